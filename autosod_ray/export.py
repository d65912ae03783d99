"""Exports of a pseudolabel / predict output for other tools.

    coco  COCO instances JSON: one annotation per connected object, its mask as RLE
          (pycocotools), `score` = the mask's quality; every exported image is listed,
          an image without an object has no annotation
    png   one PNG per image: <stem>.png (flat, as SOD tools and jobs/evaluate.py read a
          folder) or the image id's sub-folders kept (tree)
    hf    Parquet whose `mask` / `saliency` (and with_images: `image`) columns are
          {bytes, path} structs that Hugging Face `datasets` loads as PIL images, with the
          feature metadata in the schema; plus the scalar columns

The predictions are read twice, shard by shard: first the small columns (image_id,
quality, config_hash) to choose the rows (one config, quality filters) and check names,
then the rows themselves, a batch at a time, so memory holds one batch of PNGs.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pycocotools import mask as mask_util
from scipy import ndimage

from .config import ExportConfig
from .data.images import decode_gray
from .data.parquet import shard_files, write_table_atomic
from .data.stages import read_with_retries
from .data.training import quality_threshold
from .data.uris import InputError, file_stem, open_fs, write_bytes_at

CATEGORY = {"id": 1, "name": "salient object", "supercategory": "object"}
ROW_COLUMNS = [
    "image_id",
    "source_uri",
    "height",
    "width",
    "mask_png",
    "saliency_png",
    "fg_fraction",
    "quality",
    "confidence",
    "backbone",
    "config_hash",
]
SCAN_COLUMNS = ["image_id", "quality", "config_hash"]
BATCH_ROWS = 256  # rows decoded at a time

# ---------------------------------------------------------------- pure functions


def object_labels(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """H x W bool -> (H x W int labels of its 8-connected objects, 1..n in row-major order
    of their first pixel; n areas in pixels)."""
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    return labels, np.bincount(labels.ravel(), minlength=n + 1)[1:]


def object_masks(mask: np.ndarray, min_area: int) -> tuple[list[np.ndarray], int]:
    """H x W bool -> (each 8-connected object of at least `min_area` pixels as an H x W bool
    mask, in label order (first pixel in row-major order); how many smaller ones were left)."""
    labels, areas = object_labels(mask)
    keep = [k + 1 for k in range(len(areas)) if areas[k] >= min_area]
    return [labels == k for k in keep], len(areas) - len(keep)


def rle_encode(obj: np.ndarray) -> dict:
    """H x W bool -> COCO compressed RLE {"size": [H, W], "counts": str} (JSON-ready)."""
    rle = mask_util.encode(np.asfortranarray(obj, dtype=np.uint8))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def mask_bbox(obj: np.ndarray) -> list[float]:
    """H x W bool, not empty -> COCO bbox [x, y, width, height] of its pixels."""
    rows, cols = np.flatnonzero(obj.any(1)), np.flatnonzero(obj.any(0))
    x, y = cols[0], rows[0]
    return [float(x), float(y), float(cols[-1] - x + 1), float(rows[-1] - y + 1)]


def object_annotation(obj: np.ndarray, ann_id: int, image_id: int, score: float | None) -> dict:
    """H x W bool object -> a COCO instance annotation: RLE segmentation, bbox, area in
    pixels, iscrowd 0, `score` (the mask's quality; left out when unknown)."""
    ann = {
        "id": ann_id,
        "image_id": image_id,
        "category_id": CATEGORY["id"],
        "segmentation": rle_encode(obj),
        "area": int(obj.sum()),
        "bbox": mask_bbox(obj),
        "iscrowd": 0,
    }
    if _finite(score) is not None:
        ann["score"] = float(score)
    return ann


def png_name_flat(image_id: str) -> str:
    """'a/b/0001.jpg' -> '0001.png': one folder, matched by stem."""
    return f"{file_stem(image_id)}.png"


def png_name_tree(image_id: str) -> str:
    """'a/b/0001.jpg' -> 'a/b/0001.png': the image id's sub-folders kept."""
    path = posixpath.normpath(image_id)
    if path.startswith(("/", "../")) or path in ("..", "."):
        raise InputError(
            f"--format png --png-layout tree: image id {image_id!r} is not a relative path "
            "inside the output; use the flat layout"
        )
    return f"{posixpath.splitext(path)[0]}.png"


PNG_LAYOUTS: dict[str, Callable[[str], str]] = {"flat": png_name_flat, "tree": png_name_tree}


def png_names(ids: list[str], layout: str) -> list[str]:
    """One PNG path per image id; two ids that would share a file (also when only letter
    case differs, which case-insensitive file systems merge) are refused."""
    names = [PNG_LAYOUTS[layout](i) for i in ids]
    seen: dict[str, str] = {}
    for image_id, name in zip(ids, names, strict=True):
        other = seen.setdefault(name.casefold(), image_id)
        if other != image_id:
            hint = " (use --png-layout tree to keep sub-folders)" if layout == "flat" else ""
            raise InputError(
                f"--format png: images {other!r} and {image_id!r} would both be written as "
                f"{name!r}{hint}"
            )
    return names


# ------------------------------------------------------------ choosing the rows


@dataclass
class Selection:
    """The prediction rows an export takes, chosen before anything is written."""

    fs: object
    files: list[str]  # the masks/ shards
    config_hash: str | None  # only rows of this config (None: every row)
    threshold: float | None  # only rows with quality >= this (None: no quality filter)
    rows: int  # rows found
    other_config: int  # rows of another config, left out
    kept_ids: list[str]  # the image ids exported, in shard order

    def keep(self, table: pa.Table) -> np.ndarray:
        """Which rows of a shard batch the selection takes (bool array)."""
        keep = np.ones(table.num_rows, bool)
        if self.config_hash is not None:
            hashes = pc.fill_null(pc.equal(table.column("config_hash"), self.config_hash), False)
            keep &= hashes.to_numpy(zero_copy_only=False)
        if self.threshold is not None:
            keep &= passes(table.column("quality"), self.threshold)
        return keep


def passes(quality: pa.ChunkedArray | pa.Array, threshold: float) -> np.ndarray:
    """N float32 qualities (null / NaN: unknown) -> N bool: quality >= threshold, compared in
    float64 (the same test wherever rows are chosen)."""
    q = pc.fill_null(quality, float("nan")).to_numpy(zero_copy_only=False).astype(np.float64)
    with np.errstate(invalid="ignore"):
        return q >= threshold


def masks_location(uri: str, storage_options: dict) -> tuple[object, str, str | None]:
    """A pseudolabel / predict output or its masks/ folder -> (fs, masks folder, run.json
    path or None)."""
    fs, root = open_fs(uri, storage_options)
    root = root.rstrip("/")
    if not fs.exists(root):
        raise InputError(f"--predictions {uri!r} does not exist")
    if fs.isdir(posixpath.join(root, "masks")):
        root = posixpath.join(root, "masks")
    run_json = None
    if posixpath.basename(root) == "masks":
        candidate = posixpath.join(posixpath.dirname(root), "run.json")
        run_json = candidate if fs.exists(candidate) else None
    return fs, root, run_json


def select_predictions(uri: str, storage_options: dict, cfg: ExportConfig) -> Selection:
    """Scan image_id / quality / config_hash of every shard; keep the rows of the output's
    config (run.json's hash) that pass min_quality / top_fraction (train's rule)."""
    fs, root, run_json = masks_location(uri, storage_options)
    files = shard_files(fs, root) if fs.isdir(root) else []
    if not files:
        raise InputError(
            f"--predictions {uri!r} holds no Parquet shards; give a pseudolabel / predict "
            "output folder (with masks/) or its masks/ folder"
        )
    parts = []
    for path in files:
        with fs.open(path, "rb") as fh:
            shard = pq.ParquetFile(fh)
            missing = [c for c in ROW_COLUMNS if c not in shard.schema_arrow.names]
            if missing:
                raise InputError(
                    f"--predictions {uri!r}: {posixpath.basename(path)} lacks the columns "
                    f"{', '.join(missing)}; give a pseudolabel / predict output"
                )
            parts.append(shard.read(columns=SCAN_COLUMNS))
    scan = pa.concat_tables(parts)
    hashes = scan.column("config_hash")
    if run_json is not None:
        try:
            config_hash = json.loads(fs.cat_file(run_json)).get("config_hash")
        except ValueError:
            raise InputError(
                f"--predictions {uri!r}: its run.json is damaged (not JSON); restore it (it "
                "names the config whose masks to export)"
            ) from None
    else:
        distinct = pc.unique(hashes).to_pylist()
        if len(distinct) > 1:
            raise InputError(
                f"--predictions {uri!r} holds masks of {len(distinct)} configs and no run.json "
                "naming the current one; give the output folder with its run.json"
            )
        config_hash = None
    mine = (
        pc.fill_null(pc.equal(hashes, config_hash), False)
        if config_hash is not None
        else pa.array(np.ones(scan.num_rows, bool))
    )
    ours = scan.filter(mine)
    ids = ours.column("image_id").to_pylist()
    if len(set(ids)) != len(ids):
        raise InputError(f"--predictions {uri!r} repeats image ids; every image must appear once")
    threshold = None
    if cfg.min_quality > 0 or cfg.top_fraction < 1:
        quality = pc.fill_null(ours.column("quality"), float("nan"))
        known = quality.to_numpy(zero_copy_only=False).astype(np.float64)
        known = known[np.isfinite(known)]
        if not len(known):
            raise InputError(
                f"--predictions {uri!r}: no mask has a quality (an older predict's masks "
                "carry none), "
                "so --min-quality / --top-fraction cannot choose; leave them out"
            )
        threshold = quality_threshold(known, cfg.min_quality, cfg.top_fraction)
        ids = [i for i, keep in zip(ids, passes(quality, threshold), strict=True) if keep]
    if not ours.num_rows:
        raise InputError(
            f"--predictions {uri!r} holds no masks of config {config_hash} (of {scan.num_rows} "
            "rows); every image failed, or the run has not written any yet"
        )
    if not ids:
        raise InputError(
            f"--predictions {uri!r}: no mask has quality >= {threshold} (of {ours.num_rows}); "
            "relax --min-quality / --top-fraction"
        )
    return Selection(
        fs, files, config_hash, threshold, scan.num_rows, scan.num_rows - ours.num_rows, ids
    )


def iter_rows(selection: Selection, columns: list[str]) -> Iterator[list[dict]]:
    """The selected rows, shard by shard, at most BATCH_ROWS at a time (as Python dicts)."""
    fs = selection.fs
    for path in selection.files:
        with fs.open(path, "rb") as fh:
            shard = pq.ParquetFile(fh)
            for batch in shard.iter_batches(batch_size=BATCH_ROWS, columns=columns):
                table = pa.Table.from_batches([batch])
                table = table.filter(pa.array(selection.keep(table)))
                if table.num_rows:
                    yield table.to_pylist()


def decode_mask(row: dict) -> np.ndarray:
    """A row's mask_png -> H x W bool, checked against the row's height and width."""
    mask = decode_gray(row["mask_png"]) > 127
    if mask.shape != (row["height"], row["width"]):
        raise InputError(
            f"--predictions: the mask of {row['image_id']!r} is {mask.shape[1]} x "
            f"{mask.shape[0]}, not the image's {row['width']} x {row['height']}"
        )
    return mask


# ------------------------------------------------------------------ the formats


def export_coco(selection: Selection, cfg: ExportConfig, opts: dict) -> dict:
    """One COCO instances JSON at cfg.output (built batch by batch, written once)."""
    fs, path = open_fs(cfg.output, opts)
    if fs.isdir(path):
        raise InputError(f"--output {cfg.output!r} is a folder; give the JSON file's path")
    images, annotations, small, empty = [], [], 0, 0
    for rows in iter_rows(selection, ROW_COLUMNS):
        for row in rows:
            image_id = len(images) + 1
            images.append(
                {
                    "id": image_id,
                    "file_name": row[cfg.file_name],
                    "width": row["width"],
                    "height": row["height"],
                    "source_uri": row["source_uri"],
                    "quality": _finite(row["quality"]),
                }
            )
            objects, dropped = object_masks(decode_mask(row), cfg.min_area)
            small += dropped
            empty += not objects
            for obj in objects:
                annotations.append(
                    object_annotation(obj, len(annotations) + 1, image_id, row["quality"])
                )
    coco = {
        "info": {
            "description": "salient-object masks exported by autosod-ray",
            "predictions": cfg.predictions,
            "config_hash": selection.config_hash,
            "min_area": cfg.min_area,
            "quality_threshold": selection.threshold,
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [CATEGORY],
    }
    write_bytes_at(cfg.output, json.dumps(coco).encode(), opts)
    return {
        "images": len(images),
        "annotations": len(annotations),
        "images_without_objects": empty,
        "objects_below_min_area": small,
    }


def export_png(selection: Selection, cfg: ExportConfig, opts: dict) -> dict:
    """One PNG per image under cfg.output (the stored PNG bytes, unchanged)."""
    names = dict(
        zip(selection.kept_ids, png_names(selection.kept_ids, cfg.png_layout), strict=True)
    )
    fs, root = _empty_folder(cfg.output, opts)  # after the names pass: nothing made on refusal
    column = f"{cfg.png_map}_png"
    written = 0
    for rows in iter_rows(selection, ["image_id", column, "config_hash", "quality"]):
        files = {posixpath.join(root, names[r["image_id"]]): r[column] for r in rows}
        for folder in {posixpath.dirname(p) for p in files}:
            fs.makedirs(folder, exist_ok=True)
        fs.pipe(files)  # object stores: the PUTs of a batch run concurrently
        written += len(files)
    return {"pngs": written, "layout": cfg.png_layout, "map": cfg.png_map}


HF_VALUES = {  # scalar columns and their Hugging Face `Value` dtypes
    "image_id": "string",
    "source_uri": "string",
    "height": "int32",
    "width": "int32",
    "fg_fraction": "float32",
    "quality": "float32",
    "confidence": "float32",
    "backbone": "string",
    "config_hash": "string",
}
HF_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # datasets' Image storage


def hf_schema(with_images: bool) -> pa.Schema:
    """The hf export's Arrow schema, with the `huggingface` feature metadata that makes
    `datasets` decode the image columns to PIL images."""
    images = (["image"] if with_images else []) + ["mask", "saliency"]
    fields = [pa.field("image_id", pa.string())]
    fields += [pa.field(name, HF_IMAGE) for name in images]
    fields += [pa.field(c, pa.type_for_alias(t)) for c, t in HF_VALUES.items() if c != "image_id"]
    features = {
        f.name: {"_type": "Image"}
        if f.name in images
        else {"dtype": HF_VALUES[f.name], "_type": "Value"}
        for f in fields
    }
    meta = {"huggingface": json.dumps({"info": {"features": features}})}
    return pa.schema(fields, metadata=meta)


def hf_table(rows: list[dict], schema: pa.Schema, image_bytes: list[bytes] | None) -> pa.Table:
    """Rows of the predictions -> a table in the hf schema."""
    columns = {c: [r[c] for r in rows] for c in HF_VALUES}
    columns["mask"] = [{"bytes": r["mask_png"], "path": None} for r in rows]
    columns["saliency"] = [{"bytes": r["saliency_png"], "path": None} for r in rows]
    if image_bytes is not None:
        columns["image"] = [
            {"bytes": data, "path": r["image_id"]}
            for r, data in zip(rows, image_bytes, strict=True)
        ]
    return pa.table({f.name: pa.array(columns[f.name], f.type) for f in schema}, schema=schema)


def export_hf(selection: Selection, cfg: ExportConfig, opts: dict) -> dict:
    """Parquet shards (one per input shard's batch) under cfg.output in the hf schema."""
    fs, root = _empty_folder(cfg.output, opts)
    schema = hf_schema(cfg.with_images)
    rows_out, files = 0, 0
    for rows in iter_rows(selection, ROW_COLUMNS):
        image_bytes = None
        if cfg.with_images:
            image_bytes = [_read_image(r["source_uri"], cfg) for r in rows]
        write_table_atomic(fs, root, hf_table(rows, schema, image_bytes))
        rows_out, files = rows_out + len(rows), files + 1
    return {"rows_written": rows_out, "files": files, "with_images": cfg.with_images}


FORMATS: dict[str, Callable[[Selection, ExportConfig, dict], dict]] = {
    "coco": export_coco,
    "png": export_png,
    "hf": export_hf,
}


def run_export(cfg: ExportConfig) -> dict:
    """Choose the rows, write them in cfg.format; returns the summary."""
    if not cfg.predictions or not cfg.output:
        raise InputError("--predictions and --output are both required")
    selection = select_predictions(cfg.predictions, cfg.storage.options(cfg.predictions), cfg)
    written = FORMATS[cfg.format](selection, cfg, cfg.storage.options(cfg.output))
    return {
        "format": cfg.format,
        "output": cfg.output,
        "rows": selection.rows,
        "other_config": selection.other_config,
        "quality_threshold": selection.threshold,
        "exported": len(selection.kept_ids),
        **written,
    }


# ---------------------------------------------------------------------- helpers


def _finite(value) -> float | None:
    return float(value) if value is not None and np.isfinite(value) else None


def _empty_folder(uri: str, opts: dict):
    """(fs, path) of an output folder that does not exist or is empty (an export never
    mixes with files already there, e.g. a PNG of an image that a filter now leaves out)."""
    fs, root = open_fs(uri, opts)
    root = root.rstrip("/")
    if fs.isfile(root):
        raise InputError(f"--output {uri!r} is a file; give a new or empty folder")
    if fs.isdir(root) and fs.ls(root):
        raise InputError(f"--output {uri!r} is not empty; give a new or empty folder")
    fs.makedirs(root, exist_ok=True)
    return fs, root


def _read_image(uri: str, cfg: ExportConfig) -> bytes:
    try:
        return read_with_retries(uri, cfg.storage.options(uri))
    except OSError as err:
        raise InputError(
            f"--with-images: cannot read {uri!r} ({type(err).__name__}: {err}); export "
            "without images, or run where the images are reachable"
        ) from None
