"""The pseudolabel job end to end: real local Ray, real Parquet (S3 through `ray job submit`:
test_security.py, on the token-auth head)."""

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
    BAD,
    GOOD,
    MAX_PIXELS,
    head_process,
    job_env,
    run_script,
    start_script,
    wait_for,
)


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


def check_output(
    out: Path | pd.DataFrame, errors: pd.DataFrame | None = None, good: dict = GOOD
) -> None:
    """Every input in exactly one table; masks decode to each image's size (`good`:
    image_id -> (height, width) of every readable input)."""
    masks = pd.read_parquet(out / "masks") if isinstance(out, Path) else out
    errors = pd.read_parquet(out / "errors") if errors is None else errors
    assert sorted(masks.image_id) == sorted(good), sorted(masks.image_id)
    assert sorted(errors.image_id) == sorted(BAD)
    for _, row in errors.iterrows():
        assert BAD[row.image_id] in row.error, row.error
        assert row.error_kind == "permanent"  # input problems: a rerun does not retry them
    for _, row in masks.iterrows():
        mask = np.asarray(Image.open(io.BytesIO(row.mask_png)))
        soft = np.asarray(Image.open(io.BytesIO(row.saliency_png)))
        assert mask.shape == soft.shape == good[row.image_id] == (row.height, row.width)
        assert set(np.unique(mask)) <= {0, 255}
        assert 0 <= row.fg_fraction <= 1 and np.isfinite(row.consistency_loss)


def test_job_labels_a_folder_and_resumes(dataset, tmp_path, ray_head, weights_path):
    """The first run starts a local Ray (`ray.init()`, as on a laptop); the later runs
    use the shared test head."""
    out = tmp_path / "run"
    env = job_env()
    done = run_job(job_args(str(dataset), str(out), weights_path), env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Started a local Ray instance" in done.stdout + done.stderr
    assert "labelled  12" in done.stdout and "errors    5" in done.stdout
    assert "pseudolabel  17/17 images  100.0%" in done.stderr  # progress, in images
    assert "5 errors" in done.stderr.split("17/17 images")[-1].splitlines()[0]
    assert (out / "report.html").exists() and "report.html" in done.stdout  # by default
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
        "quality",
        "ot_iterations",
        "ot_marginal_error",
        "attention_border",
        "backbone",
        "config_hash",
    } <= set(table.column_names)
    masks = table.to_pandas()
    assert masks.quality.between(0, 1).all() and (masks.ot_iterations > 0).all()
    assert masks.attention_border.between(0.01, 10).all()  # a ratio to the mean, never NaN
    assert all(pq.ParquetFile(f).metadata.num_rows <= 5 for f in (out / "masks").iterdir())
    import duckdb

    n = duckdb.sql(f"select count(*) from read_parquet('{out}/masks/*.parquet')").fetchall()[0][0]
    assert n == len(GOOD)
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "complete with input errors" and run["labelled"] == 12
    assert run["errors"] == run["errors_permanent"] == 5
    assert run["config"]["backbone"]["image_size"] == 224 and len(run["config_hash"]) == 16
    assert run["runs"][-1]["listing"] == {
        "images": 17,
        "ignored": {".txt": 1},
        "unreadable": 0,
        "symlink_loops": 0,
    }
    assert "ignored   1   (not images: 1 .txt)" in done.stdout
    transport = run["transport"]  # Sinkhorn's convergence over the run
    assert transport["images"] == 12 and 0 <= transport["not_converged_fraction"] <= 1
    assert transport["iterations"]["max"] == masks.ot_iterations.max()
    assert "transport" in done.stdout and "converged" in done.stdout
    # a rerun with the same config labels nothing again
    again = run_job(job_args(str(dataset), str(out), weights_path), env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "skipped   17" in again.stdout, again.stdout
    check_output(out)
    # an earlier run's transient failure (a throttled read, say): the rerun retries that
    # image, and only that one (permanent errors count as done)
    import pyarrow as pa
    import pyarrow.compute as pc

    from autosod_ray.data.parquet import ERROR_SCHEMA, drop_rows, write_table_atomic

    retried = "photos/0002.jpg"
    drop_rows(str(out), {}, "masks", lambda t: pc.equal(t.column("image_id"), retried))
    row = {"image_id": retried, "source_uri": str(dataset / retried), "error": "could not read",
           "error_kind": "transient", "config_hash": run["config_hash"]}  # fmt: skip
    import fsspec

    write_table_atomic(fsspec.filesystem("file"), str(out / "errors"),
                       pa.Table.from_pylist([row], schema=ERROR_SCHEMA))  # fmt: skip
    on_head = job_env(RAY_ADDRESS=ray_head["address"])
    third = run_job(job_args(str(dataset), str(out), weights_path), on_head)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "skipped   16" in third.stdout and "labelled  12" in third.stdout, third.stdout
    check_output(out)  # the transient row is gone, the image is labelled, exactly once
    # another config into the same output is refused, before any work
    other = run_job(
        job_args(str(dataset), str(out), weights_path, "--set", "potnet.num_clusters=2"), env
    )
    assert other.returncode == 2 and "--overwrite" in other.stderr
    assert "potnet.num_clusters: 3 -> 2" in other.stderr  # the difference, named
    history = json.loads((out / "run.json").read_text())["runs"]
    assert [r["labelled_this_run"] for r in history] == [17, 0, 1]  # each run, its own entry
    assert history[0]["timings"]["labelling_s"] > history[1]["timings"]["labelling_s"]


@pytest.mark.parametrize("offline_env", [{"HF_HUB_OFFLINE": "1"}, {}], ids=["hf-offline", "no-net"])
def test_hub_weights_unreachable_fails_fast(offline_env, dataset, tmp_path):
    """No network (this machine has none) is found by a two-second probe of the hub, not
    after the hub client's retries (67 s before)."""
    start = time.monotonic()
    res = run_job(
        ["--input", str(dataset), "--output", str(tmp_path / "out")],
        job_env(**offline_env),
        timeout=120,
    )
    assert res.returncode == 2 and "timm's hub" in res.stderr, res.stderr[-2000:]
    assert "cannot be reached" in res.stderr and "backbone.weights" in res.stderr
    assert "Started a local Ray instance" not in res.stderr + res.stdout
    assert time.monotonic() - start < 45


BAD_RUNS = [
    ({"input": "/no/such/folder"}, "does not exist"),
    ({"input": "EMPTY"}, "holds no images"),
    ({"input": "DATA", "potnet.num_clusterz": 3}, "num_clusters"),
    ({"input": "DATA", "pipeline.pool_max": 0}, "pipeline.pool_max"),
    ({"input": "DATA", "backbone.name": "not_a_model"}, "not_a_model"),
    ({"input": "DATA", "backbone.weights": "/no/weights.pt"}, "backbone.weights"),
    ({"input": "DATA", "backbone.weights": "JUNK"}, "not a readable safetensors"),
    ({"input": "DATA", "pipeline.pool_min": 3}, "pipeline.pool_max"),
]


@pytest.mark.parametrize("sets, message", BAD_RUNS, ids=[m for _, m in BAD_RUNS])
def test_bad_input_or_config_fails_before_ray(sets, message, dataset, tmp_path, weights_path):
    """Each mistake stops the job with a message naming it, before Ray starts (in-process:
    the library call that jobs/pseudolabel.py makes)."""
    import ray

    from autosod_ray.config import PseudolabelConfig, UserError, load_config
    from autosod_ray.pseudolabel import run_pseudolabel

    (tmp_path / "empty").mkdir()
    (tmp_path / "junk.safetensors").write_bytes(np.random.default_rng(0).bytes(4096))
    names = {"EMPTY": tmp_path / "empty", "DATA": dataset, "JUNK": tmp_path / "junk.safetensors"}
    overrides = [f"backbone.weights={weights_path}", f"output={tmp_path / 'out'}"]
    overrides += [f"{k}={names.get(v, v)}" for k, v in sets.items()]
    with pytest.raises(UserError) as err:
        run_pseudolabel(load_config(PseudolabelConfig, "configs/smoke.yaml", overrides))
    assert message in str(err.value)
    assert not ray.is_initialized()


def test_a_user_error_is_one_line_and_exit_2(tmp_path, weights_path):
    res = run_job(job_args("/no/such/folder", str(tmp_path / "o"), weights_path), job_env())
    assert res.returncode == 2 and res.stderr.startswith("error: --input '/no/such/folder'")
    assert len(res.stderr.strip().splitlines()) == 1 and "Started a local Ray" not in res.stdout


def test_a_request_the_cluster_can_never_hold_stops_at_once(dataset, tmp_path, weights_path):
    """More CPUs per actor than any node has: on a fixed-size cluster (the local Ray this
    starts) the job stops with the key to change instead of waiting for ever."""
    out = tmp_path / "out"
    start = time.monotonic()
    res = run_job(job_args(str(dataset), str(out), weights_path, "--set", "pipeline.num_cpus=64"),
                  job_env(), timeout=180)  # fmt: skip
    assert res.returncode == 2 and "pipeline.num_cpus" in res.stderr, res.stderr[-2000:]
    assert "no autoscaler" in res.stderr and "Traceback" not in res.stderr
    run = json.loads((out / "run.json").read_text())  # found once Ray is up: recorded
    assert run["status"] == "user error" and "pipeline.num_cpus" in run["runs"][-1]["reason"]
    assert time.monotonic() - start < 120


def test_flags_are_strings_and_only_set_values_are_yaml():
    import argparse

    from autosod_ray.cli import load_job_config
    from autosod_ray.config import PseudolabelConfig

    keys = ("input", "output", "overwrite")
    for value in ("runs/out #1", "yes", "2024", "null", "[a, b]"):
        args = argparse.Namespace(
            config=None, set=["potnet.num_clusters=4"], input=value, output=value, overwrite=False
        )
        cfg = load_job_config(PseudolabelConfig, args, keys)
        assert cfg.output == value and cfg.input == value  # as typed, not YAML
        assert cfg.potnet.num_clusters == 4 and cfg.overwrite is False  # --set: YAML scalars
    args = argparse.Namespace(config=None, set=["output=a"], input="i", output="b", overwrite=True)
    cfg = load_job_config(PseudolabelConfig, args, keys)
    assert cfg.output == "b" and cfg.overwrite is True  # flags win over --set


# ---------------------------------------------------------------- on a Ray head the test starts


def slow_job_args(dataset, out, weights_path) -> list[str]:
    """One image per block, batch and file, at every stage, so each image is a write of its
    own (larger read batches reach the sink as one block of many images). Ray Data may
    still hold the writes back and publish them in a burst: a test that must fail mid-run
    blocks a fixed image rather than race the first write."""
    one = ("read_batch_size", "decode_batch_size", "potnet_batch_size", "encode_batch_size")
    sets = [a for key in one for a in ("--set", f"pipeline.{key}=1")]
    return job_args(
        str(dataset), str(out), weights_path, "--set", "pipeline.rows_per_file=1", *sets
    )


def _start_job(args, ray_head) -> subprocess.Popen:
    return start_script("jobs/pseudolabel.py", args, job_env(RAY_ADDRESS=ray_head["address"]))


def _written(out: Path) -> int:
    masks = out / "masks"
    return len([p for p in masks.glob("part-*.parquet")]) if masks.exists() else 0


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
    assert run["duplicates"] == 0 and run["missing"] == 0
    assert run["status"] == "complete with input errors"


def test_listing_follows_symlinked_folders_and_counts_what_it_leaves_out(tmp_path):
    from autosod_ray.data.uris import scan_inputs

    elsewhere = tmp_path / "elsewhere" / "more"
    elsewhere.mkdir(parents=True)
    root = tmp_path / "in"
    root.mkdir()
    for path in (root / "a.jpg", elsewhere / "b.JPG", elsewhere / "deep.png"):
        Image.new("RGB", (32, 32)).save(path, format="PNG" if path.suffix == ".png" else "JPEG")
    (root / "notes.txt").write_text("x")
    (root / "anim.gif").write_bytes(b"GIF89a")
    (root / "more").symlink_to(elsewhere)  # ln -s /data/more in/more
    (elsewhere / "back").symlink_to(root)  # a loop back to the top
    (root / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")  # a broken link
    listing = scan_inputs(str(root), {})
    ids = listing.table.column("image_id").to_pylist()
    assert ids == ["a.jpg", "more/b.JPG", "more/deep.png"]
    assert listing.report() == {
        "images": 3,
        "ignored": {".gif": 1, ".txt": 1},
        "unreadable": 1,
        "symlink_loops": 1,
    }


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


def test_our_pixel_limit_is_the_one_in_force(monkeypatch):
    """Raising max_pixels admits images Pillow's own guard would refuse; lowering it refuses."""
    from PIL import Image as PILImage

    from autosod_ray.data.images import ImageError, decode_image

    buf = io.BytesIO()
    PILImage.new("RGB", (100, 80), (10, 20, 30)).save(buf, format="PNG")
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 1000)  # Pillow's guard: 8000 px is a bomb
    assert decode_image(buf.getvalue(), max_pixels=10**6).shape == (80, 100, 3)
    assert PILImage.MAX_IMAGE_PIXELS == 1000  # left as it was found
    with pytest.raises(ImageError) as err:
        decode_image(buf.getvalue(), max_pixels=5000, max_pixels_key="max_pixels")
    assert str(err.value) == (
        "decompression-bomb guard: 100 x 80 pixels > max_pixels 5000 (raise max_pixels to allow)"
    )


def test_the_actor_pool_is_never_larger_than_the_work():
    from autosod_ray.pseudolabel import pool_size

    assert pool_size(2, 2, 1) == {"min_size": 1, "max_size": 1}  # one block: one actor
    assert pool_size(2, 4, 3) == {"min_size": 2, "max_size": 3}
    assert pool_size(1, 8, 100) == {"min_size": 1, "max_size": 8}
    assert pool_size(3, 3, 0) == {"min_size": 1, "max_size": 1}
