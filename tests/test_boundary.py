"""The boundary prior and the per-mask quality signals, on arrays small enough to check by hand."""

import numpy as np
from scipy.sparse.csgraph import dijkstra

from autosod_ray.potnet.boundary import (
    border_patches,
    border_prototypes,
    boundary_connectivity,
    geodesic_distances,
    grid_edges,
)
from autosod_ray.potnet.ops import l2_normalize
from autosod_ray.potnet.quality import attention_on_border, quality_signals


def scene(h=16, w=16, d=16, noise=0.05, seed=0):
    """Unit features of an object in the middle, one touching the left border along two
    patches, and a background that wraps the image: (features N x D, labels h x w)."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((h, w), int)  # 0 background
    labels[5:11, 5:11] = 1  # an object inside
    labels[7:9, 0:3] = 2  # a small object on the border
    dirs = rng.normal(size=(3, d))
    x = dirs[labels.ravel()] + noise * rng.normal(size=(h * w, d))
    return l2_normalize(x.astype(np.float32)), labels


def test_grid_edges_and_border_ring():
    i, j = grid_edges(2, 3)
    assert sorted(zip(i.tolist(), j.tolist(), strict=True)) == [
        (0, 1), (0, 3), (1, 2), (1, 4), (2, 5), (3, 4), (4, 5),
    ]  # fmt: skip
    assert border_patches(3, 3).tolist() == [0, 1, 2, 3, 5, 6, 7, 8]


def test_geodesic_distances_follow_the_cheapest_path():
    # 1 x 3 grid: costs 1 - cos between neighbours; 0 -> 2 only through 1
    f = l2_normalize(np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]], np.float32))
    d = geodesic_distances(f, (1, 3))
    step = 1 - np.sqrt(0.5)
    np.testing.assert_allclose(d[0], [0.0, step, 2 * step], atol=1e-6)
    # the same as scipy's Dijkstra on the dense 4-neighbour graph of a random grid
    x, _ = scene()
    i, j = grid_edges(16, 16)
    dense = np.zeros((256, 256))
    dense[i, j] = np.maximum(1 - (x[i] * x[j]).sum(-1), 1e-6)
    np.testing.assert_allclose(geodesic_distances(x, (16, 16)), dijkstra(dense, directed=False))


def test_boundary_connectivity_marks_background_not_objects():
    x, labels = scene()
    w_bg = boundary_connectivity(x[None], (16, 16), sigma=0.15)[0].reshape(16, 16)
    assert w_bg[labels == 0].mean() > 0.9  # wraps the image
    assert w_bg[labels == 1].max() < 0.05  # never touches the border
    assert w_bg[labels == 2].max() < 0.5 < w_bg[labels == 0].min()  # touches it along 2 of 60


def test_border_prototypes_move_foreground_prototypes_on_the_border():
    x, labels = scene()
    region = labels.ravel()
    # k = 2 per class: foreground prototypes 0 (the inner object) and 1 (background patches)
    plan = np.zeros((1, 256, 4), np.float32)
    plan[0, region == 1, 0] = 1
    plan[0, region == 0, 1] = 1
    plan[0, region == 2, 2] = 1
    w_bg = boundary_connectivity(x[None], (16, 16), sigma=0.15)
    first_k = np.array([[1, 1, 0, 0]], np.float32)
    moved = border_prototypes(w_bg, plan, first_k, threshold=0.5)
    np.testing.assert_array_equal(moved, [[1, 0, 0, 0]])
    # never empties the foreground: the prototype least on the border stays
    only_bg = np.array([[0, 1, 0, 0]], np.float32)
    np.testing.assert_array_equal(border_prototypes(w_bg, plan, only_bg, 0.5), only_bg)


def test_quality_signals_hand_checked():
    s = np.zeros((1, 8, 8), np.float32)
    s[0, 2:6, 2:6] = 1.0  # a 4 x 4 object inside
    s[0, 0, 0:4] = 0.9  # and a strip on the top border
    attention = np.zeros((1, 8, 8), np.float32)
    attention[0, 2:6, 2:6] = 1.0
    features = np.zeros((1, 8, 8, 2), np.float32)
    features[..., 0] = 1.0
    features[0, 2:6, 2:6] = [0.0, 1.0]  # the object's own feature
    sig = {k: float(v[0]) for k, v in quality_signals(s, s, attention, features).items()}
    np.testing.assert_allclose(sig["fg_fraction"], (16 + 4) / 64, rtol=1e-6)
    np.testing.assert_allclose(sig["border_contact"], 4 / 28, rtol=1e-6)  # 4 of 28 ring patches
    np.testing.assert_allclose(sig["largest_component"], 16 / 20, rtol=1e-6)
    assert sig["attention_inside"] == 1.0
    np.testing.assert_allclose(sig["size_vs_attention"], np.log2(20 / 16), rtol=1e-6)
    # the mask takes the 16 object patches and 4 background ones: within / total =
    # (2 * 16 * 4 / 20) / (2 * 16 * 48 / 64)
    np.testing.assert_allclose(sig["feature_separability"], 1 - 6.4 / 24, rtol=1e-5)
    assert sig["attention_border"] == 0.0  # every bit of the attention is on the object
    # of the image, not the mask: attention on 4 of the 28 ring patches and 4 inside
    spread = np.zeros((8, 8), np.float32)
    spread[0, 0:4] = spread[3, 3:7] = 1.0
    np.testing.assert_allclose(attention_on_border(spread), (4 / 28) / (8 / 64), rtol=1e-6)
    assert attention_on_border(np.ones((8, 8))) == 1.0 and attention_on_border(spread * 0) == 1.0
