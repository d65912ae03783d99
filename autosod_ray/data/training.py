"""Training data: pseudolabel Parquet -> aligned, augmented (image, mask) batches.

read_parquet(masks/) -> filter by fg_fraction -> load_pairs (read image,
decode both, augment) -> the trainer's `iter_torch_batches`
"""

from __future__ import annotations

import posixpath

import numpy as np

from ..config import AugmentConfig
from .augment import augment_pair
from .images import ImageError, decode_gray, decode_image, resize_square
from .uris import InputError, file_stem, list_inputs, open_fs, pngs_by_stem, read_bytes_at

COLUMNS = ["image_id", "source_uri", "mask_png", "fg_fraction"]


def masks_folder(uri: str, storage_options: dict) -> tuple[object, str]:
    """A pseudolabel output or its masks/ folder -> (filesystem, masks folder path)."""
    fs, root = open_fs(uri, storage_options)
    root = root.rstrip("/")
    if fs.isdir(posixpath.join(root, "masks")):
        root = posixpath.join(root, "masks")
    files = [p for p in fs.find(root) if p.endswith(".parquet")] if fs.isdir(root) else []
    if not files:
        raise InputError(
            f"--pseudo-masks {uri!r} holds no Parquet files; give a pseudolabel output "
            "folder (with masks/) or its masks/ folder"
        )
    return fs, root


def read_pseudo_masks(uri: str, storage_options: dict, augment: AugmentConfig):
    """A Ray Dataset of (image_id, source_uri, mask_png) rows kept for training."""
    import pyarrow.fs as pafs
    import ray

    fs, root = masks_folder(uri, storage_options)
    ds = ray.data.read_parquet(
        root,
        filesystem=pafs.PyFileSystem(pafs.FSSpecHandler(fs)),
        columns=COLUMNS,
        file_extensions=["parquet"],
    )
    lo, hi = augment.min_fg_fraction, augment.max_fg_fraction
    if lo > 0 or hi < 1:
        ds = ds.filter(expr=f"fg_fraction >= {lo} and fg_fraction <= {hi}")
    return ds


def load_pairs(
    batch: dict[str, np.ndarray],
    storage_options: dict,
    augment: AugmentConfig,
    image_size: int,
    max_pixels: int,
) -> dict[str, np.ndarray]:
    """Rows -> {"image": B x S x S x 3 uint8, "mask": B x S x S uint8 (0 / 1)}.

    A row whose image can no longer be read or decoded is dropped from training
    and named in the worker's log (training cannot write an errors table).
    """
    rng = np.random.default_rng()
    images, masks = [], []
    for uri, png in zip(batch["source_uri"], batch["mask_png"], strict=True):
        try:
            image = decode_image(read_bytes_at(uri, storage_options), max_pixels)
            mask = decode_gray(png)
            if mask.shape != image.shape[:2]:
                raise ImageError(f"mask {mask.shape} does not match image {image.shape[:2]}")
        except (OSError, ValueError) as err:
            print(f"train data: skipping {uri}: {err}")
            continue
        a, m = augment_pair(
            image,
            (mask > 127).astype(np.uint8),
            image_size,
            augment.crop_scale,
            augment.crop_ratio,
            augment.flip,
            augment.color_jitter,
            rng,
        )
        images.append(a)
        masks.append(m)
    size = (image_size, image_size)
    return {
        "image": np.stack(images) if images else np.zeros((0, *size, 3), np.uint8),
        "mask": np.stack(masks) if masks else np.zeros((0, *size), np.uint8),
    }


def load_validation_set(
    images_uri: str, gt_uri: str, storage_options: dict, image_size: int, limit: int
) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(image_id, S x S x 3 uint8 image, H x W uint8 ground truth) for the first `limit`
    images that have a ground-truth PNG of the same stem."""
    gts = pngs_by_stem(gt_uri, storage_options, "validation.ground_truth")
    rows = list_inputs(images_uri, storage_options).to_pylist()
    pairs = []
    for row in rows:
        gt = gts.get(file_stem(row["image_id"]))
        if gt is None:
            continue
        image = decode_image(read_bytes_at(row["source_uri"], storage_options), 1 << 30)
        pairs.append(
            (
                row["image_id"],
                resize_square(image, image_size),
                decode_gray(read_bytes_at(gt, storage_options)),
            )
        )
        if len(pairs) == limit:
            break
    if not pairs:
        raise InputError(
            f"validation: no image in {images_uri!r} has a mask of the same name in {gt_uri!r}"
        )
    return pairs
