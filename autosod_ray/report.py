"""A static HTML report of one pseudolabel / predict output: the page a person opens first.

One self-contained file (every picture inline as a data: URI) that opens from disk or
a synced bucket with no server. Its size does not grow with the run: the histograms
read scalar columns only, and each gallery holds a fixed number of small thumbnails
chosen from sorted scalars. Masks are decoded only for those thumbnails, for a bounded
sample of whole shard files (object counts) and for the images that have ground truth
(IoU); in Ray tasks, one per shard file, when the run is large.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import html
import io
import json
import math
import posixpath
import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image
from scipy import ndimage, stats

from .config import ReportConfig, StorageConfig
from .data.images import decode_gray, decode_image
from .data.parquet import read_columns, read_table_folder, shard_files
from .data.uris import (
    InputError,
    file_stem,
    full_uri,
    open_fs,
    pngs_by_stem,
    read_bytes_at,
    write_bytes_at,
)
from .export import object_labels
from .metrics import iou
from .preview import images_by_stem

# masks/ columns the page reads for every row (never the PNGs)
SCALARS = ("image_id", "fg_fraction", "quality", "attention_border")
# object counting works on masks at most this many pixels on a side (box-downscaled)
COUNT_MAX_SIDE = 512
# thumbnails are never decoded from images larger than this (decompression bombs)
THUMB_MAX_PIXELS = 200_000_000


@dataclasses.dataclass(frozen=True)
class ReportSettings:
    """What the page shows and the rules it flags masks by (`ReportConfig` holds the same)."""

    thumbnails: int = 24  # per gallery
    thumbnail_px: int = 160  # longest side of a thumbnail
    empty_fg_fraction: float = 0.005  # no object: the mask covers less than this
    background_fg_fraction: float = 0.9  # no object: the mask covers more (background taken)
    low_quality: float = 0.4  # no object (or a wrong one): quality below this
    diffuse_attention: float = 0.8  # no object: the CLS attention on the border, over its mean
    min_object_fraction: float = 0.005  # several objects: pieces at least this share of the image
    object_scan_limit: int = 5000  # object counts over whole shard files up to this many masks
    ray_above: int = 2000  # runs with more masks than this decode masks in Ray tasks

    @classmethod
    def of(cls, cfg) -> ReportSettings:
        return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})


# ---------------------------------------------------------------- pure functions (arrays)


def overlay(
    image: np.ndarray, mask: np.ndarray, dim: float = 0.4, edge=(255, 40, 40)
) -> np.ndarray:
    """The mask over its image: background dimmed to `dim`, the mask's outline in `edge`.

    image: H x W x 3 uint8; mask: H x W bool -> H x W x 3 uint8 (pixels inside the mask,
    off its outline, keep their value).
    """
    if image.shape[:2] != mask.shape or image.ndim != 3:
        raise ValueError(f"image {image.shape} and mask {mask.shape} differ in size")
    out = image.astype(np.float32)
    out[~mask] *= dim
    out = np.round(out).astype(np.uint8)
    out[outline(mask)] = edge
    return out


def outline(mask: np.ndarray) -> np.ndarray:
    """H x W bool -> H x W bool: mask pixels with a neighbour outside (or on the image edge)."""
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def objects_in(mask: np.ndarray, min_area: float) -> int:
    """Connected pieces (8-connected) of an H x W bool mask with at least `min_area` pixels."""
    return int((object_labels(mask)[1] >= min_area).sum())


def count_objects(mask: np.ndarray, min_object_fraction: float) -> int:
    """`objects_in` with the minimum area as a share of the image; masks larger than
    COUNT_MAX_SIDE on a side are box-downscaled first (H x W bool -> int)."""
    h, w = mask.shape
    if max(h, w) > COUNT_MAX_SIDE:
        th, tw = thumbnail_size(h, w, COUNT_MAX_SIDE)
        small = Image.fromarray(mask.astype(np.uint8) * 255).resize((tw, th), Image.BOX)
        mask = np.asarray(small) >= 128
    return objects_in(mask, min_object_fraction * mask.size)


def thumbnail_size(height: int, width: int, px: int) -> tuple[int, int]:
    """(h, w) with the longer side `px` and the aspect ratio kept (never 0)."""
    scale = px / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def make_thumbnail(image: np.ndarray | None, mask: np.ndarray, px: int) -> np.ndarray:
    """The mask over its image at thumbnail size: image H x W x 3 uint8 (or None when it
    could not be read: the mask alone, white on grey), mask H x W bool -> h x w x 3 uint8."""
    h, w = thumbnail_size(*mask.shape, px)
    small = Image.fromarray(mask.astype(np.uint8) * 255).resize((w, h), Image.BOX)
    small_mask = np.asarray(small) >= 128
    if image is None:
        grey = np.where(small_mask[..., None], 235, 90).astype(np.uint8)
        return np.repeat(grey, 3, axis=2)
    pic = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR, reducing_gap=3.0))
    return overlay(pic, small_mask)


def encode_jpeg(image: np.ndarray, quality: int = 82) -> bytes:
    """H x W x 3 uint8 -> JPEG bytes."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality, optimize=True)
    return buf.getvalue()


_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_PATH = re.compile(r"(?:[a-z][a-z0-9+.-]*://|/)\S*|\S+/\S*", re.IGNORECASE)
_NUMBER = re.compile(r"\d+(?:\.\d+)?(?:e[+-]?\d+)?", re.IGNORECASE)
_EXCEPTION = re.compile(r"^[A-Z]\w*(?:Error|Exception|Interrupt|Exit)$")


def error_reason(message: str) -> str:
    """An error message -> its reason, the same for every image that failed the same way:
    the text before the first ': ' (plus the exception's name when one follows), with
    quoted text, paths / URIs and numbers replaced by '…', '<path>' and '#'."""
    parts = (message or "").strip().split(": ")
    head = parts[0]
    if len(parts) > 2 and _EXCEPTION.match(parts[1].strip()):
        head = f"{head}: {parts[1].strip()}"
    elif _EXCEPTION.match(head) and len(parts) > 1:  # "OSError: ..." -> the next part too
        head = f"{head}: {parts[1]}"
    head = _QUOTED.sub("…", head)
    head = _PATH.sub("<path>", head)
    head = _NUMBER.sub("#", head)
    head = " ".join(head.split())
    return (head[:117] + "...") if len(head) > 120 else (head or "(no message)")


def error_reasons(
    errors: Sequence[str], kinds: Sequence[str] | None = None, counts: Sequence[int] | None = None
) -> dict[str, dict]:
    """Error messages grouped by `error_reason`, most frequent first:
    {reason: {"count": n, "kinds": {kind: n}, "example": one full message}}.
    `counts[i]` says how many rows carry errors[i] (default 1 each)."""
    groups: dict[str, dict] = {}
    for i, message in enumerate(errors):
        n = 1 if counts is None else int(counts[i])
        g = groups.setdefault(error_reason(message), {"count": 0, "kinds": {}, "example": message})
        g["count"] += n
        kind = (kinds[i] if kinds is not None else "") or "unknown"
        g["kinds"][kind] = g["kinds"].get(kind, 0) + n
    return dict(sorted(groups.items(), key=lambda kv: (-kv[1]["count"], kv[0])))


def no_object_flags(
    fg_fraction: np.ndarray,
    quality: np.ndarray,
    attention_border: np.ndarray,
    s: ReportSettings,
) -> dict[str, np.ndarray]:
    """Per rule, which masks (N,) probably show no object: empty or near-empty, most of the
    image (the background taken), low quality, or an image whose CLS attention lies on its
    border as much as anywhere (nothing draws it). NaN (an output older than the column)
    never flags."""
    with np.errstate(invalid="ignore"):
        return {
            "empty": fg_fraction < s.empty_fg_fraction,
            "background": fg_fraction > s.background_fg_fraction,
            "low quality": quality < s.low_quality,
            "diffuse attention": attention_border >= s.diffuse_attention,
        }


def lowest_first(values: np.ndarray, n: int, descending: bool = False) -> np.ndarray:
    """Indices of the n smallest (largest) finite values of (N,), in that order (stable)."""
    finite = np.flatnonzero(np.isfinite(values))
    keys = -values[finite] if descending else values[finite]
    return finite[np.argsort(keys, kind="stable")[:n]]


def spearman(x: np.ndarray, y: np.ndarray) -> tuple[float, int]:
    """Spearman's rank correlation of the pairs where both are finite, and how many; NaN
    when fewer than 3 pairs or either side is constant."""
    ok = np.isfinite(x) & np.isfinite(y)
    n = int(ok.sum())
    if n < 3 or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
        return math.nan, n
    return float(stats.spearmanr(x[ok], y[ok]).statistic), n


def mask_iou(binary: np.ndarray, gt: np.ndarray) -> float:
    """IoU of an H x W bool mask with an H' x W' bool ground truth; a mask of another size
    is resized (nearest) to the ground truth's, as `evaluate` does."""
    if binary.shape != gt.shape:
        size = (gt.shape[1], gt.shape[0])
        binary = np.asarray(Image.fromarray(binary).resize(size, Image.NEAREST))
    return iou(binary, gt)


# ---------------------------------------------------------------- plots (PNG bytes)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    _plt().close(fig)
    return buf.getvalue()


def histogram_png(values: np.ndarray, xlabel: str, lines: dict[str, float]) -> bytes:
    """A 50-bin histogram over [0, 1] of the finite values, rule thresholds dashed."""
    plt = _plt()
    values = values[np.isfinite(values)]
    counts, edges = np.histogram(values, bins=50, range=(0.0, 1.0))
    fig, ax = plt.subplots(figsize=(5.4, 2.6))
    ax.stairs(counts, edges, fill=True, color="#5b7fa6")
    for i, (label, x) in enumerate(lines.items()):
        ax.axvline(x, color="#c0392b", linestyle="--", linewidth=1)
        ax.text(
            x,
            0.97 - 0.1 * i,
            f" {label}",
            transform=ax.get_xaxis_transform(),
            fontsize=7,
            color="#c0392b",
            va="top",
        )
    ax.set_xlim(0, 1)
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel("masks", fontsize=9)
    ax.tick_params(labelsize=8)
    fig.tight_layout()
    return _png(fig)


def scatter_png(quality: np.ndarray, ious: np.ndarray, rho: float, n: int) -> bytes:
    """quality (x) against IoU with the ground truth (y); at most 20000 points drawn."""
    plt = _plt()
    ok = np.flatnonzero(np.isfinite(quality) & np.isfinite(ious))
    if len(ok) > 20000:
        ok = np.random.default_rng(0).choice(ok, 20000, replace=False)
    fig, ax = plt.subplots(figsize=(4.6, 4.0))
    ax.scatter(
        quality[ok],
        ious[ok],
        s=16 if len(ok) < 500 else 5,
        alpha=0.6,
        color="#5b7fa6",
        linewidths=0,
    )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("quality", fontsize=9)
    ax.set_ylabel("IoU with ground truth", fontsize=9)
    ax.set_title(f"Spearman {rho:.3f} over {n} images", fontsize=9)
    ax.tick_params(labelsize=8)
    fig.tight_layout()
    return _png(fig)


# ---------------------------------------------------------------- shard tasks (side effects)


@dataclasses.dataclass(frozen=True)
class Stores:
    """The fsspec options of every URI the report reads or writes: a job's StorageConfig
    where one is given (its options for each URI), else the run's own `options` for URIs
    on the run's kind of store, and none for other places (local paths)."""

    run_uri: str
    options: dict
    storage: StorageConfig | None = None

    def of(self, uri: str) -> dict:
        if self.storage is not None:
            return self.storage.options(uri)
        scheme = uri.split("://", 1)[0] if "://" in uri else "file"
        base = self.run_uri.split("://", 1)[0] if "://" in self.run_uri else "file"
        return dict(self.options) if scheme == base and scheme != "file" else {}


def measure_shard(
    path: str, stores: Stores, scan: bool, gt: dict[str, str], min_object_fraction: float
) -> dict[str, list]:
    """One masks/ shard: object counts of all its masks (when `scan`) and IoU of those with
    ground truth (`gt`: image_id -> mask PNG URI). Returns per measured row image_id,
    objects (-1: not counted), iou (NaN: none) and error ("" or why the IoU is missing)."""
    fs, p = open_fs(path, stores.of(path))
    t = read_columns(fs, p, ["image_id", "mask_png"])
    out: dict[str, list] = {"image_id": [], "objects": [], "iou": [], "error": []}
    for image_id, png in zip(
        t.column("image_id").to_pylist(), t.column("mask_png").to_pylist(), strict=True
    ):
        if not scan and image_id not in gt:
            continue
        mask = decode_gray(png) > 127
        objects, score, error = -1, math.nan, ""
        if scan:
            objects = count_objects(mask, min_object_fraction)
        if image_id in gt:
            try:
                truth = decode_gray(read_bytes_at(gt[image_id], stores.of(gt[image_id]))) > 127
                score = mask_iou(mask, truth)
            except Exception as err:  # noqa: BLE001 - an unreadable ground truth is counted
                error = f"{type(err).__name__}: {err}"
        for key, value in zip(out, (image_id, objects, score, error), strict=True):
            out[key].append(value)
    return out


def thumbnail_shard(
    path: str, stores: Stores, wanted: dict[str, str | None], px: int
) -> dict[str, tuple[bytes, str]]:
    """Thumbnails of the rows of one masks/ shard named in `wanted` (image_id -> image URI,
    or None to read the row's source_uri): image_id -> (JPEG bytes, "" or why the image
    could not be read, in which case the thumbnail is the mask alone)."""
    fs, p = open_fs(path, stores.of(path))
    t = read_columns(fs, p, ["image_id", "source_uri", "mask_png"])
    out = {}
    columns = (t.column(c).to_pylist() for c in t.column_names)
    for image_id, source, png in zip(*columns, strict=True):
        if image_id not in wanted:
            continue
        mask = decode_gray(png) > 127
        uri = wanted[image_id] or source
        image, note = None, ""
        try:
            image = decode_image(read_bytes_at(uri, stores.of(uri)), THUMB_MAX_PIXELS)
            if image.shape[:2] != mask.shape:
                size = (mask.shape[1], mask.shape[0])
                image = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
        except Exception as err:  # noqa: BLE001 - the mask alone, and why
            image, note = None, f"image unreadable: {type(err).__name__}: {err}"
        out[image_id] = (encode_jpeg(make_thumbnail(image, mask, px)), note)
    return out


def run_tasks(fn: Callable, calls: list[tuple], use_ray: bool) -> list:
    """fn(*args) for each args in `calls`: Ray tasks (one per call) or in this process."""
    if not use_ray or not calls:
        return [fn(*args) for args in calls]
    import ray

    if not ray.is_initialized():
        ray.init(ignore_reinit_error=True)
    remote = ray.remote(fn)
    return ray.get([remote.remote(*args) for args in calls])


def read_scalars(files: list[str], opts: dict, columns: Sequence[str]) -> pa.Table:
    """`columns` of every shard file (threads for the I/O), with a `shard` column: the index
    of the row's file in `files`."""

    def one(i_path):
        i, path = i_path
        fs, p = open_fs(path, opts)
        t = read_columns(fs, p, list(columns))
        return t.append_column("shard", pa.array(np.full(t.num_rows, i, np.int32)))

    with ThreadPoolExecutor(max_workers=16) as pool:
        parts = list(pool.map(one, enumerate(files)))
    if not parts:
        return pa.table(
            {**{c: pa.array([], pa.string()) for c in columns}, "shard": pa.array([], pa.int32())}
        )
    return pa.concat_tables(parts, promote_options="default")


def _floats(column) -> np.ndarray:
    return pc.fill_null(pc.cast(column, pa.float64()), math.nan).to_numpy()


def report_path(predictions: str, output: str | None) -> str:
    """Where the page goes: `output` if it names an .html file, else <output or
    predictions>/report.html."""
    if output and output.lower().endswith((".html", ".htm")):
        return output
    return posixpath.join((output or predictions).rstrip("/"), "report.html")


def read_run_json(predictions: str, opts: dict) -> tuple[dict | None, str]:
    """(run.json's record or None, "" or why it could not be read)."""
    fs, root = open_fs(predictions, opts)
    path = posixpath.join(root, "run.json")
    if not fs.exists(path):
        return None, "no run.json in the predictions folder"
    try:
        record = json.loads(fs.cat_file(path))
    except (ValueError, OSError) as err:
        return None, f"run.json unreadable: {err}"
    return (record, "") if isinstance(record, dict) else (None, "run.json is not an object")


# ---------------------------------------------------------------- the entry point


def write_report(
    predictions: str,
    output: str | None = None,
    storage_options: dict | None = None,
    images: str | None = None,
    ground_truth: str | None = None,
    settings: ReportSettings | None = None,
    storage: StorageConfig | None = None,
) -> dict:
    """Write the HTML report of the pseudolabel / predict output `predictions` (a folder or
    URI holding masks/, errors/, run.json) to `output` (an .html path, or a folder for
    report.html; default <predictions>/report.html).

    `storage_options` are the fsspec options of the run's store, used for every URI on
    the same kind of store (a job's `storage` config, when given, decides for each URI).
    `images`: a folder / URI of the images, matched by file stem (default: each row's
    source_uri); `ground_truth`: a folder / URI of mask PNGs by stem (adds IoU, a
    quality-vs-IoU scatter and its Spearman figure); `settings`: galleries and rules.
    Returns a summary: output, bytes, rows, errors, thumbnails, flag counts, IoU figures,
    seconds, ray (whether masks were decoded in Ray tasks).
    """
    start = time.perf_counter()
    s = settings or ReportSettings()
    stores = Stores(predictions, dict(storage_options or {}), storage)
    opts = stores.of(predictions) if storage is not None else stores.options
    fs, root = open_fs(predictions, opts)
    if not fs.exists(root):
        raise InputError(f"--predictions {predictions!r} does not exist")
    masks_dir = posixpath.join(root, "masks")
    files = [full_uri(fs, p) for p in shard_files(fs, masks_dir)]
    if not files and not fs.exists(posixpath.join(root, "errors")):
        raise InputError(
            f"--predictions {predictions!r} holds no masks/ Parquet; give a pseudolabel or "
            "predict output folder"
        )
    run, run_note = read_run_json(predictions, opts)
    table = read_scalars(files, opts, SCALARS)
    ids = table.column("image_id").to_pylist()
    fg, quality = _floats(table.column("fg_fraction")), _floats(table.column("quality"))
    attention_border = _floats(table.column("attention_border"))
    shard = table.column("shard").to_numpy()
    errors = read_table_folder(
        posixpath.join(predictions, "errors"), opts, ["image_id", "error", "error_kind"]
    )
    reasons = _reasons_of(errors)

    # what to measure: object counts over the first shard files, IoU where ground truth is
    counts = np.bincount(shard, minlength=len(files))
    scan_files = _first_files(counts, s.object_scan_limit)
    gt_by_file: dict[int, dict[str, str]] = {}
    if ground_truth:
        gts = pngs_by_stem(ground_truth, stores.of(ground_truth), "--ground-truth")
        for k, i in enumerate(ids):
            if file_stem(i) in gts:
                gt_by_file.setdefault(int(shard[k]), {})[i] = gts[file_stem(i)]
    with_gt = bool(gt_by_file)
    use_ray = len(ids) > s.ray_above
    calls = [
        (files[f], stores, f in scan_files, gt_by_file.get(f, {}), s.min_object_fraction)
        for f in sorted(scan_files | set(gt_by_file))
    ]
    objects = np.full(len(ids), -1, np.int64)
    ious = np.full(len(ids), math.nan)
    gt_errors: list[str] = []
    row_of = {i: k for k, i in enumerate(ids)}
    for part in run_tasks(measure_shard, calls, use_ray):
        for i, n_obj, score, err in zip(*part.values(), strict=True):
            objects[row_of[i]], ious[row_of[i]] = n_obj, score
            if err:
                gt_errors.append(f"{i}: {err}")

    # the galleries, chosen from sorted scalars
    flags = no_object_flags(fg, quality, attention_border, s)
    flagged = np.logical_or.reduce(list(flags.values())) if ids else np.zeros(0, bool)
    several = objects >= 2
    galleries = _choose_galleries(ids, quality, fg, objects, ious, flagged, several, s, with_gt)
    chosen = sorted({k for g in galleries for k in g["rows"]})
    image_uris = images_by_stem(images, stores.of(images)) if images else {}
    by_file: dict[int, dict[str, str | None]] = {}
    for k in chosen:
        by_file.setdefault(int(shard[k]), {})[ids[k]] = image_uris.get(file_stem(ids[k]))
    thumbs: dict[str, tuple[bytes, str]] = {}
    thumb_calls = [(files[f], stores, w, s.thumbnail_px) for f, w in by_file.items()]
    for part in run_tasks(thumbnail_shard, thumb_calls, use_ray):
        thumbs.update(part)

    rho, n_rho = spearman(quality, ious) if with_gt else (math.nan, 0)
    scanned = int(counts[sorted(scan_files)].sum()) if scan_files else 0
    facts = {
        "predictions": predictions,
        "run": run,
        "run_note": run_note,
        "rows": len(ids),
        "errors": errors.num_rows,
        "reasons": reasons,
        "flags": {k: int(v.sum()) for k, v in flags.items()},
        "flagged": int(flagged.sum()),
        "scanned": scanned,
        "several": int(several.sum()),
        "quality_known": int(np.isfinite(quality).sum()),
        "histograms": {
            "quality": histogram_png(quality, "quality", {"low quality": s.low_quality}),
            "fg_fraction": histogram_png(
                fg,
                "fg_fraction (share of the image in the mask)",
                {"empty": s.empty_fg_fraction, "background": s.background_fg_fraction},
            ),
        },
        "gt": None,
        "settings": s,
        "images": images,
        "ground_truth": ground_truth,
    }
    if with_gt:
        measured = np.isfinite(ious)
        facts["gt"] = {
            "matched": sum(len(g) for g in gt_by_file.values()),
            "measured": int(measured.sum()),
            "unreadable": gt_errors,
            "mean_iou": float(ious[measured].mean()) if measured.any() else math.nan,
            "median_iou": float(np.median(ious[measured])) if measured.any() else math.nan,
            "spearman": rho,
            "spearman_n": n_rho,
            "scatter": scatter_png(quality, ious, rho, n_rho) if n_rho else None,
            "csv": _iou_csv(ids, quality, ious),
        }
    page = render_page(facts, galleries, thumbs, ids, quality, fg, objects, ious)
    data = page.encode("utf-8")
    path = report_path(predictions, output)
    write_bytes_at(path, data, stores.of(path))
    return {
        "output": path,
        "bytes": len(data),
        "rows": len(ids),
        "errors": errors.num_rows,
        "thumbnails": sum(len(g["rows"]) for g in galleries),
        "no_object": facts["flagged"],
        "several_objects": facts["several"],
        "scanned_for_objects": scanned,
        "iou": None
        if not with_gt
        else {
            "n": facts["gt"]["measured"],
            "mean": facts["gt"]["mean_iou"],
            "spearman": rho,
            "spearman_n": n_rho,
        },
        "seconds": round(time.perf_counter() - start, 3),
        "ray": use_ray,
    }


def run_report(cfg: ReportConfig) -> dict:
    """`jobs/report.py`: write_report with the config's paths, storage and settings."""
    if not cfg.predictions:
        raise InputError("--predictions is required")
    return write_report(
        cfg.predictions,
        cfg.output,
        cfg.storage.options(cfg.predictions),
        images=cfg.images,
        ground_truth=cfg.ground_truth,
        settings=ReportSettings.of(cfg),
        storage=cfg.storage,
    )


def _reasons_of(errors: pa.Table) -> dict[str, dict]:
    """error_reasons over the distinct (error, kind) pairs of an errors table."""
    if not errors.num_rows:
        return {}
    t = errors.select(["error", "error_kind"]).cast(
        pa.schema([("error", pa.string()), ("error_kind", pa.string())])
    )
    grouped = t.group_by(["error", "error_kind"]).aggregate([([], "count_all")])
    return error_reasons(
        grouped.column("error").to_pylist(),
        grouped.column("error_kind").to_pylist(),
        grouped.column("count_all").to_pylist(),
    )


def _first_files(counts: np.ndarray, limit: int) -> set[int]:
    """The first shard files (in name order: names are digests, so no folder is favoured)
    whose rows add up to `limit` (the file that crosses it included)."""
    chosen, total = set(), 0
    for f, n in enumerate(counts):
        if total >= limit:
            break
        if n:
            chosen.add(f)
            total += int(n)
    return chosen


def _choose_galleries(ids, quality, fg, objects, ious, flagged, several, s, with_gt) -> list:
    """The galleries: title, note, and the row indices they show (at most s.thumbnails)."""
    n = s.thumbnails
    # flagged rows, lowest quality first (NaN quality: by fg_fraction's distance from 0.5)
    key = np.where(np.isfinite(quality), quality, 2.0 + np.abs(fg - 0.5))
    flagged_rows = np.flatnonzero(flagged)
    flagged_rows = flagged_rows[np.argsort(key[flagged_rows], kind="stable")][:n]
    several_rows = np.flatnonzero(several)
    order = np.lexsort((key[several_rows], -objects[several_rows]))
    several_rows = several_rows[order][:n]
    out = [
        {
            "id": "check",
            "title": "What to check: lowest quality",
            "note": "The masks POTNet trusts least, lowest first.",
            "rows": lowest_first(quality, n).tolist(),
        },
        {
            "id": "trust",
            "title": "What to trust: highest quality",
            "note": "The masks POTNet trusts most, highest first.",
            "rows": lowest_first(quality, n, descending=True).tolist(),
        },
        {
            "id": "no-object",
            "title": "Probably no object",
            "note": "Masks a rule below flags, lowest quality first.",
            "rows": flagged_rows.tolist(),
        },
        {
            "id": "several",
            "title": "Probably several objects",
            "note": "Masks of two or more separate pieces, most pieces first.",
            "rows": several_rows.tolist(),
        },
    ]
    if with_gt:
        out.append(
            {
                "id": "worst-iou",
                "title": "Lowest IoU with the ground truth",
                "note": "Where the mask and the human mask disagree most.",
                "rows": lowest_first(ious, n).tolist(),
            }
        )
    return out


def _iou_csv(ids: list[str], quality: np.ndarray, ious: np.ndarray) -> bytes:
    rows = ["image_id,quality,iou"]
    for k in np.flatnonzero(np.isfinite(ious)):
        name = ids[k].replace('"', '""')
        rows.append(f'"{name}",{quality[k]:.6g},{ious[k]:.6f}')
    return ("\n".join(rows) + "\n").encode()


# ---------------------------------------------------------------- the page (plain HTML)

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px auto;
max-width:1240px;padding:0 16px;color:#222}
h1{font-size:22px;margin-bottom:4px}
h2{font-size:17px;margin-top:30px;border-bottom:1px solid #ddd;padding-bottom:3px}
table{border-collapse:collapse;margin:6px 0}
td,th{padding:2px 12px 2px 0;text-align:left;vertical-align:top;border-bottom:1px solid #eee}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.muted,.note{color:#666}.warn{color:#a33;font-weight:600}
.plots{display:flex;flex-wrap:wrap;gap:16px}.plots img{max-width:100%;height:auto}
.grid{display:flex;flex-wrap:wrap;gap:10px}
figure{margin:0;width:__BOX__px}
.box{width:__BOX__px;height:__BOX__px;display:flex;align-items:center;justify-content:center;
background:#f1f1f1}
figcaption{font-size:11px;line-height:1.3;overflow:hidden;white-space:nowrap;
text-overflow:ellipsis}figcaption.facts{white-space:normal}
.summary td{text-align:left}
pre{background:#f6f6f6;padding:8px;overflow:auto;max-height:420px;font-size:12px}
"""

# records script errors (and pictures that did not load) in attributes of <html>, so a
# headless browser's DOM dump shows them
ERROR_PROBE = """window.addEventListener('error',function(e){var h=document.documentElement;
h.setAttribute('data-js-errors',(h.getAttribute('data-js-errors')||'')+String(e.message)+';');});"""
LOAD_PROBE = """window.addEventListener('load',function(){var bad=0;
document.querySelectorAll('img').forEach(function(i){if(!(i.complete&&i.naturalWidth>0))bad++;});
var h=document.documentElement;h.setAttribute('data-broken-images',String(bad));
h.setAttribute('data-ready','1');});"""


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _num(value, digits: int = 3) -> str:
    """A figure for the page: floats to `digits` decimals without trailing zeros, ints with
    thousands separators, None / NaN as '-', anything else escaped text."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        text = f"{value:.{digits}f}"
        return text.rstrip("0").rstrip(".") if "." in text else text
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else _e(value)


def _rows(pairs) -> str:
    return "".join(f"<tr><th>{_e(k)}</th><td class='n'>{v}</td></tr>" for k, v in pairs)


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def run_view(record: dict | None) -> dict:
    """run.json as one flat view: the output's totals and identity, overlaid with its latest
    run's entry (status, seconds, speed, timings, listing, warnings, reason). Reads both the
    record with a `runs` history and the older flat record."""
    record = record or {}
    runs = record.get("runs") or []
    latest = runs[-1] if runs and isinstance(runs[-1], dict) else {}
    return {**{k: v for k, v in record.items() if k != "runs"}, **latest}


def _summary_html(f: dict) -> str:
    run = f["run"] or {}
    s = run_view(run)
    listing = s.get("listing") or {}
    kinds = [k for k in ("permanent", "transient", "internal") if f"errors_{k}" in s]
    pairs = [
        ("status", _e(s.get("status", "-"))),
        ("inputs", _num(s.get("inputs"))),
        ("labelled", f"<span id='labelled'>{_num(s.get('labelled', f['rows']))}</span>"),
        (
            "errors",
            f"<span id='errors'>{_num(s.get('errors', f['errors']))}</span>"
            + (
                " (" + ", ".join(f"{_num(s[f'errors_{k}'])} {k}" for k in kinds) + ")"
                if kinds
                else ""
            ),
        ),
        ("skipped (done before)", _num(s.get("skipped_already_done"))),
        ("duplicates / missing", f"{_num(s.get('duplicates'))} / {_num(s.get('missing'))}"),
        ("speed", f"{_num(s.get('images_per_second'))} images/s over {_num(s.get('seconds'))} s"),
        ("rows in masks/ now", _num(f["rows"])),
        ("rows in errors/ now", _num(f["errors"])),
    ]
    if listing:
        ignored = ", ".join(f"{_num(n)} {_e(ext)}" for ext, n in listing.get("ignored", {}).items())
        pairs.append(
            (
                "listing left out",
                f"{ignored or 'no other files'}; "
                f"{_num(listing.get('unreadable', 0))} unreadable entries",
            )
        )
    timings = s.get("timings") or {}
    if timings:
        pairs.append(("timings", ", ".join(f"{_e(k)} {_num(v)} s" for k, v in timings.items())))
    if s.get("reason"):
        pairs.append(("reason", f"<span class='warn'>{_e(s['reason'])}</span>"))
    for warning in s.get("warnings") or []:
        pairs.append(("warning", f"<span class='warn'>{_e(warning)}</span>"))
    config = s.get("config") or {}
    backbone = (config.get("backbone") or {}).get("name") or config.get("model")
    pairs += [
        ("backbone / model", _e(backbone or "-")),
        ("config hash", _e(s.get("config_hash", "-"))),
    ]
    note = f"<p class='muted'>{_e(f['run_note'])}</p>" if f["run_note"] else ""
    return (
        f"<h2 id='summary'>Run summary</h2>{note}<table class='summary'>{_rows(pairs)}</table>"
        + _history_html(run.get("runs") or [])
    )


def _history_html(runs: list) -> str:
    """One line per run into this output (run.json's history), newest last."""
    if len(runs) < 2:
        return ""
    cols = ("run", "status", "started", "seconds", "labelled_this_run", "reason")
    head = "".join(f"<th>{c.replace('_', ' ')}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{_num(r.get(c))}</td>" for c in cols) + "</tr>"
        for r in runs[-20:]
        if isinstance(r, dict)
    )
    more = f"<p class='muted'>(the last 20 of {len(runs)} runs)</p>" if len(runs) > 20 else ""
    return f"<h3>Runs into this output</h3>{more}<table><tr>{head}</tr>{body}</table>"


def _transport_html(run: dict | None) -> str:
    t = run_view(run).get("transport")
    if not t:
        return (
            "<h2>Sinkhorn convergence</h2><p class='muted'>No transport figures in run.json "
            "(transport off, a predict run, or no run.json).</p>"
        )
    from .pseudolabel import NOT_CONVERGED_WARNING

    share = t["not_converged_fraction"]
    warn = (
        f"<p class='warn'>Sinkhorn did not converge for {_num(t['not_converged'])} images "
        f"({100 * share:.1f}%): raise potnet.ot_max_iters or potnet.ot_epsilon.</p>"
        if share > NOT_CONVERGED_WARNING
        else ""
    )
    it, er = t["iterations"], t["marginal_error"]
    head = "<tr><th></th><th>median</th><th>p90</th><th>p99</th><th>max</th></tr>"

    def line(name, q, d):
        return (
            f"<tr><th>{name}</th>"
            + "".join(
                f"<td class='n'>{_num(float(q[k]), d)}</td>" for k in ("p50", "p90", "p99", "max")
            )
            + "</tr>"
        )

    return (
        "<h2 id='transport'>Sinkhorn convergence</h2>"
        f"<p><b>{100 * (1 - share):.1f}%</b> of {_num(t['images'])} images converged "
        f"(row-marginal error below {t['tol']:g}); {_num(t['not_converged'])} did not.</p>{warn}"
        f"<table>{head}{line('iterations', it, 0)}{line('marginal error', er, 6)}</table>"
    )


def _errors_html(f: dict) -> str:
    if not f["reasons"]:
        return "<h2 id='errors-by-reason'>Errors by reason</h2><p>No errors.</p>"
    body = "".join(
        f"<tr><td class='n'>{_num(g['count'])}</td><td>{_e(reason)}</td>"
        f"<td>{_e(', '.join(f'{k} {v}' for k, v in g['kinds'].items()))}</td>"
        f"<td class='muted'>{_e(g['example'][:300])}</td></tr>"
        for reason, g in f["reasons"].items()
    )
    return (
        "<h2 id='errors-by-reason'>Errors by reason</h2>"
        "<p class='muted'>Messages grouped by the text before their first ': ', with paths, "
        "quoted names and numbers taken out. Permanent errors count as done; a rerun tries "
        "transient ones again.</p>"
        "<table><tr><th>rows</th><th>reason</th><th>kind</th><th>example</th></tr>"
        f"{body}</table>"
    )


def _rules_html(f: dict) -> str:
    s: ReportSettings = f["settings"]
    rows, flags = f["rows"], f["flags"]

    def pct(n, of):
        return f"{_num(n)} ({100 * n / of:.1f}%)" if of else _num(n)

    return (
        "<h2 id='rules'>Masks that probably show no object or several objects</h2>"
        "<p>Rules (set in <code>configs/report.yaml</code>):</p><ul>"
        f"<li><b>No object</b>, any of: <i>empty</i>, fg_fraction &lt; {s.empty_fg_fraction:g} "
        f"({pct(flags['empty'], rows)}); <i>background</i>, fg_fraction &gt; "
        f"{s.background_fg_fraction:g}, the mask took the background "
        f"({pct(flags['background'], rows)}); <i>low quality</i>, quality &lt; "
        f"{s.low_quality:g} ({pct(flags['low quality'], rows)}); <i>diffuse attention</i>, "
        f"attention_border &ge; {s.diffuse_attention:g}, the CLS token's attention on the "
        "image's border over its mean: nothing in the image draws it "
        f"({pct(flags['diffuse attention'], rows)}). "
        f"Together: <span id='no-object-count'>{pct(f['flagged'], rows)}</span> of all masks.</li>"
        f"<li><b>Several objects</b>: two or more 8-connected pieces each covering at least "
        f"{100 * s.min_object_fraction:g}% of the image (scipy.ndimage.label), counted on "
        f"the masks of whole shard files, first by name, up to {_num(s.object_scan_limit)} "
        f"masks: {_num(f['scanned'])} of {_num(rows)} counted, "
        f"<span id='several-count'>{pct(f['several'], f['scanned'])}</span> with several "
        "pieces.</li></ul>"
    )


def _plots_html(f: dict) -> str:
    h = f["histograms"]
    known = f["quality_known"]
    note = "" if known else "<p class='muted'>This run has no quality scores (e.g. predict).</p>"
    return (
        "<h2 id='distributions'>Distributions</h2>"
        + note
        + "<div class='plots'>"
        + f"<img id='hist-quality' alt='histogram of quality' "
        f"src='{_data_uri(h['quality'], 'image/png')}'>"
        + f"<img id='hist-fg' alt='histogram of fg_fraction' "
        f"src='{_data_uri(h['fg_fraction'], 'image/png')}'>" + "</div>"
    )


def _gt_html(f: dict) -> str:
    g = f["gt"]
    if g is None:
        if not f["ground_truth"]:
            return ""
        return (
            "<h2 id='ground-truth'>Against the ground truth</h2><p class='warn'>No mask PNG "
            f"in {_e(f['ground_truth'])} has the file stem of a prediction.</p>"
        )
    rho = g["spearman"]
    scatter = (
        f"<img id='scatter' alt='quality against IoU' src='{_data_uri(g['scatter'], 'image/png')}'>"
        if g["scatter"]
        else "<p class='muted'>Too few images with quality and IoU to plot.</p>"
    )
    unreadable = (
        f"<p class='warn'>{len(g['unreadable'])} ground-truth masks could not be read, e.g. "
        f"{_e(g['unreadable'][0][:300])}</p>"
        if g["unreadable"]
        else ""
    )
    pairs = [
        ("images with ground truth", _num(g["matched"])),
        ("IoU measured", _num(g["measured"])),
        ("mean IoU", f"<span id='mean-iou'>{_num(g['mean_iou'])}</span>"),
        ("median IoU", _num(g["median_iou"])),
        (
            "Spearman (quality, IoU)",
            f"<span id='spearman' data-value='{_e(repr(rho))}'>{_num(rho)}</span> "
            f"over {_num(g['spearman_n'])} images",
        ),
    ]
    return (
        f"<h2 id='ground-truth'>Against the ground truth</h2><p class='muted'>Ground truth: "
        f"{_e(f['ground_truth'])} (mask PNGs matched by file stem; a mask of another size is "
        "resized to the ground truth's, as <code>evaluate</code> does).</p>"
        f"{unreadable}<table>{_rows(pairs)}</table><div class='plots'>{scatter}</div>"
        f"<p><a download='iou_per_image.csv' href='{_data_uri(g['csv'], 'text/csv')}'>"
        "IoU per image (CSV)</a></p>"
    )


def _gallery_html(g, thumbs, ids, quality, fg, objects, ious) -> str:
    figures = []
    for k in g["rows"]:
        image_id = ids[k]
        data, note = thumbs.get(image_id, (None, "no thumbnail"))
        facts = [f"q {_num(float(quality[k]), 2)}", f"fg {_num(float(fg[k]), 2)}"]
        if objects[k] >= 0:
            facts.append(f"{int(objects[k])} pc")
        if math.isfinite(ious[k]):
            facts.append(f"IoU {_num(float(ious[k]), 2)}")
        pic = (
            f"<img class='thumb' loading='eager' alt='{_e(image_id)}' title='{_e(image_id)}' "
            f"src='{_data_uri(data, 'image/jpeg')}'>"
            if data
            else "<span class='muted'>-</span>"
        )
        warn = (
            f"<figcaption class='warn' title='{_e(note)}'>{_e(note)}</figcaption>" if note else ""
        )
        figures.append(
            f"<figure><div class='box'>{pic}</div><figcaption title='{_e(image_id)}'>"
            f"{_e(image_id)}</figcaption>"
            f"<figcaption class='facts'>{' · '.join(facts)}</figcaption>{warn}</figure>"
        )
    body = "".join(figures) or "<p class='muted'>None.</p>"
    return (
        f"<section class='gallery' id='gallery-{g['id']}' data-thumbnails='{len(g['rows'])}'>"
        f"<h2>{_e(g['title'])}</h2><p class='note'>{_e(g['note'])}</p>"
        f"<div class='grid'>{body}</div></section>"
    )


def render_page(facts, galleries, thumbs, ids, quality, fg, objects, ious) -> str:
    """The whole page as one HTML string (pictures inline)."""
    s: ReportSettings = facts["settings"]
    run = facts["run"] or {}
    config = json.dumps(run.get("config", {}), indent=2, sort_keys=True)
    made = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    legend = (
        "<p class='muted'>Each thumbnail is the image with the background dimmed and the "
        "mask's outline in red. Captions: image_id; q quality; fg fg_fraction; pc pieces "
        "(connected components, where counted); IoU with the ground truth (where given).</p>"
    )
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>autosod-ray report: {_e(facts['predictions'])}</title>",
        f"<script>{ERROR_PROBE}</script>",
        f"<style>{CSS.replace('__BOX__', str(s.thumbnail_px + 8))}</style></head><body>",
        f"<h1>Report: {_e(facts['predictions'])}</h1>",
        f"<p class='muted'>Made {made} by autosod-ray from masks/, errors/ and run.json"
        + (f"; images from {_e(facts['images'])}" if facts["images"] else "")
        + ".</p>",
        _summary_html(facts),
        _transport_html(facts["run"]),
        _errors_html(facts),
        _plots_html(facts),
        _rules_html(facts),
        _gt_html(facts),
        legend,
        *(_gallery_html(g, thumbs, ids, quality, fg, objects, ious) for g in galleries),
        f"<h2 id='config'>Config</h2><details><summary>run.json config</summary>"
        f"<pre>{_e(config)}</pre></details>",
        f"<script>{LOAD_PROBE}</script></body></html>",
    ]
    return "\n".join(parts)
