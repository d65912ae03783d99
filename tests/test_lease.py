"""One run per output: the lease refuses a live second run, takes over dead ones."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from autosod_ray.data import lease as lease_mod
from autosod_ray.data.lease import LEASE, LeaseError, OutputLease


@pytest.fixture(autouse=True)
def quick(monkeypatch):
    monkeypatch.setattr(lease_mod, "SETTLE_S", 0.05)
    monkeypatch.setattr(lease_mod, "HEARTBEAT_S", 0.1)


def test_a_live_run_holds_the_output_and_renews_its_lease(tmp_path):
    with OutputLease(str(tmp_path), {}, "pseudolabel by ada"):
        first = json.loads((tmp_path / LEASE).read_text())
        with pytest.raises(LeaseError) as err:
            OutputLease(str(tmp_path), {}, "pseudolabel by bob").acquire()
        msg = str(err.value)
        assert "pseudolabel by ada" in msg and socket.gethostname() in msg
        assert f"pid {os.getpid()}" in msg and "--force-unlock" in msg
        time.sleep(0.35)
        assert json.loads((tmp_path / LEASE).read_text())["heartbeat"] > first["heartbeat"]
    assert not (tmp_path / LEASE).exists()  # released at the end


def _foreign(tmp_path, **change):
    record = {"token": "x", "owner": "train by eve", "host": "other-host", "pid": 1,
              "started": time.time(), "heartbeat": time.time(), **change}  # fmt: skip
    (tmp_path / LEASE).write_text(json.dumps(record))


def test_stale_orphaned_or_forced_leases_are_taken_over(tmp_path, monkeypatch):
    _foreign(tmp_path)
    with pytest.raises(LeaseError, match="train by eve"):
        OutputLease(str(tmp_path), {}, "me").acquire()
    with OutputLease(str(tmp_path), {}, "me", force=True):  # --force-unlock
        assert json.loads((tmp_path / LEASE).read_text())["owner"] == "me"
    _foreign(tmp_path, heartbeat=time.time() - lease_mod.STALE_S - 1)  # no heartbeat: stale
    with OutputLease(str(tmp_path), {}, "me"):
        pass
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout  # fmt: skip
    _foreign(tmp_path, host=socket.gethostname(), pid=int(dead))  # its driver was killed
    with OutputLease(str(tmp_path), {}, "me"):
        pass


RACER = """
import sys, time
from autosod_ray.data import lease
from autosod_ray.data.lease import LeaseError, OutputLease
output, opts = sys.argv[1], eval(sys.argv[2])
lease.HEARTBEAT_S = 0.2
held = OutputLease(output, opts, "racer", on_lost=lambda: None)
print("READY", flush=True)
start_at = float(sys.stdin.readline())
time.sleep(max(0.0, start_at - time.time()))
try:
    held.acquire()
except LeaseError as err:
    print("LOST", err, flush=True)
    sys.exit(0)
print("WON", flush=True)
time.sleep(2.0)
held.release()
"""


def race(output: str, opts: dict, env: dict | None = None) -> list[str]:
    """Two processes take the lease of `output` at the same instant: what each said."""
    procs = [
        subprocess.Popen([sys.executable, "-c", RACER, output, repr(opts)], env=env, text=True,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for _ in range(2)
    ]  # fmt: skip
    for p in procs:  # both are up, a lease object in hand
        assert p.stdout.readline().strip() == "READY"
    start_at = f"{time.time() + 0.5}\n"
    for p in procs:
        p.stdin.write(start_at)
        p.stdin.flush()
    return [p.communicate(timeout=60)[0] for p in procs]


@pytest.mark.parametrize("store", ["local", "s3"])
def test_of_two_processes_starting_together_exactly_one_wins(store, tmp_path, request):
    """No atomic create on object stores: a taker reads its token back after a moment,
    and of two real processes taking the lease at once, exactly one holds it."""
    if store == "s3":
        s3 = request.getfixturevalue("s3")
        import s3fs

        s3fs.S3FileSystem(endpoint_url=s3["endpoint"]).mkdir("leases")
        output, opts = "s3://leases/run", {"endpoint_url": s3["endpoint"]}
    else:
        output, opts = str(tmp_path / "run"), {}
    for _ in range(2):  # twice: the second race starts on a released lease
        said = race(output, opts, {**os.environ, "PYTHONPATH": os.getcwd()})
        assert sorted(line.split()[0] for line in said) == ["LOST", "WON"], said
        lost = next(line for line in said if line.startswith("LOST"))
        assert "racer" in lost and ("same moment" in lost or "in use by another run" in lost)


def test_a_run_whose_lease_was_taken_stops_and_names_the_taker(tmp_path):
    """The heartbeat reads the lease before renewing it: after a takeover (--force-unlock
    from elsewhere) the first run stops writing the lease and is told, with the taker."""
    lost = []
    first = OutputLease(str(tmp_path), {}, "pseudolabel by ada", on_lost=lambda: lost.append(1))
    first.acquire()
    with OutputLease(str(tmp_path), {}, "pseudolabel by bob", force=True):
        deadline = time.time() + 5
        while not lost and time.time() < deadline:
            time.sleep(0.05)
        assert lost and "taken by pseudolabel by bob" in first.lost
        time.sleep(0.3)  # the first run no longer writes: the lease stays bob's
        assert json.loads((tmp_path / LEASE).read_text())["owner"] == "pseudolabel by bob"
    first.release()  # leaves bob's lease alone (bob released it himself)
    assert not (tmp_path / LEASE).exists()


def test_a_heartbeat_that_keeps_failing_ends_the_run(tmp_path, monkeypatch):
    """Any exception in a heartbeat is retried; failing for LOST_AFTER_S gives the lease up
    (others would take it as stale) and tells the run, instead of ending silently."""
    monkeypatch.setattr(lease_mod, "LOST_AFTER_S", 0.3)
    lost = []
    held = OutputLease(str(tmp_path), {}, "me", on_lost=lambda: lost.append(1))
    held.acquire()

    def broken(record):
        raise RuntimeError("credentials expired")

    monkeypatch.setattr(held, "_write", broken)
    deadline = time.time() + 5
    while not lost and time.time() < deadline:
        time.sleep(0.05)
    assert lost and "could not be renewed" in held.lost and "credentials expired" in held.lost
    held.release()
