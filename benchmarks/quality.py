"""POTNet quality on a folder of images with ground truth, without Ray.

    python benchmarks/quality.py --images DIR --masks DIR [--config FILE] [--set k=v ...] \
        [--limit N] [--ablations] [--variant NAME:k=v,k=v ...] [--feature-cache DIR] \
        [--workers N] [--per-image FILE] [--save-masks OUT] [--json FILE]

Prints SOD metrics (PySODMetrics on the soft map; IoU on the binary mask),
seconds per image and the Spearman correlation of the `quality` column with
per-image IoU, on all images and per fold (benchmarks/folds.py).
`--ablations` runs, on the same backbone features, the paper's Table II
(full, k-means only, spectral only, without L_con refinement, without OT,
without re-weighting), our own choices undone (literal softmax marginal, hard
fusion, the boundary prior) and the normalised-cut baseline. `--feature-cache`
computes the backbone features once (benchmarks/feature_cache.py) so that all
variants run on them, in `--workers` processes of one thread each.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))

from feature_cache import cached_batches, fill_cache  # noqa: E402
from folds import fold_of  # noqa: E402

from autosod_ray.backbone import vit_geometry  # noqa: E402
from autosod_ray.config import (  # noqa: E402
    POTNetConfig,
    PseudolabelConfig,
    RefineSection,
    load_config,
)
from autosod_ray.data.images import IMAGE_EXTENSIONS, decode_image, resize_square  # noqa: E402
from autosod_ray.edge_refine import refiner  # noqa: E402
from autosod_ray.metrics import MetricMeans, image_metrics  # noqa: E402
from autosod_ray.potnet import PatchFeatures, POTNet  # noqa: E402
from autosod_ray.potnet.baseline import NcutBaseline  # noqa: E402
from autosod_ray.potnet.mask import mask_at_size  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "potnet.yaml"
PER_IMAGE_METRICS = ("IoU", "MAE", "Sm", "wF")

# Table II of the paper, and our own choices undone; each is a change to the full config
ABLATIONS = {
    "k-means only": {"clustering": "kmeans"},
    "spectral only": {"clustering": "spectral"},
    "without L_con refinement": {"refine_steps": 0},
    "without OT (nearest prototype)": {"transport": False},
    "without re-weighting": {"reweight": False},
    "literal softmax marginal (t = 1)": {"marginal": "softmax", "marginal_temperature": 1.0},
    "hard fusion": {"fusion": "hard"},
    "without the boundary prior": {"border_prior": "none"},
}
BASELINE = "ncut baseline"


def variants(
    potnet: POTNetConfig, ablations: bool, extra: list[str], baseline: bool = False
) -> dict[str, object]:
    """name -> POTNetConfig (or the ncut baseline), the full config first."""
    table: dict[str, object] = {"POTNet (this config)": potnet}
    if ablations:
        for name, change in ABLATIONS.items():
            table[name] = POTNetConfig.model_validate({**potnet.model_dump(), **change})
    if ablations or baseline:
        table[BASELINE] = "baseline"
    for spec in extra:  # NAME:key=value,key=value
        name, _, sets = spec.partition(":")
        change = dict(kv.split("=", 1) for kv in sets.split(",") if kv)
        table[name] = POTNetConfig.model_validate({**potnet.model_dump(), **change})
    return table


def image_mask_pairs(images: Path, masks: Path, limit: int | None) -> list[tuple[Path, Path]]:
    by_stem = {p.stem: p for p in masks.iterdir() if p.suffix.lower() == ".png"}
    pairs = [
        (p, by_stem[p.stem])
        for p in sorted(images.iterdir())
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.stem in by_stem
    ]
    if not pairs:
        raise SystemExit(f"no image in {images} has a mask of the same stem in {masks}")
    return pairs[:limit] if limit else pairs


def build_labellers(table: dict[str, object], seed_tau: float) -> dict[str, object]:
    return {
        name: NcutBaseline(seed_tau) if v == "baseline" else POTNet(v.params())
        for name, v in table.items()
    }


def score_batch(
    labellers, feats: PatchFeatures, gts, sizes, stems, save=None, squares=None, refine=None
) -> tuple[list, dict]:
    """Every labeller on one batch of features -> (per-image rows, seconds per labeller).
    With `refine` (the config's refine section, as a dict, method not none) POTNet's maps
    are refined on `squares` (the B x S x S x 3 images the features are of), as the
    pseudolabel job's actors refine them."""
    rows, seconds = [], {}
    for name, labeller in labellers.items():
        t0 = time.perf_counter()
        out = labeller(feats)
        potnet = isinstance(labeller, POTNet)
        if potnet and refine:
            refined = refiner(RefineSection(**refine))(out.saliency, squares)
            masks = [mask_at_size(r, h, w) for r, (h, w) in zip(refined, sizes, strict=True)]
        else:
            masks = out.masks(sizes)
        seconds[name] = time.perf_counter() - t0
        signals = out.quality_signals if potnet else {}
        for i, ((soft, binary), gt, stem) in enumerate(zip(masks, gts, stems, strict=True)):
            m = image_metrics(soft, gt, binary)
            row = {"variant": name, "stem": stem, **{k: m[k] for k in PER_IMAGE_METRICS}}
            row.update(F_curve=m["F_curve"], E_curve=m["E_curve"], adpF=m["adpF"], adpE=m["adpE"])
            if potnet:
                row.update({k: float(v[i]) for k, v in out.columns().items()})
                row.update({f"signal_{k}": float(v[i]) for k, v in signals.items()})
            rows.append(row)
            if save is not None and name == next(iter(labellers)):
                save_masks(save, stem, soft, binary)
    return rows, seconds


def _cached_job(args) -> tuple[list, dict]:
    table, seed_tau, folder, stems, gt_paths, save, refine, image_paths, image_size = args
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    with threadpool_limits(1):
        labellers = build_labellers(table, seed_tau)
        (batch,) = cached_batches(Path(folder), stems, len(stems))
        feats = PatchFeatures(
            np.stack([c.features for c in batch]),
            np.stack([c.cls_attention for c in batch]),
            batch[0].grid,
        )
        gts = [np.asarray(Image.open(p).convert("L")) > 127 for p in gt_paths]
        squares = None
        if refine:  # the images the features are of, as the backbone saw them
            images = [decode_image(Path(p).read_bytes(), 1 << 30) for p in image_paths]
            squares = np.stack([resize_square(im, image_size) for im in images])
        sizes = [c.size for c in batch]
        return score_batch(labellers, feats, gts, sizes, stems, save, squares, refine)


def run(args: argparse.Namespace) -> dict:
    cfg = load_config(PseudolabelConfig, args.config, args.set)
    pairs = image_mask_pairs(Path(args.images), Path(args.masks), args.limit)
    table = variants(cfg.potnet, args.ablations, args.variant, args.baseline)
    batch = cfg.pipeline.potnet_batch_size
    save = Path(args.save_masks) if args.save_masks else None
    refine = cfg.refine.model_dump() if cfg.refine.method != "none" else None
    rows, seconds, backbone_s = [], dict.fromkeys(table, 0.0), None
    if args.feature_cache:
        folder = fill_cache([p for p, _ in pairs], Path(args.feature_cache), cfg.backbone)
        jobs = [
            (
                table,
                cfg.potnet.seed_tau,
                str(folder),
                [p.stem for p, _ in pairs[s : s + batch]],
                [m for _, m in pairs[s : s + batch]],
                save,
                refine,
                [str(p) for p, _ in pairs[s : s + batch]],
                vit_geometry(cfg.backbone)[0],
            )
            for s in range(0, len(pairs), batch)
        ]
        with mp.get_context("spawn").Pool(args.workers) as pool:
            for done, (r, sec) in enumerate(pool.imap(_cached_job, jobs), 1):
                rows += r
                for k, v in sec.items():
                    seconds[k] += v
                print(f"{min(done * batch, len(pairs))}/{len(pairs)} images", file=sys.stderr)
    else:
        from autosod_ray.backbone import ViTFeatures
        from autosod_ray.labeller import PseudoLabeller

        extractor = ViTFeatures(cfg.backbone)
        core = PseudoLabeller(cfg.backbone, cfg.potnet, extractor)
        labellers = build_labellers(table, cfg.potnet.seed_tau)
        backbone_s = 0.0
        for start in range(0, len(pairs), batch):
            chunk = pairs[start : start + batch]
            images = [decode_image(p.read_bytes(), cfg.potnet.max_pixels) for p, _ in chunk]
            gts = [np.asarray(Image.open(m).convert("L")) > 127 for _, m in chunk]
            t0 = time.perf_counter()
            squares = np.stack([resize_square(im, core.image_size) for im in images])
            feats = core.features(squares)
            backbone_s += time.perf_counter() - t0
            sizes = [im.shape[:2] for im in images]
            stems = [p.stem for p, _ in chunk]
            r, sec = score_batch(labellers, feats, gts, sizes, stems, save, squares, refine)
            rows += r
            for k, v in sec.items():
                seconds[k] += v
            print(f"{start + len(chunk)}/{len(pairs)} images", file=sys.stderr, flush=True)
    return report(cfg, args, pairs, rows, seconds, backbone_s)


def summarise(mine: list[dict]) -> dict:
    """The dataset-level metrics of some per-image rows (and quality's Spearman with IoU)."""
    means = MetricMeans()
    for r in mine:
        means.add(r)
    res = means.results()
    if mine and "quality" in mine[0]:
        iou = [r["IoU"] for r in mine]
        res["quality_spearman"] = float(spearmanr([r["quality"] for r in mine], iou)[0])
    return res


def report(cfg, args, pairs, rows, seconds, backbone_s) -> dict:
    n = len(pairs)
    stems = [p.stem for p, _ in pairs]
    fold = dict(zip(stems, fold_of(stems, args.folds), strict=True))
    for r in rows:
        r["fold"] = int(fold[r["stem"]])
    results = {}
    for name in seconds:
        mine = [r for r in rows if r["variant"] == name]
        res = {**summarise(mine), "labeller_s_per_image": seconds[name] / n}
        if backbone_s is not None:
            res["s_per_image"] = (backbone_s + seconds[name]) / n
        if "quality" in mine[0]:
            err = np.array([r["ot_marginal_error"] for r in mine])
            res["ot_not_converged"] = float(np.mean(err >= cfg.potnet.ot_tol))
        res["folds"] = [summarise([r for r in mine if r["fold"] == f]) for f in range(args.folds)]
        results[name] = res
    if args.per_image:
        import pandas as pd

        flat = [
            {k: (v.astype(np.float32) if k.endswith("_curve") else v) for k, v in r.items()}
            for r in rows
        ]
        pd.DataFrame(flat).to_parquet(args.per_image)
    return {
        "config": cfg.model_dump(mode="json"),
        "images": str(args.images),
        "n": n,
        "backbone_s_per_image": None if backbone_s is None else backbone_s / n,
        "results": results,
    }


def save_masks(out: Path, stem: str, soft: np.ndarray, binary: np.ndarray) -> None:
    (out / "soft").mkdir(parents=True, exist_ok=True)
    (out / "binary").mkdir(parents=True, exist_ok=True)
    Image.fromarray(soft).save(out / "soft" / f"{stem}.png")
    Image.fromarray(binary.astype(np.uint8) * 255).save(out / "binary" / f"{stem}.png")


def fold_table(report: dict, metric: str = "IoU") -> str:
    """One metric per variant and fold (the folds protocol: benchmarks/folds.py)."""
    first = next(iter(report["results"].values()))
    folds = range(len(first["folds"]))
    lines = [
        f"| {metric} by fold | " + " | ".join(f"fold {f}" for f in folds) + " | all |",
        "|---" * (len(folds) + 2) + "|",
    ]
    for name, r in report["results"].items():
        cells = [f"{r['folds'][f].get(metric, np.nan):.3f}" for f in folds] + [f"{r[metric]:.3f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table(report: dict) -> str:
    cols = ("maxF", "meanF", "Sm", "meanE", "MAE", "IoU", "labeller_s_per_image")
    cols += ("quality_spearman",)
    lines = ["| variant | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in report["results"].items():
        cells = [f"{r[c]:.3f}" if c in r else "" for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images", required=True, help="folder of images")
    p.add_argument("--masks", required=True, help="folder of ground-truth PNGs, same stems")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. potnet.seed=attention (repeatable)",
    )
    p.add_argument("--limit", type=int, default=None, help="first N images only")
    p.add_argument("--ablations", action="store_true", help="also run the Table II variants")
    p.add_argument("--baseline", action="store_true", help="also run the ncut baseline")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:K=V,K=V",
        help="an extra variant: potnet keys changed from the config (repeatable)",
    )
    p.add_argument("--feature-cache", default=None, metavar="DIR", help="backbone features once")
    p.add_argument("--workers", type=int, default=1, help="processes (with --feature-cache)")
    p.add_argument("--per-image", default=None, metavar="FILE", help="per-image rows (Parquet)")
    p.add_argument(
        "--save-masks", default=None, metavar="OUT", help="write OUT/{soft,binary}/*.png"
    )
    p.add_argument("--json", default=None, metavar="FILE", help="write the report as JSON")
    p.add_argument("--folds", type=int, default=5, help="report per fold too (benchmarks/folds.py)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    report_ = run(args)
    bb = report_["backbone_s_per_image"]
    print(f"{report_['n']} images from {report_['images']}; backbone {bb or 0:.3f} s/image")
    print(table(report_))
    for metric in ("IoU", "maxF"):
        print(fold_table(report_, metric))
    if args.json:
        Path(args.json).write_text(json.dumps(report_, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
