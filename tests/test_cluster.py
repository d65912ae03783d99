"""Cluster definitions: Ray's own autoscaler schema for `ray up`, and KubeRay
manifests whose entrypoints name files and configs that exist here."""

from __future__ import annotations

import copy
import shlex

import pytest
import yaml

from autosod_ray.config import PseudolabelConfig, TrainConfig, load_config
from tests.conftest import REPO

LAUNCHERS = ["cluster/aws.yaml", "cluster/gcp.yaml"]
RAYJOBS = {
    "cluster/kuberay/rayjob-pseudolabel.yaml": ("jobs/pseudolabel.py", PseudolabelConfig),
    "cluster/kuberay/rayjob-train.yaml": ("jobs/train.py", TrainConfig),
}


def ray_validate(config: dict) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


@pytest.mark.parametrize("path", LAUNCHERS)
def test_launcher_passes_rays_autoscaler_schema(path):
    config = yaml.safe_load((REPO / path).read_text())
    ray_validate(config)
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}
    gpu, cpu = types["gpu_worker"], types["cpu_worker"]
    assert gpu["min_workers"] == 0 < gpu["max_workers"] and cpu["min_workers"] == 0
    assert config["idle_timeout_minutes"] > 0
    assert config["docker"]["image"].startswith("rayproject/ray:2.60.0")  # the Ray we pin
    installs = " ".join(config["setup_commands"])
    assert "torch==2.14.1" in installs and "/home/ray/autosod-ray[gpu]" in installs
    assert config["file_mounts"]["/home/ray/autosod-ray"] == "."


def test_the_schema_check_can_fail():
    config = yaml.safe_load((REPO / LAUNCHERS[0]).read_text())
    config["available_node_types"]["gpu_worker"]["max_wokers"] = 4  # a typo
    with pytest.raises(Exception, match="max_wokers"):
        ray_validate(config)


def test_raycluster_autoscales_gpu_and_cpu_groups():
    doc = yaml.safe_load((REPO / "cluster/kuberay/raycluster.yaml").read_text())
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayCluster")
    assert doc["spec"]["enableInTreeAutoscaling"] is True
    assert doc["spec"]["rayVersion"] == "2.60.0"
    groups = {g["groupName"]: g for g in doc["spec"]["workerGroupSpecs"]}
    gpu = groups["gpu"]
    assert gpu["minReplicas"] == 0 < gpu["maxReplicas"]
    container = gpu["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert (
        "nvidia.com/gpu"
        not in groups["cpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    )
    for group in [doc["spec"]["headGroupSpec"], *groups.values()]:
        env = group["template"]["spec"]["containers"][0]["envFrom"]
        assert {"secretRef": {"name": "autosod-s3"}} in env  # S3 credentials from a Secret


@pytest.mark.parametrize("path", sorted(RAYJOBS))
def test_rayjob_entrypoint_runs_a_job_of_this_repo(path):
    doc = yaml.safe_load((REPO / path).read_text())
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    assert doc["spec"]["clusterSelector"] == {"ray.io/cluster": "autosod"}
    argv = shlex.split(doc["spec"]["entrypoint"])
    script, schema = RAYJOBS[path]
    assert argv[0] == "python" and argv[1] == f"/app/{script}"  # the image puts the repo at /app
    assert (REPO / script).is_file()
    config = argv[argv.index("--config") + 1].removeprefix("/app/")
    assert (REPO / config).is_file()
    overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    load_config(schema, REPO / config, overrides)  # the config and its overrides validate
    container = doc["spec"]["submitterPodTemplate"]["spec"]["containers"][0]
    assert {"secretRef": {"name": "autosod-s3"}} in container["envFrom"]


def test_dockerfile_puts_the_repo_where_the_manifests_look():
    text = (REPO / "cluster/Dockerfile").read_text()
    assert "FROM rayproject/ray:2.60.0" in text and "COPY --chown=ray:users . /app" in text
    assert 'pip install --no-cache-dir -e "/app[gpu]"' in text
