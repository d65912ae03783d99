"""Step 0: the seed classifier w_fg, taken from the backbone itself (no labels).

Each seed maps B x N x D unit patch features (and the CLS attention) to a
B x D unit vector w_fg; seeds are looked up by name in `SEEDS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .backend import array_namespace, backend_for
from .ops import l2_normalize, masked_mean


@dataclass
class NcutResult:
    """Normalised-cut bipartition of each image's patch graph."""

    eigenvector: object  # B x N float, oriented so the foreground side is positive
    foreground: object  # B x N bool, the side holding the most salient entry


def ncut_bipartition(
    features, tau: float, cls_attention=None, orientation: str = "max_entry", eps: float = 1e-5
) -> NcutResult:
    """TokenCut-style normalised cut. features: B x N x D unit vectors, cls_attention B x N.

    orientation picks which side is the foreground: `max_entry` (TokenCut: the side
    holding the largest |eigenvector entry|) or `attention` (the side the CLS token
    attends to more, on average).
    """
    xp = array_namespace(features)
    # affinity graph: an edge of weight 1 where cos > tau, eps elsewhere
    w = xp.where(features @ features.swapaxes(1, 2) > tau, 1.0, eps).astype(features.dtype)
    d = w.sum(-1)
    d_isqrt = 1.0 / xp.sqrt(d)
    # (D - W) x = lambda D x  <=>  second largest eigenvector u of D^-1/2 W D^-1/2, x = D^-1/2 u
    sym = w * d_isqrt[:, :, None] * d_isqrt[:, None, :]
    u = backend_for(features).top_eigenvectors(sym, 2)[..., 1]
    vec = u * d_isqrt
    # bipartition at the mean
    side = vec > vec.mean(-1, keepdims=True)
    if orientation == "attention":
        # foreground: the side with the larger mean CLS attention
        up = side.astype(vec.dtype)
        att_up = (cls_attention * up).sum(-1) / xp.maximum(up.sum(-1), 1)
        att_down = (cls_attention * (1 - up)).sum(-1) / xp.maximum((1 - up).sum(-1), 1)
        seed_side = (att_up >= att_down)[:, None]
    else:
        # foreground: the side holding the largest |entry|
        seed = xp.abs(vec).argmax(-1)
        seed_side = xp.take_along_axis(side, seed[:, None], axis=1)
    sign = xp.where(seed_side, 1.0, -1.0).astype(vec.dtype)
    return NcutResult(eigenvector=vec * sign, foreground=side == seed_side)


def ncut_seed(features, cls_attention, *, tau: float, orientation: str) -> object:
    """w_fg = mean feature of the normalised-cut foreground side."""
    fg = ncut_bipartition(features, tau, cls_attention, orientation).foreground
    fg = fg.astype(features.dtype)
    return l2_normalize(masked_mean(features, fg[:, None, :])[:, 0])


def attention_seed(features, cls_attention, *, tau: float, orientation: str) -> object:
    """w_fg = CLS-attention-weighted mean of the patch features."""
    return l2_normalize(masked_mean(features, cls_attention[:, None, :])[:, 0])


SeedFn = Callable[..., object]
SEEDS: dict[str, SeedFn] = {"attention": attention_seed, "ncut": ncut_seed}
