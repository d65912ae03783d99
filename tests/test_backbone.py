"""The timm backbone wrapper on the real offline DINOv2 ViT-S/14 weights."""

import numpy as np
import pytest
import torch

from autosod_ray.backbone import ViTFeatures, create_vit, read_state_dict
from autosod_ray.config import BackboneConfig
from tests.conftest import DINOV2


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, size=(2, 224, 224, 3), dtype=np.uint8)


def test_features_shapes_norms_and_grid(extractor, images):
    out = extractor(images)
    assert extractor.patch_size == 14 and out.grid == (16, 16)
    for feats in (out.keys, out.tokens):
        assert feats.shape == (2, 256, 384) and feats.dtype == torch.float32
        torch.testing.assert_close(feats.norm(dim=-1), torch.ones(2, 256), atol=1e-4, rtol=0)
    assert out.cls_attention.shape == (2, 256)
    assert ((out.cls_attention > 0) & (out.cls_attention < 1)).all()


def test_keys_have_their_large_bias_removed(extractor, ecssd):
    from autosod_ray.data.images import decode_image, resize_square

    photo = decode_image((ecssd / "images" / "0001.jpg").read_bytes(), 10**8)
    batch = resize_square(photo, 224)[None]
    attn = extractor.model.blocks[-1].attn
    c = attn.qkv.in_features
    bias = attn.qkv.bias[c : 2 * c]
    assert bias.norm() > 10  # the bias DESIGN.md warns about
    out = extractor(batch, ("keys",))
    assert out.tokens is None
    # the same keys with the bias put back: every pair looks alike
    with torch.inference_mode():
        m = extractor.model
        x = m.norm_pre(m._pos_embed(m.patch_embed(extractor.preprocess(batch))))
        for blk in m.blocks[:-1]:
            x = blk(x)
        y = m.blocks[-1].norm1(x)[:, 1:]
        biased = torch.nn.functional.normalize(
            torch.nn.functional.linear(y, attn.qkv.weight[c : 2 * c], bias), dim=-1
        )
    assert (biased[0] @ biased[0].T).mean() > 0.8
    assert (out.keys[0] @ out.keys[0].T).mean() < 0.5


def test_input_size_snaps_to_patch_multiple(backbone_cfg, extractor):
    cfg = backbone_cfg.model_copy(update={"image_size": 230})
    assert ViTFeatures(cfg, model=extractor.model).image_size == 224


def test_any_input_size_is_resized(extractor):
    out = extractor(np.zeros((1, 100, 150, 3), np.uint8), ("keys",))
    assert out.keys.shape == (1, 256, 384)


def test_torch_and_wrapped_checkpoints_load_identically(tmp_path, weights_path, extractor, images):
    state = read_state_dict(str(weights_path))
    torch.save({"teacher": {f"backbone.{k}": v for k, v in state.items()}}, tmp_path / "dino.pth")
    model = create_vit(DINOV2, str(tmp_path / "dino.pth"))
    cfg = BackboneConfig(name=DINOV2, weights=str(tmp_path / "dino.pth"), image_size=224)
    again = ViTFeatures(cfg, model=model)(images, ("keys",))
    torch.testing.assert_close(again.keys, extractor(images, ("keys",)).keys)


def test_file_uri_is_accepted(weights_path):
    state = read_state_dict(f"file://{weights_path}")
    assert len(state) == 174 and all(t.dtype == torch.float32 for t in state.values())


def test_bad_weights_and_names_fail_clearly(tmp_path, weights_path):
    with pytest.raises(FileNotFoundError, match="backbone.weights"):
        create_vit(DINOV2, str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match="does not fit backbone.name"):
        create_vit("vit_tiny_patch16_224", str(weights_path))
    with pytest.raises(ValueError, match="not a timm model"):
        create_vit("no_such_vit", str(weights_path))


def test_weights_from_s3(s3, weights_path, extractor, images):
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3["endpoint"], key="testing", secret="testing")
    fs.mkdir("weights")
    fs.put(str(weights_path), "weights/vits14.safetensors")
    cfg = BackboneConfig(name=DINOV2, weights="s3://weights/vits14.safetensors", image_size=224)
    remote = ViTFeatures(cfg, storage_options={"endpoint_url": s3["endpoint"]})
    torch.testing.assert_close(remote(images, ("keys",)).keys, extractor(images, ("keys",)).keys)


def test_gpu_benchmarks_run_on_cpu(tmp_path, ecssd, weights_path):
    """benchmarks/core_throughput.py and predict_throughput.py are what a user runs on a
    GPU (benchmarks/gpu_check.sh); their CPU path is the same code, kept working here on a
    tiny setting."""
    import json
    import sys

    from tests.conftest import REPO

    sys.path.insert(0, str(REPO / "benchmarks"))
    import core_throughput
    import predict_throughput

    out = tmp_path / "core.json"
    args = ["--images", str(ecssd / "images"), "--weights", str(weights_path), "--device", "cpu"]
    args += ["--image-size", "56", "--batch-sizes", "2", "--precisions", "fp32"]
    args += ["--engines", "native", "sklearn", "--limit", "2", "--json", str(out)]
    assert core_throughput.main(args) == 0
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 4  # 2 backbones x 2 engines
    assert {r["tokens"] for r in rows} == {16, 49}  # patch 14 and patch 8 at 56 px
    assert all(r["backbone_ips"] > 0 and r["potnet_share_of_backbone"] > 0 for r in rows)
    assert all(r["refine_ips"] > 0 and r["refine_share_of_backbone"] > 0 for r in rows)
    args = ["--images", str(ecssd / "images"), "--weights", str(weights_path), "--device", "cpu"]
    args += ["--image-size", "56", "--batch-sizes", "2", "--limit", "2", "--json", str(out)]
    assert predict_throughput.main(args) == 0
    report = json.loads(out.read_text())
    assert report["precision"] == "fp32" and len(report["rows"]) == 1
    row = report["rows"][0]
    assert row["network_ips"] > 0 and row["refine_ips"] > 0 and row["end_to_end_ips"] > 0
