"""Throughput of the numeric core (backbone + POTNet, no Ray) on one device.

    python benchmarks/core_throughput.py --images DIR --weights FILE [--device cuda] \
        [--batch-sizes 8 16 32 64] [--precisions fp32 bf16] [--engines native cuml] \
        [--image-size 448] [--limit 64] [--json FILE]

For each backbone (the ViT-S/14 of --weights, and a ViT-S/8 of the same width
with random weights: its cost, not its masks, is what is measured), batch
size, precision and clustering engine, in one run on one machine: images/s of
the backbone alone, of POTNet alone on those features, and of both end to end,
POTNet's time as a share of the backbone's, and the edge refinement (the guided
filter of `refine`, on the same device) on POTNet's maps, alone and as a share of
the backbone's time. On CUDA the arrays stay on the GPU (CuPy) and every timing
ends with a device synchronisation.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from autosod_ray.config import BackboneConfig, POTNetConfig, RefineSection
from autosod_ray.data.images import IMAGE_EXTENSIONS, decode_image, resize_square
from autosod_ray.edge_refine import refiner
from autosod_ray.labeller import PseudoLabeller

BACKBONES = {
    "vit_small_patch14_dinov2.lvd142m": None,  # --weights
    "vit_small_patch8_224.dino": "random",
}


def random_weights(name: str, folder: Path) -> str:
    import timm
    from safetensors.torch import save_file

    path = folder / f"{name}.safetensors"
    model = timm.create_model(name, pretrained=False, num_classes=0)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int) -> float:
    """Seconds per call of `fn`, after one warm-up call."""
    fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / repeats


def measure(labeller: PseudoLabeller, images: np.ndarray, batch: int, device: str) -> dict:
    chunks = [images[i : i + batch] for i in range(0, len(images) - batch + 1, batch)] or [images]
    n = sum(len(c) for c in chunks)
    feats = [labeller.features(c) for c in chunks]
    maps = [labeller.potnet(f).saliency for f in feats]
    refine = refiner(RefineSection(method="guided"), labeller.extractor.device)

    def backbone():
        for c in chunks:
            labeller.features(c)

    def potnet():
        for f in feats:
            labeller.potnet(f)

    def both():
        for c in chunks:
            labeller.potnet(labeller.features(c))

    def refinement():
        for c, m in zip(chunks, maps, strict=True):
            refine(m, c)

    b, p, e, r = (timed(fn, device, 1) for fn in (backbone, potnet, both, refinement))
    return {
        "backbone_ips": n / b,
        "potnet_ips": n / p,
        "end_to_end_ips": n / e,
        "potnet_share_of_backbone": p / b,
        "refine_ips": n / r,
        "refine_share_of_backbone": r / b,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images", required=True)
    p.add_argument("--weights", required=True, help="ViT-S/14 DINOv2 weights (local file)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--image-size", type=int, default=448)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    p.add_argument("--engines", nargs="+", default=["native", "cuml"])
    p.add_argument("--limit", type=int, default=64)
    p.add_argument("--json")
    args = p.parse_args(argv)
    paths = sorted(q for q in Path(args.images).iterdir() if q.suffix.lower() in IMAGE_EXTENSIONS)
    decoded = [decode_image(q.read_bytes(), 1 << 30) for q in paths[: args.limit]]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, weights in BACKBONES.items():
            weights = args.weights if weights is None else random_weights(name, Path(tmp))
            for precision in args.precisions:
                cfg = BackboneConfig(
                    name=name,
                    weights=weights,
                    image_size=args.image_size,
                    device=args.device,
                    precision=precision,
                )
                for engine in args.engines:
                    labeller = PseudoLabeller(cfg, POTNetConfig(engine=engine))
                    size = labeller.image_size
                    images = np.stack([resize_square(im, size) for im in decoded])
                    for batch in args.batch_sizes:
                        r = measure(labeller, images, batch, args.device)
                        tokens = (size // labeller.extractor.patch_size) ** 2
                        row = {"backbone": name, "tokens": tokens, "precision": precision,
                               "engine": engine, "batch": batch,
                               **{k: round(v, 3) for k, v in r.items()}}  # fmt: skip
                        rows.append(row)
                        print(json.dumps(row), file=sys.stderr, flush=True)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    report = {"device": device, "image_size": args.image_size, "images": len(decoded), "rows": rows}
    cols = ("backbone_ips", "potnet_ips", "end_to_end_ips", "potnet_share_of_backbone",
            "refine_ips", "refine_share_of_backbone")  # fmt: skip
    print(
        f"device: {device}\n| backbone | tokens | precision | engine | batch | "
        + " | ".join(cols)
        + " |"
    )
    print("|---" * (5 + len(cols)) + "|")
    for r in rows:
        keys = ("backbone", "tokens", "precision", "engine", "batch", *cols)
        print("| " + " | ".join(str(r[k]) for k in keys) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
