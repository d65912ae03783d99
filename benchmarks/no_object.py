"""Images with no salient object, made from images with ground truth: the largest square of
each image that holds no object pixel, cropped and saved with an empty ground-truth mask.

    python benchmarks/no_object.py --images DIR --masks DIR --output DIR [--min-side 96] [--n 100]

The crops are the "no clear object" case (sky, water, grass, a wall): POTNet's
`quality` should be low on them, and the report should list them under
"Probably no object". `benchmarks/quality.py --images OUT/images --masks OUT/masks`
measures it; tests/test_potnet_real.py checks it on a few
(test_images_without_an_object_get_a_low_quality).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage


def largest_empty_square(mask: np.ndarray) -> tuple[int, int, int] | None:
    """(top, left, side) of the largest square holding no True pixel of `mask` (H x W bool),
    or None if every pixel is True. Chessboard distance to the nearest object pixel or the
    frame, so a square of side 2d - 1 centred where it is largest is object-free."""
    framed = np.pad(mask, 1, constant_values=True)
    d = ndimage.distance_transform_cdt(~framed, metric="chessboard")[1:-1, 1:-1]
    if d.max() == 0:
        return None
    r, c = np.unravel_index(int(d.argmax()), d.shape)
    half = int(d[r, c]) - 1
    return r - half, c - half, 2 * half + 1


def background_crop(image: np.ndarray, mask: np.ndarray, min_side: int) -> np.ndarray | None:
    """The largest object-free square of `image` (H x W x 3) by its ground truth, or None if it
    is smaller than `min_side` pixels."""
    found = largest_empty_square(mask)
    if found is None or found[2] < min_side:
        return None
    top, left, side = found
    return image[top : top + side, left : left + side]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images", required=True)
    p.add_argument("--masks", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--min-side", type=int, default=96)
    p.add_argument("--n", type=int, default=100)
    args = p.parse_args(argv)
    out = Path(args.output)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    made = 0
    for gt_path in sorted(Path(args.masks).glob("*.png")):
        image_path = next(Path(args.images).glob(f"{gt_path.stem}.*"), None)
        if image_path is None:
            continue
        gt = np.asarray(Image.open(gt_path).convert("L")) > 127
        crop = background_crop(np.asarray(Image.open(image_path).convert("RGB")), gt, args.min_side)
        if crop is None:
            continue
        Image.fromarray(crop).save(out / "images" / f"{gt_path.stem}.jpg", quality=95)
        empty = np.zeros(crop.shape[:2], np.uint8)
        Image.fromarray(empty).save(out / "masks" / f"{gt_path.stem}.png")
        made += 1
        if made == args.n:
            break
    print(f"{made} object-free crops under {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
