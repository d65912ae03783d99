"""Ray Data stages of the labelling pipeline, each a function or callable class on
`dict[str, np.ndarray]` batches. They move and convert data; the maths is the
`model_factory` that `ModelStage` is given.

Columns along the way:
    list    image_id, source_uri
    list    image_id, source_uri (+ attempts: earlier runs this image failed for a passing
            reason, in the labelling jobs)
    read    + data (encoded bytes), image_sha256 (of those bytes), error ("" when fine),
            error_kind
    decode  - data, + image (S x S x 3 uint8), height, width
    model   - image, + saliency (h x w float32, any grid), confidence, consistency_loss, quality,
              ot_iterations, ot_marginal_error, attention_border
    encode  - saliency, + mask_png, saliency_png, fg_fraction, backbone, config_hash
"""

from __future__ import annotations

import hashlib
import io
import random
import time
from collections.abc import Callable

import numpy as np
import pyarrow as pa
from PIL import Image

from ..endings import RunFailed
from .images import ImageError, decode_image, resize_square
from .parquet import MODEL_COLUMNS, split_rows
from .uris import read_bytes_at

# a row's error_kind: input problems stay (undecodable, not an image, too small, a bomb, gone);
# passing ones (I/O, throttling, timeouts, out of memory) are tried again by a rerun, up to
# pipeline.max_attempts runs; an exception in our own code on a valid image is `internal`
# (a bug: tried again by a rerun, and the run that saw it exits non-zero)
PERMANENT, TRANSIENT, INTERNAL = "permanent", "transient", "internal"
RETRIED = (TRANSIENT, INTERNAL)  # kinds a rerun tries again
READ_ATTEMPTS = 4  # a read is tried this many times, backing off 0.5, 1, 2 s (plus jitter)
MIN_INTERNAL_ERRORS = 4  # internal errors an actor tolerates before max_error_fraction applies


class TooManyInternalErrors(RunFailed):
    """A model actor saw more internal errors than pipeline.max_error_fraction allows."""


def read_with_retries(uri: str, storage_options: dict, attempts: int = READ_ATTEMPTS) -> bytes:
    """The bytes at `uri`; transient failures are retried with exponential back-off, a file
    that is not there (or not a file) fails at once."""
    for attempt in range(attempts):
        try:
            return read_bytes_at(uri, storage_options)  # fsspec caches filesystems
        except (FileNotFoundError, IsADirectoryError):
            raise
        except OSError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.5 * 2**attempt * (1 + 0.2 * random.random()))
    raise AssertionError("unreachable")


def read_bytes(batch: dict[str, np.ndarray], storage_options: dict) -> dict[str, np.ndarray]:
    """Fetch each source_uri; a failure becomes that row's error (and its kind), never the
    batch's."""
    data, digests, errors, kinds = [], [], [], []
    for uri in batch["source_uri"]:
        try:
            data.append(read_with_retries(uri, storage_options))
            digests.append(hashlib.sha256(data[-1]).hexdigest())
            errors.append("")
            kinds.append("")
        except (FileNotFoundError, IsADirectoryError) as err:
            data.append(b"")
            digests.append("")
            errors.append(f"could not read: {type(err).__name__}: {err}")
            kinds.append(PERMANENT)
        except (OSError, ValueError) as err:
            data.append(b"")
            digests.append("")
            errors.append(
                f"could not read after {READ_ATTEMPTS} tries: {type(err).__name__}: {err}"
            )
            kinds.append(TRANSIENT)
    return {
        **batch,
        "data": np.array(data, dtype=object),
        "image_sha256": np.array(digests, dtype=object),
        "error": np.array(errors, dtype=object),
        "error_kind": np.array(kinds, dtype=object),
    }


def decode(
    batch: dict[str, np.ndarray],
    image_size: int,
    max_pixels: int,
    min_side: int,
    max_pixels_key: str = "max_pixels",
) -> dict[str, np.ndarray]:
    """Bytes -> upright RGB resized to image_size^2; undecodable rows keep a reason."""
    n = len(batch["image_id"])
    images = np.zeros((n, image_size, image_size, 3), np.uint8)
    heights, widths = np.zeros(n, np.int32), np.zeros(n, np.int32)
    errors, kinds = list(batch["error"]), list(batch["error_kind"])
    for i, blob in enumerate(batch["data"]):
        if errors[i]:
            continue
        try:
            image = decode_image(blob, max_pixels, min_side, max_pixels_key)
        except ImageError as err:
            errors[i], kinds[i] = str(err), PERMANENT
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
        "error_kind": np.array(kinds, dtype=object),
    }


def out_of_memory(err: BaseException) -> bool:
    """CUDA's OutOfMemoryError, Python's MemoryError, or an allocator's RuntimeError."""
    return (
        isinstance(err, MemoryError)
        or (isinstance(err, RuntimeError) and "out of memory" in str(err).lower())
        or type(err).__name__ == "OutOfMemoryError"
        or "can't allocate memory" in str(err)
    )


class ModelStage:
    """Actor stage: holds the model (built once) and labels the rows without errors.

    `model_factory()` returns a callable images (B x S x S x 3 uint8) ->
    (saliency B x h x w on any grid, {column: B values}) for some of `MODEL_COLUMNS`; the
    columns it does not report get their schema default. A batch the model fails
    on (out of memory, or any other error) is split in halves and each half tried
    again, down to single images: one bad image, or a batch too big for the
    device, costs no other row. An image that still fails gets a `transient`
    error when the device ran out of memory, else an `internal` one (our bug);
    when internal errors pass `max_error_fraction` of the images this actor saw
    (and MIN_INTERNAL_ERRORS), the actor stops the run (TooManyInternalErrors).
    """

    def __init__(self, model_factory: Callable[[], Callable], max_error_fraction: float = 1.0):
        self.model = model_factory()
        self.max_error_fraction = max_error_fraction
        self.seen, self.internal, self.first_internal = 0, 0, ""

    def _label(self, images: np.ndarray, rows: np.ndarray, results: dict) -> None:
        """Label `images` (their row numbers `rows`) into `results`, splitting on failure."""
        try:
            saliency, columns = self.model(images)
        except Exception as err:  # noqa: BLE001 - isolated below, then a row's error
            if len(rows) == 1:
                if out_of_memory(err):
                    reason = (TRANSIENT, f"out of memory: {type(err).__name__}: {err}")
                else:
                    reason = (INTERNAL, f"labelling failed: {type(err).__name__}: {err}")
                results[int(rows[0])] = reason
                return
            half = len(rows) // 2
            self._label(images[:half], rows[:half], results)
            self._label(images[half:], rows[half:], results)
            return
        for j, i in enumerate(rows):
            results[int(i)] = (saliency[j], {k: v[j] for k, v in columns.items()})

    def _count(self, results: dict) -> None:
        """Stop the run when internal errors are no longer the odd image."""
        failed = [r[1] for r in results.values() if isinstance(r[0], str) and r[0] == INTERNAL]
        self.seen += len(results)
        self.internal += len(failed)
        self.first_internal = self.first_internal or (failed[0] if failed else "")
        if (
            self.internal >= MIN_INTERNAL_ERRORS
            and self.internal > self.max_error_fraction * self.seen
        ):
            raise TooManyInternalErrors(
                f"stopped: {self.internal} of the {self.seen} images one model actor labelled "
                f"failed inside the model (more than pipeline.max_error_fraction="
                f"{self.max_error_fraction:g}); first: {self.first_internal[:500]}"
            )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = np.array([e == "" for e in batch["error"]], dtype=bool)
        errors, kinds = list(batch["error"]), list(batch["error_kind"])
        out = {k: v for k, v in batch.items() if k != "image"}
        results: dict[int, object] = {}
        if ok.any():
            self._label(batch["image"][ok], np.flatnonzero(ok), results)
        self._count(results)
        done = {i: r for i, r in results.items() if not isinstance(r[0], str)}
        for i, (kind, reason) in results.items():
            if isinstance(kind, str):
                errors[i], kinds[i] = reason, kind
        grid = next(iter(done.values()))[0].shape if done else (1, 1)
        full_sal = np.zeros((len(ok),) + tuple(grid), np.float32)
        for i, (saliency, _) in done.items():
            full_sal[i] = saliency
        for name, default in MODEL_COLUMNS.items():
            values = np.full(len(ok), default)
            for i, (_, columns) in done.items():
                if name in columns:
                    values[i] = columns[name]
            out[name] = values
        return {
            **out,
            "saliency": full_sal,
            "error": np.array(errors, dtype=object),
            "error_kind": np.array(kinds, dtype=object),
        }


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode="L").save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def encode(
    batch: dict[str, np.ndarray], to_masks: Callable, backbone: str, config_hash: str
) -> dict[str, np.ndarray]:
    """Saliency (on the model's grid, or refined at its input size) -> mask and soft map
    PNGs at each image's own size. A mask that comes out empty at that size gets
    `quality` 0, exactly (its IoU with any object's mask).

    `to_masks(saliency h x w, height, width) -> (soft uint8, binary bool)`, any h x w.
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
    if "quality" in out:
        written = np.array([e == "" for e in batch["error"]], dtype=bool)
        out["quality"] = np.where(written & (fractions == 0), 0.0, out["quality"])
    return {
        **out,
        "mask_png": np.array(masks, dtype=object),
        "saliency_png": np.array(softs, dtype=object),
        "fg_fraction": fractions,
        "backbone": np.array([backbone] * n, dtype=object),
        "config_hash": np.array([config_hash] * n, dtype=object),
    }


def settle_errors(table: pa.Table, max_attempts: int) -> pa.Table:
    """Count this run's try in every failed row's `attempts` (the rows arrive with the
    earlier runs' count); a transient failure that has now failed `max_attempts` runs
    becomes permanent, and says so."""
    failed = np.array([e != "" for e in table.column("error").to_pylist()], dtype=bool)
    if "attempts" in table.column_names:
        earlier = table.column("attempts").to_numpy(zero_copy_only=False)
        attempts = np.nan_to_num(earlier.astype(np.float64)).astype(np.int32)
        table = table.drop_columns(["attempts"])
    else:
        attempts = np.zeros(table.num_rows, np.int32)
    attempts = attempts + failed.astype(np.int32)
    kinds = table.column("error_kind").to_pylist()
    errors = table.column("error").to_pylist()
    for i in np.flatnonzero(failed & (attempts >= max_attempts)):
        if kinds[i] == TRANSIENT:
            kinds[i] = PERMANENT
            errors[i] = f"gave up after {attempts[i]} runs: {errors[i]}"
    table = table.set_column(
        table.column_names.index("error_kind"), "error_kind", pa.array(kinds, pa.string())
    )
    table = table.set_column(table.column_names.index("error"), "error", pa.array(errors))
    return table.append_column("attempts", pa.array(attempts, pa.int32()))


def labelled_rows(table: pa.Table, max_attempts: int) -> dict[str, pa.Table]:
    """The labelling sink's route: a stage output table -> {"masks": ..., "errors": ...},
    failed rows with their attempts counted."""
    return split_rows(settle_errors(table, max_attempts))
