"""Step 3: dual clustering of each class's selected patches, and their fusion.

Both clusterings produce a *soft assignment in the space they cluster in*:
k-means in feature space, spectral clustering in the eigen-embedding of the
patch graph (so the graph cut survives into the fusion). Spectral clusters are
then matched to the k-means clusters (Hungarian) and the two are fused.

Clustering engines share one interface and are looked up in `CLUSTER_ENGINES`:

    engine.kmeans(points, mask, k, iters) -> labels     G x N int (-1 where mask is False)
    engine.embedding(affinity, mask, k)   -> embedding  G x N x k (unit rows, 0 off mask)

points is G x N x E (G = images x classes), mask G x N bool, affinity the
G x N x N cosine kNN graph (`knn_affinity`, shared by every engine). `native`
is batched array code (numpy or cupy); `sklearn` and `cuml` call the library
estimators (`KMeans`, `spectral_embedding`, same API in both) one group at a
time through the same wrapper, so the CPU tests of `sklearn` run the code that
`cuml` runs on a GPU.

How the selected patches become soft assignments (`CLUSTERINGS`: dual, kmeans,
spectral) and how two assignments are fused (`FUSIONS`: smooth, hard) are
registries too.
"""

from __future__ import annotations

import functools
import warnings
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
    x_sq = (x**2).sum(-1)

    def sq_dist(c):  # G x N squared distances to one point per group (G x 1 x E)
        return x_sq - 2 * (x @ c.swapaxes(1, 2))[..., 0] + (c**2).sum(-1)

    mean = masked_mean(x, w[:, None, :])  # G x 1 x E
    first = xp.where(mask, sq_dist(mean), xp.inf).argmin(-1)
    idx = [first]
    nearest = sq_dist(xp.take_along_axis(x, first[:, None, None], axis=1))
    for _ in range(1, k):
        nxt = xp.where(mask, nearest, -1.0).argmax(-1)
        idx.append(nxt)
        nearest = xp.minimum(nearest, sq_dist(xp.take_along_axis(x, nxt[:, None, None], axis=1)))
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
    x_sq = (x**2).sum(-1)[:, :, None]
    for _ in range(iters):
        # assignment: nearest centroid, |x - c|^2 = |x|^2 - 2 x.c + |c|^2
        d = x_sq - 2 * x @ centroids.swapaxes(1, 2)
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
    kmeans: Callable  # (points G x N x E, mask, k, iters) -> labels G x N
    embedding: Callable  # (affinity G x N x N, mask, k) -> G x N x k unit rows


def _groups(mask):
    """(g, indices of group g's masked points) for every group with any."""
    xp = array_namespace(mask)
    for g in range(mask.shape[0]):
        idx = xp.nonzero(mask[g])[0]
        if len(idx):
            yield g, idx


def _labels_per_group(fit):
    """`fit(points n x E, k, iters) -> n labels`, run on each group's masked points."""

    def run(x, mask, k, iters):
        xp = array_namespace(x)
        labels = xp.full(mask.shape, -1, dtype=xp.int64)
        for g, idx in _groups(mask):
            labels[g, idx] = xp.asarray(fit(x[g][idx], min(k, len(idx)), iters), dtype=xp.int64)
        return labels

    return run


def _embedding_per_group(fit):
    """`fit(affinity n x n, k) -> n x k`, run on each group's masked sub-graph."""

    def run(affinity, mask, k):
        xp = array_namespace(affinity)
        emb = xp.zeros(mask.shape + (k,), dtype=affinity.dtype)
        for g, idx in _groups(mask):
            kk = min(k, len(idx))
            emb[g, idx, :kk] = xp.asarray(fit(affinity[g][idx][:, idx], kk), dtype=emb.dtype)
        return emb

    return run


def library_engine(kmeans_cls, embed_fn) -> ClusterEngine:
    """An engine from a library with scikit-learn's `KMeans` and `spectral_embedding` API:
    scikit-learn on numpy, cuML on cupy (same calls, same arguments)."""

    def kmeans(points, k, iters):
        est = kmeans_cls(n_clusters=k, n_init=4, max_iter=max(iters, 10), random_state=0)
        return est.fit_predict(points)

    def embedding(affinity, k):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "graph is not fully connected"
            emb = embed_fn(affinity, n_components=k, drop_first=False, random_state=0)
        xp = array_namespace(affinity)
        return l2_normalize(xp.asarray(emb, dtype=affinity.dtype))  # unit rows, as NJW

    return ClusterEngine(_labels_per_group(kmeans), _embedding_per_group(embedding))


def native_engine() -> ClusterEngine:
    """Batched array code on the input's own namespace (numpy or cupy)."""
    return ClusterEngine(kmeans=batched_kmeans, embedding=spectral_embedding)


def sklearn_engine() -> ClusterEngine:
    """scikit-learn's KMeans and spectral_embedding, one group at a time (CPU)."""
    from sklearn.cluster import KMeans
    from sklearn.manifold import spectral_embedding

    return library_engine(KMeans, spectral_embedding)


def cuml_engine() -> ClusterEngine:  # pragma: no cover - needs a GPU and cuML
    """cuML's KMeans and spectral_embedding on cupy arrays: the same wrapper as sklearn."""
    from cuml.cluster import KMeans
    from cuml.manifold import spectral_embedding

    return library_engine(KMeans, functools.partial(spectral_embedding, affinity="precomputed"))


# name -> builder, called once per POTNet
CLUSTER_ENGINES: dict[str, Callable[[], ClusterEngine]] = {
    "native": native_engine,
    "sklearn": sklearn_engine,
    "cuml": cuml_engine,
}


# ---------------------------------------------------------------- soft assignments


def soft_assignment(points, labels, k: int, temperature: float):
    """Hard labels in some space -> soft assignment G x N x k in that same space.

    points G x N x E (features for k-means, the eigen-embedding for spectral
    clustering). Centres are each cluster's mean point; C_ik = softmax_k of
    -|p_i - c_k|^2 / (2 t) (for unit points and unit centres this is softmax of
    cos / t). Points outside (label -1) get zeros.
    """
    xp = array_namespace(points)
    onehot = (labels[:, None, :] == xp.arange(k)[None, :, None]).astype(points.dtype)
    centres = masked_mean(points, onehot)  # G x k x E
    sq = (points**2).sum(-1)[:, :, None] - 2 * points @ centres.swapaxes(1, 2)
    sq = sq + (centres**2).sum(-1)[:, None, :]
    soft = softmax(-sq / 2.0, axis=-1, temperature=temperature)
    return soft * (labels >= 0)[..., None]


def cluster_means(x, labels, k: int):
    """Unit mean feature of each cluster: x G x N x D, labels G x N -> G x k x D."""
    xp = array_namespace(x)
    onehot = (labels[:, None, :] == xp.arange(k)[None, :, None]).astype(x.dtype)
    return l2_normalize(masked_mean(x, onehot))


def align_clusters(reference, other):
    """Hungarian matching of `other` centroids to `reference` centroids.

    reference, other: G x k x D unit -> perm G x k int such that other[:, perm[:, j]]
    is the cluster matched to reference[:, j].
    """
    sim = to_numpy(cosine(reference, other))
    perm = np.stack([linear_sum_assignment(-s)[1] for s in sim])
    xp = array_namespace(reference)
    return xp.asarray(perm)


@dataclass
class SoftClusters:
    """One clustering of the selected patches."""

    labels: object  # G x N int, -1 off mask
    soft: object  # G x N x k, the soft assignment in the clustering's own space


def kmeans_clusters(x, mask, k: int, p, engine) -> SoftClusters:
    """k-means on the features; C_km = softmax over closeness to the centroids."""
    labels = engine.kmeans(x, mask, k, p.kmeans_iters)
    return SoftClusters(labels, soft_assignment(x, labels, k, p.assign_temperature))


def spectral_clusters(x, mask, k: int, p, engine) -> SoftClusters:
    """Spectral clustering (cosine kNN graph, normalised Laplacian, k-means in its
    eigen-embedding); C_spc = softmax over closeness to the centres *in the embedding*."""
    emb = engine.embedding(knn_affinity(x, mask, p.spectral_knn), mask, k)
    labels = engine.kmeans(emb, mask, k, p.kmeans_iters)
    return SoftClusters(labels, soft_assignment(emb, labels, k, p.assign_temperature))


# ---------------------------------------------------------------- fusion


def smooth_fusion(c_sp, c_km, gamma, p):
    # M = gamma C_spc + (1 - gamma) C_km (the paper's default)
    return gamma * c_sp + (1.0 - gamma) * c_km


def hard_fusion(c_sp, c_km, gamma, p):
    # spectral where the (rescaled) entropy reaches eta_th, k-means elsewhere
    return array_namespace(c_sp).where(gamma >= p.eta_threshold, c_sp, c_km)


FUSIONS: dict[str, Callable] = {"smooth": smooth_fusion, "hard": hard_fusion}


def dual_assignment(x, mask, gamma, k: int, p, engine):
    """Both clusterings, spectral aligned to k-means (Hungarian on the clusters' mean
    features), fused by `p.fusion` -> M, G x N x k."""
    xp = array_namespace(x)
    km = kmeans_clusters(x, mask, k, p, engine)
    sp = spectral_clusters(x, mask, k, p, engine)
    # the two label sets are arbitrary permutations of each other: match them first
    perm = align_clusters(cluster_means(x, km.labels, k), cluster_means(x, sp.labels, k))
    c_sp = xp.take_along_axis(sp.soft, perm[:, None, :], axis=2)
    return FUSIONS[p.fusion](c_sp, km.soft, gamma, p)


def kmeans_assignment(x, mask, gamma, k: int, p, engine):
    """Ablation: k-means alone."""
    return kmeans_clusters(x, mask, k, p, engine).soft


def spectral_assignment(x, mask, gamma, k: int, p, engine):
    """Ablation: spectral clustering alone."""
    return spectral_clusters(x, mask, k, p, engine).soft


CLUSTERINGS: dict[str, Callable] = {
    "dual": dual_assignment,
    "kmeans": kmeans_assignment,
    "spectral": spectral_assignment,
}
