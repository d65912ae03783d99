"""POTNet end to end on real photos with the real pretrained backbone."""

import json
import sys

import numpy as np
import pytest
from PIL import Image

from autosod_ray.config import POTNetConfig
from autosod_ray.data.images import decode_image, resize_square
from autosod_ray.labeller import PseudoLabeller
from autosod_ray.metrics import iou
from autosod_ray.potnet import SEEDS, PatchFeatures, POTNet
from tests.conftest import REPO, blob_features

# 0065: TokenCut's orientation inverts it (so the orientation switch shows)
STEMS = ["0001", "0005", "0010", "0020", "0050", "0065", "0200", "0400"]


@pytest.fixture(scope="module")
def photos(ecssd):
    imgs = [decode_image((ecssd / "images" / f"{s}.jpg").read_bytes(), 10**8) for s in STEMS]
    gts = [np.asarray(Image.open(ecssd / "masks" / f"{s}.png").convert("L")) > 127 for s in STEMS]
    return imgs, gts


def test_masks_on_real_photos_match_ground_truth(backbone_cfg, extractor, photos):
    imgs, gts = photos
    labeller = PseudoLabeller(backbone_cfg, POTNetConfig(), extractor)
    batch = np.stack([resize_square(im, labeller.image_size) for im in imgs])
    masks = labeller(batch, [im.shape[:2] for im in imgs])
    scores = [iou(m.binary, gt) for m, gt in zip(masks, gts, strict=True)]
    for m, im in zip(masks, imgs, strict=True):
        assert m.soft.shape == m.binary.shape == im.shape[:2]
        assert 0.0 < m.fg_fraction < 1.0 and 0.0 <= m.confidence <= 1.0
        assert 0.0 <= m.quality <= 1.0
    assert np.mean(scores) > 0.6, scores


@pytest.fixture(scope="module")
def real_features(extractor, photos):
    """Bias-free keys of real photos from the real backbone: POTNet's own input."""
    imgs, _ = photos
    out = extractor(np.stack([resize_square(im, extractor.image_size) for im in imgs]), ("keys",))
    return PatchFeatures(out.keys.numpy(), out.cls_attention.numpy(), out.grid)


# every switch of the method, each changed alone from the default
SWITCHES = {
    "seed": "attention",
    "seed_orientation": "max_entry",
    "clustering": "kmeans",
    "fusion": "hard",
    "engine": "sklearn",
    "transport": False,
    "reweight": False,
    "marginal": "softmax",
    "refine_steps": 0 if POTNetConfig().refine_steps else 3,
}


def test_every_switch_changes_the_saliency_on_real_features(real_features):
    """A switch that leaves the output unchanged is a switch that does nothing."""
    base = POTNet(POTNetConfig().params())(real_features).saliency
    for key, value in {**SWITCHES, "clustering": "spectral"}.items():
        other = POTNet(POTNetConfig(**{key: value}).params())(real_features).saliency
        assert np.abs(other - base).max() > 1e-3, f"{key}={value} changed nothing"
    # the registries hold exactly the names the config accepts
    assert set(SEEDS) == {"attention", "ncut"}


def test_batched_equals_one_at_a_time_and_is_deterministic():
    x, attn, _ = blob_features(b=3, noise=0.8)
    potnet = POTNet(POTNetConfig(refine_steps=2).params())
    batched = potnet(PatchFeatures(x, attn, (12, 12)))
    for i in range(3):
        one = potnet(PatchFeatures(x[i : i + 1], attn[i : i + 1], (12, 12)))
        np.testing.assert_allclose(one.saliency[0], batched.saliency[i], atol=1e-5)
        np.testing.assert_allclose(one.consistency_loss[0], batched.consistency_loss[i], atol=1e-6)
    again = potnet(PatchFeatures(x, attn, (12, 12)))
    np.testing.assert_array_equal(again.saliency, batched.saliency)


SWEEP = [
    {"seed": seed, "clustering": clustering, "engine": engine}
    for seed in ("attention", "ncut")
    for clustering in ("dual", "kmeans", "spectral")
    for engine in ("native", "sklearn")
] + [
    {"transport": False},
    {"reweight": False},
    {"fusion": "hard"},
    {"marginal": "softmax"},
    {"seed_orientation": "max_entry"},
    {"refine_steps": 3},
    {"refine_steps": 0},
]


@pytest.mark.parametrize("change", SWEEP, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_every_registered_variant_finds_the_object(change):
    x, attn, fg = blob_features(b=2, noise=0.7)
    out = POTNet(POTNetConfig(**change).params())(PatchFeatures(x, attn, (12, 12)))
    assert out.saliency.shape == (2, 12, 12) and np.isfinite(out.saliency).all()
    assert ((out.saliency >= 0) & (out.saliency <= 1)).all()
    for soft, binary in out.masks([(24, 24), (36, 30)]):
        assert soft.dtype == np.uint8 and binary.dtype == bool
    agree = ((out.saliency.reshape(2, -1) > 0.5) == fg[None]).mean(-1)
    assert (agree > 0.9).all(), agree


def test_quality_benchmark_cli(tmp_path, ecssd, weights_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import quality

    out_json = tmp_path / "q.json"
    code = quality.main(
        [
            "--images",
            str(ecssd / "images"),
            "--masks",
            str(ecssd / "masks"),
            "--limit",
            "4",
            "--set",
            "backbone.name=vit_small_patch14_dinov2.lvd142m",
            "--set",
            f"backbone.weights={weights_path}",
            "--set",
            "backbone.image_size=224",
            "--set",
            "pipeline.potnet_batch_size=2",
            "--save-masks",
            str(tmp_path / "masks"),
            "--json",
            str(out_json),
        ]
    )
    assert code == 0
    report = json.loads(out_json.read_text())
    row = report["results"]["POTNet (this config)"]
    for key in ("maxF", "meanF", "Sm", "meanE", "MAE", "IoU", "s_per_image"):
        assert np.isfinite(row[key])
    assert report["n"] == 4
    soft = sorted((tmp_path / "masks" / "soft").iterdir())
    binary = sorted((tmp_path / "masks" / "binary").iterdir())
    assert len(soft) == len(binary) == 4
    first = Image.open(binary[0])
    assert first.size == Image.open(ecssd / "images" / "0001.jpg").size
    assert set(np.unique(np.asarray(first))) <= {0, 255}


def test_bf16_features_give_the_same_masks(backbone_cfg, photos, weights_path):
    """The bf16 autocast backbone (what CUDA runs by default), here on the CPU: the same
    features to cosine 0.9999, and the same masks but for a few boundary patches (at 224 px
    one patch is 1/256 of the image)."""
    imgs, _ = photos
    sizes = [im.shape[:2] for im in imgs[:4]]
    masks, feats = {}, {}
    for precision in ("fp32", "bf16"):
        cfg = backbone_cfg.model_copy(update={"precision": precision})
        labeller = PseudoLabeller(cfg, POTNetConfig())
        batch = np.stack([resize_square(im, labeller.image_size) for im in imgs[:4]])
        feats[precision] = labeller.features(batch).features
        masks[precision] = labeller(batch, sizes)
    assert ((feats["fp32"] * feats["bf16"]).sum(-1) > 0.999).all()
    assert (feats["fp32"] * feats["bf16"]).sum(-1).mean() > 0.9999
    ious = [iou(a.binary, b.binary) for a, b in zip(masks["fp32"], masks["bf16"], strict=True)]
    assert np.mean(ious) >= 0.97 and min(ious) > 0.9, ious
