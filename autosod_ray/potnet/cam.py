"""Steps 1-2: class activation maps from the seed, and the entropy gate."""

from __future__ import annotations

from dataclasses import dataclass

from .backend import array_namespace
from .ops import EPS, entropy, l2_normalize, masked_mean, minmax


@dataclass
class CAMs:
    """Per-class activation maps and classifier weights of a batch."""

    scores: object  # B x 2 x N in [0, 1]: (S_fg, S_bg)
    weights: object  # B x 2 x D unit vectors: (w_fg, w_bg)


def class_activation_maps(features, w_fg) -> CAMs:
    """features B x N x D (unit), w_fg B x D (unit) -> CAMs for (fg, bg)."""
    xp = array_namespace(features)
    # S_fg = ReLU(cos(w_fg, f_i)), rescaled to [0, 1] per image; S_bg = 1 - S_fg
    s_fg = minmax(xp.maximum(xp.einsum("bnd,bd->bn", features, w_fg), 0.0))
    s_bg = 1.0 - s_fg
    # w_bg = mean feature weighted by S_bg
    w_bg = l2_normalize(masked_mean(features, s_bg[:, None, :])[:, 0])
    return CAMs(scores=xp.stack([s_fg, s_bg], axis=1), weights=xp.stack([w_fg, w_bg], axis=1))


@dataclass
class Gate:
    """Which patches each class clusters, and how uncertain each patch is."""

    select: object  # B x 2 x N bool: S_c > tau (at least `min_count` patches per class)
    gamma: object  # B x 2 x N in [0, 1]: entropy rescaled over the selected patches, 0 elsewhere
    entropy: object  # B x N: eta_i


def entropy_gate(scores, tau: float, min_count: int = 1) -> Gate:
    """scores B x 2 x N (S_fg, S_bg) -> the selection and gate of step 2."""
    xp = array_namespace(scores)
    # P_i = (S_fg, S_bg) / (S_fg + S_bg); eta_i = -sum_c P_ic log P_ic
    p = scores / (scores.sum(1, keepdims=True) + EPS)
    eta = entropy(p, axis=1)
    # patches whose S_c exceeds tau, plus the `min_count` strongest so no class is empty
    kth = -xp.sort(-scores, axis=-1)[..., min(min_count, scores.shape[-1]) - 1 : min_count]
    select = (scores > tau) | (scores >= kth)
    # gamma_i = (eta_i - eta_min) / (eta_max - eta_min + eps) over the selected patches
    eta_c = xp.broadcast_to(eta[:, None, :], select.shape)
    lo = xp.where(select, eta_c, xp.inf).min(-1, keepdims=True)
    hi = xp.where(select, eta_c, -xp.inf).max(-1, keepdims=True)
    gamma = xp.where(select, (eta_c - lo) / (hi - lo + EPS), 0.0).astype(scores.dtype)
    return Gate(select=select, gamma=gamma, entropy=eta)
