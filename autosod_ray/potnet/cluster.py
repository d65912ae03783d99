"""Step 3: dual clustering of each class's selected patches.

Clustering engines share one interface and are looked up by name in
`CLUSTER_ENGINES`:

    engine.kmeans(x, mask, k, iters)        -> labels  G x N int (-1 where mask is False)
    engine.spectral(x, mask, k, knn, iters) -> labels  G x N int

x is G x N x D unit features (G = images x classes), mask G x N bool. `native`
is batched array code (numpy or cupy); `sklearn` and `cuml` run the library
estimators one group at a time, on the same kNN affinity for spectral.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from .backend import array_namespace, backend_for, to_numpy
from .ops import EPS, cosine, l2_normalize, masked_mean, softmax

# ---------------------------------------------------------------- shared pieces


def farthest_point_init(x, mask, k: int):
    """Deterministic k-means init: the point nearest the masked mean, then farthest points.

    x G x N x E, mask G x N bool -> G x k x E initial centroids.
    """
    xp = array_namespace(x)
    w = mask.astype(x.dtype)
    mean = masked_mean(x, w[:, None, :])  # G x 1 x E
    d_mean = ((x - mean) ** 2).sum(-1)
    first = xp.where(mask, d_mean, xp.inf).argmin(-1)
    idx = [first]
    nearest = ((x - xp.take_along_axis(x, first[:, None, None], axis=1)) ** 2).sum(-1)
    for _ in range(1, k):
        nxt = xp.where(mask, nearest, -1.0).argmax(-1)
        idx.append(nxt)
        d = ((x - xp.take_along_axis(x, nxt[:, None, None], axis=1)) ** 2).sum(-1)
        nearest = xp.minimum(nearest, d)
    idx = xp.stack(idx, axis=1)  # G x k
    return xp.take_along_axis(x, idx[:, :, None], axis=1)


def batched_kmeans(x, mask, k: int, iters: int):
    """Lloyd's k-means (squared Euclidean) over the masked points of each group.

    x G x N x E float, mask G x N bool -> labels G x N int (-1 outside mask).
    Empty clusters keep their previous centroid.
    """
    xp = array_namespace(x)
    centroids = farthest_point_init(x, mask, k)
    labels = None
    for _ in range(iters):
        # assignment: nearest centroid
        d = (x**2).sum(-1)[:, :, None] - 2 * x @ centroids.swapaxes(1, 2)
        d = d + (centroids**2).sum(-1)[:, None, :]
        new = d.argmin(-1)
        if labels is not None and bool(xp.all((new == labels) | ~mask)):
            break
        labels = new
        # update: mean of each cluster's points
        onehot = (labels[:, None, :] == xp.arange(k)[None, :, None]) & mask[:, None, :]
        counts = onehot.sum(-1, keepdims=True)
        means = (onehot.astype(x.dtype) @ x) / xp.maximum(counts, 1)
        centroids = xp.where(counts > 0, means, centroids)
    return xp.where(mask, labels, -1)


def knn_affinity(x, mask, knn: int):
    """Symmetric cosine kNN graph among the masked points.

    x G x N x D unit, mask G x N -> G x N x N, weights max(cos, 0) on kNN edges,
    zero rows and columns outside the mask.
    """
    xp = array_namespace(x)
    sim = x @ x.swapaxes(1, 2)
    both = mask[:, :, None] & mask[:, None, :]
    sim = xp.where(both, sim, -xp.inf)
    n = x.shape[1]
    diag = xp.arange(n)
    sim[:, diag, diag] = -xp.inf  # no self loops
    kk = min(knn, n - 1)
    # the k-th largest similarity per row (a partition, not a full sort: O(N^2))
    kth = -xp.partition(-sim, kk - 1, axis=-1)[..., kk - 1 : kk]
    nn = (sim >= kth) & both
    a = xp.where(nn, xp.maximum(sim, 0.0), 0.0)
    a = xp.maximum(a, a.swapaxes(1, 2))
    a[:, diag, diag] = 0.0
    return a.astype(x.dtype)


def spectral_embedding(affinity, mask, k: int):
    """Normalised-Laplacian embedding (Ng-Jordan-Weiss): G x N x N -> G x N x k unit rows."""
    xp = array_namespace(affinity)
    deg = affinity.sum(-1)
    d_isqrt = xp.where(deg > 0, 1.0 / xp.sqrt(xp.maximum(deg, EPS)), 0.0)
    # the k smallest eigenvectors of L = I - D^-1/2 A D^-1/2 are the k largest of D^-1/2 A D^-1/2
    sym = affinity * d_isqrt[:, :, None] * d_isqrt[:, None, :]
    emb = backend_for(affinity).top_eigenvectors(sym.astype(affinity.dtype), k, mask)
    return l2_normalize(emb) * mask[..., None]


# ---------------------------------------------------------------- engines


@dataclass(frozen=True)
class ClusterEngine:
    kmeans: Callable
    spectral: Callable


def _native_kmeans(x, mask, k, iters):
    return batched_kmeans(x, mask, k, iters)


def _native_spectral(x, mask, k, knn, iters):
    emb = spectral_embedding(knn_affinity(x, mask, knn), mask, k)
    return batched_kmeans(emb, mask, k, iters)


def _per_group(fit_predict):
    """Run a one-group estimator over each group's masked points; -1 outside the mask."""

    def run(x, mask, *args):
        xp = array_namespace(x)
        labels = xp.full(mask.shape, -1, dtype=xp.int64)
        for g in range(x.shape[0]):
            idx = xp.nonzero(mask[g])[0]
            labels[g, idx] = xp.asarray(fit_predict(x[g], idx, *args), dtype=xp.int64)
        return labels

    return run


def _sklearn_kmeans(xg, idx, k, iters):
    from sklearn.cluster import KMeans

    pts = to_numpy(xg[idx])
    k = min(k, len(pts))
    return KMeans(k, n_init=4, max_iter=max(iters, 10), random_state=0).fit_predict(pts)


def _sklearn_spectral(xg, idx, k, knn, iters):
    from sklearn.cluster import SpectralClustering

    pts = xg[idx][None]
    all_points = array_namespace(pts).ones(pts.shape[:2], dtype=bool)
    a = to_numpy(knn_affinity(pts, all_points, knn))[0]
    k = min(k, len(a))
    est = SpectralClustering(k, affinity="precomputed", random_state=0, assign_labels="kmeans")
    return est.fit_predict(a)


def _cuml_kmeans(xg, idx, k, iters):  # pragma: no cover - needs a GPU and cuML
    from cuml.cluster import KMeans

    return KMeans(n_clusters=k, max_iter=max(iters, 10), random_state=0).fit_predict(xg[idx])


def _cuml_spectral(xg, idx, k, knn, iters):  # pragma: no cover - needs a GPU and cuML
    from cuml.cluster import SpectralClustering

    est = SpectralClustering(n_clusters=k, n_neighbors=knn, random_state=0)
    return est.fit_predict(xg[idx])


CLUSTER_ENGINES: dict[str, ClusterEngine] = {
    "native": ClusterEngine(_native_kmeans, _native_spectral),
    "sklearn": ClusterEngine(_per_group(_sklearn_kmeans), _per_group(_sklearn_spectral)),
    "cuml": ClusterEngine(_per_group(_cuml_kmeans), _per_group(_cuml_spectral)),
}


# ---------------------------------------------------------------- soft assignments


def soft_assignment(x, labels, k: int, temperature: float):
    """Hard labels -> (soft assignment G x N x k, centroids G x k x D).

    Centroids are the unit means of each cluster; the soft assignment is a
    softmax over cosine similarity to them. Points outside (label -1) get zeros.
    """
    xp = array_namespace(x)
    onehot = (labels[:, None, :] == xp.arange(k)[None, :, None]).astype(x.dtype)
    centroids = l2_normalize(masked_mean(x, onehot))
    soft = softmax(cosine(x, centroids), axis=-1, temperature=temperature)
    return soft * (labels >= 0)[..., None], centroids


def align_clusters(reference, other):
    """Hungarian matching of `other` centroids to `reference` centroids.

    reference, other: G x k x D unit -> perm G x k int such that other[:, perm[:, j]]
    is the cluster matched to reference[:, j].
    """
    sim = to_numpy(cosine(reference, other))
    perm = np.stack([linear_sum_assignment(-s)[1] for s in sim])
    xp = array_namespace(reference)
    return xp.asarray(perm)
