"""The boundary prior of classic saliency: objects seldom fill the image border.

Robust background detection (RBD, Zhu et al. 2014) measures, for each region,
how much of it lies on the image border against its size. On the patch grid:
the geodesic distance between two patches is the cheapest 4-connected path
whose steps cost the feature distance 1 - cos(f_i, f_j), so a region is the set
of patches reachable without crossing an edge in the image. Then

    Area(p)   = sum_q exp(-d(p, q)^2 / 2 sigma^2)          (soft size of p's region)
    Len(p)    = sum_{q on border} exp(-d(p, q)^2 / 2 sigma^2)  (its length on the border)
    w_bg(p)   = 1 - exp(-(Len(p) / sqrt(Area(p)))^2 / 2)    (background probability)

A background region that wraps the image has Len ~ sqrt(Area) or more and
w_bg near 1; an object touching the border along a short stretch keeps w_bg
near 0. POTNet uses w_bg where `border_prior` says (`BORDER_PRIORS`): to move
foreground prototypes that sit on border-connected regions to the background
class, or to damp the final saliency.
"""

from __future__ import annotations

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import dijkstra

from .backend import array_namespace, to_numpy


def grid_edges(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """The 4-neighbour edges (i, j) of an h x w grid, row-major indices."""
    idx = np.arange(h * w).reshape(h, w)
    i = np.concatenate([idx[:, :-1].ravel(), idx[:-1, :].ravel()])
    j = np.concatenate([idx[:, 1:].ravel(), idx[1:, :].ravel()])
    return i, j


def border_patches(h: int, w: int) -> np.ndarray:
    """Row-major indices of the patches on the grid's outer ring."""
    ring = np.zeros((h, w), bool)
    ring[[0, -1], :] = ring[:, [0, -1]] = True
    return np.flatnonzero(ring)


def geodesic_distances(features: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """N x D unit features on an h x w grid -> N x N geodesic distances (edge cost 1 - cos)."""
    h, w = grid
    i, j = grid_edges(h, w)
    # edge cost: feature distance of neighbours (a tiny floor keeps zero-cost edges in the graph)
    cost = np.maximum(1.0 - (features[i] * features[j]).sum(-1), 1e-6).astype(np.float64)
    graph = coo_matrix((cost, (i, j)), shape=(h * w, h * w)).tocsr()
    return dijkstra(graph, directed=False)


def boundary_connectivity(features, grid: tuple[int, int], sigma: float) -> np.ndarray:
    """B x N x D unit features (numpy or cupy) -> B x N background probability w_bg (host)."""
    feats = to_numpy(features).astype(np.float32)
    ring = border_patches(*grid)
    out = np.empty(feats.shape[:2], np.float32)
    for b, f in enumerate(feats):
        # soft membership of q in p's region: exp(-d_geo(p, q)^2 / 2 sigma^2)
        near = np.exp(-(geodesic_distances(f, grid) ** 2) / (2 * sigma**2))
        # BndCon(p) = Len_bnd(p) / sqrt(Area(p))
        bnd_con = near[:, ring].sum(-1) / np.sqrt(near.sum(-1))
        # w_bg(p) = 1 - exp(-BndCon^2 / 2)
        out[b] = 1.0 - np.exp(-(bnd_con**2) / 2.0)
    return out


def border_prototypes(w_bg, plan, foreground, threshold: float):
    """Foreground prototypes whose patches lie on border-connected background move to the
    background class. w_bg B x N, plan B x N x P, foreground B x P (1 = foreground) ->
    the new B x P foreground membership."""
    xp = array_namespace(plan)
    w_bg = xp.asarray(w_bg, dtype=plan.dtype)
    # each prototype's transported patches, weighted by its plan column: mean w_bg
    mass = plan.sum(1)
    on_border = (plan * w_bg[:, :, None]).sum(1) / xp.maximum(mass, 1e-12)
    moved = (foreground > 0) & (on_border > threshold)
    # never empty the foreground: keep the prototype least on the border
    all_moved = (moved | (foreground == 0)).all(-1, keepdims=True)
    least = on_border + xp.where(foreground > 0, 0.0, xp.inf)
    keep = least == least.min(-1, keepdims=True)
    moved = moved & ~(all_moved & keep)
    return xp.where(moved, 0.0, foreground).astype(plan.dtype)


def damp_saliency(saliency, w_bg):
    """Final clean-up: saliency * (1 - w_bg), border-connected regions fade."""
    xp = array_namespace(saliency)
    return saliency * (1.0 - xp.asarray(w_bg, dtype=saliency.dtype))


# where POTNet applies the prior (POTNetParams.border_prior)
BORDER_PRIORS: tuple[str, ...] = ("none", "prototypes", "saliency")
