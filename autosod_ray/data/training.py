"""Training data: pseudolabel Parquet -> aligned, augmented (image, mask) batches.

read_parquet(masks/) -> filter by fg_fraction -> load_pairs (read image,
decode both, augment) -> the trainer's `iter_torch_batches`
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from ..config import AugmentConfig, DataSection
from .augment import augment_pair
from .images import ImageError, decode_gray, decode_image, resize_square
from .parquet import shard_files
from .stages import read_with_retries
from .uris import InputError, file_stem, list_inputs, open_fs, pngs_by_stem, read_bytes_at

COLUMNS = ["image_id", "source_uri", "mask_png"]


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


def quality_threshold(quality: np.ndarray, min_quality: float, keep_top_fraction: float) -> float:
    """The lowest `quality` a pseudo-mask may have to train: at least `min_quality`, and
    high enough that about `keep_top_fraction` of the masks (the best) remain. Masks
    without a score (NaN: an older predict's masks) neither count nor pass."""
    q = np.asarray(quality, np.float64)
    q = np.sort(q[np.isfinite(q)])
    threshold = min_quality
    if keep_top_fraction < 1 and len(q):
        cut = min(len(q) - 1, int(np.floor(len(q) * (1 - keep_top_fraction))))
        threshold = max(threshold, float(q[cut]))
    return threshold


@dataclass
class TrainingSet:
    """The pseudo-masks a training run keeps, chosen on the driver before any Ray work."""

    root: str  # the masks/ folder
    filesystem: object  # pyarrow filesystem over it
    files: list[str]  # its Parquet files
    conditions: list[str]  # Ray Data filter expressions that keep exactly those rows
    rows: int  # pseudo-masks found
    kept: int  # pseudo-masks that pass the data filters
    min_quality: float | None  # the quality threshold in force (None: no quality filter)
    filter_columns: list[str]  # the columns the conditions read
    kept_ids: pa.Array  # image_id of the kept rows
    config_hashes: list[str]  # the labelling configs the kept rows were made by
    rows_sha256: str  # digest of the kept rows (image_id, config_hash and filter columns)

    def provenance(self, uri: str) -> dict:
        return {
            "uri": uri,
            "config_hashes": self.config_hashes,
            "rows": self.rows,
            "kept": self.kept,
            "rows_sha256": self.rows_sha256,
            "min_quality": self.min_quality,
        }


def read_filter_columns(
    fs, files: list[str], columns: list[str], uri: str, optional: tuple[str, ...] = ()
) -> pa.Table:
    """`columns` of every pseudo-mask file (`optional` ones read as nulls where a file
    lacks them); a file that is not readable Parquet, or lacks a column, is named
    (InputError)."""
    import pyarrow.parquet as pq

    parts = []
    for path in files:
        try:
            with fs.open(path, "rb") as fh:
                f = pq.ParquetFile(fh)
                names = f.schema_arrow.names
                missing = [c for c in columns if c not in names and c not in optional]
                if missing:
                    raise InputError(
                        f"--pseudo-masks {uri!r} lacks a column the data filters read "
                        f"({', '.join(missing)} in {path}); give a pseudolabel output"
                    )
                part = f.read(columns=[c for c in columns if c in names])
                for c in columns:
                    if c not in names:
                        part = part.append_column(c, pa.nulls(part.num_rows, pa.string()))
                parts.append(part.select(columns))
        except (OSError, pa.ArrowInvalid) as err:
            raise InputError(
                f"--pseudo-masks {uri!r}: {path} is not a readable Parquet file "
                f"({str(err).splitlines()[0][:200]}); relabel that output, or remove the file"
            ) from None
    return pa.concat_tables(parts, promote_options="default")


def select_pseudo_masks(uri: str, storage_options: dict, data: DataSection) -> TrainingSet:
    """Read only the id and filter columns, apply the `data` filters, fail if nothing is
    left; the kept rows' digest is the training's provenance."""
    import pyarrow.compute as pc
    import pyarrow.fs as pafs

    from .provenance import rows_digest

    fs, root = masks_folder(uri, storage_options)
    files = shard_files(fs, root)
    filesystem = pafs.PyFileSystem(pafs.FSSpecHandler(fs))
    columns = ["fg_fraction"] + (["quality"] if data.filters_quality else [])
    table = read_filter_columns(
        fs, files, ["image_id", "config_hash", *columns], uri, optional=("config_hash",)
    )
    fg = table.column("fg_fraction").to_numpy(zero_copy_only=False)
    keep = (fg >= data.min_fg_fraction) & (fg <= data.max_fg_fraction)
    conditions = [
        f"fg_fraction >= {data.min_fg_fraction}",
        f"fg_fraction <= {data.max_fg_fraction}",
    ]
    threshold = None
    if data.filters_quality:
        quality = table.column("quality").to_numpy(zero_copy_only=False).astype(np.float64)
        if keep.any() and not np.isfinite(quality[keep]).any():
            raise InputError(
                f"--pseudo-masks {uri!r}: no mask has a `quality` score (NaN: masks "
                "of an older predict, which wrote none), "
                "so data.min_quality / keep_top_fraction can keep none; set "
                "data.min_quality=0 and data.keep_top_fraction=1 to train on them all"
            )
        threshold = quality_threshold(quality[keep], data.min_quality, data.keep_top_fraction)
        keep &= quality >= threshold
        conditions.append(f"quality >= {threshold!r}")
    if not keep.any():
        raise InputError(
            f"--pseudo-masks {uri!r}: no mask passes the data filters (of {len(keep)}); "
            "relax data.min_fg_fraction / max_fg_fraction / min_quality / keep_top_fraction"
        )
    kept = table.filter(pa.array(keep)).sort_by("image_id")
    return TrainingSet(
        root=root,
        filesystem=filesystem,
        files=files,
        conditions=conditions,
        rows=len(keep),
        kept=int(keep.sum()),
        min_quality=threshold,
        filter_columns=columns,
        kept_ids=kept.column("image_id").combine_chunks(),
        config_hashes=sorted(pc.unique(pc.fill_null(kept.column("config_hash"), "")).to_pylist()),
        rows_sha256=rows_digest(kept, kept.column_names),
    )


def read_pseudo_masks(selection: TrainingSet, keep_filter_columns: bool = False):
    """A Ray Dataset of the (image_id, source_uri, mask_png) rows the selection keeps
    (and the filter columns, with `keep_filter_columns`)."""
    import ray

    ds = ray.data.read_parquet(
        selection.root,
        filesystem=selection.filesystem,
        columns=COLUMNS + selection.filter_columns,
        file_extensions=["parquet"],
    )
    ds = ds.filter(expr=" and ".join(selection.conditions))
    return ds if keep_filter_columns else ds.select_columns(COLUMNS)


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
            image = decode_image(read_with_retries(uri, storage_options), max_pixels)
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
