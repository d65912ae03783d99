"""How much to trust a trained AutoSOD model's mask, from its own output (never from
ground truth): the predict job's `quality` column, read like POTNet's.

`prediction_signals` measures per-image properties of the best query's mask
probability; `PREDICTION_QUALITY` combines them into an estimate of the mask's IoU
with a human mask, so a self-training round can keep the student's surest masks
as the first round kept the teacher's.
"""

from __future__ import annotations

import numpy as np

from ..potnet.quality import (
    QualityScore,
    border_contact,
    largest_component_share,
    separability,
)


def prediction_signals(
    prob: np.ndarray, objectness: np.ndarray, threshold: float = 0.5
) -> dict[str, np.ndarray]:
    """Per-image views of how trustworthy a predicted mask is, each B, from the B x H x W
    mask probability of the chosen query and its B objectness:

    - separability: how two-valued the probability is (Otsu's between-class variance
      over the total);
    - decisiveness: the mean of |2p - 1|, 1 when every pixel is sure either way;
    - uncertain_band: log(0.001 + pixels with p in (0.1, 0.9) over the mask's pixels):
      the width of the fuzzy rim around the object relative to its size;
    - largest_component: the share of the mask in its largest connected piece;
    - border_contact: the share of the map's outer ring inside the mask;
    - objectness: the chosen query's own score (sigmoid).
    """
    rows = []
    for p, o in zip(np.asarray(prob, np.float32), np.asarray(objectness, np.float32), strict=True):
        mask = p > threshold
        area = max(int(mask.sum()), 1)
        rows.append(
            (
                separability(p),
                float(np.abs(2.0 * p - 1.0).mean()),
                float(np.log(1e-3 + ((p > 0.1) & (p < 0.9)).sum() / area)),
                largest_component_share(mask),
                border_contact(mask),
                float(o),
            )
        )
    table = np.asarray(rows, np.float32).reshape(-1, len(PREDICTION_SIGNAL_NAMES))
    return {name: table[:, i] for i, name in enumerate(PREDICTION_SIGNAL_NAMES)}


PREDICTION_SIGNAL_NAMES = (
    "separability",
    "decisiveness",
    "uncertain_band",
    "largest_component",
    "border_contact",
    "objectness",
)

# Fit on ECSSD's 1000 images as predicted by student-0 of configs/selftrain-cpu.yaml (trained
# on POTNet's masks of ../shared/data/unlabeled): benchmarks/autosod_quality.py, then
# benchmarks/fit_quality.py --score autosod. The two signals were chosen on folds 0-1: the
# others add nothing there (the maps are nearly binary, so separability and decisiveness
# saturate; objectness is all but constant). The signals read the network's own map; the
# IoU they estimate is that of the mask predict writes, so each `refine.method` has its
# fit (the guided filter's masks are better: a higher intercept). Held-out folds: README,
# "Train and predict", "Quality of predict's masks".
PREDICTION_QUALITY = {
    "guided": QualityScore(
        signals=("uncertain_band", "largest_component"),
        intercept=-3.3825,
        weights=(-0.6919, 1.5935),
    ),
    "none": QualityScore(
        signals=("uncertain_band", "largest_component"),
        intercept=-3.2250,
        weights=(-0.6247, 1.576),
    ),
}


def prediction_quality(
    prob: np.ndarray, objectness: np.ndarray, threshold: float = 0.5, refine: str = "guided"
):
    """B x H x W mask probability (the network's own) + B objectness -> B quality in
    [0, 1), higher = better: the estimated IoU of the mask `refine` makes of it. An empty
    mask scores 0: its IoU with a human mask of any object is 0 (the signals, made for a
    mask, would read it as a clean one)."""
    prob = np.asarray(prob, np.float32)
    score = PREDICTION_QUALITY[refine]
    quality = score(prediction_signals(prob, objectness, threshold))
    empty = ~(prob > threshold).reshape(len(prob), -1).any(axis=1)
    return np.where(empty, np.float32(0.0), quality).astype(np.float32)
