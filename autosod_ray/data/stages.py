"""Ray Data stages of the labelling pipeline, each a function or callable class on
`dict[str, np.ndarray]` batches. They move and convert data; the maths is the
`model_factory` that `ModelStage` is given.

Columns along the way:
    list    image_id, source_uri
    read    + data (encoded bytes), error ("" when fine)
    decode  - data, + image (S x S x 3 uint8), height, width
    model   - image, + saliency (h x w float32), confidence, consistency_loss
    encode  - saliency, + mask_png, saliency_png, fg_fraction, backbone, config_hash
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image

from .images import ImageError, decode_image, resize_square
from .uris import read_bytes_at


def read_bytes(batch: dict[str, np.ndarray], storage_options: dict) -> dict[str, np.ndarray]:
    """Fetch each source_uri; a failure becomes that row's error, never the batch's."""
    data, errors = [], []
    for uri in batch["source_uri"]:
        try:
            data.append(read_bytes_at(uri, storage_options))  # fsspec caches filesystems
            errors.append("")
        except (OSError, ValueError) as err:
            data.append(b"")
            errors.append(f"could not read: {type(err).__name__}: {err}")
    return {**batch, "data": np.array(data, dtype=object), "error": np.array(errors, dtype=object)}


def decode(
    batch: dict[str, np.ndarray], image_size: int, max_pixels: int, min_side: int
) -> dict[str, np.ndarray]:
    """Bytes -> upright RGB resized to image_size^2; undecodable rows keep a reason."""
    n = len(batch["image_id"])
    images = np.zeros((n, image_size, image_size, 3), np.uint8)
    heights, widths = np.zeros(n, np.int32), np.zeros(n, np.int32)
    errors = list(batch["error"])
    for i, blob in enumerate(batch["data"]):
        if errors[i]:
            continue
        try:
            image = decode_image(blob, max_pixels, min_side)
        except ImageError as err:
            errors[i] = str(err)
            continue
        heights[i], widths[i] = image.shape[:2]
        images[i] = resize_square(image, image_size)
    out = {k: v for k, v in batch.items() if k != "data"}
    return {
        **out,
        "image": images,
        "height": heights,
        "width": widths,
        "error": np.array(errors, dtype=object),
    }


class ModelStage:
    """Actor stage: holds the model (built once) and labels the rows without errors.

    `model_factory()` returns a callable images (B x S x S x 3 uint8) ->
    (saliency B x h x w, confidence B, consistency_loss B).
    """

    def __init__(self, model_factory: Callable[[], Callable]):
        self.model = model_factory()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = np.array([e == "" for e in batch["error"]], dtype=bool)
        errors = list(batch["error"])
        out = {k: v for k, v in batch.items() if k != "image"}
        saliency = confidence = loss = None
        if ok.any():
            try:
                saliency, confidence, loss = self.model(batch["image"][ok])
            except Exception as err:  # noqa: BLE001 - the batch's rows go to the errors table
                for i in np.flatnonzero(ok):
                    errors[i] = f"labelling failed: {type(err).__name__}: {err}"
                ok[:] = False
        grid = saliency.shape[1:] if saliency is not None else (1, 1)
        full_sal = np.zeros((len(ok),) + tuple(grid), np.float32)
        full_conf, full_loss = np.zeros(len(ok), np.float32), np.zeros(len(ok), np.float32)
        if saliency is not None and ok.any():
            full_sal[ok], full_conf[ok], full_loss[ok] = saliency, confidence, loss
        return {
            **out,
            "saliency": full_sal,
            "confidence": full_conf,
            "consistency_loss": full_loss,
            "error": np.array(errors, dtype=object),
        }


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode="L").save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def encode(
    batch: dict[str, np.ndarray], to_masks: Callable, backbone: str, config_hash: str
) -> dict[str, np.ndarray]:
    """Patch-level saliency -> mask and soft map PNGs at each image's own size.

    `to_masks(saliency h x w, height, width) -> (soft uint8, binary bool)`.
    """
    n = len(batch["image_id"])
    masks, softs, fractions = [b""] * n, [b""] * n, np.zeros(n, np.float32)
    for i in range(n):
        if batch["error"][i]:
            continue
        soft, binary = to_masks(
            batch["saliency"][i], int(batch["height"][i]), int(batch["width"][i])
        )
        masks[i] = png_bytes(binary.astype(np.uint8) * 255)
        softs[i] = png_bytes(soft)
        fractions[i] = binary.mean()
    out = {k: v for k, v in batch.items() if k != "saliency"}
    return {
        **out,
        "mask_png": np.array(masks, dtype=object),
        "saliency_png": np.array(softs, dtype=object),
        "fg_fraction": fractions,
        "backbone": np.array([backbone] * n, dtype=object),
        "config_hash": np.array([config_hash] * n, dtype=object),
    }
