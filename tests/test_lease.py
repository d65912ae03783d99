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


def test_of_two_runs_starting_together_only_one_wins(tmp_path, monkeypatch):
    """No atomic create on object stores: the taker reads its token back after a moment,
    and a rival that wrote meanwhile wins."""
    monkeypatch.setattr(lease_mod.time, "sleep", lambda seconds: _foreign(tmp_path))
    with pytest.raises(LeaseError, match="at the same moment"):
        OutputLease(str(tmp_path), {}, "a").acquire()
    assert json.loads((tmp_path / LEASE).read_text())["owner"] == "train by eve"
