"""A cluster only its owner can drive, and no secret in any output.

One real Ray head started with token authentication (RAY_AUTH_MODE=token, a token made by
`ray get-auth-token --generate` into a temporary HOME, never the machine's ~/.ray) serves
the whole module. It holds fake AWS keys in its environment, as a node's instance profile
would give them: a pseudolabel job reads and writes S3 (moto) with them, and then none of
them may appear in anything the job leaves behind.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from autosod_ray.config import PseudolabelConfig, TrainConfig, load_config, redact_url
from tests.conftest import REPO, free_port, job_env, start_ray_node, stop_ray_node
from tests.test_pseudolabel import check_output, job_args

# distinctive fake credentials: any occurrence in an output is a leak, never a coincidence
FAKE_KEY_ID = "AKIAFAKEAUTOSOD7Q2X9"
FAKE_SECRET = "fakeSecretAutosod/k9Qz+Wq3Lm7Np2Rt5Vx8Yb"
ENDPOINT_PASSWORD = "endpointPassw0rdAutosod"


def auth_env(**extra: str) -> dict:
    """A job environment with no inherited token: only what the caller names."""
    env = job_env()
    for name in (
        "RAY_AUTH_TOKEN",
        "RAY_AUTH_TOKEN_PATH",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
    ):
        env.pop(name, None)
    return {**env, **extra}


def dashboard_status(url: str, token: str | None = None) -> int:
    """HTTP status of GET `url` (with `Authorization: Bearer <token>` when given)."""
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code


def generate_token(home: Path) -> Path:
    """`ray get-auth-token --generate` (README's step) with HOME at `home`; the token's file."""
    res = subprocess.run(
        ["ray", "get-auth-token", "--generate"],
        env=auth_env(HOME=str(home)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    path = home / ".ray" / "auth_token"
    assert res.returncode == 0 and path.is_file(), res.stderr[-2000:]
    assert res.stdout.strip() == path.read_text().strip()  # it prints the token it saved
    return path


@pytest.fixture(scope="module")
def token_head(tmp_path_factory):
    """A Ray head on 127.0.0.1 with token authentication, and fake AWS keys in its env."""
    temp = tmp_path_factory.mktemp("tok")  # short: Ray's socket paths must fit 107 bytes
    token_path = generate_token(temp / "home")
    env = auth_env(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token_path),
        AWS_ACCESS_KEY_ID=FAKE_KEY_ID,
        AWS_SECRET_ACCESS_KEY=FAKE_SECRET,
        AWS_DEFAULT_REGION="us-east-1",
    )
    port, dash = free_port(), free_port()
    (temp / "r").mkdir()
    args = ["--head", "--port", str(port), "--node-ip-address", "127.0.0.1"]
    args += ["--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash)]
    args += ["--include-dashboard", "true", "--num-cpus", "2"]
    args += ["--dashboard-agent-listen-port", str(free_port()), "--temp-dir", str(temp / "r")]
    proc, log = start_ray_node(args, temp / "head.log", env)
    url = f"http://127.0.0.1:{dash}"
    token = token_path.read_text().strip()
    deadline = time.monotonic() + 120
    # /api/version is not public under token auth: its 200 needs the token
    while True:
        try:
            if dashboard_status(f"{url}/api/version", token) == 200:
                break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_ray_node(proc, log)
            pytest.fail(
                "token-auth head did not start:\n" + (temp / "head.log").read_text()[-3000:]
            )
        time.sleep(1)
    yield {
        "address": f"127.0.0.1:{port}",
        "dashboard": url,
        "token": token,
        "token_path": token_path,
        "temp": temp,
    }
    stop_ray_node(proc, log)


def submit(head: dict, job: list[str], env: dict) -> subprocess.CompletedProcess:
    """README's `ray job submit --address ... --working-dir . -- python ...`, in `env`."""
    cmd = ["ray", "job", "submit", "--address", head["dashboard"], "--working-dir", str(REPO)]
    return subprocess.run(
        [*cmd, "--", "python", *job], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )


def owner_env(head: dict) -> dict:
    """The owner's shell after README's steps: token mode on, the cluster's token file."""
    return auth_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(head["token_path"]))


def pseudolabel_args(input_uri: str, output_uri: str, weights: Path, *extra: str) -> list[str]:
    """The pseudolabel job's smoke arguments (test_pseudolabel's), as `ray job submit` runs it."""
    return ["jobs/pseudolabel.py", *job_args(input_uri, output_uri, weights, *extra)]


def head_jobs(head: dict) -> list[dict]:
    """Every job the head knows, as its job API shows them to the owner (entrypoint,
    runtime env, metadata, message)."""
    req = urllib.request.Request(
        f"{head['dashboard']}/api/jobs/", headers={"Authorization": f"Bearer {head['token']}"}
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)


# ---------------------------------------------------------------- refused without the token


def test_dashboard_answers_only_the_token(token_head):
    jobs = f"{token_head['dashboard']}/api/jobs/"
    assert dashboard_status(jobs) == 401  # no token
    assert dashboard_status(jobs, "not-the-token") == 403  # a wrong one
    assert dashboard_status(jobs, token_head["token"]) == 200


def test_ray_job_submit_without_the_token_is_refused(token_head, tmp_path, weights_path, ecssd):
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(ecssd / "images" / "0001.jpg", images)
    for name, env, said in [
        ("none", auth_env(RAY_AUTH_MODE="disabled"), "no authentication token was found"),
        (
            "wrong",
            auth_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="x" * 64),
            "Invalid authentication",
        ),
    ]:
        out = tmp_path / f"out-{name}"
        res = submit(token_head, pseudolabel_args(str(images), str(out), weights_path), env)
        assert res.returncode != 0, res.stdout[-2000:]
        assert said in res.stdout + res.stderr, (res.stdout + res.stderr)[-2000:]
        assert not out.exists()  # the job never ran
        assert not any(str(out) in j["entrypoint"] for j in head_jobs(token_head))  # nor queued


def test_gcs_refuses_a_driver_without_the_token(token_head):
    code = f"import ray; ray.init(address={token_head['address']!r}); print('CONNECTED')"
    res = subprocess.run(
        [sys.executable, "-c", code],
        env=auth_env(RAY_AUTH_MODE="disabled"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode != 0 and "CONNECTED" not in res.stdout
    assert "authentication token is missing" in res.stderr.lower(), res.stderr[-2000:]


# ---------------------------------------------------------------- the owner's job, and no secret


def s3_haystack(fs, root: str) -> dict[str, str]:
    """Every object under `root` as text: raw bytes, and Parquet tables decoded (their
    strings may sit compressed in the file)."""
    texts = {}
    for path in fs.find(root):
        raw = fs.cat_file(path)
        texts[path] = raw.decode("utf-8", errors="replace")
        if path.endswith(".parquet"):
            texts[path + " (decoded)"] = pd.read_parquet(io.BytesIO(raw)).to_csv()
    return texts


def log_haystack(ray_temp: Path) -> dict[str, str]:
    """Every log file of the Ray sessions under `ray_temp` (not the uploaded working dir:
    that is this repository, this file with its fake keys included)."""
    return {
        str(p): p.read_bytes().decode("utf-8", errors="replace")
        for p in ray_temp.glob("session_*/logs/**/*")
        if p.is_file() and not p.is_symlink()
    }


def leaks(haystack: dict[str, str], secrets: list[str]) -> list[str]:
    return [f"{s!r} in {where}" for where, text in haystack.items() for s in secrets if s in text]


def test_owner_submits_pseudolabel_on_s3_and_no_secret_is_anywhere(
    token_head, s3, monkeypatch, weights_path, dataset
):
    """README's secure cluster end to end: the owner submits pseudolabel on S3 (test_pseudolabel's
    awkward and bad files: every input in exactly one table, read from and written to S3);
    no credential is in any output, log or job record."""
    import s3fs

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", FAKE_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    fs = s3fs.S3FileSystem(endpoint_url=s3["endpoint"], key=FAKE_KEY_ID, secret=FAKE_SECRET)
    fs.mkdir("secbucket")
    fs.put(str(dataset), "secbucket/images", recursive=True)
    args = pseudolabel_args(
        "s3://secbucket/images",
        "s3://secbucket/out",
        weights_path,
        "--set",
        f"storage.endpoint_url={s3['endpoint']}",
    )
    # no keys in the submission: the head's environment holds them (an instance profile's role)
    res = submit(token_head, args, owner_env(token_head))
    said = res.stdout + res.stderr
    assert res.returncode == 0, said[-4000:]
    assert "succeeded" in res.stdout and "labelled  12" in res.stdout
    assert "errors    5" in res.stdout

    outputs = s3_haystack(fs, "secbucket/out")
    run = json.loads(fs.cat_file("secbucket/out/run.json"))
    assert run["status"] == "complete with input errors"
    assert run["config"]["refine"]["method"] == "guided"  # the edge refinement, by default
    # run.json holds the config's dump: the one test_endpoint_credentials_never_shown redacts
    assert run["config"]["storage"]["endpoint_url"] == s3["endpoint"]
    masks, errors = (
        pd.concat(
            pd.read_parquet(io.BytesIO(fs.cat_file(p))) for p in fs.glob(f"secbucket/out/{t}/*")
        )
        for t in ("masks", "errors")
    )
    assert masks.source_uri.str.startswith("s3://secbucket/images/").all()
    check_output(masks, errors)
    haystack = {
        **outputs,
        "ray job submit's stdout and stderr (the job's logs)": said,
        "the head's job API": json.dumps(head_jobs(token_head)),
        **log_haystack(token_head["temp"] / "r"),  # the driver's, workers', raylet's, GCS' logs
    }
    # the scan reads what it claims to: the run's own strings are found in it
    assert any("secbucket/images" in t for w, t in haystack.items() if "run.json" in w)
    assert any("bad/empty.jpg" in t for w, t in haystack.items() if "(decoded)" in w)
    assert any("raylet" in w for w in haystack)
    assert "s3://secbucket/out" in haystack["the head's job API"]
    assert not leaks(haystack, [FAKE_KEY_ID, FAKE_SECRET, token_head["token"]])


# ---------------------------------------------------------------- credentials in an endpoint URL


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://minio:9000", "http://minio:9000"),
        (f"http://user:{ENDPOINT_PASSWORD}@minio:9000", "http://***@minio:9000"),
        (f"https://AKIA:{ENDPOINT_PASSWORD}@h/p?x=1", "https://***@h/p?x=1"),
        (f"http://user:pa/ss{ENDPOINT_PASSWORD}@h:1/x", "http://***@h:1/x"),  # unescaped /
        (f"user:{ENDPOINT_PASSWORD}@h", "***@h"),  # no scheme
    ],
)
def test_redact_url(url, shown):
    assert redact_url(url) == shown


def test_endpoint_credentials_never_shown(tmp_path):
    endpoint = f"http://autosod:{ENDPOINT_PASSWORD}@127.0.0.1:9000"
    flags = {"input": str(tmp_path / "in"), "output": str(tmp_path / "out")}
    sets = [f"storage.endpoint_url={endpoint}"]
    cfg = load_config(PseudolabelConfig, REPO / "configs/smoke.yaml", sets, flags)
    train = load_config(TrainConfig, REPO / "configs/train-smoke.yaml", sets)
    assert cfg.storage.endpoint_url == endpoint  # kept as given ...
    assert cfg.storage.options("s3://b/k")["endpoint_url"] == endpoint  # ... and used so
    dumped = cfg.model_dump(mode="json")  # run.json's "config" (train.json's for train)
    assert dumped["storage"]["endpoint_url"] == "http://***@127.0.0.1:9000"
    shown = [
        json.dumps(dumped),
        json.dumps(train.model_dump(mode="json")),
        cfg.model_dump_json(),
        repr(cfg),
        str(cfg),
        repr(train.storage),
        str(cfg.model_dump()),
    ]
    assert all("***@127.0.0.1:9000" in s for s in shown)
    assert not [s for s in shown if ENDPOINT_PASSWORD in s]
