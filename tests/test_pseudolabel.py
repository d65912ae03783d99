"""The pseudolabel job end to end: real local Ray, real Parquet, S3 protocol via moto."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.conftest import (
    head_process,
    job_env,
    ray_job_submit,
    run_script,
    start_script,
    wait_for,
)

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


def run_job(args: list[str], env: dict, timeout: int = 400) -> subprocess.CompletedProcess:
    return run_script("jobs/pseudolabel.py", args, env, timeout)


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
    env = job_env()
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


def test_hub_weights_unreachable_fails_fast(dataset, tmp_path):
    res = run_job(
        ["--input", str(dataset), "--output", str(tmp_path / "out")],
        job_env(HF_HUB_OFFLINE="1"),
        timeout=120,
    )
    assert res.returncode == 2 and "timm's hub" in res.stderr, res.stderr[-2000:]
    assert "Started a local Ray instance" not in res.stderr + res.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--input", "/no/such/folder"], "does not exist"),
        (["--input", "EMPTY"], "holds no images"),
        (["--input", "DATA", "--set", "potnet.num_clusterz=3"], "num_clusters"),
        (["--input", "DATA", "--set", "pipeline.pool_max=0"], "pipeline.pool_max"),
        (["--input", "DATA", "--set", "backbone.name=not_a_model"], "not_a_model"),
        (["--input", "DATA", "--set", "backbone.weights=/no/weights.pt"], "backbone.weights"),
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
        job_env(),
        timeout=120,
    )
    assert res.returncode == 2 and message in res.stderr, res.stderr[-2000:]
    assert "Started a local Ray instance" not in res.stderr + res.stdout
    assert time.monotonic() - start < 60


# ---------------------------------------------------------------- on a Ray head the test starts


def test_ray_job_submit_with_s3_input_and_output(dataset, s3, ray_head, weights_path):
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3["endpoint"], key="testing", secret="testing")
    fs.mkdir("data")
    fs.put(str(dataset), "data/images", recursive=True)
    args = job_args(
        "s3://data/images",
        "s3://data/autosod/run1",
        weights_path,
        "--set",
        f"storage.endpoint_url={s3['endpoint']}",
    )
    res = ray_job_submit(ray_head, ["jobs/pseudolabel.py", *args], env_vars=s3["env"])
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    assert "succeeded" in res.stdout and "labelled  12" in res.stdout
    masks = pd.concat(
        pd.read_parquet(io.BytesIO(fs.cat_file(p)))
        for p in fs.glob("data/autosod/run1/masks/*.parquet")
    )
    errors = pd.concat(
        pd.read_parquet(io.BytesIO(fs.cat_file(p)))
        for p in fs.glob("data/autosod/run1/errors/*.parquet")
    )
    assert masks.source_uri.str.startswith("s3://data/images/").all()
    check_output(masks, errors)
    assert json.loads(fs.cat_file("data/autosod/run1/run.json"))["status"] == "complete"


def slow_job_args(dataset, out, weights_path) -> list[str]:
    """One image per batch and per file: many small writes, time to fail in between."""
    return job_args(
        str(dataset),
        str(out),
        weights_path,
        "--set",
        "pipeline.rows_per_file=1",
        "--set",
        "pipeline.potnet_batch_size=1",
    )


def _start_job(args, ray_head) -> subprocess.Popen:
    return start_script("jobs/pseudolabel.py", args, job_env(RAY_ADDRESS=ray_head["address"]))


def _written(out: Path) -> int:
    masks = out / "masks"
    return len([p for p in masks.glob("part-*.parquet")]) if masks.exists() else 0


def test_killed_driver_then_rerun_ends_exactly_once(dataset, tmp_path, ray_head, weights_path):
    out = tmp_path / "run"
    args = slow_job_args(dataset, out, weights_path)
    proc = _start_job(args, ray_head)
    wait_for(lambda: _written(out) >= 2, proc)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver dies mid-write
    proc.wait()
    partial = _written(out)
    assert 0 < partial < len(GOOD)
    rerun = run_job(args, job_env(RAY_ADDRESS=ray_head["address"]))
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    check_output(out)
    assert json.loads((out / "run.json").read_text())["skipped_already_done"] >= partial


def test_killed_actor_is_replaced_and_output_is_exactly_once(
    dataset, tmp_path, ray_head, weights_path
):
    out = tmp_path / "run"
    args = slow_job_args(dataset, out, weights_path)
    proc = _start_job(args, ray_head)

    def model_actor() -> int | None:
        return head_process(ray_head, "ModelStage")

    wait_for(lambda: _written(out) >= 1 and model_actor() is not None, proc)
    os.kill(model_actor(), signal.SIGKILL)  # mid-run
    stdout, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, stdout[-4000:]
    check_output(out)
    run = json.loads((out / "run.json").read_text())
    assert run["duplicates"] == 0 and run["missing"] == 0 and run["status"] == "complete"


def test_manifest_inputs(tmp_path, dataset):
    """A CSV or Parquet manifest with a `uri` column; image_id from its column or the URI."""
    import pyarrow as pa

    from autosod_ray.data.uris import InputError, list_inputs

    uris = [str(dataset / "photos" / "0001.jpg"), str(dataset / "0005.jpeg")]
    (tmp_path / "m.csv").write_text("uri\n" + "\n".join(uris) + "\n")
    table = list_inputs(str(tmp_path / "m.csv"), {})
    assert sorted(table.column("source_uri").to_pylist()) == sorted(uris)
    pq.write_table(pa.table({"uri": uris, "image_id": ["a", "b"]}), tmp_path / "m.parquet")
    assert list_inputs(str(tmp_path / "m.parquet"), {}).column("image_id").to_pylist() == ["a", "b"]
    pq.write_table(pa.table({"path": uris}), tmp_path / "bad.parquet")
    with pytest.raises(InputError, match="no 'uri' column"):
        list_inputs(str(tmp_path / "bad.parquet"), {})
    with pytest.raises(InputError, match="not a manifest"):
        list_inputs(str(dataset / "photos" / "0001.jpg"), {})
