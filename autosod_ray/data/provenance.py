"""What made an output, by content: digests of weights files, input listings and rows.

A key that holds a path serves stale data the day the file at that path
changes, so everything that derives from an output (a resume, a token cache, a
checkpoint) is keyed by these digests instead:

- `file_sha256`: a file's sha256, computed once and remembered by (URI, size,
  modification time or ETag) in a small JSON cache, so the next run of a
  350 MB backbone costs one `stat`;
- `listing_digest`: the (image_id, source_uri) rows an input listing found;
- `rows_digest`: any table's rows (for training: the pseudo-masks it keeps).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import pyarrow as pa

from .uris import open_fs

DIGEST_CACHE = Path.home() / ".cache" / "autosod-ray" / "sha256.json"
CHUNK = 1 << 22  # 4 MiB reads


def _stamp(info: dict) -> str:
    """What changes when a file's content does: its size and mtime (or ETag)."""
    for key in ("ETag", "etag", "mtime", "LastModified", "last_modified", "created"):
        if info.get(key) is not None:
            return f"{info.get('size')}:{info[key]}"
    return f"{info.get('size')}:"


def _load_cache(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _save_cache(path: Path, cache: dict) -> None:
    """Write the cache atomically; a cache that cannot be written costs a recompute."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".sha256-")
        with os.fdopen(fd, "w") as fh:
            json.dump(cache, fh)
        os.replace(tmp, path)
    except OSError:
        pass


def file_sha256(uri: str, storage_options: dict, cache_path: Path | None = DIGEST_CACHE) -> str:
    """sha256 of the file at a local path or URI, remembered by (URI, size, mtime/ETag)."""
    fs, path = open_fs(uri, storage_options)
    info = fs.info(path)
    protocol = fs.protocol[0] if isinstance(fs.protocol, tuple) else fs.protocol
    key = f"{protocol}://{path}|{_stamp(info)}"
    cache = _load_cache(cache_path) if cache_path else {}
    if key in cache:
        return cache[key]
    digest = hashlib.sha256()
    with fs.open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    value = digest.hexdigest()
    if cache_path:
        stale = [k for k in cache if k.split("|", 1)[0] == key.split("|", 1)[0]]
        for k in stale:  # one entry per file: its newest content
            del cache[k]
        _save_cache(cache_path, {**cache, key: value})
    return value


def rows_digest(table: pa.Table, columns: list[str]) -> str:
    """sha256 of `columns` of every row, in the table's order (sort it first for a
    digest that ignores order); the same rows give the same digest however chunked."""
    digest = hashlib.sha256()
    digest.update(json.dumps(columns).encode())
    for batch in table.select(columns).combine_chunks().to_batches(max_chunksize=65_536):
        for column in batch.columns:
            digest.update(json.dumps(column.to_pylist(), default=str).encode())
    return digest.hexdigest()


def listing_digest(listing: pa.Table) -> str:
    """The digest of an input listing (image_id, source_uri), independent of its order."""
    return rows_digest(listing.sort_by("image_id"), ["image_id", "source_uri"])


def weights_provenance(weights: str | None, name: str, storage_options: dict) -> dict:
    """{"name", "weights", "sha256"} of a backbone: hub weights are known by name only."""
    if not weights:
        return {"name": name, "weights": None, "sha256": None}
    return {"name": name, "weights": weights, "sha256": file_sha256(weights, storage_options)}
