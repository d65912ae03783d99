"""Step 7: Otsu threshold and upsampling to the image's own size."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def otsu_threshold(values: np.ndarray, nbins: int = 256) -> float:
    """Otsu's threshold of a float array (any shape): maximises between-class variance.

    Histogram of `nbins` bins over [min, max]; returns the centre of the bin after
    which the lower class ends.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    lo, hi = float(v.min()), float(v.max())
    if hi - lo < 1e-12:
        return lo
    hist, edges = np.histogram(v, bins=nbins, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)  # weight of the lower class for a cut after each bin
    w1 = np.cumsum(hist[::-1])[::-1]  # weight of the upper class starting at each bin
    m0 = np.cumsum(hist * centres) / np.maximum(w0, 1)
    m1 = (np.cumsum((hist * centres)[::-1]) / np.maximum(w1[::-1], 1))[::-1]
    # between-class variance for a cut between bin t and t + 1
    between = w0[:-1] * w1[1:] * (m0[:-1] - m1[1:]) ** 2
    return float(centres[int(np.argmax(between))])


def upsample(saliency: np.ndarray, height: int, width: int) -> np.ndarray:
    """h x w float map -> height x width float32 map (bilinear, corners not aligned)."""
    t = torch.from_numpy(np.array(saliency, dtype=np.float32))[None, None]  # a writable copy
    return F.interpolate(t, size=(height, width), mode="bilinear", align_corners=False)[
        0, 0
    ].numpy()


def mask_at_size(saliency: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Patch-level soft map (h x w, [0, 1]) -> (soft uint8 HxW, binary bool HxW)."""
    soft = np.clip(upsample(saliency, height, width), 0.0, 1.0)
    binary = soft > otsu_threshold(soft)
    return np.round(soft * 255).astype(np.uint8), binary
