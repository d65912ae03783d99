"""Can the cluster ever hold what a job asks for? Checked before any work starts.

A request Ray can never schedule does not fail in Ray: it waits, and the job
hangs ("No available node types can fulfill resource request", "The job may
hang forever"). On a fixed-size cluster (no autoscaler: a laptop's local Ray, a
`ray start` cluster) that is a user error, raised here naming the setting to
change. On an autoscaling cluster the request may be met once nodes are
added: a warning names the node types that could hold it, and a request that
no node type can hold is an error too.

`cluster_capacity()` reads the cluster (Ray must be up); everything else is
plain arithmetic on resource dicts, tested without Ray.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .config import ConfigError


class ResourceError(ConfigError):
    """A resource request this cluster can never meet; the message names the key."""


@dataclass
class Capacity:
    """What the cluster has now, and what its autoscaler could add."""

    nodes: list[dict[str, float]]  # each alive node's total resources
    node_types: list[dict[str, float]] = field(default_factory=list)  # addable node types

    @property
    def autoscaling(self) -> bool:
        return bool(self.node_types)

    @property
    def total(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for node in self.nodes:
            for k, v in node.items():
                out[k] = out.get(k, 0.0) + v
        return out


def cluster_capacity() -> Capacity:
    """The connected Ray cluster's alive nodes and the node types its autoscaler can add
    (Ray Data uses the same autoscaler config to tell the two kinds of cluster apart)."""
    import ray
    import ray._private.state

    nodes = [
        {k: float(v) for k, v in n["Resources"].items() if k in ("CPU", "GPU", "memory")}
        for n in ray.nodes()
        if n.get("Alive")
    ]
    types = []
    config = ray._private.state.state.get_cluster_config()
    for group in getattr(config, "node_group_configs", None) or []:
        can_add = group.max_count == -1 or group.max_count > group.min_count
        if group.resources and group.max_count != 0 and can_add:
            types.append({k: float(v) for k, v in group.resources.items()})
    return Capacity(nodes=nodes, node_types=types)


def fits(bundle: dict[str, float], node: dict[str, float]) -> bool:
    return all(node.get(k, 0.0) >= v for k, v in bundle.items() if v > 0)


def _show(bundle: dict[str, float], only=None) -> str:
    """'{CPU: 2, GPU: 1}'; with `only`, just those resources (not a node's memory in bytes)."""
    shown = [f"{k}: {v:g}" for k, v in bundle.items() if v > 0 and (only is None or k in only)]
    return "{" + ", ".join(shown) + "}"


def check_request(
    capacity: Capacity,
    bundle: dict[str, float],
    count: int,
    what: str,
    fix: str,
    reserve: dict[str, float] | None = None,
) -> list[str]:
    """`count` bundles that must all run at once, beside `reserve` (e.g. CPUs for the data
    tasks that feed them). Raises ResourceError if the cluster can never hold them;
    returns warnings (an autoscaling cluster that must grow first)."""
    reserve = reserve or {}
    need = {k: bundle.get(k, 0.0) * count + reserve.get(k, 0.0) for k in {*bundle, *reserve}}
    have = capacity.total
    one_fits_now = any(fits(bundle, n) for n in capacity.nodes)
    all_fit_now = one_fits_now and fits(need, have) and _packs(bundle, count, capacity.nodes)
    if all_fit_now:
        return []
    shown = f"{count} x {_show(bundle)}" + (f" + {_show(reserve)}" if reserve else "")
    if not capacity.autoscaling:
        biggest = max(capacity.nodes, key=lambda n: n.get("CPU", 0), default={})
        raise ResourceError(
            f"{what} needs {shown}, but this cluster (no autoscaler) has "
            f"{_show(have, need)} over {len(capacity.nodes)} node(s), "
            f"{_show(biggest, need)} at most on one; {fix}"
        )
    holders = [t for t in capacity.node_types if fits(bundle, t)]
    if not holders and not one_fits_now:
        raise ResourceError(
            f"{what} needs {_show(bundle)} on one node, but no node of this cluster and no "
            f"node type its autoscaler can add has that much; {fix}"
        )
    return [
        f"{what} needs {shown}; the cluster has {_show(have, need)} now and must grow first "
        f"(node types that can hold one: {', '.join(_show(t, need) for t in holders) or 'none'})"
    ]


def _packs(bundle: dict[str, float], count: int, nodes: list[dict[str, float]]) -> bool:
    """Whether `count` copies of `bundle` fit on these nodes at once (each on one node)."""
    placed = 0
    for node in nodes:
        per = [math.floor(node.get(k, 0.0) / v) for k, v in bundle.items() if v > 0]
        placed += min(per) if per else count
        if placed >= count:
            return True
    return placed >= count


# CPUs left to Ray Data's read / decode / augment tasks beside the training workers
DATA_CPUS = 1.0


def resolve_workers(
    num_workers: int | str,
    cpus_per_worker: float | str,
    use_gpu: bool,
    capacity: Capacity,
) -> tuple[int, float]:
    """`auto` scaling from the cluster as it is now: one worker per GPU (one worker on a CPU
    cluster), and each worker's share of the CPUs left after DATA_CPUS for data ingest."""
    total = capacity.total
    if num_workers == "auto":
        num_workers = max(1, int(total.get("GPU", 0))) if use_gpu else 1
    if cpus_per_worker == "auto":
        spare = max(1.0, total.get("CPU", 0.0) - DATA_CPUS)
        largest = max((n.get("CPU", 0.0) for n in capacity.nodes), default=1.0)
        cpus_per_worker = max(1.0, min(math.floor(spare / num_workers), largest))
    return int(num_workers), float(cpus_per_worker)
