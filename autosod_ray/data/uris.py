"""Finding the inputs: a folder or URI searched recursively, or a manifest file."""

from __future__ import annotations

import io
import os
import posixpath
import uuid
from dataclasses import dataclass, field

import fsspec
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from ..config import UserError
from .images import IMAGE_EXTENSIONS

MANIFEST_SUFFIXES = (".parquet", ".csv")


class InputError(UserError, ValueError):
    """A bad --input: the message says what is wrong and how to fix it."""


def open_fs(uri: str, storage_options: dict):
    """(filesystem, path inside it) for a local path or fsspec URI."""
    return fsspec.core.url_to_fs(uri, **storage_options)


def absolute(uri: str | None) -> str | None:
    """A relative local path -> absolute (workers may run in another folder); URIs as is."""
    if not uri or "://" in uri:
        return uri
    return posixpath.abspath(uri)


def full_uri(fs, path: str) -> str:
    """Path inside `fs` -> a URI any worker can open again."""
    protocol = fs.protocol[0] if isinstance(fs.protocol, tuple) else fs.protocol
    return path if protocol in ("file", "local") else f"{protocol}://{path}"


@dataclass
class Listing:
    """Every input image, and what the listing saw but did not take, with reasons."""

    table: pa.Table  # image_id, source_uri; sorted by image_id
    ignored: dict[str, int] = field(default_factory=dict)  # extension -> files not images
    unreadable: int = 0  # entries the listing could not read (or broken links)
    loops: int = 0  # symlinked folders not entered again (they lead back into the walk)

    def report(self) -> dict:
        return {
            "images": self.table.num_rows,
            "ignored": dict(sorted(self.ignored.items())),
            "unreadable": self.unreadable,
            "symlink_loops": self.loops,
        }


def _walk_local(root: str) -> tuple[list[str], dict[str, int], int, int]:
    """A local folder, symlinked sub-folders followed once each: (image paths, ignored
    extensions, unreadable entries, loops)."""
    paths, ignored, unreadable, loops, seen = [], {}, [0], 0, set()

    def count_error(_err: OSError) -> None:
        unreadable[0] += 1

    for folder, subfolders, files in os.walk(root, followlinks=True, onerror=count_error):
        real = os.path.realpath(folder)
        if real in seen:  # a link back into the walk: its contents are listed already
            subfolders[:] = []
            loops += 1
            continue
        seen.add(real)
        for name in files:
            path = posixpath.join(folder, name)
            if not name.lower().endswith(IMAGE_EXTENSIONS):
                ext = posixpath.splitext(name)[1].lower() or "(no extension)"
                ignored[ext] = ignored.get(ext, 0) + 1
            elif not os.path.exists(path):  # a broken link
                unreadable[0] += 1
            else:
                paths.append(path)
    return paths, ignored, unreadable[0], loops


def scan_inputs(uri: str, storage_options: dict, manifest_column: str = "uri") -> Listing:
    """Every input image as a row (image_id, source_uri), sorted by image_id, and what
    was left out and why.

    A folder is searched recursively for image extensions (any case); local symlinked
    sub-folders are followed (each real folder once); image_id is the path relative to
    the folder. A manifest (.parquet / .csv) gives URIs in `manifest_column` and
    image_id from an `image_id` column or the URI.
    """
    try:
        fs, root = open_fs(uri, storage_options)
        if not fs.exists(root):
            raise InputError(f"--input {uri!r} does not exist; give a folder, URI or manifest")
        if fs.isfile(root):
            return Listing(_read_manifest(fs, root, uri, manifest_column))
        root = root.rstrip("/")
        if _is_local(fs):
            paths, ignored, unreadable, loops = _walk_local(root)
        else:
            found, ignored, unreadable, loops = fs.find(root), {}, 0, 0
            paths = [p for p in found if p.lower().endswith(IMAGE_EXTENSIONS)]
            for p in found:
                if not p.lower().endswith(IMAGE_EXTENSIONS):
                    ext = posixpath.splitext(p)[1].lower() or "(no extension)"
                    ignored[ext] = ignored.get(ext, 0) + 1
    except PermissionError as err:
        raise InputError(
            f"--input {uri!r}: permission denied ({err}); check the credentials"
        ) from None
    if not paths:
        raise InputError(
            f"--input {uri!r} holds no images ({', '.join(IMAGE_EXTENSIONS)}, any case)"
        )
    ids = [posixpath.relpath(p, root) for p in paths]
    table = pa.table({"image_id": ids, "source_uri": [full_uri(fs, p) for p in paths]})
    return Listing(table.sort_by("image_id"), ignored, unreadable, loops)


def list_inputs(uri: str, storage_options: dict, manifest_column: str = "uri") -> pa.Table:
    """`scan_inputs`' table alone: (image_id, source_uri) rows sorted by image_id."""
    return scan_inputs(uri, storage_options, manifest_column).table


def _is_local(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return bool({"file", "local"} & set(protocol))


def _read_manifest(fs, path: str, uri: str, column: str) -> pa.Table:
    if not path.lower().endswith(MANIFEST_SUFFIXES):
        raise InputError(
            f"--input {uri!r} is a file but not a manifest; give a folder, or a "
            f".parquet / .csv manifest with a {column!r} column"
        )
    data = fs.cat_file(path)
    table = (
        pq.read_table(io.BytesIO(data))
        if path.lower().endswith(".parquet")
        else pacsv.read_csv(io.BytesIO(data))
    )
    if column not in table.column_names:
        raise InputError(
            f"manifest {uri!r} has no {column!r} column (columns: {table.column_names})"
        )
    uris = [str(u) for u in table.column(column).to_pylist()]
    if not uris:
        raise InputError(f"manifest {uri!r} lists no images")
    if "image_id" in table.column_names:
        ids = [str(i) for i in table.column("image_id").to_pylist()]
    else:
        ids = [u.split("://", 1)[-1] for u in uris]
    if len(set(ids)) != len(ids):
        raise InputError(f"manifest {uri!r} repeats image ids; every image must appear once")
    return pa.table({"image_id": ids, "source_uri": uris}).sort_by("image_id")


def file_stem(path: str) -> str:
    """'a/b/0001.jpg' -> '0001' (how ground truth is matched to predictions)."""
    return posixpath.splitext(posixpath.basename(path))[0]


def pngs_by_stem(uri: str, storage_options: dict, what: str) -> dict[str, str]:
    """Every PNG under `uri` by file stem; `what` names the flag in error messages."""
    fs, root = open_fs(uri, storage_options)
    if not fs.exists(root):
        raise InputError(f"{what} {uri!r} does not exist")
    found: dict[str, str] = {}
    for path in sorted(fs.find(root)):
        if path.lower().endswith(".png"):
            stem = file_stem(path)
            if stem in found:
                raise InputError(f"{what} {uri!r}: two PNGs share the stem {stem!r}")
            found[stem] = full_uri(fs, path)
    if not found:
        raise InputError(f"{what} {uri!r} holds no PNG files")
    return found


def read_bytes_at(uri: str, storage_options: dict) -> bytes:
    fs, path = open_fs(uri, storage_options)
    return fs.cat_file(path)


def write_atomic(fs, path: str, data: bytes) -> None:
    """Put a whole file so that a reader sees the old one or the new one, never half:
    locally written beside it under a `_`-prefixed name (readers skip those) and
    renamed (atomic on one filesystem; a refused rename removes the temporary file and
    raises, never falling back to a copy); an object store publishes a PUT whole."""
    if _is_local(fs):
        tmp = posixpath.join(posixpath.dirname(path), f"_tmp-{uuid.uuid4().hex}")
        try:
            fs.pipe_file(tmp, data)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.remove(tmp)
            except OSError:
                pass  # never written, or the folder refuses that too
            raise
    else:
        fs.pipe_file(path, data)


def write_bytes_at(uri: str, data: bytes, storage_options: dict) -> None:
    """Write a whole file at a local path or URI, creating its folder."""
    fs, path = open_fs(uri, storage_options)
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    fs.pipe_file(path, data)
