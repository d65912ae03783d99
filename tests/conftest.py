"""Shared fixtures. Real assets come from ../shared (override with AUTOSOD_SHARED)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from autosod_ray.config import BackboneConfig

REPO = Path(__file__).resolve().parents[1]
DINOV2 = "vit_small_patch14_dinov2.lvd142m"

# Ray on one test machine: stay on 127.0.0.1, quiet logs, no token auth (tests only)
RAY_TEST_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "RAY_AUTH_MODE": "disabled",
}
os.environ.update(RAY_TEST_ENV)


def job_env(**extra) -> dict:
    """Environment for a job subprocess: this checkout first on the path, no inherited Ray."""
    env = {**os.environ, **RAY_TEST_ENV, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    return {**env, **extra}


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    path = Path(os.environ.get("AUTOSOD_SHARED", REPO.parent / "shared")).resolve()
    if not (path / "weights").is_dir() or not (path / "data").is_dir():
        pytest.fail(f"shared assets not found at {path}; set AUTOSOD_SHARED to the shared folder")
    return path


@pytest.fixture(scope="session")
def weights_path(shared_dir) -> Path:
    return shared_dir / "weights" / "dinov2_vits14_imgfocus.fp16.safetensors"


@pytest.fixture(scope="session")
def backbone_cfg(weights_path) -> BackboneConfig:
    """The offline DINOv2 ViT-S/14 at a small input size (fast on 2 CPU cores)."""
    return BackboneConfig(name=DINOV2, weights=str(weights_path), image_size=224, device="cpu")


@pytest.fixture(scope="session")
def extractor(backbone_cfg):
    from autosod_ray.backbone import ViTFeatures

    return ViTFeatures(backbone_cfg)


@pytest.fixture(scope="session")
def ecssd(shared_dir) -> Path:
    return shared_dir / "data" / "ecssd"


def blob_features(b=2, h=12, w=12, d=32, noise=0.6, seed=0):
    """Synthetic unit patch features: a disc of one direction on a background of another."""
    from autosod_ray.potnet.ops import l2_normalize

    rng = np.random.default_rng(seed)
    fg_dir, bg_dir = rng.normal(size=d), rng.normal(size=d)
    yy, xx = np.mgrid[:h, :w]
    fg = ((yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (min(h, w) / 3) ** 2).ravel()
    x = np.where(fg[None, :, None], fg_dir, bg_dir) + noise * rng.normal(size=(b, h * w, d))
    attn = np.where(fg, 1.0, 0.2)[None].repeat(b, 0)
    attn = attn / attn.sum(-1, keepdims=True)
    return l2_normalize(x.astype(np.float32)), attn.astype(np.float32), fg


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def s3(monkeypatch):
    """A real S3 endpoint on 127.0.0.1 (moto server), stopped at the end."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    creds = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    for k, v in creds.items():
        monkeypatch.setenv(k, v)
    yield {"endpoint": f"http://127.0.0.1:{port}", "env": creds}
    server.stop()


def start_ray_node(
    args: list[str], log_path: Path, env: dict | None = None
) -> tuple[subprocess.Popen, object]:
    """`ray start --block ...` in its own session, so the test can stop exactly it.

    Its SIGTERM stops it at once: Ray's drain on SIGTERM (for preemptible nodes) would wait
    up to 30 s for the leases that finished jobs leave on a test node.
    """
    log = open(log_path, "w")  # noqa: SIM115 - closed by stop_ray_node
    proc = subprocess.Popen(
        ["ray", "start", "--block", *args],
        env={**(env or job_env()), "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return proc, log


def stop_ray_node(proc: subprocess.Popen, log, sig=signal.SIGTERM) -> None:
    """Stop a node by its own processes (never `ray stop`, which stops every Ray).

    SIGTERM goes to `ray start --block` alone, which stops its own daemons; whatever of its
    process group outlives it is ended too. SIGKILL: the whole group at once, a node lost.
    """
    if proc.poll() is None:
        if sig == signal.SIGKILL:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    _end_group(proc.pid)
    log.close()


def _end_group(pgid: int, grace: float = 10.0) -> None:
    """SIGTERM what is left of a process group we started, SIGKILL it after `grace` s."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 0.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


def start_ray_head(temp: Path, num_cpus: int, *extra: str, env: dict | None = None) -> dict:
    """A Ray head on 127.0.0.1 with its dashboard (for `ray job submit`), ready to use."""
    port, dash = free_port(), free_port()
    args = ["--head", "--port", str(port), "--node-ip-address", "127.0.0.1"]
    args += ["--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash)]
    args += ["--include-dashboard", "true", "--num-cpus", str(num_cpus)]
    args += ["--dashboard-agent-listen-port", str(free_port()), "--temp-dir", str(temp), *extra]
    proc, log = start_ray_node(args, temp / "head.log", env)
    url = f"http://127.0.0.1:{dash}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                stop_ray_node(proc, log)
                pytest.fail("ray head did not start:\n" + (temp / "head.log").read_text()[-3000:])
            time.sleep(1)
    return {
        "address": f"127.0.0.1:{port}",
        "dashboard": url,
        "session": proc.pid,
        "proc": proc,
        "log": log,
    }


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory):
    """A one-node Ray head with 4 logical CPUs, shared by the job tests."""
    head = start_ray_head(tmp_path_factory.mktemp("ray"), 4)
    yield head
    stop_ray_node(head["proc"], head["log"])


# our metric keys -> PySODMetrics' names in version_performance.json
PYSOD_REFERENCE_NAMES = {
    "Sm": "Smeasure",
    "wF": "wFmeasure",
    "MAE": "MAE",
    "maxF": "maxFm",
    "meanF": "meanFm",
    "adpF": "adpFm",
    "maxE": "maxEm",
    "meanE": "meanEm",
    "adpE": "adpEm",
}


def ray_job_submit(ray_head, job: list[str], env_vars: dict | None = None):
    """`ray job submit` of a repo job to the test head; returns the finished process."""
    extra = ["--runtime-env-json", json.dumps({"env_vars": env_vars})] if env_vars else []
    cmd = ["ray", "job", "submit", "--address", ray_head["dashboard"], "--working-dir", str(REPO)]
    return subprocess.run(
        [*cmd, *extra, "--", "python", *job],
        cwd=REPO,
        env=job_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )


def run_script(script: str, args: list[str], env: dict, timeout: int = 400):
    """Run `python <script> ...` from the repo root; returns the finished process."""
    return subprocess.run(
        [sys.executable, script, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_script(script: str, args: list[str], env: dict) -> subprocess.Popen:
    """Start `python <script> ...` in its own session (so a test can kill all of it)."""
    return subprocess.Popen(
        [sys.executable, script, *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def wait_for(condition, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Poll `condition` until true; fail if `proc` ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail("job ended before the failure could be injected:\n" + proc.stdout.read())
        if time.monotonic() > deadline:
            pytest.fail("timed out waiting for the job to make progress")
        time.sleep(0.3)


def driver_of(supervisor: int) -> int:
    """The driver of a job started with start_script: the child its supervisor started."""
    children = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
    return int(children[0])


def head_process(ray_head, marker: str) -> int | None:
    """PID of a process of our own Ray head whose command line contains `marker`."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            mine = os.getsid(int(entry.name)) == ray_head["session"]
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if mine and marker in cmdline:
            return int(entry.name)
    return None


def copy_photos(root: Path, ecssd: Path, n: int) -> Path:
    """The first `n` ECSSD photos (0001.jpg ...) copied into `root`."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(1, n + 1):
        shutil.copy(ecssd / "images" / f"{i:04d}.jpg", root / f"{i:04d}.jpg")
    return root


# ---------------------------------------------------------------- a folder of awkward inputs

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
    "bad/bomb.png": "decompression-bomb guard: 1200 x 1000 pixels > max_pixels 1000000 "
    "(raise potnet.max_pixels to allow)",
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
