"""Training augmentation that keeps an image and its mask aligned (uint8 arrays in,
uint8 arrays out); every random draw comes from the `rng` passed in."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image


def random_resized_crop_box(
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    rng: np.random.Generator,
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a crop covering `scale` of the area with aspect in `ratio`.

    Ten tries at a random box, then the largest centred box of an allowed ratio.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    aspect = min(max(width / height, ratio[0]), ratio[1])
    w, h = (
        (width, round(width / aspect))
        if width / height < aspect
        else (round(height * aspect), height)
    )
    w, h = min(w, width), min(h, height)
    return (height - h) // 2, (width - w) // 2, h, w


def color_jitter(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """H x W x 3 uint8 -> same, brightness, contrast and saturation each scaled by a
    factor in [1 - strength, 1 + strength]."""
    if strength <= 0:
        return image
    x = image.astype(np.float32)
    b, c, s = rng.uniform(1 - strength, 1 + strength, size=3)
    x = x * b
    x = (x - x.mean()) * c + x.mean()
    gray = x @ np.array([0.299, 0.587, 0.114], np.float32)
    x = (x - gray[..., None]) * s + gray[..., None]
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def augment_pair(
    image: np.ndarray,
    mask: np.ndarray,
    size: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    flip: bool,
    jitter: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """H x W x 3 uint8 image, H x W uint8 mask -> size x size x 3, size x size (aligned).

    The mask is resized with nearest-neighbour so it stays binary.
    """
    if image.shape[:2] != mask.shape:
        raise ValueError(f"image {image.shape[:2]} and mask {mask.shape} differ in size")
    top, left, h, w = random_resized_crop_box(*mask.shape, scale, ratio, rng)
    box = (left, top, left + w, top + h)
    out_image = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR, box=box))
    out_mask = np.asarray(Image.fromarray(mask).resize((size, size), Image.NEAREST, box=box))
    if flip and rng.random() < 0.5:
        out_image, out_mask = out_image[:, ::-1], out_mask[:, ::-1]
    return color_jitter(np.ascontiguousarray(out_image), jitter, rng), np.ascontiguousarray(
        out_mask
    )
