"""Steps 5-6: prototype update, OT re-weighting, confidence-weighted consistency."""

from __future__ import annotations

from dataclasses import dataclass

from .backend import array_namespace
from .ops import cosine, entropy, l2_normalize, masked_mean, softmax


@dataclass
class ClassMaps:
    saliency: object  # B x N: foreground share of the re-weighted prototype maps
    prototypes: object  # B x P x D: z'_ck
    mass: object  # B x P: gamma_ck, the OT mass of each prototype
    weight: object  # B x P: what weighted the maps (gamma, or uniform without re-weighting)


def reweighted_class_maps(
    features, prototypes, plan, k: int, temperature: float, reweight: bool = True,
    foreground=None,
) -> ClassMaps:  # fmt: skip
    """features B x N x D, prototypes B x P x D, plan B x N x P -> foreground map B x N.

    P = C * k prototypes, class-major (foreground first). Class map
    A_c(i) = sum_k gamma_ck exp(cos(z'_ck, f_i) / t); saliency = A_fg / sum_c A_c.
    `foreground` (B x P, 1 = foreground) overrides which prototypes make A_fg (the
    border prior moves some to the background); default: the first k.
    """
    xp = array_namespace(features)
    b, n, p = plan.shape
    # hard assignment j*(i) = argmax_j T_ij; z'_j = mean of the features assigned to j
    assigned = (plan.argmax(-1)[:, None, :] == xp.arange(p)[None, :, None]).astype(features.dtype)
    updated = l2_normalize(masked_mean(features, assigned))
    has_members = assigned.sum(-1, keepdims=True) > 0
    updated = xp.where(has_members, updated, prototypes)  # an empty prototype keeps Z_j
    # OT mass gamma_j = sum_i T_ij (rows of T sum to 1/N, so the masses sum to 1)
    mass = plan.sum(1)
    weight = mass if reweight else xp.full_like(mass, 1.0 / p)
    # prototype CAM cos(z'_j, f_i), weighted by gamma_j and summed over each class's k
    logits = cosine(features, updated) / temperature + xp.log(xp.maximum(weight, 1e-12))[:, None]
    share = softmax(logits, axis=-1)  # B x N x P, sums to 1 over all prototypes
    fg = share[:, :, :k].sum(-1) if foreground is None else (share * foreground[:, None]).sum(-1)
    return ClassMaps(fg, prototypes=updated, mass=mass, weight=weight)


def transport_confidence(plan):
    """omega_i = 1 - H(T_i / sum T_i) / log P, in [0, 1]."""
    xp = array_namespace(plan)
    rows = plan / plan.sum(-1, keepdims=True)
    return 1.0 - entropy(rows, axis=-1) / xp.log(plan.shape[-1])


def consistency_loss(saliency, cam, confidence):
    """L_con = mean_i omega_i * |class map_i - CAM_i|, per image (B x N each -> B)."""
    xp = array_namespace(saliency)
    return (confidence * xp.abs(saliency - cam)).mean(-1)
