"""How much to trust each mask, from what POTNet already has (never from ground truth).

`quality_signals` measures per-image properties of the patch-level saliency
against other views POTNet already has; `mask_quality` combines them into one
score in (0, 1), higher = better.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .mask import otsu_threshold


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def separability(values: np.ndarray) -> float:
    """Otsu's between-class variance over the total variance, in [0, 1]: how two-valued a map is."""
    v = values.ravel().astype(np.float64)
    var = v.var()
    if var < 1e-12:
        return 0.0
    t = otsu_threshold(v)
    lo, hi = v[v <= t], v[v > t]
    if not len(lo) or not len(hi):
        return 0.0
    w0, w1 = len(lo) / len(v), len(hi) / len(v)
    return float(w0 * w1 * (lo.mean() - hi.mean()) ** 2 / var)


def quality_signals(
    saliency: np.ndarray, seed_cam: np.ndarray, cls_attention: np.ndarray
) -> dict[str, np.ndarray]:
    """Per-image views of how trustworthy a mask is, each B, from B x h x w maps:

    - separability: how two-valued the saliency is (Otsu's between-class variance
      over the total); a clean object/background split scores near 1;
    - largest_component: the share of the mask in its largest connected piece;
    - seed_agreement: IoU of the mask with the seed CAM S_fg (step 1, before
      refinement) thresholded by Otsu: two views of the image agreeing;
    - attention_inside: the share of the CLS token's attention that falls inside
      the mask (a view the clustering never used).
    """
    rows = []
    for s, c, a in zip(saliency, seed_cam, cls_attention, strict=True):
        mask = s > otsu_threshold(s)
        labels, count = ndimage.label(mask)
        largest = np.bincount(labels.ravel())[1:].max() if count else 0
        rows.append(
            (
                separability(s),
                float(largest / max(mask.sum(), 1)),
                _iou(mask, c > otsu_threshold(c)),
                float((a * mask).sum() / max(a.sum(), 1e-12)),
            )
        )
    names = ("separability", "largest_component", "seed_agreement", "attention_inside")
    table = np.asarray(rows, np.float32).reshape(-1, len(names))
    return {name: table[:, i] for i, name in enumerate(names)}


# quality = sigmoid(intercept + sum_s weight_s * signal_s), an estimate of the mask's IoU with
# a human mask: relative weights 2 : 1 : 0.5 : 0.25 on the signals standardised over ECSSD's
# 1000 images, scale and offset fit to IoU there by least squares (benchmarks/fit_quality.py
# --relative 2,1,0.5,0.25; Spearman with IoU 0.684 cross-validated, README "Quality")
QUALITY_SIGNALS = ("separability", "largest_component", "seed_agreement", "attention_inside")
QUALITY_INTERCEPT = -9.1701
QUALITY_WEIGHTS = (8.0418, 1.9118, 0.7097, 0.4523)


def quality_score(signals: dict[str, np.ndarray]) -> np.ndarray:
    """`quality_signals` -> B quality in (0, 1), higher = better."""
    z = QUALITY_INTERCEPT + sum(
        w * signals[name] for name, w in zip(QUALITY_SIGNALS, QUALITY_WEIGHTS, strict=True)
    )
    return (1.0 / (1.0 + np.exp(-z))).astype(np.float32)
