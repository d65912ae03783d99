"""Cluster definitions: Ray's own autoscaler schema for `ray up`, and KubeRay
manifests whose entrypoints name files and configs that exist here."""

from __future__ import annotations

import copy
import json
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
    assert "envFrom" not in container  # it only submits: no S3 keys (least privilege)


def test_dockerfile_puts_the_repo_where_the_manifests_look():
    text = (REPO / "cluster/Dockerfile").read_text()
    assert "FROM rayproject/ray:2.60.0" in text and "COPY --chown=ray:users . /app" in text
    assert 'pip install --no-cache-dir -e "/app[gpu]"' in text


# ---------------------------------------------------------------- only the owner can drive it
# Pure checks, each returning what is wrong with a definition (empty: nothing), so that a
# test can show each one catching the mistake it is for.

RAY_PORTS = (6379, 8265, 10001)  # GCS, dashboard, client server
WORLD = ("0.0.0.0/0", "::/0")
TOKEN_FILE = "/home/ray/.ray/auth_token"  # where `ray up` puts the owner's token on each node


def _start_commands(config: dict) -> list[str]:
    return [
        c for key in ("head_start_ray_commands", "worker_start_ray_commands") for c in config[key]
    ]


def launcher_auth_problems(config: dict, text: str) -> list[str]:
    """Token auth on every `ray start`, the token from a file `ray up` copies, never inline."""
    problems = []
    starts = [c for c in _start_commands(config) if "ray start" in c]
    if len(starts) < 2:
        problems.append("a head and a worker `ray start` command are expected")
    for cmd in starts:
        if "RAY_AUTH_MODE=token" not in cmd:
            problems.append(f"`ray start` without RAY_AUTH_MODE=token: {cmd!r}")
        if f"RAY_AUTH_TOKEN_PATH={TOKEN_FILE}" not in cmd:
            problems.append(f"`ray start` without RAY_AUTH_TOKEN_PATH={TOKEN_FILE}: {cmd!r}")
    if config["file_mounts"].get(TOKEN_FILE) != "~/.ray/auth_token":
        problems.append(f"file_mounts must copy ~/.ray/auth_token to {TOKEN_FILE}")
    if "RAY_AUTH_MODE=disabled" in text or "RAY_AUTH_TOKEN=" in text:
        problems.append("authentication turned off, or a token written into the file")
    return problems


def launcher_network_problems(config: dict) -> list[str]:
    """The dashboard on 127.0.0.1 (the SSH tunnel's end); no rule opening a port but SSH to
    the world; every node in the group those rules make."""
    problems = []
    for cmd in _start_commands(config):
        if "ray start --head" in cmd and "--dashboard-host=127.0.0.1" not in cmd:
            problems.append(f"the head's dashboard must listen on 127.0.0.1 only: {cmd!r}")
        if "--dashboard-host" in cmd and "--dashboard-host=127.0.0.1" not in cmd:
            problems.append(f"a dashboard open beyond 127.0.0.1: {cmd!r}")
    rules = config["provider"].get("security_group", {}).get("IpPermissions", [])
    for rule in rules:
        ranges = [r.get("CidrIp") for r in rule.get("IpRanges", [])]
        ranges += [r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])]
        if any(r in WORLD for r in ranges) and (rule.get("FromPort"), rule.get("ToPort")) != (
            22,
            22,
        ):
            problems.append(f"a security-group rule opens more than SSH to the world: {rule}")
    for name, node in config["available_node_types"].items():
        if "SecurityGroupIds" in node["node_config"]:
            problems.append(f"{name}: SecurityGroupIds bypass the cluster's own group")
        for iface in node["node_config"].get("networkInterfaces", []):
            problems.append(f"{name}: networkInterfaces replace the tagged default: {iface}")
    return problems


def _covers(rule: dict, key: str, port: int) -> bool:
    for entry in rule.get(key, []):
        if entry["IPProtocol"] == "all":
            return True
        for spec in entry.get("ports", ["0-65535"]) if entry["IPProtocol"] == "tcp" else []:
            low, _, high = str(spec).partition("-")
            if int(low) <= port <= int(high or low):
                return True
    return False


def gcp_firewall_problems(doc: dict, tag: str) -> list[str]:
    """Allow from the world only SSH; deny GCS / dashboard / client from the world above the
    network's own allow rules (priority 65534), below the cluster's internal allow."""
    problems = []
    rules = [r for r in doc["rules"] if tag in r.get("targetTags", [])]
    internal = [r for r in rules if r.get("sourceTags") == [tag] and _covers(r, "allowed", 6379)]
    for rule in rules:
        if set(rule.get("sourceRanges", [])) & set(WORLD) and rule.get("allowed"):
            if any(_covers(rule, "allowed", p) for p in RAY_PORTS) or any(
                e.get("ports") != ["22"] for e in rule["allowed"]
            ):
                problems.append(f"{rule['name']} opens more than SSH to the world")
    for port in RAY_PORTS:
        deny = [
            r
            for r in rules
            if set(r.get("sourceRanges", [])) & set(WORLD) and _covers(r, "denied", port)
        ]
        if not deny or not all(r["priority"] < 65534 for r in deny):
            problems.append(f"port {port} is not denied to the world above the default rules")
        elif not internal or min(r["priority"] for r in internal) >= min(
            r["priority"] for r in deny
        ):
            problems.append(f"port {port}: the cluster's own nodes must be allowed before the deny")
    return problems


@pytest.mark.parametrize("path", LAUNCHERS)
def test_launcher_needs_the_owners_token_and_opens_nothing_to_the_world(path):
    text = (REPO / path).read_text()
    config = yaml.safe_load(text)
    assert launcher_auth_problems(config, text) == []
    assert launcher_network_problems(config) == []


def test_gcp_nodes_carry_the_firewalled_tag():
    config = yaml.safe_load((REPO / "cluster/gcp.yaml").read_text())
    firewall = yaml.safe_load((REPO / "cluster/gcp-firewall.yaml").read_text())
    for name, node in config["available_node_types"].items():
        assert node["node_config"]["tags"]["items"] == ["autosod-ray"], name
    assert gcp_firewall_problems(firewall, "autosod-ray") == []


LAUNCHER_MISTAKES = {
    "dashboard on 0.0.0.0": lambda c: c["head_start_ray_commands"].__setitem__(
        1, c["head_start_ray_commands"][1].replace("127.0.0.1", "0.0.0.0")
    ),
    "auth off on workers": lambda c: c["worker_start_ray_commands"].__setitem__(
        1,
        c["worker_start_ray_commands"][1].replace("RAY_AUTH_MODE=token", "RAY_AUTH_MODE=disabled"),
    ),
    "no token file": lambda c: c["file_mounts"].pop(TOKEN_FILE),
    "dashboard port to the world": lambda c: (
        c["provider"]
        .setdefault("security_group", {})
        .setdefault("IpPermissions", [])
        .append(
            {
                "FromPort": 8265,
                "ToPort": 8265,
                "IpProtocol": "tcp",
                "IpRanges": [{"CidrIp": "0.0.0.0/0"}],
            }
        )
    ),
    "own security group": lambda c: c["available_node_types"]["head"]["node_config"].__setitem__(
        "SecurityGroupIds", ["sg-123"]
    ),
}


@pytest.mark.parametrize("mistake", sorted(LAUNCHER_MISTAKES))
def test_the_launcher_checks_catch_each_mistake(mistake):
    text = (REPO / LAUNCHERS[0]).read_text()
    config = yaml.safe_load(text)
    LAUNCHER_MISTAKES[mistake](config)
    text = yaml.safe_dump(config)
    assert launcher_auth_problems(config, text) + launcher_network_problems(config)


@pytest.mark.parametrize(
    "mistake",
    ["allow 8265 from the world", "drop the deny", "deny below the default rules", "no internal"],
)
def test_the_firewall_check_catches_each_mistake(mistake):
    doc = yaml.safe_load((REPO / "cluster/gcp-firewall.yaml").read_text())
    rules = {r["name"]: r for r in doc["rules"]}
    if mistake == "allow 8265 from the world":
        rules["autosod-ray-ssh"]["allowed"][0]["ports"] = ["22", "8265"]
    elif mistake == "drop the deny":
        doc["rules"].remove(rules["autosod-ray-deny-ray-ports"])
    elif mistake == "deny below the default rules":
        rules["autosod-ray-deny-ray-ports"]["priority"] = 65535
    else:
        doc["rules"].remove(rules["autosod-ray-internal"])
    assert gcp_firewall_problems(doc, "autosod-ray")


def kuberay_problems(docs: dict[str, list[dict]]) -> list[str]:
    """authOptions token on the RayCluster; each RayJob's submitter sends the token of that
    same Secret; the head's Service a ClusterIP; nothing exposes it or turns auth off."""
    problems = []
    flat = [(path, d) for path, ds in docs.items() for d in ds if d]
    clusters = [d for _, d in flat if d["kind"] == "RayCluster"]
    secret = None
    for cluster in clusters:
        auth = cluster["spec"].get("authOptions") or {}
        secret = auth.get("secretName")
        if auth.get("mode") != "token" or not secret:
            problems.append(f"RayCluster {cluster['metadata']['name']}: authOptions token + Secret")
        if cluster["spec"]["headGroupSpec"].get("serviceType") != "ClusterIP":
            problems.append("the head's Service must be a ClusterIP")
    for path, doc in flat:
        if doc["kind"] in ("Ingress", "Route") or doc.get("spec", {}).get("type") in (
            "LoadBalancer",
            "NodePort",
        ):
            problems.append(f"{path}: {doc['kind']} exposes the cluster")
        if doc["kind"] == "RayJob":
            spec = doc["spec"]["submitterPodTemplate"]["spec"]["containers"][0]
            env = {e["name"]: e for e in spec.get("env", [])}
            ref = env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef", {})
            if env.get("RAY_AUTH_MODE", {}).get("value") != "token":
                problems.append(f"{path}: the submitter must run with RAY_AUTH_MODE=token")
            if ref != {"name": secret, "key": "auth_token"}:
                problems.append(f"{path}: the submitter's token must come from Secret {secret}")
    for path, doc in flat:
        for container in _containers(doc):
            for e in container.get("env", []):
                if e["name"] == "RAY_AUTH_MODE" and e.get("value") != "token":
                    problems.append(f"{path}: RAY_AUTH_MODE={e.get('value')}")
                if e["name"] == "RAY_AUTH_TOKEN" and "value" in e:
                    problems.append(f"{path}: a token written into the manifest")
    return problems


def _containers(doc: dict) -> list[dict]:
    spec = doc.get("spec", {})
    templates = []
    if "headGroupSpec" in spec:
        templates = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    pods = [g["template"] for g in templates]
    if "submitterPodTemplate" in spec:
        pods.append(spec["submitterPodTemplate"])
    return [c for pod in pods for c in pod["spec"]["containers"]]


def _kuberay_docs() -> dict[str, list[dict]]:
    return {
        str(p.relative_to(REPO)): list(yaml.safe_load_all(p.read_text()))
        for p in sorted((REPO / "cluster/kuberay").glob("*.yaml"))
    }


def test_kuberay_needs_the_token_and_stays_inside_kubernetes():
    docs = _kuberay_docs()
    assert {d["kind"] for ds in docs.values() for d in ds} == {"RayCluster", "RayJob"}
    assert kuberay_problems(docs) == []


@pytest.mark.parametrize(
    "mistake", ["no authOptions", "auth disabled", "LoadBalancer", "token inline", "no token"]
)
def test_the_kuberay_check_catches_each_mistake(mistake):
    docs = _kuberay_docs()
    cluster = docs["cluster/kuberay/raycluster.yaml"][0]
    job = docs["cluster/kuberay/rayjob-pseudolabel.yaml"][0]
    submitter = job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]
    if mistake == "no authOptions":
        del cluster["spec"]["authOptions"]
    elif mistake == "auth disabled":
        cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"] = [
            {"name": "RAY_AUTH_MODE", "value": "disabled"}
        ]
    elif mistake == "LoadBalancer":
        cluster["spec"]["headGroupSpec"]["serviceType"] = "LoadBalancer"
    elif mistake == "token inline":
        submitter["env"][1] = {"name": "RAY_AUTH_TOKEN", "value": "0123abcd"}
    else:
        submitter["env"] = []
    assert kuberay_problems(docs)


# ---------------------------------------------------------------- least privilege, written down


def _uri_prefix(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.split("://", 1)[1].partition("/")
    return bucket, key


def _rayjob_uris() -> tuple[str, str]:
    argv = shlex.split(
        yaml.safe_load((REPO / "cluster/kuberay/rayjob-pseudolabel.yaml").read_text())["spec"][
            "entrypoint"
        ]
    )
    return argv[argv.index("--input") + 1], argv[argv.index("--output") + 1]


def _granted_folder(resource: str, bucket: str) -> str | None:
    """The key folder `arn:aws:s3:::<bucket>/<folder>/*` grants, or None if it grants more
    (another bucket, the whole bucket, a wildcard inside the folder)."""
    head = f"arn:aws:s3:::{bucket}/"
    folder = resource.removeprefix(head).removesuffix("*")
    if not resource.startswith(head) or not resource.endswith("/*") or not folder.strip("/"):
        return None
    return None if "*" in folder or "?" in folder else folder


def s3_policy_problems(policy: dict, read: str, write: str) -> list[str]:
    """Only s3:ListBucket (on the two prefixes), GetObject in a folder holding the input or
    the output, Put/DeleteObject in a folder holding the output but not the input."""
    problems = []
    rbucket, rprefix = _uri_prefix(read)
    wbucket, wprefix = _uri_prefix(write)
    tops = {rprefix.split("/")[0], wprefix.split("/")[0]}
    for st in policy["Statement"]:
        sid, resources = st.get("Sid"), _list(st["Resource"])
        if st["Effect"] != "Allow" or "NotAction" in st or "NotResource" in st:
            problems.append(f"{sid}: only plain Allow statements")
        for action in _list(st["Action"]):
            if action == "s3:ListBucket":
                prefixes = st.get("Condition", {}).get("StringLike", {}).get("s3:prefix", [])
                if (
                    resources != [f"arn:aws:s3:::{rbucket}"]
                    or not prefixes
                    or any(p.split("/")[0] not in tops for p in prefixes)
                ):
                    problems.append(f"{sid}: listing beyond the two prefixes")
            elif action == "s3:GetObject":
                for r in resources:
                    folders = {_granted_folder(r, rbucket), _granted_folder(r, wbucket)} - {None}
                    if not any(rprefix.startswith(f) or wprefix.startswith(f) for f in folders):
                        problems.append(f"{sid}: reads beyond the input and output: {r}")
            elif action in ("s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"):
                for r in resources:
                    f = _granted_folder(r, wbucket)
                    if f is None or not wprefix.startswith(f) or rprefix.startswith(f):
                        problems.append(f"{sid}: writes beyond the output prefix: {r}")
            else:
                problems.append(f"{sid}: {action} is more than the jobs need")
    return problems


def test_aws_policies_read_the_input_write_the_output_and_nothing_else():
    header = (REPO / "cluster/aws.yaml").read_text().split("cluster_name:")[0]
    for name in ("aws-iam-s3-policy.json", "aws-iam-head-policy.json"):
        assert f"cluster/{name}" in header and (REPO / "cluster" / name).is_file()
    s3 = json.loads((REPO / "cluster/aws-iam-s3-policy.json").read_text())
    read, write = _rayjob_uris()  # s3://my-bucket/images/, s3://my-bucket/autosod/run1/
    assert s3_policy_problems(s3, read, write) == []
    # what the jobs do: read the input, read and write the output
    grants = {
        (a, r) for st in s3["Statement"] for a in _list(st["Action"]) for r in _list(st["Resource"])
    }
    assert ("s3:GetObject", "arn:aws:s3:::my-bucket/images/*") in grants
    assert ("s3:PutObject", "arn:aws:s3:::my-bucket/autosod/*") in grants
    assert ("s3:PutObject", "arn:aws:s3:::my-bucket/images/*") not in grants
    head = json.loads((REPO / "cluster/aws-iam-head-policy.json").read_text())
    actions = {a for st in head["Statement"] for a in _list(st["Action"])}
    assert not [a for a in actions if "*" in a or a.startswith("s3:")]
    by_action = {a: st for st in head["Statement"] for a in _list(st["Action"])}
    assert by_action["iam:PassRole"]["Resource"].endswith(":role/autosod-s3")
    cluster = yaml.safe_load((REPO / "cluster/aws.yaml").read_text())["cluster_name"]
    assert by_action["ec2:TerminateInstances"]["Condition"] == {
        "StringEquals": {"ec2:ResourceTag/ray-cluster-name": cluster}
    }
    types = yaml.safe_load((REPO / "cluster/aws.yaml").read_text())["available_node_types"]
    profiles = {
        k: t["node_config"]["IamInstanceProfile"]["Arn"].rsplit("/", 1)[1] for k, t in types.items()
    }
    assert profiles == {
        "head": "autosod-head",
        "gpu_worker": "autosod-s3",
        "cpu_worker": "autosod-s3",
    }


def _allow(action: str, resource: str) -> dict:
    return {"Effect": "Allow", "Action": action, "Resource": resource}


@pytest.mark.parametrize(
    "statement",
    [
        _allow("s3:PutObject", "arn:aws:s3:::my-bucket/images/*"),  # write the input
        _allow("s3:PutObject", "arn:aws:s3:::my-bucket/*"),  # write the whole bucket
        _allow("s3:*", "arn:aws:s3:::my-bucket/autosod/*"),  # any action
        _allow("s3:GetObject", "arn:aws:s3:::other/*"),  # another bucket
        _allow("s3:GetObject", "arn:aws:s3:::*"),  # every bucket
        _allow("s3:DeleteBucket", "arn:aws:s3:::my-bucket"),  # more than objects
        _allow("s3:ListBucket", "arn:aws:s3:::my-bucket"),  # list all of it
    ],
)
def test_the_policy_check_catches_each_mistake(statement):
    s3 = json.loads((REPO / "cluster/aws-iam-s3-policy.json").read_text())
    s3["Statement"].append(statement)
    assert s3_policy_problems(s3, *_rayjob_uris())


def _list(value) -> list:
    return [value] if isinstance(value, str) else list(value)


GCP_ROLES = {
    "roles/storage.objectViewer",  # read objects (and list the bucket)
    "roles/storage.objectUser",  # read, write, delete objects
    "roles/compute.instanceAdmin.v1",  # the head's autoscaler: start / stop workers
    "roles/iam.serviceAccountUser",  # the head: start workers as the workers' account
}


def gcp_iam_problems(doc: dict) -> list[str]:
    """Storage roles only on the bucket, conditioned on the input / output prefixes (write:
    the output only); the head's compute role; serviceAccountUser on the workers' account."""
    problems = []
    out_bucket, out_prefix = _uri_prefix(doc["output"])
    in_bucket, in_prefix = _uri_prefix(doc["input"])
    out_cond = f'resource.name.startsWith("projects/_/buckets/{out_bucket}/objects/{out_prefix}")'
    in_cond = f'resource.name.startsWith("projects/_/buckets/{in_bucket}/objects/{in_prefix}")'
    accounts = doc["service_accounts"]
    for b in doc["bindings"]:
        role, where = b["role"], b["resource"]
        expression = " ".join(b.get("condition", {}).get("expression", "").split())
        if role not in GCP_ROLES:
            problems.append(f"{b['member']}: {role} is more than the jobs need")
        elif role.startswith("roles/storage."):
            allowed = {out_cond} if role == "roles/storage.objectUser" else {out_cond, in_cond}
            terms = set(expression.split(" || ")) if expression else set()
            if "bucket" not in where or not terms or not terms <= allowed:
                problems.append(f"{b['member']}: {role} beyond the prefixes ({expression!r})")
        elif (
            role == "roles/compute.instanceAdmin.v1"
            and b["member"] != f"serviceAccount:{accounts['head']}"
        ):
            problems.append(f"{b['member']}: only the head starts workers")
        elif role == "roles/iam.serviceAccountUser" and where != {
            "service_account": accounts["workers"]
        }:
            problems.append(f"{b['member']}: serviceAccountUser beyond the workers' account")
    return problems


def test_gcp_bindings_read_the_input_write_the_output_and_nothing_else():
    header = (REPO / "cluster/gcp.yaml").read_text().split("cluster_name:")[0]
    assert "cluster/gcp-iam.yaml" in header and "cluster/gcp-firewall.yaml" in header
    doc = yaml.safe_load((REPO / "cluster/gcp-iam.yaml").read_text())
    assert gcp_iam_problems(doc) == []
    config = yaml.safe_load((REPO / "cluster/gcp.yaml").read_text())
    emails = {
        k: t["node_config"]["serviceAccounts"][0]["email"]
        for k, t in config["available_node_types"].items()
    }
    accounts = doc["service_accounts"]
    assert emails == {
        "head": accounts["head"],
        "gpu_worker": accounts["workers"],
        "cpu_worker": accounts["workers"],
    }
    writes = [b for b in doc["bindings"] if b["role"] == "roles/storage.objectUser"]
    assert {b["member"] for b in writes} == {f"serviceAccount:{a}" for a in accounts.values()}


@pytest.mark.parametrize(
    "mistake", ["write the input", "project-wide storage", "owner", "unconditioned"]
)
def test_the_gcp_binding_check_catches_each_mistake(mistake):
    doc = yaml.safe_load((REPO / "cluster/gcp-iam.yaml").read_text())
    write = next(b for b in doc["bindings"] if b["role"] == "roles/storage.objectUser")
    if mistake == "write the input":
        write["condition"]["expression"] = (
            'resource.name.startsWith("projects/_/buckets/my-bucket/objects/images/")'
        )
    elif mistake == "project-wide storage":
        write["resource"] = {"project": "my-project"}
    elif mistake == "owner":
        doc["bindings"].append(
            {"member": write["member"], "role": "roles/owner", "resource": {"project": "p"}}
        )
    else:
        del write["condition"]
    assert gcp_iam_problems(doc)
