"""SOD metrics with PySODMetrics, under the standard protocol, plus IoU of binary masks.

`SODMetrics` accumulates (prediction, ground truth) pairs and reports the
standard key set: Sm, wF, MAE, maxF, meanF, adpF, maxE, meanE, adpE, IoU, n.
Soft metrics use the uint8 soft map; IoU uses the binary mask.
"""

from __future__ import annotations

import warnings

import numpy as np
import py_sod_metrics as psm

METRIC_KEYS = ("Sm", "wF", "MAE", "maxF", "meanF", "adpF", "maxE", "meanE", "adpE", "IoU")


def iou(binary: np.ndarray, gt: np.ndarray) -> float:
    """Intersection over union of two boolean masks (1.0 when both are empty)."""
    union = np.logical_or(binary, gt).sum()
    return 1.0 if union == 0 else float(np.logical_and(binary, gt).sum() / union)


class SODMetrics:
    """Dataset-level SOD metrics; `step` one image at a time, `results` at the end."""

    def __init__(self):
        with warnings.catch_warnings():
            warnings.simplefilter(
                "ignore"
            )  # PySODMetrics marks Fmeasure as legacy; it is the standard
            self.fm = psm.Fmeasure()
        self.sm, self.em, self.mae, self.wfm = (
            psm.Smeasure(),
            psm.Emeasure(),
            psm.MAE(),
            psm.WeightedFmeasure(),
        )
        self.ious: list[float] = []

    def step(self, soft: np.ndarray, gt: np.ndarray, binary: np.ndarray | None = None) -> None:
        """soft: H x W uint8; gt: H x W bool or 0/255; binary: H x W bool (default soft >= 128)."""
        gt_u8 = np.where(np.asarray(gt) > 127 if gt.dtype != bool else gt, 255, 0).astype(np.uint8)
        if soft.shape != gt_u8.shape:
            raise ValueError(
                f"prediction {soft.shape} and ground truth {gt_u8.shape} differ in size"
            )
        for metric in (self.fm, self.sm, self.em, self.mae, self.wfm):
            metric.step(pred=soft, gt=gt_u8)
        self.ious.append(iou(soft >= 128 if binary is None else binary, gt_u8 > 127))

    def results(self) -> dict[str, float]:
        fm, em = self.fm.get_results()["fm"], self.em.get_results()["em"]
        return {
            "Sm": float(self.sm.get_results()["sm"]),
            "wF": float(self.wfm.get_results()["wfm"]),
            "MAE": float(self.mae.get_results()["mae"]),
            "maxF": float(fm["curve"].max()),
            "meanF": float(fm["curve"].mean()),
            "adpF": float(fm["adp"]),
            "maxE": float(em["curve"].max()),
            "meanE": float(em["curve"].mean()),
            "adpE": float(em["adp"]),
            "IoU": float(np.mean(self.ious)) if self.ious else float("nan"),
            "n": len(self.ious),
        }
