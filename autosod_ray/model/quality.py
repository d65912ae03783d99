"""How much to trust a trained AutoSOD model's mask, from its own output (never from
ground truth): the predict job's `quality` column, read like POTNet's.

`prediction_signals` measures per-image properties of the best query's mask
probability and of the map predict's refinement makes of it; `noise_agreement` asks
the decoder again on nudged encoder tokens;
`PREDICTION_QUALITY` combines them into an estimate of the mask's IoU with a human
mask, so a self-training round can keep the student's surest masks as the first round
kept the teacher's.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..potnet.mask import upsample
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


@dataclass(frozen=True, eq=False)
class PredictedMask:
    """One image's prediction as the signals read it: the H x W mask probability of the
    chosen query, its objectness, the h x w x D encoder tokens the network read, the
    agreement of its nudged masks (NaN when not given), the S x S map predict's `refine`
    made of the probability (all NaN when not given) and the threshold that makes the
    mask."""

    prob: np.ndarray
    objectness: float
    tokens: np.ndarray
    agreement: float
    refined: np.ndarray
    threshold: float

    @functools.cached_property
    def mask(self) -> np.ndarray:
        return self.prob > self.threshold


# name -> a signal of one PredictedMask; a registry (as timm's models), so that a score
# computes only the signals it reads
PREDICTION_SIGNALS: dict[str, Callable[[PredictedMask], float]] = {}


def register(name: str):
    """Decorator: add a signal to PREDICTION_SIGNALS under `name` (a name once only)."""

    def add(signal: Callable[[PredictedMask], float]):
        if name in PREDICTION_SIGNALS:
            raise ValueError(f"a quality signal named {name!r} is registered already")
        PREDICTION_SIGNALS[name] = signal
        return signal

    return add


@register("separability")
def map_separability(m: PredictedMask) -> float:
    """How two-valued the probability is (Otsu's between-class variance over the total)."""
    return separability(m.prob)


@register("decisiveness")
def decisiveness(m: PredictedMask) -> float:
    """The mean of |2p - 1|: 1 when every pixel is sure either way."""
    return float(np.abs(2.0 * m.prob - 1.0).mean())


@register("uncertain_band")
def uncertain_band(m: PredictedMask) -> float:
    """log(0.001 + pixels with p in (0.1, 0.9) over the mask's pixels): the width of the
    fuzzy rim around the object relative to its size."""
    fuzzy = ((m.prob > 0.1) & (m.prob < 0.9)).sum()
    return float(np.log(1e-3 + fuzzy / max(int(m.mask.sum()), 1)))


@register("largest_component")
def largest_component(m: PredictedMask) -> float:
    """The share of the mask in its largest connected piece."""
    return largest_component_share(m.mask)


@register("border_contact")
def mask_border_contact(m: PredictedMask) -> float:
    """The share of the map's outer ring inside the mask."""
    return border_contact(m.mask)


@register("objectness")
def query_objectness(m: PredictedMask) -> float:
    """The chosen query's own score (sigmoid)."""
    return float(m.objectness)


@register("feature_separability")
def token_separability(m: PredictedMask) -> float:
    """How well the mask, on the token grid, splits the encoder's features
    (`feature_separability`): a view the decoder's confidence does not give, low for a
    sure mask cut in the wrong place."""
    return feature_separability(m.tokens, on_grid(m.prob, m.tokens.shape[:2]) > m.threshold)


@register("noise_disagreement")
def noise_disagreement(m: PredictedMask) -> float:
    """log(0.001 + 1 - `noise_agreement`): how far the mask moves when the tokens are
    nudged (NaN without the agreement)."""
    return float(np.log(1e-3 + 1.0 - m.agreement))


@register("refined_separability")
def refined_separability(m: PredictedMask) -> float:
    """How two-valued the refined map is: the guided filter keeps a mask sharp where the
    image's colours change at its outline, and blurs one whose outline the colours do not
    follow (NaN without the refined map)."""
    return separability(m.refined) if np.isfinite(m.refined).all() else np.nan


@register("refine_shift")
def refine_shift(m: PredictedMask) -> float:
    """log(0.0001 + the mean |refined - probability|), the probability upsampled
    bilinearly as the guided filter upsamples it: how far the refinement moved the
    network's map (NaN without the refined map). Measured, not read by the score."""
    return float(np.log(1e-4 + np.abs(m.refined - upsample(m.prob, *m.refined.shape)).mean()))


PREDICTION_SIGNAL_NAMES = tuple(PREDICTION_SIGNALS)  # the signals above, in this order


def prediction_signals(
    prob: np.ndarray,
    objectness: np.ndarray,
    tokens: np.ndarray,
    threshold: float = 0.5,
    noise_agreement: np.ndarray | None = None,
    refined: np.ndarray | None = None,
    names: tuple[str, ...] = PREDICTION_SIGNAL_NAMES,
) -> dict[str, np.ndarray]:
    """The `names` signals (PREDICTION_SIGNALS; default: all) of each image, each B, from
    the B x H x W mask probability of the chosen query, its B objectness, the B x h x w x D
    encoder tokens the network read, the B `noise_agreement` and the B x S x S map
    predict's `refine` made of the probability. Without the agreements or the refined
    map, the signals that read them are NaN."""
    unknown = [n for n in names if n not in PREDICTION_SIGNALS]
    if unknown:
        raise ValueError(f"unknown quality signals {unknown}; known: {PREDICTION_SIGNAL_NAMES}")
    prob = np.asarray(prob, np.float32)
    agreement = (
        np.full(len(prob), np.nan, np.float32)
        if noise_agreement is None
        else np.asarray(noise_agreement, np.float32)
    )
    if refined is None:
        refined = np.full((len(prob), 1, 1), np.nan, np.float32)
    images = [
        PredictedMask(p, float(o), t, a, r, threshold)  # a: float32, as the fit read it
        for p, o, t, a, r in zip(
            prob, np.asarray(objectness, np.float32), tokens, agreement, refined, strict=True
        )
    ]
    return {
        name: np.asarray([PREDICTION_SIGNALS[name](m) for m in images], np.float32).reshape(-1)
        for name in names
    }


# the nudge of `noise_agreement`, chosen on folds 0-1 of student-0's ECSSD masks (scale
# 0.25 / 0.5 / 1.0 of the tokens' spread, 1 or 3 draws: benchmarks/results/
# prediction_noise_choice_folds01.txt); PREDICTION_QUALITY is fit to these values
NOISE_SCALE, NOISE_DRAWS, NOISE_SEED = 0.5, 3, 0


@functools.lru_cache(maxsize=4)
def token_noise(draws: int, n: int, d: int, seed: int = NOISE_SEED) -> torch.Tensor:
    """draws x N x D standard normal noise, the same on every call (a fixed generator on
    the CPU, made once per shape): every image gets the same nudges, whatever batch it is
    in, so an image's quality does not depend on its neighbours or the run. Read only."""
    return torch.randn(draws, n, d, generator=torch.Generator().manual_seed(seed))


@torch.inference_mode()
def noise_agreement(
    decode: Callable[[torch.Tensor], torch.Tensor],
    tokens: torch.Tensor,
    prob: torch.Tensor,
    threshold: float = 0.5,
    scale: float = NOISE_SCALE,
    draws: int = NOISE_DRAWS,
) -> torch.Tensor:
    """`decode` (B x N x D tokens -> B x H x W mask probability), the B x N x D tokens it
    read and the B x H x W probability it made of them -> B: the mean IoU of the mask with
    the masks it makes of the tokens plus Gaussian noise of `scale` x each image's token
    standard deviation (`draws` fixed draws). 1 for a mask the nudges do not move; a mask
    that hangs on a few tokens, or that the decoder was unsure how to cut, moves. An
    image whose masks are all empty agrees (1)."""
    b, n, d = tokens.shape
    noise = token_noise(draws, n, d).to(tokens.device, tokens.dtype)
    spread = tokens.float().std(dim=(1, 2), keepdim=True).to(tokens.dtype)  # per image
    mask = (prob > threshold).reshape(b, -1)
    total = torch.zeros(b, device=tokens.device)
    for k in range(draws):
        nudged = decode(tokens + scale * spread * noise[k]).reshape(b, -1) > threshold
        union = (mask | nudged).sum(1).float()
        inter = (mask & nudged).sum(1).float()
        total += torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
    return total / draws


# Fit on ECSSD's 1000 images as predicted by student-0 of jobs/selftrain.py (the default
# configs/selftrain-cpu.yaml, trained on POTNet's refined masks of ../shared/data/unlabeled):
# benchmarks/autosod_quality.py, then benchmarks/fit_quality.py --score autosod (empty
# masks, which prediction_quality scores 0 without reading a signal, left out). The
# signals were chosen on folds 0-1: one from the encoder (feature_separability, which the
# decoder's confidence does not change), one from the decoder asked again
# (noise_disagreement: a sure mask cut in the wrong place is seldom a stable one) and, for
# the guided filter's masks, one from the image (refined_separability: the filter keeps a
# mask sharp only where the image's colours change at its outline). refine_shift ranked
# ECSSD's masks a little better beside them but scored object-free crops higher, so it is
# measured, not kept (benchmarks/results/prediction_refined_choice_folds01.txt). The map's own
# signals add nothing (the maps are nearly binary, so separability and decisiveness
# saturate; objectness is all but constant). The IoU they estimate is that of the mask
# predict writes, so each `refine.method` has its fit (an unrefined map has no refined
# view). Held-out folds: README, "Train and predict", "Quality of predict's masks".
PREDICTION_QUALITY = {
    "guided": QualityScore(
        signals=("feature_separability", "noise_disagreement", "refined_separability"),
        intercept=-12.5528,
        weights=(0.6209, -0.6148, 12.1854),
    ),
    "none": QualityScore(
        signals=("feature_separability", "noise_disagreement"),
        intercept=-1.9595,
        weights=(1.4601, -0.7193),
    ),
}


def quality_settings(refine: str) -> dict:
    """What makes predict's `quality` for masks refined by `refine`: the fit and the
    nudges it was fit to (for the predict job's `settings` and config hash)."""
    return {
        **PREDICTION_QUALITY[refine].settings(),
        "noise": {"scale": NOISE_SCALE, "draws": NOISE_DRAWS, "seed": NOISE_SEED},
    }


def prediction_quality(
    prob: np.ndarray,
    objectness: np.ndarray,
    tokens: np.ndarray,
    noise_agreement: np.ndarray,
    refined: np.ndarray,
    threshold: float = 0.5,
    refine: str = "guided",
):
    """B x H x W mask probability (the network's own) + B objectness + B x h x w x D
    encoder tokens + B `noise_agreement` + the B x S x S map `refine` made of the
    probability -> B quality in [0, 1), higher = better: the estimated IoU of the mask
    `refine` makes (`score_signals` of `prediction_signals`)."""
    reads = PREDICTION_QUALITY[refine].signals  # only what the score reads
    signals = prediction_signals(
        prob, objectness, tokens, threshold, noise_agreement, refined, names=reads
    )
    return score_signals(signals, prob, threshold, refine)


def score_signals(
    signals: dict[str, np.ndarray], prob: np.ndarray, threshold: float = 0.5, refine: str = "guided"
) -> np.ndarray:
    """`prediction_signals` of the B x H x W probability -> B quality by `refine`'s fit. An
    empty mask scores 0: its IoU with a human mask of any object is 0 (the signals, made
    for a mask, would read it as a clean one)."""
    score = PREDICTION_QUALITY[refine]
    unread = [n for n in score.signals if np.isnan(signals[n]).any()]
    if unread:  # a score of NaN would be written as if it were one
        raise ValueError(f"quality signals {unread} are NaN: give the agreements and refined map")
    empty = ~(np.asarray(prob) > threshold).reshape(len(prob), -1).any(axis=1)
    return np.where(empty, np.float32(0.0), score(signals)).astype(np.float32)
