"""The product's output: Parquet shards of pseudo-masks, and an errors table.

Files appear atomically (written under a `_`-prefixed name that readers skip,
then renamed; an S3 PUT is atomic by itself) and are named by a digest of their
image ids, so a retried write replaces its own file instead of adding a copy.
"""

from __future__ import annotations

import hashlib
import io
import posixpath
from collections.abc import Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ray.data.block import Block, BlockAccessor
from ray.data.datasource import Datasink

from .uris import open_fs, write_atomic

MASK_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("source_uri", pa.string()),
        ("image_sha256", pa.string()),  # of the image's bytes as read: what the mask is of
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("mask_png", pa.binary()),  # binary mask, 0/255 grayscale PNG at the image's size
        ("saliency_png", pa.binary()),  # soft map, uint8 grayscale PNG at the image's size
        ("fg_fraction", pa.float32()),
        ("confidence", pa.float32()),
        ("consistency_loss", pa.float32()),
        ("quality", pa.float32()),
        ("ot_iterations", pa.int32()),
        ("ot_marginal_error", pa.float32()),
        # of the image: the CLS attention on its border over its mean (~1: nothing draws it)
        ("attention_border", pa.float32()),
        ("backbone", pa.string()),
        ("config_hash", pa.string()),
    ]
)
ERROR_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("source_uri", pa.string()),
        ("error", pa.string()),
        ("error_kind", pa.string()),  # permanent (done) | transient, internal (retried)
        ("attempts", pa.int32()),  # runs that failed on this image
        ("config_hash", pa.string()),
    ]
)
TABLES = {"masks": MASK_SCHEMA, "errors": ERROR_SCHEMA}
# each output column's type, so a column that a file predates reads as nulls of its own type
COLUMN_TYPES = {f.name: f.type for schema in TABLES.values() for f in schema}

# per-image scalars a labelling model reports, and the value of each it does not report
# (predict's AutoSOD has no transport: NaN losses, 0 Sinkhorn iterations)
MODEL_COLUMNS = {
    "confidence": np.float32(np.nan),
    "consistency_loss": np.float32(np.nan),
    "quality": np.float32(np.nan),
    "ot_iterations": np.int32(0),
    "ot_marginal_error": np.float32(np.nan),
    "attention_border": np.float32(np.nan),
}


def shard_name(ids: list[str]) -> str:
    """Deterministic file name for a set of image ids."""
    digest = hashlib.sha1("\n".join(sorted(ids)).encode()).hexdigest()[:20]
    return f"part-{digest}.parquet"


def write_table_atomic(fs, directory: str, table: pa.Table, key: str = "image_id") -> str:
    """Write `table` to directory/part-<digest of its `key` column>.parquet so readers never
    see half a file."""
    fs.makedirs(directory, exist_ok=True)
    final = posixpath.join(directory, shard_name(table.column(key).to_pylist()))
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    write_atomic(fs, final, buf.getvalue())
    return final


def ensure_tables(output: str, storage_options: dict) -> None:
    """Give masks/ and errors/ an empty shard in their schema where they have none, so both
    tables always exist and read back (pandas, DuckDB) even when nothing failed."""
    fs, root = open_fs(output, storage_options)
    for name, schema in TABLES.items():
        directory = posixpath.join(root, name)
        if not fs.exists(directory) or not any(p.endswith(".parquet") for p in fs.find(directory)):
            write_table_atomic(fs, directory, schema.empty_table())


def split_rows(table: pa.Table) -> dict[str, pa.Table]:
    """A stage output table -> {"masks": ..., "errors": ...} in the output schemas."""
    failed = pc.not_equal(table.column("error"), "")
    return {
        "masks": table.filter(pc.invert(failed)).select(MASK_SCHEMA.names).cast(MASK_SCHEMA),
        "errors": table.filter(failed).select(ERROR_SCHEMA.names).cast(ERROR_SCHEMA),
    }


class ShardDatasink(Datasink):
    """Writes each block's rows as Parquet shards of at most `rows_per_file` rows under
    <output>/<folder>, where `route(table) -> {folder: rows}` decides the folders; files
    are named by a digest of their `key` column. Each write first asks `admit()` (False:
    the run is ending, write nothing) and, once admitted, tells `on_written` what it wrote
    however it ends."""

    def __init__(
        self,
        output: str,
        storage_options: dict,
        rows_per_file: int,
        route: Callable[[pa.Table], dict[str, pa.Table]],
        key: str = "image_id",
        on_written: Callable[[dict[str, int]], None] | None = None,
        admit: Callable[[], bool] | None = None,
    ):
        self.output, self.storage_options = output, storage_options
        self.rows_per_file, self.route, self.key = rows_per_file, route, key
        self.on_written = on_written  # told {folder: rows} after each write (progress)
        self.admit = admit

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_file

    def write(self, blocks: Iterable[Block], ctx) -> dict[str, int]:
        fs, root = open_fs(self.output, self.storage_options)
        tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        tables = [t for t in tables if t.num_rows]
        counts: dict[str, int] = {}
        if not tables or (self.admit is not None and not self.admit()):
            return counts  # nothing to write, or the run is ending: nothing is written
        try:
            routed = self.route(pa.concat_tables(tables, promote_options="default"))
            for name, part in routed.items():
                counts[name] = counts.get(name, 0)
                for start in range(0, part.num_rows, self.rows_per_file):
                    chunk = part.slice(start, self.rows_per_file)
                    write_table_atomic(fs, posixpath.join(root, name), chunk, self.key)
                    counts[name] += chunk.num_rows
        finally:
            if self.on_written is not None:
                self.on_written(counts)
        return counts


def read_table_folder(uri: str, storage_options: dict, columns: list[str]) -> pa.Table:
    """`columns` of every Parquet file under `uri` (none there: an empty table), skipping
    the `_`- and `.`-prefixed names that writers use for files not yet complete."""
    fs, root = open_fs(uri, storage_options)
    parts = [read_columns(fs, path, columns) for path in shard_files(fs, root)]
    return pa.concat_tables(parts) if parts else pa.table({c: pa.array([]) for c in columns})


def shard_files(fs, root: str) -> list[str]:
    """The complete Parquet files under `root` (writers' `_`/`.`-prefixed files skipped)."""
    if not fs.exists(root):
        return []
    return [
        p
        for p in sorted(fs.find(root))
        if p.endswith(".parquet") and not posixpath.basename(p).startswith(("_", "."))
    ]


def read_columns(fs, path: str, columns: list[str]) -> pa.Table:
    """`columns` of one file; a column the file predates reads as nulls."""
    with fs.open(path, "rb") as fh:
        f = pq.ParquetFile(fh)
        have = [c for c in columns if c in f.schema_arrow.names]
        t = f.read(columns=have)
    for c in columns:
        if c not in have:
            t = t.append_column(c, pa.nulls(t.num_rows, COLUMN_TYPES.get(c, pa.string())))
    return t.select(columns)


def drop_rows(output: str, storage_options: dict, table: str, drop) -> int:
    """Remove the rows `drop(t) -> bool array` selects from <output>/<table>, file by file
    (each file with such rows is removed, then its remaining rows written back, so a crash
    in between loses rows that a rerun redoes, never duplicates them); returns how many."""
    fs, root = open_fs(output, storage_options)
    directory, dropped = posixpath.join(root, table), 0
    for path in shard_files(fs, directory):
        with fs.open(path, "rb") as fh:
            t = pq.read_table(fh)
        gone = drop(t)
        gone = gone.combine_chunks() if isinstance(gone, pa.ChunkedArray) else pa.array(gone)
        n = pc.sum(gone).as_py() or 0
        if n:
            fs.rm(path)
            rest = t.filter(pc.invert(gone))
            if rest.num_rows:
                write_table_atomic(fs, directory, rest)
            dropped += n
    return dropped


def read_rows(
    output: str,
    storage_options: dict,
    table: str,
    columns: list[str],
    config_hash: str | None = None,
) -> pa.Table:
    """`columns` of every row in <output>/<table> (optionally of one config hash only)."""
    schema = pa.schema([TABLES[table].field(c) for c in columns])
    wanted = sorted({*columns, "config_hash"})
    t = read_table_folder(posixpath.join(output, table), storage_options, wanted)
    if not t.num_rows:
        return schema.empty_table()
    if config_hash is not None:
        t = t.filter(pc.equal(t.column("config_hash"), config_hash))
    return t.select(columns).cast(schema)
