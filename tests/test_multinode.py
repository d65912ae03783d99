"""A three-node Ray cluster on one machine (head + two `ray start --address` nodes,
each with its own custom resource): jobs really spread over nodes, and survive
losing one."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import (
    copy_photos,
    free_port,
    job_env,
    ray_job_submit,
    run_script,
    start_ray_head,
    start_ray_node,
    start_script,
    stop_ray_node,
    wait_for,
)

N_IMAGES = 12
# 3 logical CPUs per node and 2 per POTNet actor: at most one actor per node,
# and a CPU left on each for the other stages
NODE_CPUS = 3
SPREAD = ["--set", "pipeline.num_cpus=2", "--set", "pipeline.pool_min=2"]
# one block per image (read and decode batches fuse): work to spread
SPREAD += ["--set", "pipeline.read_batch_size=1", "--set", "pipeline.decode_batch_size=1"]
SPREAD += ["--set", "pipeline.pool_max=3"]


def cluster_env(**extra) -> dict:
    """Ray refuses several nodes on one host unless told this is a cluster on purpose;
    every node is pinned to 127.0.0.1 by --node-ip-address."""
    return job_env(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1", **extra)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Head (resource node_head) and nodes w1, w2 (node_w1, node_w2) on 127.0.0.1."""
    temp = tmp_path_factory.mktemp("multinode")
    head = start_ray_head(temp, NODE_CPUS, "--resources", '{"node_head": 1}', env=cluster_env())
    nodes = {}
    try:
        for name in ("w1", "w2"):
            args = ["--address", head["address"], "--node-ip-address", "127.0.0.1"]
            args += ["--num-cpus", str(NODE_CPUS), "--resources", json.dumps({f"node_{name}": 1})]
            args += ["--dashboard-agent-listen-port", str(free_port())]
            nodes[name] = start_ray_node(args, temp / f"{name}.log", cluster_env())
            # one at a time: nodes on one host pick their socket names by what exists
            _wait_for_nodes(head, 1 + len(nodes), nodes, temp)
        yield {**head, "nodes": nodes}
    finally:
        for proc, log in nodes.values():
            stop_ray_node(proc, log)
        stop_ray_node(head["proc"], head["log"])


def _alive_nodes(head) -> list:
    from ray.util.state import list_nodes

    return [n for n in list_nodes(address=head["dashboard"]) if n.state == "ALIVE"]


def _wait_for_nodes(head, n: int, nodes: dict, temp: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while len(_alive_nodes(head)) < n:
        for name, (proc, _) in nodes.items():
            if proc.poll() is not None:
                pytest.fail(f"node {name} exited:\n" + (temp / f"{name}.log").read_text()[-2000:])
        if time.monotonic() > deadline:
            pytest.fail(f"only {len(_alive_nodes(head))} of {n} Ray nodes came up")
        time.sleep(1)


def _actor_nodes(head, marker: str) -> set[str]:
    """Node ids of every actor (alive or dead) whose class name contains `marker`."""
    from ray.util.state import list_actors

    return {
        a.node_id
        for a in list_actors(address=head["dashboard"], limit=10_000)
        if marker in a.class_name
    }


@pytest.fixture(scope="module")
def photos(tmp_path_factory, ecssd) -> Path:
    return copy_photos(tmp_path_factory.mktemp("photos"), ecssd, N_IMAGES)


def pseudolabel_args(photos: Path, out: Path, weights_path, *extra: str) -> list[str]:
    args = ["--config", "configs/smoke.yaml", "--input", str(photos), "--output", str(out)]
    return [*args, "--set", f"backbone.weights={weights_path}", *SPREAD, *extra]


def exactly_once(out: Path, n: int = N_IMAGES) -> None:
    masks = pd.read_parquet(out / "masks")
    assert sorted(masks.image_id) == [f"{i:04d}.jpg" for i in range(1, n + 1)]
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "complete" and run["duplicates"] == 0 and run["missing"] == 0


@pytest.fixture(scope="module")
def pseudo_masks(cluster, photos, tmp_path_factory, weights_path) -> Path:
    """pseudolabel submitted with `ray job submit` to the three-node cluster."""
    out = tmp_path_factory.mktemp("spread") / "run"
    res = ray_job_submit(
        cluster, ["jobs/pseudolabel.py", *pseudolabel_args(photos, out, weights_path)]
    )
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    return out


def test_pseudolabel_actors_run_on_several_nodes_exactly_once(cluster, pseudo_masks):
    exactly_once(pseudo_masks)
    assert len(_actor_nodes(cluster, "ModelStage")) >= 2


def test_train_workers_on_different_nodes(cluster, pseudo_masks, tmp_path, weights_path):
    out = tmp_path / "train"
    args = ["--config", "configs/train-smoke.yaml", "--pseudo-masks", str(pseudo_masks)]
    args += ["--output", str(out), "--set", f"backbone.weights={weights_path}"]
    args += ["--set", "scaling.placement_strategy=STRICT_SPREAD", "--set", "optim.max_steps=3"]
    args += ["--set", "optim.batch_size=2"]  # 3 steps = one pass over the 12 pseudo-masks
    res = run_script("jobs/train.py", args, cluster_env(RAY_ADDRESS=cluster["address"]))
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert len(_actor_nodes(cluster, "RayTrainWorker")) == 2
    assert any((out / "checkpoints").glob("checkpoint_*/state.pt"))
    assert json.loads((out / "train.json").read_text())["steps"] == 3


def _worker_node_with_actor(head, marker: str) -> tuple[str, str] | None:
    """(name, node id) of a non-head node where an actor named `marker` is alive."""
    from ray.util.state import list_actors

    names = {}
    for n in _alive_nodes(head):
        for name in ("w1", "w2"):
            if f"node_{name}" in (n.resources_total or {}):
                names[n.node_id] = name
    for a in list_actors(address=head["dashboard"], limit=10_000):
        if marker in a.class_name and a.state == "ALIVE" and a.node_id in names:
            return names[a.node_id], a.node_id
    return None


def test_losing_a_node_mid_job_still_ends_exactly_once(cluster, ecssd, tmp_path, weights_path):
    """Runs last: it takes a worker node away for good, while a POTNet actor is on it."""
    out = tmp_path / "run"
    # long enough that the state API, polled on a loaded machine, sees an actor on a worker
    # node before the job ends (36 images were done in 56 s once, before it could)
    photos = copy_photos(tmp_path / "photos", ecssd, 6 * N_IMAGES)
    args = pseudolabel_args(
        photos,
        out,
        weights_path,
        "--set",
        "pipeline.pool_min=3",
        "--set",
        "pipeline.rows_per_file=1",
        "--set",
        "pipeline.potnet_batch_size=1",
    )
    proc = start_script("jobs/pseudolabel.py", args, cluster_env(RAY_ADDRESS=cluster["address"]))
    wait_for(lambda: _worker_node_with_actor(cluster, "ModelStage"), proc)
    name, lost = _worker_node_with_actor(cluster, "ModelStage")
    node, log = cluster["nodes"][name]
    stop_ray_node(node, log, signal.SIGKILL)  # the node and every process on it die at once
    stdout, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, stdout[-4000:]
    exactly_once(out, 6 * N_IMAGES)
    deadline = time.monotonic() + 120  # Ray marks a node dead after missed health checks
    while lost in {n.node_id for n in _alive_nodes(cluster)} and time.monotonic() < deadline:
        time.sleep(2)
    assert lost not in {n.node_id for n in _alive_nodes(cluster)}
