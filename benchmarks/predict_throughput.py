"""Throughput of predict's numeric core (AutoSOD, no Ray) and of its edge refinement.

    python benchmarks/predict_throughput.py --images DIR --weights FILE [--device cuda] \
        [--batch-sizes 16 64] [--precision auto] [--image-size 448] [--limit 64] [--json FILE]

A network of the paper's shape (configs' ModelConfig defaults) on the pretrained
encoder of --weights (the decoder's weights are random: its cost, not its masks, is
measured), in one run on one device: images/s of the network alone, of the guided
filter (`refine`'s default) alone on its maps, on the same device, and of both,
and the refinement's time as a share of the network's. This is the figure that
says whether a GPU predict (or pseudolabel) actor can afford the refinement.
`nudges_share_of_network` is the share of the network's time spent on the decoder
passes of `quality`'s `noise_agreement` (model/quality.py): the network timed with
and without them.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from autosod_ray.config import BackboneConfig, ModelConfig, RefineSection
from autosod_ray.data.images import IMAGE_EXTENSIONS, decode_image, resize_square
from autosod_ray.edge_refine import refiner
from autosod_ray.model import build_autosod
from autosod_ray.model.inference import AutoSODPredictor, save_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from core_throughput import timed  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images", required=True)
    p.add_argument("--weights", required=True, help="ViT-S/14 DINOv2 weights (local file)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--image-size", type=int, default=448)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64])
    p.add_argument("--limit", type=int, default=64)
    p.add_argument("--json")
    args = p.parse_args(argv)
    paths = sorted(q for q in Path(args.images).iterdir() if q.suffix.lower() in IMAGE_EXTENSIONS)
    size = args.image_size
    images = np.stack(
        [resize_square(decode_image(q.read_bytes(), 1 << 30), size) for q in paths[: args.limit]]
    )
    backbone = BackboneConfig(
        name="vit_small_patch14_dinov2.lvd142m", weights=args.weights, image_size=size
    )
    net = build_autosod(backbone, ModelConfig(), seed=0)
    meta = {"backbone": backbone.model_dump(), "model": ModelConfig().model_dump(),
            "image_size": size, "patch_size": 14}  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        save_model(tmp, net.state_dict(), meta, {})
        predictor = AutoSODPredictor(tmp, {}, args.device, args.precision)
        plain = AutoSODPredictor(tmp, {}, args.device, args.precision, nudges=0)
    refine = refiner(RefineSection(method="guided"), predictor.device)
    for batch in args.batch_sizes:
        chunks = [images[i : i + batch] for i in range(0, len(images) - batch + 1, batch)]
        n = sum(len(c) for c in chunks)
        maps = [predictor(c)[0] for c in chunks]

        def network(chunks=chunks):
            for c in chunks:
                predictor(c)

        def network_without_nudges(chunks=chunks):
            for c in chunks:
                plain(c)

        def refinement(chunks=chunks, maps=maps):
            for c, m in zip(chunks, maps, strict=True):
                refine(m, c)

        def both(chunks=chunks):
            for c in chunks:
                refine(predictor(c)[0], c)

        t_net, t_plain, t_ref, t_both = (
            timed(fn, args.device, 2) for fn in (network, network_without_nudges, refinement, both)
        )
        row = {"batch": batch, "network_ips": n / t_net, "refine_ips": n / t_ref,
               "end_to_end_ips": n / t_both, "refine_share_of_network": t_ref / t_net,
               "nudges_share_of_network": 1.0 - t_plain / t_net}  # fmt: skip
        rows.append({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    device = torch.cuda.get_device_name() if predictor.device.type == "cuda" else "cpu"
    precision = "bf16" if predictor.autocast else "fp32"
    report = {"device": device, "precision": precision, "image_size": size, "rows": rows,
              "torch_threads": torch.get_num_threads()}  # fmt: skip
    cols = ("network_ips", "refine_ips", "end_to_end_ips", "refine_share_of_network",
            "nudges_share_of_network")  # fmt: skip
    print(f"device: {device}, {precision}, {size} px\n| batch | " + " | ".join(cols) + " |")
    print("|---" * (1 + len(cols)) + "|")
    for r in rows:
        print(f"| {r['batch']} | " + " | ".join(str(r[k]) for k in cols) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
