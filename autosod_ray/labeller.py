"""The numeric core without Ray: images -> backbone features -> POTNet -> masks.

`PseudoLabeller` is what a Ray Data actor holds, what the benchmarks time, and
what a GPU box runs alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .backbone import ViTFeatures
from .config import BackboneConfig, POTNetConfig
from .potnet import PatchFeatures, POTNet
from .potnet.backend import resolve_backend


@dataclass
class PseudoMask:
    """One image's pseudo-label at its own size."""

    soft: np.ndarray  # H x W uint8 soft map
    binary: np.ndarray  # H x W bool mask
    confidence: float
    consistency_loss: float
    quality: float
    attention_border: float  # of the image: CLS attention on its border over its mean

    @property
    def fg_fraction(self) -> float:
        return float(self.binary.mean())


class PseudoLabeller:
    """Backbone + POTNet for batches of square-resized images."""

    def __init__(
        self,
        backbone: BackboneConfig,
        potnet: POTNetConfig,
        extractor: ViTFeatures | None = None,
        storage_options: dict | None = None,
    ):
        if extractor is None:
            extractor = ViTFeatures(backbone, storage_options=storage_options)
        self.extractor = extractor
        self.backend = resolve_backend(potnet.backend, str(self.extractor.device))
        self.potnet = POTNet(potnet.params())

    @property
    def image_size(self) -> int:
        return self.extractor.image_size

    def features(self, images: np.ndarray) -> PatchFeatures:
        """B x S x S x 3 uint8 -> POTNet's input on the configured array backend."""
        which = self.extractor.cfg.features
        out = self.extractor(images, (which,))
        return PatchFeatures(
            features=self.backend.from_torch(getattr(out, which)),
            cls_attention=self.backend.from_torch(out.cls_attention),
            grid=out.grid,
        )

    def __call__(self, images: np.ndarray, sizes: list[tuple[int, int]]) -> list[PseudoMask]:
        """Square-resized batch and each image's own (height, width) -> pseudo-masks."""
        out = self.potnet(self.features(images))
        return [
            PseudoMask(soft, binary, float(c), float(loss), float(q), float(a))
            for (soft, binary), c, loss, q, a in zip(
                out.masks(sizes),
                out.confidence,
                out.consistency_loss,
                out.quality,
                out.columns()["attention_border"],
                strict=True,
            )
        ]
