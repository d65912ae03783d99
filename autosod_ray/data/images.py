"""Image decoding that never guesses: RGB uint8 in the image's upright orientation.

Every mode PIL reads (grayscale, palette, CMYK, 16-bit, alpha) becomes 3-channel
RGB; anything that is not an image raises `ImageError` with a reason a person
understands, so the pipeline can put it in the errors table.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class ImageError(ValueError):
    """An input that cannot be labelled; the message is stored in the errors table."""


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # high bit depth grayscale: rescale its own range to 8 bits
        a = np.asarray(img, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = np.zeros_like(a) if hi <= lo else (a - lo) / (hi - lo) * 255.0
        img = Image.fromarray(np.round(a).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)  # transparent pixels over white
    return img.convert("RGB")


def decode_image(
    data: bytes, max_pixels: int, min_side: int = 1, max_pixels_key: str = "max_pixels"
) -> np.ndarray:
    """Encoded bytes -> H x W x 3 uint8 RGB, EXIF-oriented (the first frame of a
    multi-frame file).

    Raises ImageError for empty, truncated, corrupt or non-image data, images
    over `max_pixels` (decompression bombs; the message names `max_pixels_key`,
    the config key that raises the limit) and images smaller than `min_side`.
    Our `max_pixels`, checked from the header before decoding, is the guard in
    force: Pillow's own (a fixed 89 MP warning, 179 MP error) is switched off for
    the call so that a user can raise the limit as well as lower it.
    """
    if not data:
        raise ImageError("empty file (0 bytes)")
    pillow_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        if w * h > max_pixels:
            raise ImageError(
                f"decompression-bomb guard: {w} x {h} pixels > max_pixels {max_pixels} "
                f"(raise {max_pixels_key} to allow)"
            )
        img.load()
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("not an image (no decoder recognises the bytes)") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"corrupt or truncated image: {err}") from None
    finally:
        Image.MAX_IMAGE_PIXELS = pillow_limit
    img = ImageOps.exif_transpose(img)
    if min(img.size) < min_side:
        raise ImageError(
            f"image is {img.size[0]}x{img.size[1]} pixels, smaller than one patch ({min_side} px)"
        )
    return np.asarray(_to_rgb(img))


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """H x W x 3 uint8 -> size x size x 3 uint8 (bilinear with antialiasing)."""
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))


def decode_gray(data: bytes) -> np.ndarray:
    """A mask or soft-map PNG -> H x W uint8."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("L"))
