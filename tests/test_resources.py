"""Requests a cluster can never hold fail before any work; auto scaling sizes itself."""

import pytest

from autosod_ray.resources import Capacity, ResourceError, check_request, resolve_workers

LAPTOP = Capacity(nodes=[{"CPU": 2.0, "memory": 8e9}])
GPU_CLUSTER = Capacity(
    nodes=[{"CPU": 8.0}, {"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 1.0}],
)
AUTOSCALING = Capacity(nodes=[{"CPU": 4.0}], node_types=[{"CPU": 8.0, "GPU": 1.0}, {"CPU": 16.0}])


def test_a_request_that_fits_passes_quietly():
    assert check_request(LAPTOP, {"CPU": 0.5}, 2, "the model actors", "fix it") == []
    assert check_request(GPU_CLUSTER, {"CPU": 4, "GPU": 1}, 2, "w", "f", {"CPU": 1}) == []


@pytest.mark.parametrize(
    "bundle, count, reserve",
    [
        ({"CPU": 4.0}, 1, None),  # more than any node has
        ({"CPU": 1.0}, 2, {"CPU": 1.0}),  # fits, but leaves nothing for the data tasks
        ({"CPU": 1.0, "GPU": 1.0}, 1, None),  # no GPU at all
    ],
)
def test_a_fixed_cluster_refuses_what_it_can_never_hold(bundle, count, reserve):
    with pytest.raises(ResourceError) as err:
        check_request(
            LAPTOP, bundle, count, "the train workers", "set scaling.num_workers", reserve
        )
    msg = str(err.value)
    assert "no autoscaler" in msg and "scaling.num_workers" in msg and "CPU: 2" in msg
    assert "memory" not in msg  # only what was asked for, not 8e+09 bytes of it


def test_packing_is_per_node_not_just_the_total():
    # 3 x 6 CPUs = 18 <= 24 in total, but only one bundle of 6 fits on each 8-CPU node... x3
    assert check_request(GPU_CLUSTER, {"CPU": 6.0}, 3, "w", "f") == []
    with pytest.raises(ResourceError):
        check_request(GPU_CLUSTER, {"CPU": 5.0}, 4, "w", "f")  # 20 <= 24, but 1 per node


def test_an_autoscaling_cluster_warns_with_the_node_types_that_can_hold_it():
    warnings = check_request(AUTOSCALING, {"CPU": 4.0, "GPU": 1.0}, 2, "the model actors", "f")
    assert len(warnings) == 1 and "must grow" in warnings[0] and "GPU: 1" in warnings[0]
    with pytest.raises(ResourceError, match="no node type"):
        check_request(AUTOSCALING, {"CPU": 32.0}, 1, "the model actors", "lower pipeline.num_cpus")


def test_auto_scaling_leaves_a_cpu_for_data_and_uses_every_gpu():
    assert resolve_workers("auto", "auto", False, LAPTOP) == (1, 1.0)
    assert resolve_workers("auto", "auto", False, Capacity(nodes=[{"CPU": 16.0}])) == (1, 15.0)
    assert resolve_workers("auto", "auto", True, GPU_CLUSTER) == (2, 8.0)
    assert resolve_workers(3, "auto", False, Capacity(nodes=[{"CPU": 16.0}])) == (3, 5.0)
    assert resolve_workers(2, 1.5, False, LAPTOP) == (2, 1.5)  # explicit values stay
