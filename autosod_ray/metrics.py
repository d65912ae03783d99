"""SOD metrics with PySODMetrics, under the standard protocol, plus IoU of binary masks.

Dataset-level PySODMetrics figures are means over images of per-image values
(curves included), so `image_metrics` (one image) and `summarize` (any number
of them, in any order, from any worker) give exactly what one PySODMetrics run
over the same pairs gives. `SODMetrics` is the sequential accumulator on top.
Keys: Sm, wF, MAE, maxF, meanF, adpF, maxE, meanE, adpE, IoU, n.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import numpy as np

METRIC_KEYS = ("Sm", "wF", "MAE", "maxF", "meanF", "adpF", "maxE", "meanE", "adpE", "IoU")


def iou(binary: np.ndarray, gt: np.ndarray) -> float:
    """Intersection over union of two boolean masks (1.0 when both are empty)."""
    union = np.logical_or(binary, gt).sum()
    return 1.0 if union == 0 else float(np.logical_and(binary, gt).sum() / union)


def image_metrics(soft: np.ndarray, gt: np.ndarray, binary: np.ndarray | None = None) -> dict:
    """One pair -> per-image values: scalars and the 256-threshold F and E curves.

    soft: H x W uint8; gt: H x W bool or 0/255; binary: H x W bool (default soft >= 128).
    """
    gt_u8 = np.where(gt if gt.dtype == bool else np.asarray(gt) > 127, 255, 0).astype(np.uint8)
    if soft.shape != gt_u8.shape:
        raise ValueError(f"prediction {soft.shape} and ground truth {gt_u8.shape} differ in size")
    import py_sod_metrics as psm  # here, not on import: it loads scikit-learn (1-2 s a process)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PySODMetrics marks Fmeasure legacy; it is the standard
        fm = psm.Fmeasure()
    sm, em, mae, wfm = psm.Smeasure(), psm.Emeasure(), psm.MAE(), psm.WeightedFmeasure()
    for metric in (fm, sm, em, mae, wfm):
        metric.step(pred=soft, gt=gt_u8)
    f, e = fm.get_results()["fm"], em.get_results()["em"]
    return {
        "Sm": float(sm.get_results()["sm"]),
        "wF": float(wfm.get_results()["wfm"]),
        "MAE": float(mae.get_results()["mae"]),
        "adpF": float(f["adp"]),
        "F_curve": np.asarray(f["curve"], dtype=np.float64),
        "adpE": float(e["adp"]),
        "E_curve": np.asarray(e["curve"], dtype=np.float64),
        "IoU": iou(soft >= 128 if binary is None else binary, gt_u8 > 127),
    }


class MetricMeans:
    """Running sums of per-image values; memory does not grow with the number of images."""

    SUMMED = ("Sm", "wF", "MAE", "adpF", "adpE", "IoU", "F_curve", "E_curve")

    def __init__(self):
        self.n, self.sums = 0, {}

    def add(self, row: dict) -> None:
        self.n += 1
        for key in self.SUMMED:
            self.sums[key] = self.sums.get(key, 0.0) + row[key]

    def results(self) -> dict[str, float]:
        """The dataset-level standard keys (means over images)."""
        if self.n == 0:
            return {**dict.fromkeys(METRIC_KEYS, float("nan")), "n": 0}
        mean = {k: v / self.n for k, v in self.sums.items()}
        return {
            "Sm": float(mean["Sm"]),
            "wF": float(mean["wF"]),
            "MAE": float(mean["MAE"]),
            "maxF": float(mean["F_curve"].max()),
            "meanF": float(mean["F_curve"].mean()),
            "adpF": float(mean["adpF"]),
            "maxE": float(mean["E_curve"].max()),
            "meanE": float(mean["E_curve"].mean()),
            "adpE": float(mean["adpE"]),
            "IoU": float(mean["IoU"]),
            "n": self.n,
        }


def summarize(rows: Iterable[dict]) -> dict[str, float]:
    """Per-image values -> the dataset-level standard keys (means over images)."""
    means = MetricMeans()
    for row in rows:
        means.add(row)
    return means.results()


class SODMetrics:
    """Dataset-level SOD metrics; `step` one image at a time, `results` at the end."""

    def __init__(self):
        self.means = MetricMeans()

    def step(self, soft: np.ndarray, gt: np.ndarray, binary: np.ndarray | None = None) -> None:
        self.means.add(image_metrics(soft, gt, binary))

    def results(self) -> dict[str, float]:
        return self.means.results()


def quality_ranking(quality: np.ndarray, iou_values: np.ndarray) -> dict[str, float] | None:
    """How well a per-mask quality score ranks masks by their IoU with ground truth.

    quality, iou_values: one per image (NaN quality = none reported). Returns the
    Spearman rank correlation, and the mean IoU of all images and of the best
    quarter by quality (what a user keeps who filters on it); None without scores.
    """
    from scipy.stats import spearmanr

    q, v = np.asarray(quality, np.float64), np.asarray(iou_values, np.float64)
    keep = np.isfinite(q)
    if keep.sum() < 2:
        return None
    q, v = q[keep], v[keep]
    top = np.argsort(-q, kind="stable")[: max(1, len(q) // 4)]
    return {
        "spearman": float(spearmanr(q, v)[0]),
        "n": int(len(q)),
        "iou_all": float(v.mean()),
        "iou_best_quarter": float(v[top].mean()),
    }
