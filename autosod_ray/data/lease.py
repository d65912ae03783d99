"""One run per output: a lease object in the output, renewed while the run lives.

`<output>/_lease.json` holds {owner, host, pid, started, heartbeat}. A run takes
the lease before writing anything and renews it every `HEARTBEAT_S` seconds
from a background thread; it removes it when it ends. A second run into the
same output is refused with the first run's owner, host and age, unless the
lease is stale (no heartbeat for `STALE_S` seconds), its owner was a process on
this host that no longer exists (a killed driver, rerun at once), or the user
passes --force-unlock. Object stores have no atomic create-if-absent, so a
taker writes its own token and reads it back after a moment: of two runs
starting together, the one whose token did not survive gives way.

While it runs, each heartbeat reads the lease back first: a run whose token is
gone (another run took the output over) stops writing it and calls `on_lost`,
and so does a run whose heartbeat has failed for `LOST_AFTER_S` (others would
soon take its lease for a stale one). The jobs' `on_lost` interrupts the
driver, which then ends with status "failed" naming the taker.
"""

from __future__ import annotations

import _thread
import json
import os
import posixpath
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from ..config import UserError
from .uris import open_fs, write_atomic

LEASE = "_lease.json"
HEARTBEAT_S = 10.0
STALE_S = 60.0
SETTLE_S = 1.0  # how long a taker waits before reading its token back
LOST_AFTER_S = STALE_S / 2  # a heartbeat failing this long gives the lease up


class LeaseError(UserError):
    """Another live run holds the output."""


@dataclass
class LeaseRecord:
    token: str
    owner: str
    host: str
    pid: int
    started: float
    heartbeat: float

    def describe(self, now: float) -> str:
        return (
            f"{self.owner} (host {self.host}, pid {self.pid}, started "
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.started))}, last seen "
            f"{now - self.heartbeat:.0f} s ago)"
        )


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def interrupt_driver() -> None:
    """The default `on_lost`: raise KeyboardInterrupt in the main thread (the driver
    then ends through its usual path, which reads `lease.lost` for the reason)."""
    _thread.interrupt_main()


class OutputLease:
    """`with OutputLease(output, opts, job, force): ...` holds the output for one run.

    After `acquire`, `took_over` is the dead run's lease this run took over (None when
    the output was free), and `lost` says why the lease was lost, if it was.
    """

    def __init__(
        self,
        output: str,
        storage_options: dict,
        owner: str,
        force: bool = False,
        on_lost: Callable[[], None] = interrupt_driver,
    ):
        self.fs, root = open_fs(output, storage_options)
        self.path = posixpath.join(root, LEASE)
        self.output, self.owner, self.force, self.on_lost = output, owner, force, on_lost
        self.record: LeaseRecord | None = None
        self.took_over: LeaseRecord | None = None
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> LeaseRecord | None:
        try:
            return LeaseRecord(**json.loads(self.fs.cat_file(self.path)))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError):  # a damaged lease holds nothing
            return None

    def _write(self, record: LeaseRecord) -> None:
        write_atomic(self.fs, self.path, json.dumps(record.__dict__).encode())

    def _live(self, other: LeaseRecord, now: float) -> bool:
        stale = now - other.heartbeat > STALE_S
        orphaned = other.host == socket.gethostname() and _process_gone(other.pid)
        return not (stale or orphaned)

    def held_by_another(self, now: float) -> LeaseRecord | None:
        """The live lease of another run, if any (stale or orphaned leases don't count)."""
        other = self._read()
        if other is None or (self.record and other.token == self.record.token):
            return None
        return other if self._live(other, now) else None

    def acquire(self) -> None:
        now = time.time()
        previous = self._read()
        if previous is not None and self._live(previous, now) and not self.force:
            raise LeaseError(
                f"--output {self.output!r} is in use by another run: "
                f"{previous.describe(now)}; wait for it to end, use another output, or, if "
                f"that run is dead, rerun with --force-unlock (a lease with no heartbeat for "
                f"{STALE_S:.0f} s is taken over without it)"
            )
        self.fs.makedirs(posixpath.dirname(self.path), exist_ok=True)
        self.record = LeaseRecord(
            token=uuid.uuid4().hex,
            owner=self.owner,
            host=socket.gethostname(),
            pid=os.getpid(),
            started=now,
            heartbeat=now,
        )
        self._write(self.record)
        time.sleep(SETTLE_S)
        won = self._read()
        if won is None or won.token != self.record.token:
            self.record = None
            raise LeaseError(
                f"--output {self.output!r}: another run took it at the same moment "
                f"({won.describe(time.time()) if won else 'unknown'}); use another output"
            )
        self.took_over = previous
        self._thread = threading.Thread(target=self._beat, daemon=True, name="output-lease")
        self._thread.start()

    def _renew(self) -> None:
        """One heartbeat: the lease must still be ours (else LeaseError), then renew it."""
        current = self._read()
        if current is None or current.token != self.record.token:
            taker = current.describe(time.time()) if current else "someone removed it"
            raise LeaseError(f"--output {self.output!r}: this run's lease was taken by {taker}")
        self.record.heartbeat = time.time()
        self._write(self.record)

    def _lose(self, reason: str) -> None:
        self.lost = reason
        self._stop.set()
        self.on_lost()

    def _beat(self) -> None:
        last_renewed = time.time()
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._renew()
                last_renewed = time.time()
            except LeaseError as err:
                return self._lose(str(err))
            except Exception as err:  # noqa: BLE001 - retried until LOST_AFTER_S
                if time.time() - last_renewed > LOST_AFTER_S:
                    return self._lose(
                        f"--output {self.output!r}: the lease could not be renewed for "
                        f"{LOST_AFTER_S:.0f} s ({type(err).__name__}: {err})"
                    )

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        if self.record is not None and self.lost is None:
            try:
                current = self._read()
                if current is not None and current.token == self.record.token:
                    self.fs.rm(self.path)
            except OSError:  # an output that went away: nothing left to release
                pass
        self.record = None

    def __enter__(self) -> OutputLease:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
