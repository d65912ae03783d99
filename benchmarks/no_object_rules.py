"""How often the report's "no object" rules fire, on photos with an object and on
object-free crops, by fold.

    python benchmarks/no_object_rules.py --per-image ECSSD.parquet \
        --crops NAME=CROPS.parquet [--crops ...] [--set diffuse_attention=0.8 ...]

Reads the per-image rows of `benchmarks/quality.py --per-image` (`signal_fg_fraction`,
`quality`, `signal_attention_border`, and IoU for the photos) and applies
`autosod_ray.report.no_object_flags`, the function the report uses, with the report's
default settings (or `--set`). For each set it prints the share flagged by the mask's
rules (empty, background, low quality), by the image's rule (diffuse attention) and by
either, with the mean IoU of the flagged photos (a crop's IoU is 0 by construction). A
crop's fold is its source image's (benchmarks/no_object.py names a crop by its image's
stem). `--sweep` adds the shares flagged by other `diffuse_attention` thresholds (the
choice, made on the photos of folds 0-1), `--list` the photos only the image's rule flags.

The mask's rules read the rows as benchmarks/quality.py measures them: `fg_fraction` of the
mask on the patch grid, before any refinement to the image's size; the report reads the
written mask's, so its shares differ a little for the empty and background rules.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fit_quality import source_folds  # noqa: E402
from folds import fold_of  # noqa: E402

from autosod_ray.report import ReportSettings, no_object_flags  # noqa: E402

IMAGE_RULE = "diffuse attention"


def flags(rows: pd.DataFrame, settings: ReportSettings) -> tuple[np.ndarray, np.ndarray]:
    """(flagged by any of the mask's rules, flagged by the image's rule), each (N,)."""
    f = no_object_flags(
        rows["signal_fg_fraction"].to_numpy(np.float64),
        rows["quality"].to_numpy(np.float64),
        rows["signal_attention_border"].to_numpy(np.float64),
        settings,
    )
    image_rule = f.pop(IMAGE_RULE)
    return np.logical_or.reduce(list(f.values())), image_rule


def line(name: str, rows: pd.DataFrame, settings: ReportSettings, with_iou: bool) -> str:
    mask_rules, image_rule = flags(rows, settings)
    either = mask_rules | image_rule
    iou = rows["IoU"].to_numpy() if with_iou else None

    def share(sel):
        text = f"{sel.mean():.3f}"
        return text + (f" (IoU {iou[sel].mean():.3f})" if iou is not None and sel.any() else "")

    return (
        f"{name}: {len(rows)} images; mask rules {share(mask_rules)}; "
        f"{IMAGE_RULE} {share(image_rule)}; either {share(either)}; "
        f"median attention_border {rows['signal_attention_border'].median():.3f}, "
        f"median quality {rows['quality'].median():.3f}"
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--per-image", required=True, help="the photos' rows (with IoU)")
    p.add_argument("--crops", action="append", default=[], metavar="NAME=FILE")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--sweep", default="", help="comma-separated diffuse_attention thresholds")
    p.add_argument("--list", action="store_true", help="the photos only the image's rule flags")
    args = p.parse_args(argv)
    settings = dataclasses.replace(
        ReportSettings(), **{k: float(v) for k, v in (s.split("=", 1) for s in args.set)}
    )
    photos = pd.read_parquet(args.per_image)
    photos["fold"] = fold_of(photos["stem"], args.folds)
    sets = {"photos": photos}
    for spec in args.crops:
        name, path = spec.split("=", 1)
        crops = pd.read_parquet(path)
        crops["fold"] = source_folds(crops["stem"], photos)
        sets[name] = crops
    print(f"rules: {settings}")
    for name, part in (("folds 0-1", photos["fold"] < 2), ("folds 2-4", photos["fold"] >= 2)):
        print(line(f"photos {name}", photos[part], settings, True))
    for name, rows in sets.items():
        print(line(name, rows, settings, rows is photos))
        for fold in sorted(rows["fold"].dropna().unique()):
            part = rows[rows["fold"] == fold]
            print(line(f"  {name} fold {int(fold)}", part, settings, rows is photos))
    for t in [float(v) for v in args.sweep.split(",") if v]:
        s = dataclasses.replace(settings, diffuse_attention=t)
        shares = {
            name: f"{flags(rows, s)[1].mean():.3f}"
            for name, rows in (("photos folds 0-1", photos[photos["fold"] < 2]), *sets.items())
            if name != "photos"
        }
        print(f"diffuse_attention {t:g}: {IMAGE_RULE} flags {shares}")
    if args.list:
        mask_rules, image_rule = flags(photos, settings)
        alone = image_rule & ~mask_rules
        print(f"photos only {IMAGE_RULE} flags (stem, fold, attention_border, quality, IoU):")
        for r in photos[alone].itertuples():
            print(
                f"  {r.stem} {r.fold} {r.signal_attention_border:.2f} {r.quality:.2f} {r.IoU:.2f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
