"""Each POTNet step against a reference on the same input."""

import numpy as np
import pytest
from sklearn.cluster import KMeans, SpectralClustering
from sklearn.metrics import adjusted_rand_score

from autosod_ray.config import POTNetConfig
from autosod_ray.potnet.cam import class_activation_maps, entropy_gate
from autosod_ray.potnet.cluster import (
    CLUSTER_ENGINES,
    align_clusters,
    batched_kmeans,
    knn_affinity,
    soft_assignment,
    spectral_embedding,
)
from autosod_ray.potnet.core import refine_seed
from autosod_ray.potnet.mask import mask_at_size, otsu_threshold
from autosod_ray.potnet.ops import l2_normalize, masked_mean
from autosod_ray.potnet.reweight import (
    consistency_loss,
    reweighted_class_maps,
    transport_confidence,
)
from autosod_ray.potnet.seeds import ncut_bipartition
from autosod_ray.potnet.transport import nearest_prototype_plan, prototype_marginal, sinkhorn


def blobs(n_per=40, k=3, d=16, spread=0.15, seed=0):
    rng = np.random.default_rng(seed)
    centres = l2_normalize(rng.normal(size=(k, d)))
    x = np.concatenate([c + spread * rng.normal(size=(n_per, d)) for c in centres])
    truth = np.repeat(np.arange(k), n_per)
    perm = rng.permutation(len(x))
    return l2_normalize(x[perm]).astype(np.float32), truth[perm]


# ------------------------------------------------------------------ steps 1-2


def test_cams_rescale_and_background_weight():
    f = l2_normalize(np.array([[[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]]], dtype=np.float32))
    w_fg = np.array([[1.0, 0.0]], dtype=np.float32)
    cams = class_activation_maps(f, w_fg)
    np.testing.assert_allclose(cams.scores[0, 0], [1.0, 0.0, np.sqrt(0.5)], atol=1e-5)
    np.testing.assert_allclose(cams.scores[0, 1], 1 - cams.scores[0, 0], atol=1e-6)
    # w_bg is the S_bg-weighted mean: dominated by the second patch
    assert cams.weights[0, 1, 1] > cams.weights[0, 1, 0]


def test_entropy_gate_hand_checked():
    s_fg = np.array([[0.9, 0.6, 0.5, 0.1]], dtype=np.float32)
    scores = np.stack([s_fg, 1 - s_fg], axis=1)
    gate = entropy_gate(scores, tau=0.55)
    np.testing.assert_array_equal(gate.select[0, 0], [True, True, False, False])
    np.testing.assert_array_equal(gate.select[0, 1], [False, False, False, True])
    eta = -(scores * np.log(scores)).sum(1)[0]
    np.testing.assert_allclose(gate.entropy[0], eta, rtol=1e-5)
    # among fg-selected patches (0.9, 0.6) entropy goes min -> 0, max -> 1
    np.testing.assert_allclose(gate.gamma[0, 0], [0.0, 1.0, 0.0, 0.0], atol=1e-5)
    # a class with one selected patch has gamma 0 there
    np.testing.assert_allclose(gate.gamma[0, 1], [0, 0, 0, 0], atol=1e-5)


def test_entropy_gate_min_count_keeps_classes_non_empty():
    s_fg = np.array([[0.2, 0.3, 0.1, 0.25]], dtype=np.float32)
    gate = entropy_gate(np.stack([s_fg, 1 - s_fg], 1), tau=0.9, min_count=2)
    assert gate.select[0, 0].sum() == 2 and gate.select[0, 0, 1] and gate.select[0, 0, 3]


def test_prototype_means_hand_checked():
    x = np.array([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]], dtype=np.float32)
    w = np.array([[[1.0, 0.0, 1.0], [0.0, 2.0, 0.0]]], dtype=np.float32)
    np.testing.assert_allclose(masked_mean(x, w)[0], [[1.0, 0.5], [0.0, 1.0]])


# ------------------------------------------------------------------ step 3


def test_kmeans_matches_sklearn_on_blobs():
    x, truth = blobs()
    mask = np.ones((1, len(x)), bool)
    ours = batched_kmeans(x[None], mask, 3, iters=50)[0]
    ref = KMeans(3, n_init=10, random_state=0).fit_predict(x)
    assert adjusted_rand_score(ref, ours) > 0.99
    assert adjusted_rand_score(truth, ours) > 0.99


def test_kmeans_respects_mask_and_batches():
    x1, _ = blobs(seed=1)
    x2, _ = blobs(seed=2)
    mask = np.ones((2, len(x1)), bool)
    mask[1, ::3] = False
    both = batched_kmeans(np.stack([x1, x2]), mask, 3, iters=50)
    assert (both[1, ::3] == -1).all() and (both[0] >= 0).all()
    alone = batched_kmeans(x2[None], mask[1:], 3, iters=50)[0]
    np.testing.assert_array_equal(both[1], alone)


def test_spectral_matches_sklearn_on_same_affinity():
    x, truth = blobs(n_per=30, spread=0.25, seed=3)
    mask = np.ones((1, len(x)), bool)
    ours = CLUSTER_ENGINES["native"].spectral(x[None], mask, 3, 8, 50)[0]
    aff = knn_affinity(x[None], mask, 8)[0]
    ref = SpectralClustering(3, affinity="precomputed", random_state=0).fit_predict(aff)
    assert adjusted_rand_score(ref, ours) > 0.95
    assert adjusted_rand_score(truth, ours) > 0.9  # overlapping blobs: a few points are ambiguous


def test_affinity_is_symmetric_knn_and_masked():
    x, _ = blobs(n_per=10)
    mask = np.ones((1, len(x)), bool)
    mask[0, :5] = False
    a = knn_affinity(x[None], mask, 4)[0]
    np.testing.assert_array_equal(a, a.T)
    assert (a[:5] == 0).all() and (a[:, :5] == 0).all() and (np.diag(a) == 0).all()
    assert ((a[5:] > 0).sum(1) >= 4).all()
    emb = spectral_embedding(a[None], mask, 3)[0]
    assert (emb[:5] == 0).all()
    np.testing.assert_allclose(np.linalg.norm(emb[5:], axis=1), 1.0, atol=1e-4)


@pytest.mark.parametrize("engine", ["native", "sklearn"])
def test_engines_agree_on_blobs(engine):
    x, truth = blobs(seed=4)
    mask = np.ones((1, len(x)), bool)
    e = CLUSTER_ENGINES[engine]
    assert adjusted_rand_score(truth, e.kmeans(x[None], mask, 3, 30)[0]) > 0.99
    assert adjusted_rand_score(truth, e.spectral(x[None], mask, 3, 8, 30)[0]) > 0.99


def test_soft_assignment_and_alignment_undo_a_permutation():
    x, truth = blobs(seed=5)
    perm = np.array([2, 0, 1])
    soft_a, cent_a = soft_assignment(x[None], truth[None], 3, 0.1)
    soft_b, cent_b = soft_assignment(x[None], perm[truth][None], 3, 0.1)
    np.testing.assert_allclose(soft_a.sum(-1), 1.0, atol=1e-5)
    match = align_clusters(cent_a, cent_b)
    np.testing.assert_array_equal(match[0], perm)
    aligned = np.take_along_axis(soft_b, match[:, None, :], axis=2)
    np.testing.assert_allclose(aligned, soft_a, atol=1e-6)


# ------------------------------------------------------------------ steps 4-6


def sinkhorn_reference(sim, col, eps, iters=5000):
    """Plain float64 Sinkhorn-Knopp in the probability domain."""
    n = sim.shape[0]
    k = np.exp((sim.astype(np.float64) - 1.0) / eps)
    a, b = np.full(n, 1.0 / n), col.astype(np.float64)
    u, v = np.ones(n), np.ones(len(b))
    for _ in range(iters):
        u = a / (k @ v)
        v = b / (k.T @ u)
    return u[:, None] * k * v[None]


def test_sinkhorn_meets_marginals_and_matches_float64_reference():
    rng = np.random.default_rng(0)
    f = l2_normalize(rng.normal(size=(3, 50, 8)).astype(np.float32))
    z = l2_normalize(rng.normal(size=(3, 6, 8)).astype(np.float32))
    sim = f @ z.transpose(0, 2, 1)
    col = rng.dirichlet(np.ones(6), size=3).astype(np.float32)
    out = sinkhorn(sim, col, epsilon=0.1, max_iters=2000, tol=1e-6)
    assert out.iterations < 2000 and (out.marginal_error < 1e-6).all()
    np.testing.assert_allclose(out.plan.sum(2), 1 / 50, atol=1e-6)
    np.testing.assert_allclose(out.plan.sum(1), col, atol=1e-5)
    for b in range(3):
        np.testing.assert_allclose(
            out.plan[b], sinkhorn_reference(sim[b], col[b], 0.1), rtol=1e-3, atol=1e-7
        )


def test_sinkhorn_is_stable_at_small_epsilon():
    rng = np.random.default_rng(1)
    sim = rng.uniform(-1, 1, size=(1, 40, 4)).astype(np.float32)
    out = sinkhorn(sim, np.full((1, 4), 0.25, np.float32), epsilon=0.005, max_iters=500, tol=1e-4)
    assert np.isfinite(out.plan).all()
    np.testing.assert_allclose(out.plan.sum(1), 0.25, atol=1e-3)


def test_prototype_marginal_prefers_prototypes_like_their_class_weight():
    w = np.array([[[1.0, 0.0], [0.0, 1.0]]], dtype=np.float32)
    z = l2_normalize(np.array([[[1, 0], [1, 1], [0, 1], [1, 0]]], dtype=np.float32))
    v = prototype_marginal(z, w, k=2, temperature=0.5)
    np.testing.assert_allclose(v.sum(), 1.0, rtol=1e-6)
    assert v[0, 0] > v[0, 1] and v[0, 2] > v[0, 3]


def test_reweighting_hand_checked():
    f = np.array([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]], dtype=np.float32)
    z = np.array([[[1.0, 0.0], [0.0, 1.0]]], dtype=np.float32)  # one prototype per class
    plan = np.array([[[0.3, 0.03], [0.03, 0.3], [0.3, 0.04]]], dtype=np.float32)
    maps = reweighted_class_maps(f, z, plan, k=1, temperature=0.5)
    mass = plan[0].sum(0)
    np.testing.assert_allclose(maps.mass[0], mass, rtol=1e-6)
    # A_fg(i) = gamma_fg exp(cos(z_fg, f_i) / t); saliency = A_fg / (A_fg + A_bg)
    a_fg = mass[0] * np.exp(np.array([1.0, 0.0, 1.0]) / 0.5)
    a_bg = mass[1] * np.exp(np.array([0.0, 1.0, 0.0]) / 0.5)
    np.testing.assert_allclose(maps.saliency[0], a_fg / (a_fg + a_bg), rtol=1e-5)
    flat = reweighted_class_maps(f, z, plan, k=1, temperature=0.5, reweight=False)
    np.testing.assert_allclose(flat.saliency[0, 0], np.e**2 / (np.e**2 + 1), rtol=1e-5)
    omega = transport_confidence(plan)
    assert omega.shape == (1, 3) and (omega > 0).all() and (omega < 1).all()
    uniform = np.full((1, 3, 2), 1 / 6, np.float32)
    np.testing.assert_allclose(transport_confidence(uniform), 0.0, atol=1e-6)
    loss = consistency_loss(np.array([[1.0, 0.0]]), np.array([[0.5, 0.5]]), np.array([[1.0, 0.0]]))
    np.testing.assert_allclose(loss, [0.25])


def test_class_prior_marginal_gives_each_class_its_share():
    w = np.array([[[1.0, 0.0], [0.0, 1.0]]], dtype=np.float32)
    z = l2_normalize(np.array([[[1, 0], [1, 1], [0, 1], [1, 0]]], dtype=np.float32))
    v = prototype_marginal(z, w, k=2, temperature=0.5, class_prior=np.array([[0.2, 0.8]]))
    np.testing.assert_allclose(v[0, :2].sum(), 0.2, rtol=1e-6)
    np.testing.assert_allclose(v[0, 2:].sum(), 0.8, rtol=1e-6)


def test_nearest_prototype_plan_assigns_to_most_similar():
    sim = np.array([[[0.9, 0.1], [0.2, 0.8]]], dtype=np.float32)
    plan = nearest_prototype_plan(sim, 0.05).plan
    np.testing.assert_array_equal(plan.argmax(-1), [[0, 1]])
    np.testing.assert_allclose(plan.sum(-1), 0.5, rtol=1e-6)


def test_refinement_lowers_the_consistency_objective():
    from tests.conftest import blob_features

    x, _, fg = blob_features(b=2, noise=0.9)
    target = np.broadcast_to(fg.astype(np.float32), (2, fg.size)).copy()
    omega = np.ones_like(target)
    w0 = l2_normalize(x.mean(1))

    def objective(w):
        cams = class_activation_maps(x, w)
        return consistency_loss(target, cams.scores[:, 0], omega).sum()

    w1 = refine_seed(x, w0, target, omega, POTNetConfig(refine_steps=10, refine_lr=0.5))
    assert objective(w1) < objective(w0)


# ------------------------------------------------------------------ step 7


def test_otsu_matches_skimage():
    from skimage.filters import threshold_otsu

    rng = np.random.default_rng(0)
    for _ in range(5):
        v = np.concatenate([rng.normal(0.2, 0.05, 500), rng.normal(0.7, 0.1, 300)])
        assert otsu_threshold(v) == pytest.approx(threshold_otsu(v, nbins=256), abs=1e-9)


def test_mask_at_size_is_image_sized():
    sal = np.zeros((4, 4), np.float32)
    sal[1:3, 1:3] = 1.0
    soft, binary = mask_at_size(sal, 37, 53)
    assert soft.shape == binary.shape == (37, 53) and soft.dtype == np.uint8
    assert binary[18, 26] and not binary[0, 0]


# ------------------------------------------------------------------ step 0


def test_ncut_orientations_pick_the_attended_side():
    from tests.conftest import blob_features

    x, attn, fg = blob_features(b=2, noise=0.5)
    for orientation in ("attention", "max_entry"):
        cut = ncut_bipartition(x, 0.2, attn, orientation)
        agree = (cut.foreground == fg[None]).mean(-1)
        assert (agree > 0.95).all(), orientation
        # the eigenvector is oriented so that the foreground side is positive
        for vec, side in zip(cut.eigenvector, cut.foreground, strict=True):
            assert vec[side].min() > vec[~side].max()
    # inverting the attention inverts the attention orientation only
    flipped = ncut_bipartition(x, 0.2, 1.0 - attn, "attention").foreground
    assert ((flipped == ~fg[None]).mean(-1) > 0.95).all()


def test_lanczos_path_finds_the_same_eigenvectors_as_lapack():
    """Above LANCZOS_MIN_N rows the numpy backend switches to ARPACK: same subspace."""
    import scipy.linalg

    from autosod_ray.potnet.backend import ARRAY_BACKENDS, LANCZOS_MIN_N

    rng = np.random.default_rng(0)
    n = LANCZOS_MIN_N + 100
    centres = rng.standard_normal((3, 32))
    x = centres[rng.integers(0, 3, n)] + 0.5 * rng.standard_normal((n, 32))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    w = np.where(x @ x.T > 0.2, 1.0, 1e-5)
    d = 1 / np.sqrt(w.sum(1))
    sym = (w * d[:, None] * d[None]).astype(np.float32)
    got = ARRAY_BACKENDS["numpy"].top_eigenvectors(sym[None], 2)[0]
    _, want = scipy.linalg.eigh(sym.astype(np.float64), subset_by_index=[n - 2, n - 1])
    for j in range(2):
        assert abs(got[:, j] @ want[:, 1 - j]) > 0.999
    again = ARRAY_BACKENDS["numpy"].top_eigenvectors(sym[None], 2)[0]
    assert np.array_equal(got, again)  # deterministic start vector
