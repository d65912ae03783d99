"""A run's output as one value with a life cycle: opened once, ended once.

    out = RunOutput(uri, storage_options, job="pseudolabel")
    out.refuse_mixing(identity, overwrite)      # before anything is written
    out.check_writable()
    with out.run(owner, force_unlock, identity, entry) as run:
        ...                                     # label, train
        run.finish(status, totals)

`RunOutput` owns the filesystem and root, the lease, and the record (run.json,
or train.json for training): the output's identity (what made it, by content:
`config_hash`, the settings hashed, `provenance`) and its history, one entry
per run (start, end, status, reason, counts, timings, resources). Every way a
run ends goes through `run()`: a normal end, a user error, Ctrl-C, SIGTERM, a
lost Ray cluster, a lost output or lease; the entry says which, with the counts
done so far, and the lease is released (unless another run took it).
"""

from __future__ import annotations

import getpass
import json
import os
import posixpath
import re
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import contextmanager

from ..config import UserError, redact_text
from ..endings import Ending, LeaseLost, RunFailed, chain, ending_of, task_error_line, terminated
from .lease import OutputLease
from .uris import open_fs, write_atomic


class OutputError(UserError, ValueError):
    """A bad --output: not writable, or made by something else and no --overwrite."""


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def redacted(tree):
    """`tree` with credentials taken out of every URL in its strings (`user:pass@`)."""
    if isinstance(tree, dict):
        return {k: redacted(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [redacted(v) for v in tree]
    return redact_text(tree) if isinstance(tree, str) and "@" in tree else tree


def hold_signals() -> None:
    """From now on, SIGINT and SIGTERM are ignored (in the main thread): the run is
    already ending, and recording how must not be cut short."""
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def differences(then: dict, now: dict, limit: int = 8) -> list[str]:
    """The settings that differ between two identities, as 'key: then -> now' lines."""
    a, b = flatten(then), flatten(now)
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    lines = [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys[:limit]]
    if len(keys) > limit:
        lines.append(f"... and {len(keys) - limit} more")
    return lines


class RunOutput:
    """<output>/: its lease, its record (`record` file: history and identity), its tables.

    `watchers` (set by the job's edge, e.g. a supervisor process) are told when a run
    starts holding an output and when it has recorded its ending.
    """

    watchers: list = []

    def __init__(self, uri: str, storage_options: dict, job: str, record: str = "run.json"):
        self.uri, self.storage_options, self.job = uri, storage_options, job
        self.fs, self.root = open_fs(uri, storage_options)
        self.record_name = record
        self.record: dict = {}
        self.entry: dict = {}
        self.lease: OutputLease | None = None
        self.clear_on_start: list[str] = []  # what --overwrite replaces, under the lease

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    # ------------------------------------------------------------------ before the run

    def read_record(self) -> dict | None:
        """The record as it is now, or None (no record, or one that cannot be read)."""
        try:
            return json.loads(self.fs.cat_file(self.path(self.record_name)))
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as err:
            raise OutputError(
                f"--output {self.uri!r}: its {self.record_name} cannot be read "
                f"({type(err).__name__}: {err}); check the output and its permissions"
            ) from None
        except ValueError:
            print(f"WARNING: {self.path(self.record_name)} is damaged; starting a new history",
                  file=sys.stderr)  # fmt: skip
            return None

    def mismatch(self, identity: dict) -> list[str] | None:
        """None when the output is empty or was made by `identity`; else what differs."""
        previous = self.read_record()
        if previous is None or previous.get("config_hash") in (None, identity["config_hash"]):
            return None
        if "settings" not in previous:  # a record from before settings were kept
            return [f"config_hash: {previous.get('config_hash')!r} -> {identity['config_hash']!r}"]
        return differences(previous["settings"], identity["settings"]) or [
            f"config_hash: {previous['config_hash']!r} -> {identity['config_hash']!r}"
        ]

    def refuse_mixing(self, identity: dict, overwrite: bool, what: str, clear: list[str]) -> bool:
        """Refuse an output made by other settings or inputs (naming what differs) unless
        `overwrite`; returns whether the `clear` folders / files must be removed (done by
        `run`, under the lease)."""
        diff = self.mismatch(identity)
        if diff is None:
            return False
        if not overwrite:
            raise OutputError(
                f"--output {self.uri!r} holds {what} made otherwise: " + "; ".join(diff)
                + "; use a new output, or --overwrite to replace them"
            )  # fmt: skip
        self.clear_on_start = clear
        return True

    def check_writable(self) -> None:
        """Fail now (exit 2) if the output cannot be written, leaving nothing behind."""
        existed = self.fs.exists(self.root)
        probe = self.path(f"_write-probe-{uuid.uuid4().hex}")
        try:
            self.fs.makedirs(self.root, exist_ok=True)
            self.fs.pipe_file(probe, b"")
            self.fs.rm(probe)
        except OSError as err:
            if not existed:
                try:
                    self.fs.rmdir(self.root)
                except OSError:
                    pass
            raise OutputError(
                f"--output {self.uri!r} cannot be written ({type(err).__name__}: "
                f"{getattr(err, 'strerror', None) or err}); give a folder or URI you can "
                "write to"
            ) from None

    # ------------------------------------------------------------------ the run

    def write_record(self) -> None:
        body = json.dumps(redacted(self.record), indent=2, default=str).encode()
        write_atomic(self.fs, self.path(self.record_name), body)

    @contextmanager
    def run(
        self,
        force_unlock: bool,
        identity: dict,
        entry: dict,
        counts: Callable[[], dict] = dict,
    ):
        """Hold the output for one run. `identity`: config_hash, config, settings,
        provenance (kept from the run that made the output, unless it is new);
        `entry`: this run's fields; `counts()`: what the output holds now (read when
        the run ends early)."""
        owner = f"{self.job} by {getpass.getuser()}"
        self.lease = OutputLease(self.uri, self.storage_options, owner, force_unlock)
        self.lease.acquire()
        try:
            for name in self.clear_on_start:
                if self.fs.exists(self.path(name)):
                    self.fs.rm(self.path(name), recursive=True)
            self._begin(identity, entry)
            yield self
        except BaseException as err:
            if isinstance(err, KeyboardInterrupt) or terminated(err):
                hold_signals()  # a second signal (`ray job stop` sends two) must not cut this
            if self.lease.lost:  # another run owns the record now: leave it alone
                self._tell("end", status="failed")
                raise LeaseLost(self.lease.lost) from err
            ending = self._output_lost(err) or ending_of(err)
            try:
                totals = counts()
            except Exception:  # noqa: BLE001 - the output itself may be what failed
                totals = {}
            self._end(ending.status, ending.reason, totals)
            if ending.status == "failed" and ending.known and not isinstance(err, RunFailed):
                raise RunFailed(ending.reason) from err  # a Ray-wrapped cause, said in one line
            raise
        finally:
            self.lease.release()

    def _output_lost(self, err: BaseException) -> Ending | None:
        """A failed write into this output (read-only, deleted, permissions revoked), said
        by the innermost such error: the one the filesystem raised, not Ray's wrapper."""
        refused = [c for c in chain(err) if isinstance(c, OSError) and self.root in str(c)]
        if not refused:
            return None
        cause = refused[-1]  # `chain` gives a wrapper before what it wraps
        # the error's own words and path(s), as a traceback ends: "[Errno 1] Operation not
        # permitted: 'tmp' -> 'part'" (a task's, from its traceback: Ray's wrapper has no
        # errno of its own), less the errno
        said = str(cause) if getattr(cause, "strerror", None) else task_error_line(cause)
        said = re.sub(r"^([\w.]+: )?\[Errno \d+\] ", "", said or str(cause))
        return Ending("failed", f"the output could not be written: {said}")

    def _begin(self, identity: dict, entry: dict) -> None:
        previous = self.read_record() or {}
        history = previous.get("runs", [])
        took = self.lease.took_over
        for old in history:
            if old.get("status") == "running":
                old["status"] = "abandoned"
                old["reason"] = (
                    "its driver stopped without ending the run (killed, or its machine or "
                    "cluster lost); the next run took the output over"
                )
        if took is not None:
            print(
                f"WARNING: took the output over from a run that is gone: "
                f"{took.describe(time.time())}",
                file=sys.stderr,
            )
        self.entry = {
            "run": len(history) + 1,
            "status": "running",
            "started": _now(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "user": getpass.getuser(),
            **({"took_over": took.describe(time.time())} if took else {}),
            **entry,
        }
        same = previous.get("config_hash") == identity["config_hash"]
        earlier = {k: v for k, v in previous.items() if same and k != "runs"}
        self.record = {
            **identity,
            **earlier,  # an output keeps what first made it (its config, its provenance)
            "job": self.job,
            "status": "running",
            "runs": [*history, self.entry],
        }
        self._start_clock = time.perf_counter()
        self.write_record()
        self._tell("start")

    def _tell(self, event: str, status: str | None = None) -> None:
        note = {
            "uri": self.uri,
            "storage_options": self.storage_options,
            "job": self.job,
            "record": self.path(self.record_name),
            "status": status or self.record.get("status"),
            "host": socket.gethostname(),
        }
        for watcher in self.watchers:
            watcher(event, note)

    def _end(self, status: str, reason: str | None, totals: dict) -> None:
        self.entry.update(
            status=status,
            ended=_now(),
            wall_s=round(time.perf_counter() - self._start_clock, 3),
            **({"reason": redact_text(reason)} if reason else {}),
        )
        runs = self.record.pop("runs")
        self.record.update(totals)
        self.record.update(status=status, runs=runs)  # the history last, for a reader
        try:
            self.write_record()
        except OSError as err:  # the output is what failed: say so where it can be seen
            print(
                f"error: could not record how the run ended in {self.record_name} "
                f"({type(err).__name__}: {err})",
                file=sys.stderr,
            )
        self._tell("end")

    def finish(self, status: str, totals: dict, reason: str | None = None, **entry) -> dict:
        """End the run normally: its entry and the output's totals; returns the record's
        view of this run (totals and this entry) for the summary."""
        self.entry.update(entry)
        self._end(status, reason, totals)
        return {**totals, **self.entry, "status": status}


def _how(code: int) -> str:
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit {code}"


def end_for_dead_driver(note: dict, pid: int, code: int) -> None:
    """End, in its output's record, the run of driver `pid` that died without ending it
    (`note`: what the driver told its supervisor), with the counts its tables hold; release
    its lease."""
    from .lease import LEASE
    from .parquet import read_rows

    out = RunOutput(note["uri"], note["storage_options"], note["job"],
                    posixpath.basename(note["record"]))  # fmt: skip
    try:
        lease = json.loads(out.fs.cat_file(out.path(LEASE)))
    except (OSError, ValueError):
        lease = {}
    if lease and (lease.get("pid"), lease.get("host")) != (pid, note["host"]):
        return  # another run holds the output now: its record is not ours to touch
    record = out.read_record() or {}
    runs = [
        r
        for r in record.get("runs", [])
        if (r.get("pid"), r.get("host"), r["status"]) == (pid, note["host"], "running")
    ]
    reason = (
        f"the driver process ended without recording how ({_how(code)}): its Ray cluster was "
        "lost, it ran out of memory, or it crashed; its log says more"
    )
    for run in runs:
        run.update(status="failed", ended=_now(), reason=reason)
    if runs:
        record["status"] = "failed"
        for table, key in (("masks", "labelled"), ("errors", "errors")):
            if out.fs.exists(out.path(table)):
                rows = read_rows(out.uri, out.storage_options, table, ["image_id"],
                                 record.get("config_hash"))  # fmt: skip
                record[key] = rows.num_rows
        out.record = record
        out.write_record()
    if lease:
        out.fs.rm(out.path(LEASE))
    print(f"error: {reason}", file=sys.stderr)
