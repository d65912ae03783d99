"""Each POTNet step against a reference on the same input."""

import importlib.util

import numpy as np
import pytest
from sklearn.cluster import KMeans, SpectralClustering
from sklearn.metrics import adjusted_rand_score

from autosod_ray.potnet.cam import class_activation_maps, entropy_gate
from autosod_ray.potnet.cluster import (
    CLUSTER_ENGINES,
    align_clusters,
    batched_kmeans,
    cluster_means,
    knn_affinity,
    soft_assignment,
    spectral_clusters,
    spectral_embedding,
)
from autosod_ray.potnet.mask import mask_at_size, otsu_threshold
from autosod_ray.potnet.ops import l2_normalize, masked_mean
from autosod_ray.potnet.params import POTNetParams
from autosod_ray.potnet.refine import refine_by_consistency, torch_cam
from autosod_ray.potnet.reweight import (
    consistency_loss,
    reweighted_class_maps,
    transport_confidence,
)
from autosod_ray.potnet.seeds import ncut_bipartition
from autosod_ray.potnet.transport import (
    MARGINALS,
    class_prior_marginal,
    nearest_prototype_plan,
    sinkhorn,
    softmax_marginal,
)


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
    p = POTNetParams(spectral_knn=8, kmeans_iters=50)
    ours = spectral_clusters(x[None], mask, 3, p, CLUSTER_ENGINES["native"]()).labels[0]
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


ENGINES = ["native", "sklearn"] + (["cuml"] if importlib.util.find_spec("cuml") else [])


@pytest.mark.parametrize("engine", ENGINES)
def test_engines_agree_on_blobs(engine):
    x, truth = blobs(seed=4)
    mask = np.ones((1, len(x)), bool)
    e = CLUSTER_ENGINES[engine]()
    if engine == "cuml":  # pragma: no cover - GPU machines only
        import cupy

        x, mask = cupy.asarray(x), cupy.asarray(mask)
    p = POTNetParams(spectral_knn=8, kmeans_iters=30)
    km = np.asarray(e.kmeans(x[None], mask, 3, 30)[0].tolist())
    sp = np.asarray(spectral_clusters(x[None], mask, 3, p, e).labels[0].tolist())
    assert adjusted_rand_score(truth, km) > 0.99
    assert adjusted_rand_score(truth, sp) > 0.99


def lifted(xy: np.ndarray, scale: float = 0.15) -> np.ndarray:
    """2-d points onto the unit sphere near a pole: cosine kNN sees their planar geometry."""
    p = np.concatenate([xy * scale, np.ones((len(xy), 1))], axis=1)
    return l2_normalize(p).astype(np.float32)


def two_moons_and_circles():
    from sklearn.datasets import make_circles, make_moons

    yield "moons", make_moons(300, noise=0.05, random_state=0)
    yield "circles", make_circles(300, factor=0.5, noise=0.04, random_state=0)


@pytest.mark.parametrize("engine", ENGINES)
def test_spectral_soft_assignment_lives_in_the_embedding(engine):
    """argmax C_spc must be the spectral labels, also where k-means in feature space
    (and so any soft nearest-centroid over feature means) cannot follow them."""
    e = CLUSTER_ENGINES[engine]()
    p = POTNetParams(spectral_knn=10, kmeans_iters=50)
    for name, (xy, truth) in two_moons_and_circles():
        x, mask = lifted(xy)[None], np.ones((1, len(xy)), bool)
        if engine == "cuml":  # pragma: no cover - GPU machines only
            import cupy

            x, mask = cupy.asarray(x), cupy.asarray(mask)
        sp = spectral_clusters(x, mask, 2, p, e)
        labels = np.asarray(sp.labels[0].tolist())
        argmax = np.asarray(sp.soft[0].argmax(-1).tolist())
        assert adjusted_rand_score(labels, argmax) >= 0.95, name
        assert adjusted_rand_score(truth, labels) >= 0.95, name  # the graph cut works
        # a soft nearest-centroid of the spectral clusters' feature means loses them
        centroid = soft_assignment(x, sp.labels, 2, p.assign_temperature)
        lost = adjusted_rand_score(labels, np.asarray(centroid[0].argmax(-1).tolist()))
        assert lost < 0.5, (name, lost)


def test_sklearn_engine_is_sklearn_spectral_clustering():
    """Same affinity, scikit-learn's own SpectralClustering: the same partition."""
    x, _ = blobs(n_per=30, spread=0.3, seed=7)
    mask = np.ones((1, len(x)), bool)
    p = POTNetParams(spectral_knn=8, kmeans_iters=50)
    ours = spectral_clusters(x[None], mask, 3, p, CLUSTER_ENGINES["sklearn"]()).labels[0]
    aff = knn_affinity(x[None], mask, 8)[0]
    ref = SpectralClustering(3, affinity="precomputed", random_state=0).fit_predict(aff)
    assert adjusted_rand_score(ref, ours) > 0.95


def test_library_engines_respect_the_mask_per_group():
    """The wrapper that runs sklearn here runs cuML on a GPU: masks and groups."""
    x1, t1 = blobs(seed=8)
    x2, _ = blobs(seed=9)
    mask = np.ones((2, len(x1)), bool)
    mask[1, ::2] = False
    e = CLUSTER_ENGINES["sklearn"]()
    labels = e.kmeans(np.stack([x1, x2]), mask, 3, 30)
    assert (labels[1, ::2] == -1).all() and (labels[0] >= 0).all()
    assert adjusted_rand_score(t1, labels[0]) > 0.99
    aff = knn_affinity(np.stack([x1, x2]), mask, 8)
    emb = e.embedding(aff, mask, 3)
    assert (emb[1, ::2] == 0).all()
    np.testing.assert_allclose(np.linalg.norm(emb[1, 1::2], axis=-1), 1.0, atol=1e-4)


def test_soft_assignment_and_alignment_undo_a_permutation():
    x, truth = blobs(seed=5)
    perm = np.array([2, 0, 1])
    soft_a = soft_assignment(x[None], truth[None], 3, 0.1)
    soft_b = soft_assignment(x[None], perm[truth][None], 3, 0.1)
    np.testing.assert_allclose(soft_a.sum(-1), 1.0, atol=1e-5)
    match = align_clusters(
        cluster_means(x[None], truth[None], 3), cluster_means(x[None], perm[truth][None], 3)
    )
    np.testing.assert_array_equal(match[0], perm)
    aligned = np.take_along_axis(soft_b, match[:, None, :], axis=2)
    np.testing.assert_allclose(aligned, soft_a, atol=1e-6)
    # off-mask points get no assignment
    labels = truth.copy()[None]
    labels[0, :5] = -1
    assert (soft_assignment(x[None], labels, 3, 0.1)[0, :5] == 0).all()


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
    assert (out.iterations < 2000).all() and (out.marginal_error < 1e-6).all()
    assert out.converged.all() and out.iterations.shape == (3,)
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


def test_sinkhorn_reports_each_images_own_convergence():
    """Sinkhorn contracts fast where every cost is alike and slowly where costs spread
    far beyond epsilon: in one batch, each image reports its own iterations and error."""
    rng = np.random.default_rng(2)
    f = rng.normal(size=(2, 60, 8)).astype(np.float32)
    z = rng.normal(size=(2, 4, 8)).astype(np.float32)
    f[0], z[0] = f[0, :1] + 0.02 * f[0], f[0, :1] + 0.02 * z[0]  # image 0: costs nearly equal
    f, z = l2_normalize(f), l2_normalize(z)
    col = np.array([[0.25, 0.25, 0.25, 0.25], [0.01, 0.69, 0.15, 0.15]], np.float32)
    out = sinkhorn(f @ z.transpose(0, 2, 1), col, epsilon=0.01, max_iters=100, tol=1e-6)
    assert out.converged.tolist() == [True, False]
    assert out.iterations[0] < 100 and out.iterations[1] == 100
    assert out.marginal_error[1] >= 1e-6 > out.marginal_error[0]


def test_softmax_marginal_prefers_prototypes_like_their_class_weight():
    w = np.array([[[1.0, 0.0], [0.0, 1.0]]], dtype=np.float32)
    z = l2_normalize(np.array([[[1, 0], [1, 1], [0, 1], [1, 0]]], dtype=np.float32))
    select = np.ones((1, 2, 5), bool)
    v = softmax_marginal(z, w, select, k=2, temperature=0.5)
    np.testing.assert_allclose(v.sum(), 1.0, rtol=1e-6)
    assert v[0, 0] > v[0, 1] and v[0, 2] > v[0, 3]
    # t = 1 is the paper's plain softmax over all (c, k) of cos(Z_ck, w_c)
    logits = np.array([1.0, np.sqrt(0.5), 1.0, 0.0])
    np.testing.assert_allclose(
        softmax_marginal(z, w, select, 2, 1.0)[0], np.exp(logits) / np.exp(logits).sum(), rtol=1e-5
    )
    assert set(MARGINALS) == {"class_prior", "softmax"}


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
    select = np.zeros((1, 2, 10), bool)
    select[0, 0, :2] = True  # the foreground CAM selected 2 patches, the background 8
    select[0, 1, 2:] = True
    v = class_prior_marginal(z, w, select, k=2, temperature=0.5)
    np.testing.assert_allclose(v[0, :2].sum(), 0.2, rtol=1e-6)
    np.testing.assert_allclose(v[0, 2:].sum(), 0.8, rtol=1e-6)


def test_nearest_prototype_plan_assigns_to_most_similar():
    sim = np.array([[[0.9, 0.1], [0.2, 0.8]]], dtype=np.float32)
    plan = nearest_prototype_plan(sim, 0.05).plan
    np.testing.assert_array_equal(plan.argmax(-1), [[0, 1]])
    np.testing.assert_allclose(plan.sum(-1), 0.5, rtol=1e-6)


def _refinement_inputs(b=2, seed=0):
    from tests.conftest import blob_features

    x, _, fg = blob_features(b=b, noise=0.9, seed=seed)
    w0 = l2_normalize(x.mean(1))
    fg_mean = l2_normalize((x * fg[None, :, None]).sum(1))
    bg_mean = l2_normalize((x * ~fg[None, :, None]).sum(1))
    z = np.stack([fg_mean, bg_mean], axis=1).astype(np.float32)  # k = 1 per class
    mass = np.full((b, 2), 0.5, np.float32)
    omega = np.random.default_rng(seed).uniform(0.2, 1.0, size=(b, x.shape[1])).astype(np.float32)
    return x, w0, z, mass, omega


def test_torch_twins_equal_the_numpy_steps():
    """Zero refinement steps reproduce the numpy steps 1 and 5 exactly: refinement starts
    from the maps POTNet computed, whatever prototypes count as foreground."""
    import torch

    x, w0, z, _, omega = _refinement_inputs()
    rng = np.random.default_rng(3)
    plan = rng.uniform(0.0, 1.0, size=(2, x.shape[1], 2)).astype(np.float32)
    plan /= plan.sum((1, 2), keepdims=True)
    for foreground in (None, np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)):
        maps = reweighted_class_maps(x, z, plan, 1, 0.1, foreground=foreground)  # numpy step 5
        out = refine_by_consistency(
            x, w0, maps.prototypes, maps.weight, omega, 1, steps=0, lr=0.1, temperature=0.1,
            foreground=foreground,
        )  # fmt: skip
        np.testing.assert_allclose(out.saliency, maps.saliency, atol=1e-5)
        np.testing.assert_allclose(out.cam, class_activation_maps(x, w0).scores[:, 0], atol=1e-5)
        np.testing.assert_allclose(
            out.loss, consistency_loss(maps.saliency, out.cam, omega), rtol=1e-4, atol=1e-6
        )
    # the second image's foreground is the second prototype: its map is the first's complement
    flipped = reweighted_class_maps(x, z, plan, 1, 0.1, foreground=np.eye(2, dtype=np.float32))
    plain = reweighted_class_maps(x, z, plan, 1, 0.1)
    np.testing.assert_allclose(flipped.saliency[1], 1 - plain.saliency[1], atol=1e-6)
    np.testing.assert_allclose(flipped.saliency[0], plain.saliency[0], atol=1e-6)
    f = torch.from_numpy(x)
    np.testing.assert_allclose(torch_cam(f, torch.from_numpy(w0)).numpy(), out.cam, atol=1e-6)


def test_refinement_lowers_l_con_and_moves_both_maps():
    x, w0, z, mass, omega = _refinement_inputs(b=3, seed=1)
    before = refine_by_consistency(x, w0, z, mass, omega, 1, steps=0, lr=0.5, temperature=0.1)
    after = refine_by_consistency(x, w0, z, mass, omega, 1, steps=5, lr=0.5, temperature=0.1)
    assert (after.loss < before.loss).all()
    assert np.abs(after.saliency - before.saliency).max() > 1e-3  # the prototype CAMs moved
    assert np.abs(after.cam - before.cam).max() > 1e-3  # and so did the classifier's
    # batched: each image refines exactly as it would alone
    one = refine_by_consistency(x[1:2], w0[1:2], z[1:2], mass[1:2], omega[1:2], 1, 5, 0.5, 0.1)
    np.testing.assert_allclose(one.saliency[0], after.saliency[1], atol=1e-5)


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


def test_transport_summary_and_its_warning():
    import pyarrow as pa

    from autosod_ray.pseudolabel import (
        NOT_CONVERGED_WARNING,
        transport_lines,
        transport_summary,
        transport_warnings,
    )

    n = 200
    iterations = np.full(n, 40, np.int32)
    error = np.full(n, 1e-5, np.float32)
    iterations[:3], error[:3] = 1000, 3e-3  # 1.5% did not converge
    masks = pa.table({"ot_iterations": iterations, "ot_marginal_error": error})
    t = transport_summary(masks, tol=1e-4)["transport"]
    assert t["images"] == n and t["not_converged"] == 3
    assert t["not_converged_fraction"] == pytest.approx(0.015)
    assert t["not_converged_fraction"] > NOT_CONVERGED_WARNING
    assert t["iterations"]["p50"] == 40 and t["iterations"]["max"] == 1000
    (line,), (warning,) = transport_lines(t), transport_warnings(t)  # run.json keeps warnings
    assert "98.5% converged" in line and "did not converge for 3 images" in warning
    iterations[:3], error[:3] = 40, 1e-5  # all converged: no warning
    quiet = transport_summary(
        pa.table({"ot_iterations": iterations, "ot_marginal_error": error}), 1e-4
    )
    assert len(transport_lines(quiet["transport"])) == 1
    assert transport_warnings(quiet["transport"]) == []
    # no Sinkhorn ran (transport off, or predict): nothing to say
    none = pa.table({"ot_iterations": np.zeros(4, np.int32), "ot_marginal_error": np.zeros(4)})
    assert transport_summary(none, 1e-4) == {} and transport_lines(None) == []


def test_batched_dense_eigensolver_honours_the_mask():
    """The CuPy backend's solver, run here on numpy: the masked sub-problems' top
    eigenvectors, as the per-matrix LAPACK / ARPACK path finds them."""
    from autosod_ray.potnet.backend import ARRAY_BACKENDS, batched_top_eigenvectors

    x, _ = blobs(n_per=40, seed=11)
    mask = np.ones((3, len(x)), bool)
    mask[1, ::3] = False
    mask[2, 2:] = False  # a problem with fewer points than k
    aff = knn_affinity(np.stack([x, x, x]), mask, 8)
    deg = aff.sum(-1)
    d = np.where(deg > 0, 1 / np.sqrt(np.maximum(deg, 1e-8)), 0)
    sym = (aff * d[:, :, None] * d[:, None, :]).astype(np.float32)
    got = batched_top_eigenvectors(sym, 3, mask)
    want = ARRAY_BACKENDS["numpy"].top_eigenvectors(sym, 3, mask)
    assert (got[~mask] == 0).all() and (got[2, :, 2] == 0).all()
    for b in range(2):  # the same subspace (vectors are defined up to sign and rotation)
        proj = got[b].T @ want[b]
        np.testing.assert_allclose(np.linalg.svd(proj, compute_uv=False), 1.0, atol=1e-3)
    # ignoring the mask (the old CuPy path): the 2-point problem's vectors leak off its mask
    unmasked = batched_top_eigenvectors(sym, 3)
    assert np.abs(unmasked[2][~mask[2]]).max() > 0.5


def test_quality_signals_hand_checked():
    from autosod_ray.potnet.quality import (
        QUALITY_SIGNALS,
        quality_score,
        quality_signals,
        separability,
        transport_signals,
    )

    clean = np.zeros((8, 8), np.float32)
    clean[2:6, 2:6] = 1.0  # one square object, a two-valued map
    split = clean.copy()
    split[2:6, 3] = 0.0  # the same object cut in two: pieces of 8 and 4 patches
    noisy = np.clip(clean + np.random.default_rng(0).uniform(-0.45, 0.45, clean.shape), 0, 1)
    attention = np.zeros((8, 8), np.float32)
    attention[3, 3] = 0.75  # three quarters of the CLS attention on the object
    attention[0, 0] = 0.25
    sal = np.stack([clean, split, noisy])
    features = np.stack([clean, 1.0 - clean], axis=-1)  # the object's feature, the rest's
    s = quality_signals(
        sal, np.stack([clean, clean, clean]), np.stack([attention] * 3), np.stack([features] * 3)
    )
    assert separability(clean) == pytest.approx(1.0) and separability(np.ones((4, 4))) == 0.0
    assert s["separability"][0] == pytest.approx(1.0)
    assert s["separability"][0] > s["separability"][2]
    np.testing.assert_allclose(s["largest_component"][:2], [1.0, 8 / 12])
    np.testing.assert_allclose(s["seed_agreement"][:2], [1.0, 12 / 16])
    np.testing.assert_allclose(s["attention_inside"][0], 0.75)
    assert s["feature_separability"][0] == pytest.approx(1.0)  # the mask is the feature split
    # the split mask leaves 4 object patches with the 48 others: within / total =
    # (2 * 4 * 48 / 52) / (2 * 16 * 48 / 64) = 4 / 13
    assert s["feature_separability"][1] == pytest.approx(9 / 13, rel=1e-5)
    s.update(transport_signals(np.array([60, 60, 60]), np.zeros(3), np.full(3, 0.7)))
    np.testing.assert_allclose(s["log_ot_iterations"], np.log1p(60), rtol=1e-6)
    q = quality_score(s)
    assert set(QUALITY_SIGNALS) <= set(s) and ((q > 0) & (q < 1)).all()
    assert q[0] > q[2]  # the clean mask scores above the noisy one


def test_no_object_crops_are_scored_by_the_model_that_left_out_their_source():
    """benchmarks/fit_quality.py --no-object: a crop takes the fold of the ECSSD image it
    was cut from (not a fold of its own among the crops), and is scored by the fit that
    left that fold out."""
    import sys
    from pathlib import Path

    import pandas as pd

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from fit_quality import fold_fits, held_out, predict, source_folds
    from folds import fold_of

    stems = [f"{i:04d}" for i in range(1, 51)]
    frame = pd.DataFrame({"stem": stems, "fold": fold_of(stems, 5)})
    crops = pd.Series(["0003", "0047", "0048"])  # the first in fold 0, the others in fold 4
    src = source_folds(crops, frame)
    np.testing.assert_array_equal(src, [0, 4, 4])
    assert not (src == fold_of(list(crops), 5)).all()  # the crops' own folds would differ
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(50, 2)), rng.uniform(0.2, 0.9, 50)
    fits = fold_fits(x, y, frame.fold.to_numpy())
    extra = rng.normal(size=(3, 2))
    got = held_out(extra, None, src, fits)
    want = [predict(fits[f], e[None])[0] for f, e in zip(src, extra, strict=True)]
    np.testing.assert_allclose(got, want)
    with pytest.raises(SystemExit, match="0999"):
        source_folds(pd.Series(["0999"]), frame)
