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
    feature_separability,
    largest_component_share,
    separability,
)


def on_grid(prob: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """H x W map -> its mean over each cell of an h x w grid that divides it (the pixel
    decoder's 2h x 2w map back on the token grid). A mask under half of every cell it
    touches (a sliver) is empty there, and its feature split reads 0."""
    (big_h, big_w), (h, w) = prob.shape, grid
    if big_h % h or big_w % w:
        raise ValueError(f"a {big_h} x {big_w} map does not divide into a {h} x {w} grid")
    return prob.reshape(h, big_h // h, w, big_w // w).mean(axis=(1, 3))  # block means


def prediction_signals(
    prob: np.ndarray, objectness: np.ndarray, tokens: np.ndarray, threshold: float = 0.5
) -> dict[str, np.ndarray]:
    """Per-image views of how trustworthy a predicted mask is, each B, from the B x H x W
    mask probability of the chosen query, its B objectness and the B x h x w x D encoder
    tokens the network read:

    - separability: how two-valued the probability is (Otsu's between-class variance
      over the total);
    - decisiveness: the mean of |2p - 1|, 1 when every pixel is sure either way;
    - uncertain_band: log(0.001 + pixels with p in (0.1, 0.9) over the mask's pixels):
      the width of the fuzzy rim around the object relative to its size;
    - largest_component: the share of the mask in its largest connected piece;
    - border_contact: the share of the map's outer ring inside the mask;
    - objectness: the chosen query's own score (sigmoid);
    - feature_separability: how well the mask, on the token grid, splits the encoder's
      features (`feature_separability`): a view the decoder's confidence does not give,
      low for a sure mask cut in the wrong place.
    """
    rows = []
    for p, o, t in zip(
        np.asarray(prob, np.float32), np.asarray(objectness, np.float32), tokens, strict=True
    ):
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
                feature_separability(t, on_grid(p, t.shape[:2]) > threshold),
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
    "feature_separability",
)

# Fit on ECSSD's 1000 images as predicted by student-0 of jobs/selftrain.py (the default
# configs/selftrain-cpu.yaml, trained on POTNet's refined masks of ../shared/data/unlabeled):
# benchmarks/autosod_quality.py, then benchmarks/fit_quality.py --score autosod. The
# signals were chosen on folds 0-1: the map's own (the rim, the largest piece) and the
# encoder's (feature_separability, which lifts the ranking most on later students, whose
# maps are surer); the others add nothing there (the maps are nearly binary, so
# separability and decisiveness saturate; objectness is all but constant). The IoU they
# estimate is that of the mask predict writes, so each `refine.method` has its fit (the
# guided filter's masks are better). Held-out folds: README, "Train and predict",
# "Quality of predict's masks".
PREDICTION_QUALITY = {
    "guided": QualityScore(
        signals=("uncertain_band", "largest_component", "feature_separability"),
        intercept=-2.5313,
        weights=(-0.4281, 0.8695, 2.6223),
    ),
    "none": QualityScore(
        signals=("uncertain_band", "largest_component", "feature_separability"),
        intercept=-2.4365,
        weights=(-0.3802, 0.8368, 2.6315),
    ),
}


def prediction_quality(
    prob: np.ndarray,
    objectness: np.ndarray,
    tokens: np.ndarray,
    threshold: float = 0.5,
    refine: str = "guided",
):
    """B x H x W mask probability (the network's own) + B objectness + B x h x w x D
    encoder tokens -> B quality in [0, 1), higher = better: the estimated IoU of the mask
    `refine` makes of it. An empty mask scores 0: its IoU with a human mask of any object
    is 0 (the signals, made for a mask, would read it as a clean one)."""
    prob = np.asarray(prob, np.float32)
    score = PREDICTION_QUALITY[refine]
    quality = score(prediction_signals(prob, objectness, tokens, threshold))
    empty = ~(prob > threshold).reshape(len(prob), -1).any(axis=1)
    return np.where(empty, np.float32(0.0), quality).astype(np.float32)
