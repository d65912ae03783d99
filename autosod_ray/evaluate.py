"""The evaluate job: SOD metrics of predictions against ground truth, at dataset scale.

Pairs are scored in parallel by Ray Data tasks (per-image PySODMetrics values);
the driver averages them, which equals one PySODMetrics run over the same pairs.
Predictions: pseudolabel / predict Parquet (`saliency_png`, `mask_png`) or a
folder of PNG soft maps. Ground truth: a folder of mask PNGs, matched by stem.
"""

from __future__ import annotations

import io
import json
import posixpath

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from .config import EvaluateConfig
from .data.images import decode_gray
from .data.progress import ProgressPrinter
from .data.uris import (
    InputError,
    file_stem,
    open_fs,
    pngs_by_stem,
    read_bytes_at,
    write_bytes_at,
)
from .metrics import MetricMeans, image_metrics, quality_ranking

PER_IMAGE = ("Sm", "wF", "MAE", "adpF", "adpE", "IoU")


def load_predictions(uri: str, opts: dict) -> pa.Table:
    """(image_id, saliency_png, mask_png, quality, stem, pred_uri) rows from Parquet or PNGs
    (quality is null where the predictions carry none)."""
    fs, root = open_fs(uri, opts)
    if not fs.exists(root):
        raise InputError(f"--predictions {uri!r} does not exist")
    masks_dir = posixpath.join(root, "masks")
    parquet_root = masks_dir if fs.isdir(masks_dir) else root
    files = [
        p
        for p in fs.find(parquet_root)
        if p.endswith(".parquet") and not posixpath.basename(p).startswith(("_", "."))
    ]
    if files:
        cols = ["image_id", "saliency_png", "mask_png"]
        tables = []
        for path in sorted(files):
            with fs.open(path, "rb") as fh:
                f = pq.ParquetFile(fh)
                has_quality = "quality" in f.schema_arrow.names  # not in other Parquet
                t = f.read(columns=cols + (["quality"] if has_quality else []))
            quality = (
                t.column("quality").cast(pa.float32())
                if has_quality
                else pa.nulls(t.num_rows, pa.float32())
            )
            tables.append(t.select(cols).append_column("quality", quality))
        t = pa.concat_tables(tables)
        ids = t.column("image_id").to_pylist()
        return t.append_column("stem", pa.array([file_stem(i) for i in ids])).append_column(
            "pred_uri", pa.array([""] * t.num_rows)
        )
    pngs = pngs_by_stem(uri, opts, "--predictions")
    n = len(pngs)
    return pa.table(
        {
            "image_id": list(pngs),
            "saliency_png": pa.array([b""] * n, pa.binary()),
            "mask_png": pa.array([b""] * n, pa.binary()),
            "quality": pa.nulls(n, pa.float32()),
            "stem": list(pngs),
            "pred_uri": list(pngs.values()),
        }
    )


def score_pairs(batch: dict[str, np.ndarray], storage_options: dict) -> dict[str, np.ndarray]:
    """Per-image metrics for each (prediction, ground truth) pair; errors kept per row."""
    n = len(batch["image_id"])
    out = {k: np.zeros(n, np.float64) for k in PER_IMAGE}
    f_curves, e_curves = np.zeros((n, 256)), np.zeros((n, 256))
    resized, errors = np.zeros(n, bool), [""] * n
    for i in range(n):
        try:
            gt = decode_gray(read_bytes_at(batch["gt_uri"][i], storage_options)) > 127
            if batch["pred_uri"][i]:
                soft = decode_gray(read_bytes_at(batch["pred_uri"][i], storage_options))
                binary = None
            else:
                soft = decode_gray(batch["saliency_png"][i])
                binary = (
                    decode_gray(batch["mask_png"][i]) > 127 if len(batch["mask_png"][i]) else None
                )
            if soft.shape != gt.shape:  # resized to the ground truth's size, and counted
                resized[i] = True
                size = (gt.shape[1], gt.shape[0])
                soft = np.asarray(Image.fromarray(soft).resize(size, Image.BILINEAR))
                if binary is not None:
                    binary = np.asarray(Image.fromarray(binary).resize(size, Image.NEAREST))
            row = image_metrics(soft, gt, binary)
        except Exception as err:  # noqa: BLE001 - an unreadable pair is reported, not fatal
            errors[i] = f"{type(err).__name__}: {err}"
            continue
        for k in PER_IMAGE:
            out[k][i] = row[k]
        f_curves[i], e_curves[i] = row["F_curve"], row["E_curve"]
    return {
        "image_id": batch["image_id"],
        "quality": batch["quality"],
        **out,
        "F_curve": f_curves,
        "E_curve": e_curves,
        "resized": resized,
        "error": np.array(errors, dtype=object),
    }


def _gather(batch: dict, means: MetricMeans, per_image: list, unreadable: list) -> None:
    """One batch of scored pairs into the running means and the per-image rows."""
    for i, image_id in enumerate(batch["image_id"]):
        if batch["error"][i]:
            unreadable.append({"image_id": str(image_id), "error": batch["error"][i]})
            continue
        row = {k: float(batch[k][i]) for k in PER_IMAGE}
        means.add({**row, "F_curve": batch["F_curve"][i], "E_curve": batch["E_curve"][i]})
        quality = batch["quality"][i]
        quality = float("nan") if quality is None else float(quality)
        per_image.append({"image_id": str(image_id), **row, "quality": quality})


def run_evaluate(cfg: EvaluateConfig) -> dict:
    """Score every matched pair; write metrics.json and per-image Parquet next to it."""
    import ray

    if not (cfg.predictions and cfg.ground_truth and cfg.output):
        raise InputError("--predictions, --ground-truth and --output are all required")
    preds = load_predictions(cfg.predictions, cfg.storage.options(cfg.predictions))
    gts = pngs_by_stem(cfg.ground_truth, cfg.storage.options(cfg.ground_truth), "--ground-truth")
    stems = preds.column("stem").to_pylist()
    if len(set(stems)) != len(stems):
        raise InputError(
            "--predictions: two predictions share a file stem; ground truth is "
            "matched by stem, so stems must be unique"
        )
    matched = [s in gts for s in stems]
    pairs = preds.filter(pa.array(matched))
    pairs = pairs.append_column(
        "gt_uri", pa.array([gts[s] for s in pairs.column("stem").to_pylist()])
    )
    means, per_image, unreadable, resized = MetricMeans(), [], [], 0
    if pairs.num_rows:
        ray.init(ignore_reinit_error=True)
        opts = cfg.storage.options(cfg.ground_truth)
        step = max(cfg.batch_size, -(-pairs.num_rows // 10_000))
        ds = ray.data.from_arrow([pairs.slice(i, step) for i in range(0, pairs.num_rows, step)])
        ds = ds.map_batches(
            score_pairs,
            batch_size=cfg.batch_size,
            batch_format="numpy",
            fn_kwargs={"storage_options": opts},
        )
        with ProgressPrinter(
            "evaluate", pairs.num_rows, lambda: (len(per_image) + len(unreadable), len(unreadable))
        ):
            for batch in ds.iter_batches(batch_size=cfg.batch_size, batch_format="numpy"):
                _gather(batch, means, per_image, unreadable)
                resized += int(np.sum(batch["resized"][batch["error"] == ""]))
    ranking = quality_ranking(
        np.array([r["quality"] for r in per_image]), np.array([r["IoU"] for r in per_image])
    )
    metrics = {
        **means.results(),
        "quality_ranking": ranking,
        "predictions_without_gt": int(len(stems) - sum(matched)),
        "gt_without_predictions": len(set(gts) - set(stems)),
        "resized": resized,
        "unreadable": unreadable,
    }
    opts = cfg.storage.options(cfg.output)
    write_bytes_at(cfg.output, json.dumps(metrics, indent=2).encode(), opts)
    table = pa.Table.from_pylist(per_image) if per_image else pa.table({"image_id": []})
    if per_image:
        table = table.sort_by([("IoU", "ascending")])  # worst images first
    buf = io.BytesIO()
    pq.write_table(table, buf)
    write_bytes_at(posixpath.splitext(cfg.output)[0] + "_per_image.parquet", buf.getvalue(), opts)
    return metrics
