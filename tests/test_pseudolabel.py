"""The pseudolabel job end to end: real local Ray, real Parquet, S3 protocol via moto."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.conftest import REPO

PHOTOS = ["0001", "0002", "0003", "0004", "0005", "0006"]
GOOD = {  # image_id -> (height, width) after EXIF orientation
    "photos/0001.jpg": None,
    "photos/0002.jpg": None,
    "photos/0003.jpg": None,
    "photos/deeper/0004.JPG": None,
    "0005.jpeg": None,
    "0006.png": None,
    "odd/cmyk.jpg": (48, 64),
    "odd/palette.png": (48, 64),
    "odd/gray16.png": (48, 64),
    "odd/rgba.png": (48, 64),
    "odd/gray.jpg": (48, 64),
    "odd/rotated.jpg": (64, 48),
}
BAD = {
    "bad/empty.jpg": "empty file",
    "bad/truncated.jpg": "corrupt or truncated",
    "bad/text.png": "not an image",
    "bad/tiny.png": "smaller than one patch",
    "bad/bomb.png": "decompression bomb",
}
MAX_PIXELS = 1_000_000


def _env(**extra) -> dict:
    env = {
        **os.environ,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
        "RAY_AUTH_MODE": "disabled",
        "PYTHONPATH": str(REPO),
    }
    env.pop("RAY_ADDRESS", None)
    return {**env, **extra}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, ecssd) -> Path:
    """Real photos (nested, odd extensions) plus every kind of awkward and bad file."""
    root = tmp_path_factory.mktemp("images")
    for stem, rel in zip(
        PHOTOS, [k for k in GOOD if k[-8:-4].isdigit() or "0005" in k or "0006" in k], strict=True
    ):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        img = Image.open(ecssd / "images" / f"{stem}.jpg")
        img.save(path, format="PNG" if rel.endswith(".png") else "JPEG")
        GOOD[rel] = (img.height, img.width)
    odd = root / "odd"
    odd.mkdir()
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    rgb.convert("CMYK").save(odd / "cmyk.jpg")
    rgb.convert("P", palette=Image.ADAPTIVE).save(odd / "palette.png")
    Image.fromarray((np.arange(48 * 64).reshape(48, 64) * 20).astype(np.uint16)).save(
        odd / "gray16.png"
    )
    rgb.convert("RGBA").save(odd / "rgba.png")
    rgb.convert("L").save(odd / "gray.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees on display
    rgb.save(odd / "rotated.jpg", exif=exif.tobytes())
    bad = root / "bad"
    bad.mkdir()
    (bad / "empty.jpg").write_bytes(b"")
    full = (root / "photos" / "0001.jpg").read_bytes()
    (bad / "truncated.jpg").write_bytes(full[: len(full) // 3])
    (bad / "text.png").write_bytes(b"this is not a picture")
    Image.new("RGB", (5, 5)).save(bad / "tiny.png")
    Image.new("L", (1200, 1000)).save(bad / "bomb.png")
    (root / "notes.txt").write_text("not an image extension: not an input")
    return root


def run_job(args: list[str], env: dict, timeout: int = 400, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "jobs/pseudolabel.py", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )


def job_args(input_uri: str, output_uri: str, weights: Path, *extra: str) -> list[str]:
    return [
        "--config",
        "configs/smoke.yaml",
        "--input",
        input_uri,
        "--output",
        output_uri,
        "--set",
        f"backbone.weights={weights}",
        "--set",
        f"potnet.max_pixels={MAX_PIXELS}",
        *extra,
    ]


def check_output(out: Path | pd.DataFrame, errors: pd.DataFrame | None = None) -> None:
    """Every input in exactly one table; masks decode to each image's size."""
    masks = pd.read_parquet(out / "masks") if isinstance(out, Path) else out
    errors = pd.read_parquet(out / "errors") if errors is None else errors
    assert sorted(masks.image_id) == sorted(GOOD), sorted(masks.image_id)
    assert sorted(errors.image_id) == sorted(BAD)
    for _, row in errors.iterrows():
        assert BAD[row.image_id] in row.error, row.error
    for _, row in masks.iterrows():
        mask = np.asarray(Image.open(io.BytesIO(row.mask_png)))
        soft = np.asarray(Image.open(io.BytesIO(row.saliency_png)))
        assert mask.shape == soft.shape == GOOD[row.image_id] == (row.height, row.width)
        assert set(np.unique(mask)) <= {0, 255}
        assert 0 <= row.fg_fraction <= 1 and np.isfinite(row.consistency_loss)


def test_job_labels_a_folder_and_resumes(dataset, tmp_path, weights_path):
    out = tmp_path / "run"
    env = _env()
    done = run_job(job_args(str(dataset), str(out), weights_path), env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "labelled  12" in done.stdout and "errors    5" in done.stdout
    check_output(out)
    # plain columns for any reader: pyarrow, pandas, DuckDB
    table = pq.read_table(out / "masks")
    assert {
        "image_id",
        "source_uri",
        "height",
        "width",
        "mask_png",
        "saliency_png",
        "fg_fraction",
        "confidence",
        "consistency_loss",
        "backbone",
        "config_hash",
    } <= set(table.column_names)
    assert all(pq.ParquetFile(f).metadata.num_rows <= 5 for f in (out / "masks").iterdir())
    import duckdb

    n = duckdb.sql(f"select count(*) from read_parquet('{out}/masks/*.parquet')").fetchall()[0][0]
    assert n == len(GOOD)
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "complete" and run["labelled"] == 12 and run["errors"] == 5
    assert run["config"]["backbone"]["image_size"] == 224 and len(run["config_hash"]) == 16
    # a rerun with the same config labels nothing again
    again = run_job(job_args(str(dataset), str(out), weights_path), env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "skipped   17" in again.stdout, again.stdout
    check_output(out)
    # another config into the same output is refused, before any work
    other = run_job(
        job_args(str(dataset), str(out), weights_path, "--set", "potnet.num_clusters=2"), env
    )
    assert other.returncode == 2 and "--overwrite" in other.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--input", "/no/such/folder"], "does not exist"),
        (["--input", "EMPTY"], "holds no images"),
        (["--input", "DATA", "--set", "potnet.num_clusterz=3"], "num_clusters"),
        (["--input", "DATA", "--set", "pipeline.pool_max=0"], "pipeline.pool_max"),
        (["--input", "DATA", "--set", "backbone.name=not_a_model"], "not_a_model"),
    ],
)
def test_bad_input_or_config_fails_fast(args, message, dataset, tmp_path, weights_path):
    (tmp_path / "empty").mkdir()
    args = [{"EMPTY": str(tmp_path / "empty"), "DATA": str(dataset)}.get(a, a) for a in args]
    start = time.monotonic()
    res = run_job(
        [
            "--config",
            "configs/smoke.yaml",
            "--output",
            str(tmp_path / "out"),
            "--set",
            f"backbone.weights={weights_path}",
            *args,
        ],
        _env(),
        timeout=120,
    )
    assert res.returncode == 2 and message in res.stderr, res.stderr[-2000:]
    assert "Started a local Ray instance" not in res.stderr + res.stdout
    assert time.monotonic() - start < 60
