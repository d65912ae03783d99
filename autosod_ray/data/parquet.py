"""The product's output: Parquet shards of pseudo-masks, and an errors table.

Files appear atomically (written under a `_`-prefixed name that readers skip,
then renamed; an S3 PUT is atomic by itself) and are named by a digest of their
image ids, so a retried write replaces its own file instead of adding a copy.
"""

from __future__ import annotations

import hashlib
import io
import posixpath
import uuid
from collections.abc import Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ray.data.block import Block, BlockAccessor
from ray.data.datasource import Datasink

from .uris import open_fs

MASK_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("source_uri", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("mask_png", pa.binary()),  # binary mask, 0/255 grayscale PNG at the image's size
        ("saliency_png", pa.binary()),  # soft map, uint8 grayscale PNG at the image's size
        ("fg_fraction", pa.float32()),
        ("confidence", pa.float32()),
        ("consistency_loss", pa.float32()),
        ("backbone", pa.string()),
        ("config_hash", pa.string()),
    ]
)
ERROR_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("source_uri", pa.string()),
        ("error", pa.string()),
        ("config_hash", pa.string()),
    ]
)
TABLES = {"masks": MASK_SCHEMA, "errors": ERROR_SCHEMA}


def shard_name(ids: list[str]) -> str:
    """Deterministic file name for a set of image ids."""
    digest = hashlib.sha1("\n".join(sorted(ids)).encode()).hexdigest()[:20]
    return f"part-{digest}.parquet"


def write_table_atomic(fs, directory: str, table: pa.Table) -> str:
    """Write `table` to directory/part-<digest>.parquet so readers never see half a file."""
    fs.makedirs(directory, exist_ok=True)
    final = posixpath.join(directory, shard_name(table.column("image_id").to_pylist()))
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    if getattr(fs, "protocol", None) in ("file", ("file", "local"), "local"):
        tmp = posixpath.join(directory, f"_tmp-{uuid.uuid4().hex}.parquet")
        fs.pipe_file(tmp, buf.getvalue())
        fs.mv(tmp, final)  # rename: atomic on one filesystem
    else:
        fs.pipe_file(final, buf.getvalue())  # object stores publish a PUT whole
    return final


def split_rows(table: pa.Table) -> dict[str, pa.Table]:
    """A stage output table -> {"masks": ..., "errors": ...} in the output schemas."""
    failed = pc.not_equal(table.column("error"), "")
    return {
        "masks": table.filter(pc.invert(failed)).select(MASK_SCHEMA.names).cast(MASK_SCHEMA),
        "errors": table.filter(failed).select(ERROR_SCHEMA.names).cast(ERROR_SCHEMA),
    }


class PseudoMaskDatasink(Datasink):
    """Writes each block's rows to <output>/masks or <output>/errors, bounded rows per file."""

    def __init__(self, output: str, storage_options: dict, rows_per_file: int):
        self.output, self.storage_options, self.rows_per_file = (
            output,
            storage_options,
            rows_per_file,
        )

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_file

    def write(self, blocks: Iterable[Block], ctx) -> dict[str, int]:
        fs, root = open_fs(self.output, self.storage_options)
        tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        tables = [t for t in tables if t.num_rows]
        counts = dict.fromkeys(TABLES, 0)
        if not tables:
            return counts
        for name, part in split_rows(pa.concat_tables(tables, promote_options="default")).items():
            for start in range(0, part.num_rows, self.rows_per_file):
                chunk = part.slice(start, self.rows_per_file)
                write_table_atomic(fs, posixpath.join(root, name), chunk)
                counts[name] += chunk.num_rows
        return counts


def read_ids(
    output: str, storage_options: dict, table: str, config_hash: str | None = None
) -> list[str]:
    """image_id of every row in <output>/<table> (optionally of one config hash only)."""
    fs, root = open_fs(output, storage_options)
    directory = posixpath.join(root, table)
    if not fs.exists(directory):
        return []
    ids: list[str] = []
    for path in sorted(fs.find(directory)):
        if not path.endswith(".parquet") or posixpath.basename(path).startswith(("_", ".")):
            continue
        with fs.open(path, "rb") as fh:
            t = pq.read_table(fh, columns=["image_id", "config_hash"])
        if config_hash is not None:
            t = t.filter(pc.equal(t.column("config_hash"), config_hash))
        ids.extend(t.column("image_id").to_pylist())
    return ids
