"""Fit POTNet's per-mask `quality` score on images with ground truth (ECSSD only).

    python benchmarks/fit_quality.py --per-image FILE.parquet [--variant NAME] [--folds 5]

Reads the per-image rows of `benchmarks/quality.py --per-image` (the `signal_*`
columns and IoU of one variant), prints each signal's Spearman correlation
with IoU, and fits IoU ~ sigmoid(a + w . signals) by least squares (so the
score reads as an estimate of IoU, in (0, 1), without ties), reporting the
Spearman correlation of its cross-validated predictions (each fold scored by a
model fit on the others) and the fit on all rows, whose coefficients are what
`autosod_ray/potnet/quality.py` holds.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))

from autosod_ray.potnet.quality import QUALITY_SIGNALS  # noqa: E402


def design(frame: pd.DataFrame, names: tuple[str, ...]) -> np.ndarray:
    return np.column_stack([frame[f"signal_{n}"].to_numpy(np.float64) for n in names])


def predict(coef: np.ndarray, x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-(coef[0] + x @ coef[1:])))


def fit(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares of sigmoid(a + w . x) to y: returns (a, w...)."""
    from scipy.optimize import least_squares

    return least_squares(lambda c: predict(c, x) - y, np.zeros(x.shape[1] + 1)).x


def fit_balanced(x: np.ndarray, y: np.ndarray, relative: np.ndarray) -> np.ndarray:
    """Fixed relative weights on the standardised signals; only the scale and offset of the
    sigmoid are fit. Returns (a, w...) on the raw signals, as `fit` does."""
    mean, std = x.mean(0), x.std(0)
    combo = ((x - mean) / std) @ relative
    a, b = fit(combo[:, None], y)
    w = b * relative / std
    return np.concatenate([[a - w @ mean], w])


def cross_validated(x, y, folds: int, seed: int = 0, fitter=fit) -> np.ndarray:
    order = np.random.default_rng(seed).permutation(len(y))
    out = np.empty(len(y))
    for part in np.array_split(order, folds):
        train = np.setdiff1d(order, part)
        out[part] = predict(fitter(x[train], y[train]), x[part])
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--per-image", required=True)
    p.add_argument("--variant", default="POTNet (this config)")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument(
        "--relative",
        default=None,
        metavar="W,W,...",
        help="fix the relative weights of the standardised signals; fit only scale and offset",
    )
    args = p.parse_args(argv)
    frame = pd.read_parquet(args.per_image)
    frame = frame[frame.variant == args.variant]
    y = frame.IoU.to_numpy(np.float64)
    print(f"{len(frame)} images of {args.variant!r}; mean IoU {y.mean():.3f}")
    for c in sorted(c for c in frame.columns if c.startswith("signal_")):
        print(f"  {c[7:]:<20} Spearman with IoU {spearmanr(frame[c], y)[0]:+.3f}")
    x = design(frame, QUALITY_SIGNALS)
    fitter = fit
    if args.relative:
        relative = np.array([float(w) for w in args.relative.split(",")])
        fitter = lambda x, y: fit_balanced(x, y, relative)  # noqa: E731
    cv = np.mean([cross_validated(x, y, args.folds, seed, fitter) for seed in range(5)], axis=0)
    coef = fitter(x, y)
    quarter = np.argsort(-cv)[: len(y) // 4]
    print(f"sigmoid of a linear model on {', '.join(QUALITY_SIGNALS)}:")
    print(f"  {args.folds}-fold cross-validated Spearman {spearmanr(cv, y)[0]:.3f} (5 splits)")
    print(f"  best quarter by it: mean IoU {y[quarter].mean():.3f} (all {y.mean():.3f})")
    print(f"  fit on all rows: Spearman {spearmanr(predict(coef, x), y)[0]:.3f}")
    print(
        f"  coefficients: intercept {coef[0]:.4f}, "
        + ", ".join(f"{n} {c:.4f}" for n, c in zip(QUALITY_SIGNALS, coef[1:], strict=True))
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
