"""The training-free normalised-cut baseline (TokenCut-style) that POTNet must beat."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .backend import to_numpy
from .mask import upsample
from .ops import minmax
from .seeds import ncut_bipartition


@dataclass
class NcutOutput:
    saliency: np.ndarray  # B x h x w: the oriented second eigenvector, rescaled to [0, 1]
    foreground: np.ndarray  # B x h x w bool: the bipartition side holding the seed

    def masks(self, sizes: list[tuple[int, int]]) -> list[tuple[np.ndarray, np.ndarray]]:
        out = []
        for s, fg, (h, w) in zip(self.saliency, self.foreground, sizes, strict=True):
            soft = np.clip(upsample(s, h, w), 0.0, 1.0)
            binary = upsample(fg.astype(np.float32), h, w) > 0.5
            out.append((np.round(soft * 255).astype(np.uint8), binary))
        return out


class NcutBaseline:
    """`NcutBaseline(tau)(patch_features)`: normalised cut alone, no POTNet."""

    def __init__(self, tau: float = 0.2):
        self.tau = tau

    def __call__(self, batch) -> NcutOutput:
        cut = ncut_bipartition(batch.features, self.tau)
        b, (h, w) = batch.features.shape[0], batch.grid
        return NcutOutput(
            saliency=to_numpy(minmax(cut.eigenvector)).reshape(b, h, w).astype(np.float32),
            foreground=to_numpy(cut.foreground).reshape(b, h, w),
        )
