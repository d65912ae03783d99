"""Fit a per-mask `quality` score, every choice inside the folds.

    python benchmarks/fit_quality.py --per-image FILE.parquet [--score potnet|autosod] \
        [--variant NAME] [--folds 5] [--only-folds 0,1] [--report-folds 2,3,4] \
        [--refine guided|none] [--signals A,B] [--shipped] [--no-object CROPS.parquet]

Reads the per-image rows (the `signal_*` columns, IoU and fold of one variant) of
`benchmarks/quality.py --per-image` for POTNet's score, or of
`benchmarks/autosod_quality.py --per-image` for predict's (`--score autosod`). The score is made in
two stages, both fit on the training folds only:

1. rank: a ridge regression of IoU's normal scores (its ranks mapped through
   the inverse normal) on the standardised signals, so the combination is
   fit to order masks as IoU does rather than to the few worst;
2. calibrate: IoU ~ sigmoid(a + b * rank) by least squares, so the score reads
   as an estimate of the mask's IoU.

The two compose into quality = sigmoid(intercept + weights . signals), the form
`QualityScore` ships (autosod_ray/potnet/quality.py, autosod_ray/model/quality.py).
Each fold is scored by a model fit on the other folds; the figures printed are
those of the held-out folds only:
Spearman with IoU, calibration error (mean |mean quality - mean IoU| over
deciles of quality) and the mean IoU of the best 10% / 25% / 50% by quality.
The last lines fit all folds: the coefficients to ship.

It also prints the held-out quality of masks by the share of the map's border they
cover; `--no-object` scores object-free images (benchmarks/no_object.py's
crops, whose right quality is low), each by the model that left out its stem's fold.
`--only-folds 0,1` reads those folds' rows alone (and the crops cut from them): each is
scored by a fit on the others of them, so a choice made there never reads the rest;
`--report-folds 2,3,4` adds those folds' held-out rows pooled. predict's empty masks
score 0 (as `prediction_quality` scores them) and are left out of every fit: the score
never meets them, and one such row (its feature and refined-map splits 0, IoU 0) would
weigh on a fit as much as a hundred ordinary ones.

The signals are fixed in advance (the shipped score's). POTNet's first eight were not
chosen on ECSSD; predict's (three for refined masks, two unrefined) and POTNet's ninth
(feature_separability, taken from predict's) were chosen on folds 0-1 (model/quality.py),
so read folds 2-4. POTNet's:
`fg_fraction` and `consistency_loss` are left out because their correlation
with IoU changes sign between ECSSD and a held-out set of cluttered scenes
(+0.06 / -0.16 here, -0.31 / -0.40 there), so they describe the dataset more
than the mask.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import least_squares
from scipy.stats import norm, rankdata, spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))

from folds import fold_of  # noqa: E402

from autosod_ray.model.quality import PREDICTION_QUALITY  # noqa: E402
from autosod_ray.potnet.quality import POTNET_QUALITY  # noqa: E402

# the score each labeller ships, and where: its signals are fixed in advance
SCORES = {
    "potnet": (POTNET_QUALITY, "autosod_ray/potnet/quality.py", "POTNet (this config)"),
    "autosod": (PREDICTION_QUALITY["guided"], "autosod_ray/model/quality.py", None),  # --refine
}


def predict(coef: np.ndarray, x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-(coef[0] + x @ coef[1:])))


def calibrate(r: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least squares of sigmoid(a + b r) to y -> (a, b)."""
    a, b = least_squares(lambda c: predict(c, r[:, None]) - y, np.zeros(2)).x
    return float(a), float(b)


def fit(x: np.ndarray, y: np.ndarray, ridge: float = 1.0) -> np.ndarray:
    """Stage 1 (rank) and stage 2 (calibrate) on rows x (signals) and y (IoU); returns
    (intercept, weights...) on the raw signals."""
    mean, std = x.mean(0), np.maximum(x.std(0), 1e-9)
    z = np.column_stack([np.ones(len(y)), (x - mean) / std])
    # stage 1: ridge regression of the normal scores of IoU's ranks
    target = norm.ppf((rankdata(y) - 0.5) / len(y))
    penalty = ridge * np.diag([0.0] + [1.0] * x.shape[1])
    w = np.linalg.solve(z.T @ z + penalty, z.T @ target)
    # stage 2: sigmoid calibration of that rank score to IoU
    a, b = calibrate(z @ w, y)
    weights = b * w[1:] / std
    return np.concatenate([[a + b * (w[0] - (w[1:] / std) @ mean)], weights])


def fold_fits(x: np.ndarray, y: np.ndarray, folds: np.ndarray) -> dict[int, np.ndarray]:
    """fold -> the model fit on the other folds."""
    return {f: fit(x[folds != f], y[folds != f]) for f in np.unique(folds)}


def held_out(x: np.ndarray, y: np.ndarray, folds: np.ndarray, fits=None) -> np.ndarray:
    """Each fold scored by a model fit on the others (`fits`: `fold_fits`' answer, to
    score other rows of the same folds with the same models)."""
    fits = fold_fits(x, y, folds) if fits is None else fits
    out = np.full(len(x), np.nan)
    for f, coef in fits.items():
        out[folds == f] = predict(coef, x[folds == f])
    return out


def calibration_error(quality: np.ndarray, iou: np.ndarray, bins: int = 10) -> float:
    """Mean over deciles of quality of |mean quality - mean IoU|."""
    parts = np.array_split(np.argsort(quality), bins)
    return float(np.mean([abs(quality[p].mean() - iou[p].mean()) for p in parts]))


def best_share(quality: np.ndarray, iou: np.ndarray, share: float) -> float:
    """Mean IoU of the best `share` of the masks by quality."""
    return float(iou[np.argsort(-quality)[: max(1, int(len(iou) * share))]].mean())


def figures(quality: np.ndarray, iou: np.ndarray) -> dict[str, float]:
    return {
        "spearman": float(spearmanr(quality, iou)[0]),
        "calibration_error": calibration_error(quality, iou),
        "mean_quality": float(quality.mean()),
        "mean_iou": float(iou.mean()),
        **{f"best_{int(s * 100)}": best_share(quality, iou, s) for s in (0.1, 0.25, 0.5)},
    }


def load(per_image: str, variant: str, n_folds: int, agreement: str | None = None):
    frame = pd.read_parquet(per_image)
    frame = frame[frame.variant == variant].sort_values("stem")
    if agreement:  # a student's agreement with these masks, by stem (autosod_quality.py)
        theirs = pd.read_parquet(agreement, columns=["variant", "stem", "agreement"])
        if theirs.variant.nunique() != 1:
            raise SystemExit(f"--agreement {agreement}: rows of several models; give one")
        theirs = theirs.drop(columns="variant").rename(columns={"agreement": "signal_agreement"})
        frame = frame.merge(theirs, on="stem", how="inner", validate="one_to_one")
        if frame.signal_agreement.isna().any() or len(frame) != len(theirs):
            raise SystemExit(f"--agreement {agreement}: not the same images as --per-image")
    if "fold" not in frame:
        frame["fold"] = fold_of(frame.stem, n_folds)
    signals = {
        c[7:]: frame[c].to_numpy(np.float64) for c in frame.columns if c.startswith("signal_")
    }
    return frame, signals


def source_folds(stems: pd.Series, frame: pd.DataFrame) -> np.ndarray:
    """The fold of the image each row was made from (a crop is named by its source's
    stem), so that it is scored by the model that never saw that image."""
    fold_by_stem = dict(zip(frame.stem, frame.fold, strict=True))
    missing = sorted(set(stems) - set(fold_by_stem))
    if missing:
        raise SystemExit(f"--no-object rows of images not in --per-image: {missing[:5]}")
    return stems.map(fold_by_stem).to_numpy()


def no_mask(score: str, rows: pd.DataFrame) -> np.ndarray:
    """The rows predict scores 0 without reading a signal: its empty masks
    (`prediction_quality` scores no other mask exactly 0, so the stored `quality` marks
    them). They are left out of every fit (the score never meets them) and score 0."""
    if score != "autosod":
        return np.zeros(len(rows), bool)
    return rows.quality.to_numpy() == 0


def describe_no_object(label: str, quality: np.ndarray) -> str:
    """Quality on images with no object (IoU 0 with any object's mask): low is right."""
    q25, q50, q75 = np.quantile(quality, [0.25, 0.5, 0.75])
    below = ", ".join(f"< {t}: {np.mean(quality < t):.2f}" for t in (0.3, 0.4, 0.5))
    return f"  {label}: median {q50:.3f} (quartiles {q25:.3f} / {q75:.3f}); share {below}"


BORDER_BINS = ((0.0, 0.0, "none"), (0.0, 0.1, "up to 10%"), (0.1, 0.2, "10-20%"),
               (0.2, 0.4, "20-40%"), (0.4, 1.0, "40% or more"))  # fmt: skip


def by_border_contact(border: np.ndarray, quality: np.ndarray, iou: np.ndarray) -> list[str]:
    """Masks binned by the share of the map's border they cover: count, IoU, quality."""
    lines = []
    for lo, hi, name in BORDER_BINS:
        m = border == 0 if hi == 0 else (border > lo) & (border <= hi)
        if m.any():
            lines.append(f"  border {name}: {m.sum()} masks, mean IoU {iou[m].mean():.3f}, "
                         f"mean quality {quality[m].mean():.3f}")  # fmt: skip
    return lines


def describe(label: str, quality: np.ndarray, iou: np.ndarray) -> str:
    f = figures(quality, iou)
    return (
        f"  {label}: Spearman {f['spearman']:.3f}, calibration error "
        f"{f['calibration_error']:.3f}, mean quality {f['mean_quality']:.3f} vs IoU "
        f"{f['mean_iou']:.3f}, best 10/25/50% IoU {f['best_10']:.3f} / {f['best_25']:.3f} / "
        f"{f['best_50']:.3f}"
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--per-image", required=True)
    p.add_argument("--score", choices=sorted(SCORES), default="potnet")
    p.add_argument("--variant", help="the rows' variant (default: POTNet's, or the only one)")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--only-folds", help="comma-separated folds: read only their rows (a choice)")
    p.add_argument(
        "--report-folds", help="comma-separated folds: their held-out rows pooled (not chosen on)"
    )
    p.add_argument("--signals", help="comma-separated signals (default: the shipped score's)")
    p.add_argument(
        "--agreement", help="per-image rows of autosod_quality.py --teacher-masks: + agreement"
    )
    p.add_argument(
        "--refine",
        choices=sorted(PREDICTION_QUALITY),
        default="guided",
        help="--score autosod: the refine.method whose shipped fit --shipped applies",
    )
    p.add_argument("--shipped", action="store_true", help="the shipped score as it is: no fit")
    p.add_argument(
        "--no-object",
        help="per-image rows on object-free images (benchmarks/no_object.py's crops, named by "
        "the stem they came from): their quality, held-out by that stem's fold",
    )
    args = p.parse_args(argv)
    score, module, variant = SCORES[args.score]
    if args.score == "autosod":
        score = PREDICTION_QUALITY[args.refine]
    variant = (
        args.variant
        or variant
        or pd.read_parquet(args.per_image, columns=["variant"]).variant.iloc[0]
    )
    frame, signals = load(args.per_image, variant, args.folds, args.agreement)
    crops = load(args.no_object, variant, args.folds) if args.no_object else None
    if args.only_folds:
        keep = frame.fold.isin([int(f) for f in args.only_folds.split(",")]).to_numpy()
        frame, signals = frame[keep], {k: v[keep] for k, v in signals.items()}
        if crops is not None:  # the crops cut from those folds' images
            inside = crops[0].stem.isin(frame.stem).to_numpy()
            crops = crops[0][inside], {k: v[inside] for k, v in crops[1].items()}
    names = args.signals.split(",") if args.signals else list(score.signals)
    y, folds = frame.IoU.to_numpy(np.float64), frame.fold.to_numpy()
    print(f"{len(frame)} images of {variant!r}; mean IoU {y.mean():.3f}")
    for name, v in signals.items():
        print(f"  {name:<20} Spearman with IoU {spearmanr(v, y)[0]:+.3f}")
    x = np.column_stack([signals[n] for n in names])
    empty = no_mask(args.score, frame)
    if empty.any():
        print(f"  {empty.sum()} empty masks: scored 0, as predict does, and left out of the fits")
    if args.shipped:  # no fit: the score as it ships, on rows it may never have seen
        shipped = np.where(empty, 0.0, score({n: signals[n] for n in score.signals}))
        print(describe(f"shipped {module} score, as it is", shipped, y))
        print(f"  median quality {np.median(shipped):.3f}")
        for t in (0.3, 0.4, 0.5):  # what a "low quality" rule at t would flag
            low = shipped < t
            iou_low = f"{y[low].mean():.3f}" if low.any() else "-"
            print(f"  quality < {t}: {low.mean():.3f} of the masks, their mean IoU {iou_low}")
        if crops is not None:
            on_empty = np.where(no_mask(args.score, crops[0]), 0.0, score(crops[1]))
            print(describe_no_object("object-free images", on_empty))
        return 0
    fits = fold_fits(x[~empty], y[~empty], folds[~empty])
    quality = np.where(empty, 0.0, held_out(x, y, folds, fits))
    print(f"held-out folds (each scored by a model fit on the others), signals {names}:")
    for f in np.unique(folds):
        print(describe(f"fold {f}", quality[folds == f], y[folds == f]))
    print(describe("pooled", quality, y))
    if args.report_folds:
        m = np.isin(folds, [int(f) for f in args.report_folds.split(",")])
        print(describe(f"pooled over folds {args.report_folds}", quality[m], y[m]))
    if "border_contact" in signals:
        print("\n".join(by_border_contact(signals["border_contact"], quality, y)))
    if crops is not None:  # each scored by the model that left out its stem's fold
        crop_x = np.column_stack([crops[1][n] for n in names])
        on_empty = held_out(crop_x, None, source_folds(crops[0].stem, frame), fits)
        on_empty = np.where(no_mask(args.score, crops[0]), 0.0, on_empty)
        print(describe_no_object("object-free images, held-out by fold", on_empty))
    alone = held_out(signals["separability"][:, None], y, folds)
    print(describe("separability alone, pooled", alone, y))
    coef = fit(x[~empty], y[~empty])
    print(f"fit on all folds (what {module} ships):")
    print(f"  signals={tuple(names)!r}")
    print(f"  intercept={coef[0]:.4f}")
    print(f"  weights={tuple(round(float(c), 4) for c in coef[1:])!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
