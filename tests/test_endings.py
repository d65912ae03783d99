"""Every way a run ends is honest, with real processes and real faults: run.json's
status and counts, the exit code, the lease, nothing lost, nothing duplicated."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from autosod_ray.data.lease import LEASE, LeaseError, OutputLease
from tests.conftest import BAD, GOOD, driver_of, job_env, start_script, wait_for
from tests.test_pseudolabel import _written, check_output, job_args, run_job, slow_job_args


def record(out: Path) -> dict:
    return json.loads((out / "run.json").read_text())


def one_line_error(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.startswith(("error:", "interrupted"))]
    assert "Traceback" not in stderr, stderr[-3000:]
    return lines[-1] if lines else ""


def session_processes(sid: int) -> list[int]:
    """PIDs of the processes in session `sid` (a job started with start_new_session)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == sid:
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def kill_session(sid: int) -> None:
    """Stop a job and the local Ray it started, by their own session (never `ray stop`)."""
    for pid in session_processes(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def longer(dataset: Path, root: Path, ecssd: Path, n: int = 24) -> tuple[Path, dict]:
    """`dataset` plus `n` more ECSSD photos (more/0101.jpg ...): a run long enough that a
    graceful stop (seconds: the driver winds Ray Data down) lands before its end. Returns
    the folder and image_id -> (height, width) of its readable images."""
    shutil.copytree(dataset, root)
    (root / "more").mkdir()
    good = dict(GOOD)
    for i in range(101, 101 + n):
        src = ecssd / "images" / f"{i:04d}.jpg"
        shutil.copy(src, root / "more" / src.name)
        with Image.open(src) as img:
            good[f"more/{src.name}"] = (img.height, img.width)
    return root, good


@pytest.mark.slow
def test_sigint_then_sigterm_then_a_rerun_completes(
    dataset, ecssd, tmp_path, ray_head, weights_path
):
    """Ctrl-C (130) and SIGTERM (143, as `ray job stop` sends) each end the run with its
    status and the counts done so far in run.json, one line on stderr and the lease gone;
    kill -9 ends a run that holds the lease (a second run is refused meanwhile), and the
    rerun takes the output over from it; the rerun finishes exactly once, and run.json keeps
    all four runs."""
    out = tmp_path / "run"
    images, good = longer(dataset, tmp_path / "images", ecssd)
    args = slow_job_args(images, out, weights_path)
    env = job_env(RAY_ADDRESS=ray_head["address"])
    for sig, code, status in ((signal.SIGINT, 130, "interrupted"),
                              (signal.SIGTERM, 143, "terminated")):  # fmt: skip
        before = _written(out)
        proc = start_script("jobs/pseudolabel.py", args, env)
        wait_for(lambda b=before: _written(out) > b, proc)
        if sig == signal.SIGINT:
            os.killpg(proc.pid, sig)  # Ctrl-C: the terminal's foreground group
        else:  # `ray job stop`: every process of the job, one by one
            for pid in (proc.pid, driver_of(proc.pid)):
                os.kill(pid, sig)
        stdout, _ = proc.communicate(timeout=180)
        assert proc.returncode == code, stdout[-3000:]
        assert "Traceback" not in stdout, stdout[-3000:]
        run = record(out)
        assert run["status"] == status and run["runs"][-1]["status"] == status
        assert before < run["labelled"] < len(good) and run["duplicates"] == 0
        assert run["labelled"] == _written(out)  # the counts are what the output holds
        assert not (out / LEASE).exists()
    before = _written(out)
    proc = start_script("jobs/pseudolabel.py", args, env)
    wait_for(lambda: _written(out) > before, proc)
    # a second run into the same output while the first lives is refused, naming the first
    with pytest.raises(LeaseError, match=f"in use by another run.*pid {driver_of(proc.pid)}"):
        OutputLease(str(out), {}, "a second run").acquire()
    assert proc.poll() is None
    os.killpg(proc.pid, signal.SIGKILL)  # the job dies mid-write (its driver with it)
    proc.wait()
    assert before < _written(out) < len(good)
    done = run_job(args, env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "took the output over from a run that is gone" in done.stderr
    check_output(out, good=good)
    run = record(out)
    assert [r["status"] for r in run["runs"]] == ["interrupted", "terminated", "abandoned",
                                                   "complete with input errors"]  # fmt: skip
    assert (
        run["runs"][-1]["skipped_already_done"]
        == run["runs"][1]["input"]["images"] - (run["runs"][-1]["labelled_this_run"])
    )


def raylet_of(driver: int) -> int | None:
    """The raylet a driver's `ray.init()` started (its child)."""
    for pid in session_processes(driver):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"raylet/raylet" in cmd:
            return pid
    return None


@pytest.mark.slow
def test_losing_the_ray_cluster_ends_the_run_as_failed(dataset, tmp_path, weights_path):
    """The raylet under the driver is killed mid-run: run.json says failed because the
    Ray cluster was lost (not "running"), the exit code is 3, the lease is released."""
    out = tmp_path / "run"
    proc = start_script(
        "jobs/pseudolabel.py", slow_job_args(dataset, out, weights_path), job_env()
    )  # fmt: skip - its own local Ray, not the shared head
    try:
        wait_for(lambda: _written(out) >= 1 and raylet_of(proc.pid) is not None, proc, 400)
        os.kill(raylet_of(proc.pid), signal.SIGKILL)
        stdout, _ = proc.communicate(timeout=300)
    finally:
        kill_session(proc.pid)
    assert proc.returncode == 3, stdout[-4000:]
    run = record(out)
    # ended by the driver itself, or (when Ray ended the driver first) by its supervisor
    assert run["status"] == "failed" and "Ray cluster was lost" in run["runs"][-1]["reason"]
    assert run["labelled"] >= 1 and not (out / LEASE).exists()
    assert "error:" in stdout and "Ray cluster was lost" in stdout.split("error:")[-1]


def test_user_errors_are_one_line_exit_2_and_leave_nothing(dataset, tmp_path, weights_path):
    """A YAML syntax error, a missing input, an output that cannot be written: one line,
    exit 2, no output folder left behind."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("potnet:\n  num_clusters: [3,\n")
    res = run_job(["--config", str(bad), "--input", str(dataset), "--output",
                   str(tmp_path / "a")], job_env())  # fmt: skip
    assert res.returncode == 2 and "not valid YAML: line 3" in one_line_error(res.stderr)
    res = run_job(job_args(str(tmp_path / "nowhere"), str(tmp_path / "b"), weights_path),
                  job_env())  # fmt: skip
    assert res.returncode == 2 and "does not exist" in one_line_error(res.stderr)
    blocked = tmp_path / "file"
    blocked.write_text("a file where the output's parent folder should be")
    res = run_job(job_args(str(dataset), str(blocked / "out"), weights_path), job_env())
    assert res.returncode == 2 and "cannot be written" in one_line_error(res.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml", "file"]


def perturbed_weights(src: Path, dst: Path, seed: int = 0) -> None:
    """The same backbone with other weights (a fine-tune, say), saved at `dst`."""
    from safetensors.numpy import load_file, save_file

    state = load_file(str(src))
    rng = np.random.default_rng(seed)
    name = next(k for k in sorted(state) if k.endswith("qkv.weight"))
    state[name] = state[name] + rng.normal(0, 1e-2, state[name].shape).astype(state[name].dtype)
    save_file(state, str(dst))


@pytest.mark.slow
def test_weights_are_known_by_content(dataset, tmp_path, ray_head, weights_path):
    """Replace the weights file at the same path: the rerun is refused, naming the weights'
    digest; move the same file elsewhere: the output is still its own (nothing to do)."""
    images = tmp_path / "images"
    images.mkdir()
    for name in ("photos/0001.jpg", "photos/0002.jpg"):
        shutil.copy(dataset / name, images / Path(name).name)
    weights = tmp_path / "w" / "backbone.safetensors"
    weights.parent.mkdir()
    shutil.copy(weights_path, weights)
    out = tmp_path / "out"
    first = run_job(
        job_args(str(images), str(out), weights), job_env(RAY_ADDRESS=ray_head["address"])
    )
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    made_by = record(out)["provenance"]["backbone"]["sha256"]
    moved = tmp_path / "elsewhere.safetensors"
    shutil.move(weights, moved)
    again = run_job(job_args(str(images), str(out), moved), job_env())
    assert again.returncode == 0 and "skipped   2" in again.stdout, again.stderr[-3000:]
    perturbed_weights(moved, weights)  # other content at the first path
    other = run_job(job_args(str(images), str(out), weights), job_env())
    assert other.returncode == 2
    line = one_line_error(other.stderr)
    assert f"weights_sha256: '{made_by}' ->" in line and "--overwrite" in line
    run = record(out)
    assert run["provenance"]["backbone"]["sha256"] == made_by  # what made the masks stays
    assert [r["status"] for r in run["runs"]] == ["complete", "complete"]
    assert run["runs"][1]["labelled_this_run"] == 0  # the no-op rerun has its own entry


class FailsOn:
    """A model that raises on the images it is told to (our bug), and labels the rest."""

    def __init__(self, everything: bool):
        self.everything = everything

    def __call__(self):
        def label(images):
            red = (images[..., 0] > 150) & (images[..., 1] < 60)  # the flat red test image
            if self.everything or (red.reshape(len(images), -1).mean(1) > 0.5).any():
                raise ValueError("a bug in the model")
            return np.ones((len(images), 4, 4), np.float32), {}

        return label


def failing_labelling(everything: bool):
    from autosod_ray.potnet.mask import mask_at_size
    from autosod_ray.pseudolabel import Labelling

    return Labelling(
        job="pseudolabel",
        model_factory=FailsOn(everything),
        to_masks=mask_at_size,
        model_name="test",
        settings={"model": "fails", "everything": everything},
        provenance={},
        image_size=56,
        patch_size=14,
        max_pixels=10**8,
        max_pixels_key="max_pixels",
    )


def test_internal_errors_are_counted_retried_and_stop_a_run(tmp_path, ray_head, ecssd):
    """An exception in our code on a valid image is `internal`: the run ends "failed"
    (exit 3) and a rerun tries it again, counting attempts; when most images fail, the
    actor stops the run early instead of failing every image."""
    import ray
    from PIL import Image

    from autosod_ray.config import PseudolabelConfig
    from autosod_ray.endings import EXIT_CODES, RunFailed
    from autosod_ray.pseudolabel import run_labelling

    images = tmp_path / "images"
    images.mkdir()
    for i in range(1, 9):
        shutil.copy(ecssd / "images" / f"{i:04d}.jpg", images)
    Image.new("RGB", (64, 64), (200, 30, 30)).save(images / "flat.png")  # our model's bug
    ray.init(address=ray_head["address"])
    try:
        cfg = PseudolabelConfig(input=str(images), output=str(tmp_path / "one"))
        cfg.pipeline.potnet_batch_size = 3
        summary = run_labelling(cfg, failing_labelling(everything=False))
        assert summary["status"] == "failed" and EXIT_CODES[summary["status"]] == 3
        assert summary["labelled"] == 8 and summary["errors_internal"] == 1
        assert "internal errors" in summary["reason"]
        import pandas as pd

        errors = pd.read_parquet(tmp_path / "one" / "errors")
        assert errors.to_dict("records")[0] | {"config_hash": None, "source_uri": None} == {
            "image_id": "flat.png", "source_uri": None, "config_hash": None,
            "error": "labelling failed: ValueError: a bug in the model",
            "error_kind": "internal", "attempts": 1,
        }  # fmt: skip
        again = run_labelling(cfg, failing_labelling(everything=False))  # retried: bug not fixed
        assert again["skipped_already_done"] == 8 and again["labelled_this_run"] == 1
        assert pd.read_parquet(tmp_path / "one" / "errors").attempts.tolist() == [2]
        # a model that fails on everything: stopped after a few images, not the whole set
        cfg = PseudolabelConfig(input=str(images), output=str(tmp_path / "all"))
        cfg.pipeline.potnet_batch_size = 1
        with pytest.raises(RunFailed) as err:
            run_labelling(cfg, failing_labelling(everything=True))
    finally:
        ray.shutdown()
    run = record(tmp_path / "all")
    assert run["status"] == "failed" and "pipeline.max_error_fraction" in run["runs"][-1]["reason"]
    assert "a bug in the model" in run["runs"][-1]["reason"] and "stopped" in str(err.value)
    assert not (tmp_path / "all" / LEASE).exists()


def test_transient_failures_become_permanent_after_max_attempts():
    """settle_errors counts this run's try; the max_attempts-th transient failure is given
    up (permanent: reruns stop trying), internal errors are never given up."""
    from autosod_ray.data.stages import settle_errors

    table = pa.table(
        {
            "image_id": ["ok", "slow", "slow2", "bug", "bad"],
            "error": ["", "timeout", "timeout", "ValueError", "not an image"],
            "error_kind": ["", "transient", "transient", "internal", "permanent"],
            "attempts": pa.array([0, 1, 2, 5, None], pa.int32()),
        }
    )
    got = settle_errors(table, max_attempts=3).to_pydict()
    assert got["attempts"] == [0, 2, 3, 6, 1]
    assert got["error_kind"] == ["", "transient", "permanent", "internal", "permanent"]
    assert got["error"][2] == "gave up after 3 runs: timeout" and got["error"][1] == "timeout"


def test_the_sink_writes_only_what_the_ledger_admits_and_always_reports(tmp_path):
    """ShardDatasink asks before each write and reports after it, a failed write too: once
    the ledger is closed (the run is ending) nothing more is written, and the ledger knows
    when no admitted write is still under way (the driver waits for that, then counts)."""
    from autosod_ray.data.parquet import ShardDatasink, shard_name
    from autosod_ray.data.progress import WriteLedger

    def sink_to(ledger: WriteLedger) -> ShardDatasink:
        return ShardDatasink(str(tmp_path), {}, 2, lambda t: {"masks": t},
                             on_written=lambda c: ledger.add(c.get("masks", 0), 0),
                             admit=ledger.admit)  # fmt: skip

    def rows(*ids: str) -> list[pa.Table]:
        return [pa.table({"image_id": list(ids)})]

    ledger = WriteLedger()
    assert sink_to(ledger).write(rows("a", "b", "c"), None) == {"masks": 3}
    assert len(list((tmp_path / "masks").glob("part-*"))) == 2  # at most 2 rows a file
    assert ledger.read() == (3, 0) and ledger.close() == 0
    assert sink_to(ledger).write(rows("d"), None) == {}  # closed: not written, not told
    assert len(list((tmp_path / "masks").glob("part-*"))) == 2 and ledger.read() == (3, 0)
    failing = WriteLedger()
    (tmp_path / "masks" / shard_name(["e"]) / "taken").mkdir(parents=True)
    with pytest.raises(OSError):
        sink_to(failing).write(rows("e"), None)
    assert failing.close() == 0  # told, though it failed: nothing left to wait for


def test_a_failed_atomic_write_leaves_no_temporary_file(tmp_path):
    """write_atomic's rename refused (the name is taken by a folder): it raises and removes
    its `_tmp-` file rather than leave it, or fall back to a copy."""
    import fsspec

    from autosod_ray.data.uris import write_atomic

    (tmp_path / "taken" / "inside").mkdir(parents=True)
    with pytest.raises(OSError):
        write_atomic(fsspec.filesystem("file"), str(tmp_path / "taken"), b"data")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
    write_atomic(fsspec.filesystem("file"), str(tmp_path / "free"), b"data")
    assert (tmp_path / "free").read_bytes() == b"data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["free", "taken"]


def test_a_task_error_is_said_in_the_tasks_words(tmp_path):
    """A Ray task's exception reaches the driver wrapped (a coloured `ray::Task()` header
    first, Ray Data's own exceptions around it); run.json's reason names the task's own
    exception and message, and a refused write its path(s)."""
    import pickle
    import traceback

    from ray.data.exceptions import SystemException, UserCodeException
    from ray.exceptions import RayTaskError

    from autosod_ray.data.run_output import RunOutput
    from autosod_ray.endings import ending_of

    def from_a_task(raise_it) -> BaseException:
        """What the driver catches: the task's error as Ray ships it (pickled), raised
        from Ray Data's SystemException."""
        try:
            raise_it()
        except Exception as raised:
            wrapped = RayTaskError("encode", traceback.format_exc(), raised)
        err = pickle.loads(pickle.dumps(wrapped)).as_instanceof_cause()  # as Ray does
        try:
            raise err from SystemException()
        except Exception as caught:
            return caught

    def bad_value():
        int("bad value")

    def a_udf_fails():  # as Ray Data runs a map function: its error, then its wrapper
        try:
            bad_value()
        except ValueError as e:
            raise UserCodeException("UDF failed to process a data block.") from e

    said = "ValueError: invalid literal for int() with base 10: 'bad value'"
    for raise_it in (bad_value, a_udf_fails):
        err = from_a_task(raise_it)
        assert str(err).startswith("\x1b[36m")  # Ray's own first line: a coloured header
        ending = ending_of(err)
        assert (ending.status, ending.reason, ending.known) == ("failed", said, False)

    out = RunOutput(str(tmp_path / "out"), {}, "pseudolabel")
    part, tmp = f"{out.root}/masks/part-1.parquet", f"{out.root}/masks/_tmp-1"

    def refused():
        raise PermissionError(1, "Operation not permitted", tmp, None, part)

    lost = out._output_lost(from_a_task(refused))
    said = f"the output could not be written: Operation not permitted: '{tmp}' -> '{part}'"
    assert (lost.status, lost.reason) == ("failed", said)
    assert out._output_lost(from_a_task(bad_value)) is None  # not a write into the output


def immutable(path: Path, on: bool) -> bool:
    """chattr +i / -i (root can write through any mode bits, not through this)."""
    res = subprocess.run(["chattr", "+i" if on else "-i", str(path)], capture_output=True)
    return res.returncode == 0


@pytest.mark.slow
def test_a_write_refused_mid_run_fails_the_run_and_a_rerun_completes(
    dataset, tmp_path, ray_head, weights_path
):
    """masks/ refuses one write mid-run (the file the last image's shard goes to is made
    immutable, as a folder turned read-only refuses every write): the run ends "failed"
    naming the write error (exit 3), run.json keeps what was written, the lease is
    released; once the output is writable again, a rerun completes exactly once.

    The refusal waits at a fixed image rather than being timed against the job: Ray Data
    writes in bursts, so a test that made masks/ read-only after the first write raced
    the last one."""
    from autosod_ray.data.parquet import MASK_SCHEMA, shard_name

    out = tmp_path / "run"
    blocked = out / "masks" / shard_name([sorted(GOOD)[-1]])  # one image per file: its own
    blocked.parent.mkdir(parents=True)
    pq.write_table(MASK_SCHEMA.empty_table(), blocked)  # a valid empty shard, as ensure_tables
    if not immutable(blocked, True):
        pytest.skip("chattr +i is not permitted here (needs CAP_LINUX_IMMUTABLE)")
    args = slow_job_args(dataset, out, weights_path)
    env = job_env(RAY_ADDRESS=ray_head["address"])
    try:
        failed = run_job(args, env)
    finally:
        immutable(blocked, False)
    assert failed.returncode == 3, failed.stdout[-3000:] + failed.stderr[-3000:]
    run = record(out)
    # one line: the filesystem's words and the refused file, not Ray's coloured wrapper
    said = run["runs"][-1]["reason"]
    refused = re.fullmatch(
        r"the output could not be written: Operation not permitted: '(.+)' -> '(.+)'", said
    )
    assert run["status"] == "failed" and refused and refused.group(2) == str(blocked), said
    tmp = Path(refused.group(1))
    assert tmp.parent == blocked.parent and tmp.name.startswith("_tmp-")
    assert not tmp.exists()  # the refused write removed its temporary file
    assert f"error: {said}" in failed.stderr.splitlines()
    assert 0 < run["labelled"] < len(GOOD) and not (out / LEASE).exists()
    assert run["labelled"] == _written(out) - 1  # what the output holds, less the empty shard
    rerun = run_job(args, env)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    check_output(out)
    assert len(BAD) == record(out)["errors_permanent"]


def test_a_killed_run_is_taken_over_and_said_so(tmp_path):
    """kill -9 leaves run.json "running" and a lease behind: the next run takes the lease
    over, says so, and marks the dead run "abandoned" in the history."""
    from autosod_ray.data.run_output import RunOutput

    out = tmp_path / "out"
    code = (
        "import os, sys\n"
        "from autosod_ray.data.run_output import RunOutput\n"
        f"out = RunOutput({str(out)!r}, {{}}, 'pseudolabel')\n"
        "identity = {'config_hash': 'h', 'settings': {}, 'config': {}, 'provenance': {}}\n"
        "with out.run(False, identity, {}):\n"
        "    os.kill(os.getpid(), 9)\n"
    )
    res = subprocess.run(["python", "-c", code], env=job_env(), capture_output=True, text=True)
    assert res.returncode == -9 and (out / LEASE).exists()
    assert record(out)["status"] == "running"
    identity = {"config_hash": "h", "settings": {}, "config": {}, "provenance": {}}
    run = RunOutput(str(out), {}, "pseudolabel")
    with run.run(False, identity, {}) as r:
        assert r.lease.took_over is not None and r.lease.took_over.pid > 0
        r.finish("complete", {"labelled": 0})
    history = record(out)["runs"]
    assert [h["status"] for h in history] == ["abandoned", "complete"]
    assert "took_over" in history[1] and not (out / LEASE).exists()


DIES = """
import os, signal
from autosod_ray.cli import run_job
from autosod_ray.data.run_output import RunOutput


def main():
    out = RunOutput({out!r}, {{}}, "pseudolabel")
    identity = {{"config_hash": "h", "settings": {{}}, "config": {{}}, "provenance": {{}}}}
    with out.run(False, identity, {{}}):
        os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer, or Ray ending its driver


run_job(main, supervised=True)
"""


def test_a_driver_that_dies_is_ended_by_its_supervisor(tmp_path):
    """Only the driver dies (SIGKILL): its supervisor records the run "failed" with the
    reason, releases the lease, and exits 3."""
    out = tmp_path / "out"
    script = tmp_path / "dies.py"
    script.write_text(DIES.format(out=str(out)))
    res = subprocess.run(["python", str(script)], env=job_env(), capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert res.returncode == 3, res.stderr[-2000:]
    assert "error: the driver process ended without recording how (killed by SIGKILL)" in (
        res.stderr
    )
    run = record(out)
    assert run["status"] == "failed" and run["runs"][-1]["status"] == "failed"
    assert "killed by SIGKILL" in run["runs"][-1]["reason"] and not (out / LEASE).exists()


def test_no_credential_in_a_reason_or_a_record():
    from autosod_ray.config import redact_text
    from autosod_ray.data.run_output import redacted

    text = "could not reach http://AKIAXX:p@ss/w0rd@minio:9000/b and s3://bucket/key"
    assert redact_text(text) == "could not reach http://***@minio:9000/b and s3://bucket/key"
    record = {"runs": [{"reason": text, "input": {"uri": "s3://k:s@host/in"}}], "n": 1}
    assert "AKIAXX" not in json.dumps(redacted(record)) and "k:s@" not in json.dumps(
        redacted(record)
    )
