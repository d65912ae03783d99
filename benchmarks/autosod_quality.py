"""Trained AutoSOD models on a folder of images with ground truth, without Ray: SOD
metrics per fold, and the per-image signals of predict's `quality` (model/quality.py).

    python benchmarks/autosod_quality.py --model [NAME=]DIR [--model ...] --images DIR \
        --masks DIR --token-cache DIR [--teacher-masks DIR] [--refine guided|none] \
        [--limit N] [--per-image FILE] [--json FILE]

Models trained with a frozen encoder (configs/train-cpu.yaml) share it: each
image's encoder tokens are computed once, under <token-cache>/<encoder digest>/,
and every model's decoder runs on them, so comparing the students of several
self-training rounds costs one encoder pass. The digest hashes the encoder's
weights as loaded from each model folder, so a model with another (or a
fine-tuned) encoder gets its own tokens; a token file is named by the image's
stem, so give each image set its own --token-cache. Tokens are stored as
float16, as the training's token cache stores them (predict runs on fp32). The
images are prepared as the predict job prepares them (decode, square resize,
predict's `refine` (default guided, `--refine none` for the model's grid as it is),
the model's threshold at the image's own size; tests/test_autosod.py checks the
decoder on an image's tokens predicts what the model predicts on the image).
`decoder_s_per_image` counts the decoder passes of `quality`'s `noise_agreement`.

`--teacher-masks DIR` (DIR/binary/<stem>.png, as `benchmarks/quality.py
--save-masks` writes POTNet's) adds `agreement`: the IoU of each student mask
with the teacher's, a candidate signal of how far either can be trusted.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))

from folds import fold_of  # noqa: E402
from quality import PER_IMAGE_METRICS, image_mask_pairs, summarise  # noqa: E402

from autosod_ray.config import RefineSection  # noqa: E402
from autosod_ray.data.images import decode_image, resize_square  # noqa: E402
from autosod_ray.edge_refine import REFINEMENTS, refiner  # noqa: E402
from autosod_ray.metrics import image_metrics, iou  # noqa: E402
from autosod_ray.model.inference import load_model, threshold_at_size  # noqa: E402
from autosod_ray.model.quality import (  # noqa: E402
    noise_agreement,
    prediction_signals,
    score_signals,
)


def encoder_digest(model) -> str:
    """sha256 of the encoder's weights (names, shapes, bytes) and the input size."""
    h = hashlib.sha256(str(model.image_size).encode())
    for name, tensor in sorted(model.encoder.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def fill_tokens(model, images: list[Path], folder: Path, batch: int = 8) -> float:
    """Encode every image not yet under `folder` (one float16 N x D .npy each); returns
    the seconds spent encoding."""
    folder.mkdir(parents=True, exist_ok=True)
    todo = [p for p in images if not (folder / f"{p.stem}.npy").exists()]
    t0 = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(todo), batch):
            chunk = todo[start : start + batch]
            x = np.stack(
                [
                    resize_square(decode_image(p.read_bytes(), 1 << 30), model.image_size)
                    for p in chunk
                ]
            )
            tokens = model.encode(torch.as_tensor(x)).to(torch.float16).numpy()
            for p, t in zip(chunk, tokens, strict=True):
                np.save(folder / f"{p.stem}.npy", t)
            print(f"  encoded {start + len(chunk)}/{len(todo)}", file=sys.stderr, flush=True)
    return time.perf_counter() - t0


def score_model(
    name: str,
    model,
    meta: dict,
    pairs,
    folder: Path,
    teacher: Path | None = None,
    batch: int = 16,
    refine: str = "guided",
):
    """One model's decoder over the cached tokens -> (per-image rows, decoder seconds);
    each mask refined as predict's `refine.method` does (RefineSection's defaults)."""
    threshold = meta["model"]["threshold"]
    refined = refiner(RefineSection(method=refine))
    rows, seconds = [], 0.0
    for start in range(0, len(pairs), batch):
        chunk = pairs[start : start + batch]
        tokens = torch.from_numpy(np.stack([np.load(folder / f"{p.stem}.npy") for p, _ in chunk]))
        t0 = time.perf_counter()
        prob, obj = model.predict(tokens=tokens.float())
        agreement = noise_agreement(
            lambda t: model.predict(tokens=t)[0], tokens.float(), prob, threshold
        ).numpy()
        prob, obj = prob.numpy(), obj.numpy()
        seconds += time.perf_counter() - t0
        grid = tokens.float().reshape(len(chunk), *model.grid, -1).numpy()
        seen = np.stack(
            [resize_square(decode_image(im.read_bytes(), 1 << 30), model.image_size)
             for im, _ in chunk]
        )  # fmt: skip
        maps = refined(prob, seen)
        signals = prediction_signals(prob, obj, grid, threshold, agreement, maps)
        quality = score_signals(signals, prob, threshold, refine)  # predict's, signals once
        for i, (image, gt_path) in enumerate(chunk):
            gt = np.asarray(Image.open(gt_path).convert("L")) > 127
            soft, binary = threshold_at_size(maps[i], *gt.shape, threshold=threshold)
            m = image_metrics(soft, gt, binary)
            row = {"variant": name, "stem": image.stem, **{k: m[k] for k in PER_IMAGE_METRICS}}
            row.update(F_curve=m["F_curve"], E_curve=m["E_curve"], adpF=m["adpF"], adpE=m["adpE"])
            row.update(quality=float(quality[i]), confidence=float(obj[i]))
            row.update({f"signal_{k}": float(v[i]) for k, v in signals.items()})
            if teacher is not None:
                theirs = np.asarray(Image.open(teacher / "binary" / f"{image.stem}.png")) > 127
                row["agreement"] = iou(binary, theirs)
            rows.append(row)
    return rows, seconds


def parse_models(specs: list[str]) -> dict[str, str]:
    """NAME=DIR (or DIR, named by its folder) -> {name: dir}."""
    out = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        out[name if sep else Path(spec).parent.name] = path if sep else spec
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", action="append", required=True, help="[NAME=]model folder")
    p.add_argument("--images", type=Path, required=True)
    p.add_argument("--masks", type=Path, required=True)
    p.add_argument("--token-cache", type=Path, required=True)
    p.add_argument("--teacher-masks", type=Path, help="DIR/binary/<stem>.png: agreement")
    p.add_argument("--refine", choices=sorted(REFINEMENTS), default="guided",
                   help="predict's refine.method (default: predict's default, guided)")  # fmt: skip
    p.add_argument("--limit", type=int)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--per-image")
    p.add_argument("--json")
    args = p.parse_args(argv)
    pairs = image_mask_pairs(args.images, args.masks, args.limit)
    stems = [im.stem for im, _ in pairs]
    fold = dict(zip(stems, fold_of(stems, args.folds), strict=True))
    rows, results = [], {}
    for name, uri in parse_models(args.model).items():
        model, meta = load_model(str(Path(uri).resolve()), {})
        folder = args.token_cache / encoder_digest(model)
        encode_s = fill_tokens(model, [im for im, _ in pairs], folder)
        mine, decode_s = score_model(
            name, model, meta, pairs, folder, args.teacher_masks, refine=args.refine
        )
        for r in mine:
            r["fold"] = int(fold[r["stem"]])
        rows += mine
        results[name] = {
            "model": uri,
            "model_sha256": meta["sha256"],
            "trained_on": meta.get("trained_on"),
            "refine": args.refine,
            **summarise(mine),
            "folds": [summarise([r for r in mine if r["fold"] == f]) for f in range(args.folds)],
            "encoder_s_per_image_this_run": encode_s / len(pairs),
            "decoder_s_per_image": decode_s / len(pairs),
        }
        res = results[name]
        print(
            f"{name}: IoU {res['IoU']:.3f} maxF {res['maxF']:.3f} MAE {res['MAE']:.3f} "
            f"quality Spearman {res['quality_spearman']:.3f}; IoU by fold "
            + " ".join(f"{f['IoU']:.3f}" for f in res["folds"])
        )
        if args.teacher_masks:
            agree = np.array([r["agreement"] for r in mine])
            res["agreement_mean"] = float(agree.mean())
            res["agreement_spearman_with_IoU"] = float(
                spearmanr(agree, [r["IoU"] for r in mine])[0]
            )
            print(f"  agreement with the teacher: mean {agree.mean():.3f}, Spearman with IoU "
                  f"{res['agreement_spearman_with_IoU']:.3f}")  # fmt: skip
    if args.per_image:
        flat = [
            {k: (v.astype(np.float32) if k.endswith("_curve") else v) for k, v in r.items()}
            for r in rows
        ]
        pd.DataFrame(flat).to_parquet(args.per_image)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"images": str(args.images), "n": len(pairs), "results": results}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
