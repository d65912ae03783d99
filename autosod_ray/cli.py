"""Shared command-line plumbing for jobs/*.py: --config, --set, errors as messages."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from .config import UserError, load_config, redact_text
from .endings import EXIT_CODES, RunFailed, ending_of, terminated

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TURNED_OFF = object()  # what a --no-X flag stores: the config key X becomes false


# an override each job's config accepts, for its --help
SET_EXAMPLES = {
    "potnet.yaml": "potnet.num_clusters=4",
    "predict.yaml": "pipeline.pool_max=2",
    "train.yaml": "optim.max_steps=500",
    "evaluate.yaml": "batch_size=32",
    "preview.yaml": "n=12",
    "report.yaml": "thumbnails=12",
    "export.yaml": "min_area=128",
    "selftrain-cpu.yaml": "rounds=2",
}


def job_parser(description: str, default_config: str) -> argparse.ArgumentParser:
    """The job's parser: its docstring's usage lines kept as written, --config, --set."""
    p = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--config",
        default=str(CONFIGS / default_config),
        help=f"YAML config (default: configs/{default_config})",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key, e.g. "
        f"{SET_EXAMPLES.get(default_config, 'key=value')} (repeatable)",
    )
    return p


def add_force_unlock(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--force-unlock",
        action="store_true",
        help="take the output from another run that still holds its lease (if it is dead)",
    )


def add_labelling_args(p: argparse.ArgumentParser, source: str) -> None:
    """--input / --output / --overwrite / --force-unlock of the jobs that write pseudo-mask
    Parquet."""
    where = p.add_argument_group("where (required, here or in --config)")
    where.add_argument("--input", help="folder, URI (s3://, gs://, file://) or manifest of images")
    where.add_argument("--output", help="folder or URI for masks/, errors/ and run.json")
    p.add_argument(
        "--overwrite", action="store_true", help=f"replace an output written by another {source}"
    )
    p.add_argument(
        "--no-report",
        dest="report",
        action="store_const",
        const=TURNED_OFF,
        help="do not write <output>/report.html at the end",
    )
    add_force_unlock(p)


def config_flags(args: argparse.Namespace, keys: tuple[str, ...]) -> dict:
    """Each given flag in `keys` as a config value of its own type (a path stays a string,
    whatever it looks like); they win over --set and the file."""
    flags = {}
    for key in keys:
        value = getattr(args, key, None)
        if value is TURNED_OFF:  # a --no-X flag
            flags[key] = False
        elif value is not None and value is not False:
            flags[key] = value
    return flags


def load_job_config(schema, args: argparse.Namespace, keys: tuple[str, ...]):
    """The job's config: --config file, then --set overrides, then the flags in `keys`."""
    return load_config(schema, args.config, args.set, config_flags(args, keys))


def run_job(main: Callable[[], int], supervised: bool = False) -> None:
    """Run a job's main and exit with the code of how it ended (autosod_ray/endings.py).

    A user error, Ctrl-C, SIGTERM or a run that stopped itself (too many internal
    errors, a lost lease or cluster) is one line on stderr; any other exception is a
    bug: its traceback is printed, then exit 3. `supervised` (the jobs that hold an
    output): the driver runs as a child of a small supervisor that ends the output's
    record if the driver dies without doing so (see `supervise`).
    """
    if supervised and SUPERVISOR_FD not in os.environ:
        sys.exit(supervise())
    supervisor = None
    if SUPERVISOR_FD in os.environ:
        from .data.run_output import RunOutput

        supervisor = PipeWatcher(int(os.environ[SUPERVISOR_FD]))
        RunOutput.watchers.append(supervisor)
    # the driver ends on SIGTERM through Python (run.json, lease, exit 143); Ray's C++
    # failure-signal handler (set up when the driver starts Ray, after this) would turn
    # that ending into an abort (exit -6)
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))  # as Ray's driver
    try:
        code = main()
    except (UserError, RunFailed, KeyboardInterrupt, SystemExit) as err:
        if isinstance(err, SystemExit) and not terminated(err):
            raise
        ending = ending_of(err)
        line = f"error: {ending.reason}" if ending.status != "interrupted" else ending.reason
        print(redact_text(line), file=sys.stderr)
        code = ending.exit_code
    except Exception:
        print(redact_text(traceback.format_exc()), file=sys.stderr, end="")
        code = EXIT_CODES["failed"]
    if supervisor is not None:
        supervisor("exit", {"code": code})  # Ray's own exit may not keep it (lost cluster)
    sys.exit(code)


# ---------------------------------------------------------------- the driver's supervisor

SUPERVISOR_FD = "AUTOSOD_SUPERVISOR_FD"  # set in a driver that a supervisor started


class PipeWatcher:
    """Tells the supervisor (a JSON line on an inherited pipe) when a run starts holding an
    output and when it has recorded its ending."""

    def __init__(self, fd: int):
        self.fd = fd

    def __call__(self, event: str, note: dict) -> None:
        os.write(self.fd, (json.dumps({"event": event, **note}) + "\n").encode())


def _driver_process() -> None:
    """In the driver, before exec: its own process group (the supervisor forwards each
    signal once), and SIGKILL when the supervisor dies (kill -9 ends both)."""
    os.setpgid(0, 0)
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def supervise() -> int:
    """Run this job again as a child (the driver), forward SIGINT / SIGTERM to it, and
    when it dies without recording how its run ended (its Ray cluster was lost and Ray
    ended the process, the OOM killer, a crash in native code), end that run in the
    output's record as "failed" with the counts done and release its lease. Returns the
    exit code of how the run ended."""
    from .data.run_output import end_for_dead_driver

    read_fd, write_fd = os.pipe()
    env = {**os.environ, SUPERVISOR_FD: str(write_fd)}
    child = subprocess.Popen(
        [sys.executable, *sys.argv], env=env, pass_fds=(write_fd,), preexec_fn=_driver_process
    )
    os.close(write_fd)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: child.send_signal(signum))
    code = child.wait()
    os.set_blocking(read_fd, False)  # what the driver said; its descendants may hold the pipe
    notes = b""
    try:
        while chunk := os.read(read_fd, 1 << 16):
            notes += chunk
    except BlockingIOError:
        pass
    os.close(read_fd)
    open_runs, said = {}, None  # runs that started and did not record their ending
    for line in notes.decode().splitlines():
        note = json.loads(line)
        if note["event"] == "exit":
            said = note["code"]
        elif note["event"] == "start":
            open_runs[note["record"]] = note
        else:
            open_runs.pop(note["record"], None)
    try:
        for note in open_runs.values():
            end_for_dead_driver(note, child.pid, code)
    except Exception as err:  # noqa: BLE001 - the output itself may be gone
        print(f"error: could not record how the driver ended: {type(err).__name__}: {err}",
              file=sys.stderr)  # fmt: skip
        return EXIT_CODES["failed"]
    if open_runs:
        return EXIT_CODES["failed"]
    if said is not None:
        return said  # the driver's own code, even when Ray's exit replaced it
    return 128 - code if code < 0 else code


def exit_code(summary: dict) -> int:
    """A finished run's exit code, from its status."""
    return EXIT_CODES[summary["status"]]
