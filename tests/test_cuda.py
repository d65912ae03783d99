"""The CUDA paths against the CPU path on the same input, where a GPU is.

CI has no GPU: these are skipped there and run on a GPU machine through
`bash benchmarks/gpu_check.sh` (README "On a GPU"). Each compares the GPU's answer
with the CPU's on real images and the real pretrained backbone: the edge refinement
(torch, float64, must be the same to float32 rounding), POTNet's masks (CuPy arrays,
a batched eigensolver instead of ARPACK: the same masks up to a few boundary
patches), AutoSOD's prediction (fp32 the same, bf16 close) and a bf16 training step.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from autosod_ray.config import BackboneConfig, ModelConfig, POTNetConfig
from autosod_ray.data.images import resize_square
from autosod_ray.metrics import iou

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DINOV2 = "vit_small_patch14_dinov2.lvd142m"
STEMS = [f"{i:04d}" for i in range(1, 9)]


def photos(ecssd, size: int, stems=STEMS) -> tuple[np.ndarray, list[np.ndarray]]:
    """ECSSD images resized to size x size, and their ground-truth masks at their own size."""
    images = [np.asarray(Image.open(ecssd / "images" / f"{s}.jpg").convert("RGB")) for s in stems]
    gts = [np.asarray(Image.open(ecssd / "masks" / f"{s}.png").convert("L")) > 127 for s in stems]
    return np.stack([resize_square(im, size) for im in images]), gts


def test_edge_refinement_on_cuda_is_the_cpu_refinement(ecssd):
    from autosod_ray.edge_refine import guided

    images, _ = photos(ecssd, 448, STEMS[:4])
    prob = np.random.default_rng(0).random((4, 32, 32)).astype(np.float32)
    cpu = guided(prob, images, radius=1 / 32, eps=1e-3, device="cpu")
    gpu = guided(prob, images, radius=1 / 32, eps=1e-3, device="cuda")
    assert gpu.shape == cpu.shape == (4, 448, 448)
    np.testing.assert_allclose(gpu, cpu, atol=1e-5)


def test_potnet_on_cuda_gives_the_cpu_masks(ecssd, weights_path):
    """fp32 features: CuPy's batched eigh against ARPACK/LAPACK, the rest the same array
    code; bf16 features (the GPU default) must not cost quality against the ground truth."""
    from autosod_ray.labeller import PseudoLabeller

    images, gts = photos(ecssd, 224)
    sizes = [gt.shape for gt in gts]

    def masks(device: str, precision: str):
        cfg = BackboneConfig(
            name=DINOV2, weights=str(weights_path), image_size=224, device=device,
            precision=precision,
        )  # fmt: skip
        labeller = PseudoLabeller(cfg, POTNetConfig())
        assert labeller.backend.name == ("cupy" if device == "cuda" else "numpy")
        return labeller(images, sizes)

    cpu, gpu, bf16 = masks("cpu", "fp32"), masks("cuda", "fp32"), masks("cuda", "bf16")
    same = [iou(a.binary, b.binary) for a, b in zip(cpu, gpu, strict=True)]
    assert np.mean(same) > 0.95 and min(same) > 0.8, same
    np.testing.assert_allclose([m.quality for m in gpu], [m.quality for m in cpu], atol=0.05)
    truth = {k: np.mean([iou(m.binary, gt) for m, gt in zip(v, gts, strict=True)])
             for k, v in {"cpu": cpu, "gpu": gpu, "bf16": bf16}.items()}  # fmt: skip
    assert truth["gpu"] > truth["cpu"] - 0.02 and truth["bf16"] > truth["cpu"] - 0.03, truth


def test_autosod_predicts_on_cuda_as_on_cpu(ecssd, weights_path, tmp_path):
    from autosod_ray.model import build_autosod
    from autosod_ray.model.inference import AutoSODPredictor, save_model

    backbone = BackboneConfig(name=DINOV2, weights=str(weights_path), image_size=224)
    cfg = ModelConfig(num_queries=5, decoder_layers=2, width=128, heads=4, ffn_width=256)
    net = build_autosod(backbone, cfg, seed=0)
    meta = {"backbone": backbone.model_dump(), "model": cfg.model_dump(), "image_size": 224,
            "patch_size": 14}  # fmt: skip
    save_model(str(tmp_path / "model"), net.state_dict(), meta, {})
    images, _ = photos(ecssd, 224, STEMS[:4])
    model = str(tmp_path / "model")
    on_cpu = AutoSODPredictor(model, {}, "cpu", "fp32")
    cpu, cpu_obj, cpu_tokens, cpu_agree = on_cpu(images)
    gpu, gpu_obj, gpu_tokens, gpu_agree = AutoSODPredictor(model, {}, "cuda", "fp32")(images)
    bf16, bf16_obj, bf16_tokens, bf16_agree = AutoSODPredictor(model, {}, "cuda", "bf16")(images)
    np.testing.assert_allclose(gpu, cpu, atol=2e-3)
    np.testing.assert_allclose(gpu_obj, cpu_obj, atol=2e-3)
    np.testing.assert_allclose(gpu_tokens, cpu_tokens, atol=2e-2)
    np.testing.assert_allclose(gpu_agree, cpu_agree, atol=0.05)  # the same nudges on the GPU
    # predict's GPU default (bf16): the score was fit to fp32 agreements on the CPU
    np.testing.assert_allclose(bf16_agree, cpu_agree, atol=0.15)
    assert np.abs(bf16 - cpu).mean() < 0.02
    # predict's whole score, each side refining on its own device as predict's actor does:
    # the signals the score reads (an untrained network's masks may all be empty, which
    # scores 0 on both sides), then the score
    from autosod_ray.edge_refine import guided
    from autosod_ray.model.quality import prediction_quality, prediction_signals

    def scored(prob, obj, tokens, agree, device):
        refined = guided(prob, images, radius=1 / 32, eps=1e-3, device=device)
        args = (prob, obj, tokens, on_cpu.threshold, agree, refined)
        return prediction_signals(*args), prediction_quality(
            prob, obj, tokens, agree, refined, threshold=on_cpu.threshold
        )

    cpu_signals, cpu_quality = scored(cpu, cpu_obj, cpu_tokens, cpu_agree, "cpu")
    for (signals, quality), atol in (
        (scored(gpu, gpu_obj, gpu_tokens, gpu_agree, "cuda"), 0.02),
        (scored(bf16, bf16_obj, bf16_tokens, bf16_agree, "cuda"), 0.1),
    ):
        for name in ("feature_separability", "refined_separability"):
            np.testing.assert_allclose(signals[name], cpu_signals[name], atol=atol)
        np.testing.assert_allclose(quality, cpu_quality, atol=2.5 * atol)


def test_a_bf16_training_step_on_cuda_learns(ecssd, weights_path):
    """The train loop's own step under bf16 autocast: the decoder fits 4 real images."""
    from autosod_ray.config import TrainConfig
    from autosod_ray.train.loop import build_training, train_step

    cfg = TrainConfig.model_validate(
        {
            "pseudo_masks": "unused",
            "output": "unused",
            "backbone": {"name": DINOV2, "weights": str(weights_path), "image_size": 112},
            "model": {
                "num_queries": 5,
                "decoder_layers": 2,
                "width": 128,
                "heads": 4,
                "ffn_width": 256,
            },  # fmt: skip
            "optim": {"lr": 1e-3, "warmup_steps": 0, "max_steps": 40, "freeze_encoder": True},
        }
    )
    device = torch.device("cuda")
    model, optimiser, scheduler = build_training(cfg, {}, device)
    images, gts = photos(ecssd, 112, STEMS[:4])
    masks = np.stack([np.asarray(Image.fromarray(g).resize((112, 112))) for g in gts])
    batch = {"image": torch.as_tensor(images, device=device),
             "mask": torch.as_tensor(masks, device=device)}  # fmt: skip

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16)

    losses = [train_step(model, optimiser, scheduler, batch, cfg, autocast)["loss"]
              for _ in range(40)]  # fmt: skip
    assert np.isfinite(losses).all() and losses[-1] < losses[0] / 4, losses[::5]
