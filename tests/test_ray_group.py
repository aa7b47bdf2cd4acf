"""WorkerGroup on a real local Ray cluster: placement group, rank order, rendezvous, gloo group,
health checks, rebuild after a worker dies, and the resource-timeout message."""

import pytest

from actors.group import WorkerGroup
from pipeline.config import load_config
from pipeline.runtime.worker import Placement, ResourceTimeout, WorkerLost
from tests.ray_local import local_ray

CPU_GROUP = ["parallel.degree=2", "cluster.gpus_per_worker=0", "cluster.cpus_per_worker=0.5"]


@pytest.fixture(scope="module")
def ray_cluster(s3_server):
    return local_ray()


def test_group_starts_ranks_in_node_order_and_survives_a_rebuild(ray_cluster):
    ray = ray_cluster
    group = WorkerGroup(load_config(None, CPU_GROUP), name="t", load_model=False)
    group.start()
    try:
        assert len(group.workers) == 2 and group.health() == 2  # gloo all-reduce of ranks: 0 + 1
        assert ray.get([w.ping.remote() for w in group.workers]) == [0, 1]
        assert [p.sort_key() for p in group.placements] == sorted(p.sort_key() for p in group.placements)
        assert len({p.node_id for p in group.placements}) == 1  # STRICT_PACK
        assert group.device_plan() == [(None, None), (None, None)]

        ray.kill(group.workers[1], no_restart=True)
        with pytest.raises(WorkerLost, match="worker group t"):
            group.health()
        assert not group.alive and group.pg is None  # every rank killed, bundles released

        group.rebuild()
        assert group.builds == 2 and group.health() == 2
    finally:
        group.shutdown()


def test_waiting_for_resources_times_out_with_what_to_change(ray_cluster):
    cfg = load_config(None, ["parallel.degree=64", "cluster.gpus_per_worker=0", "cluster.cpus_per_worker=1",
                             "cluster.resource_timeout_s=1"])
    group = WorkerGroup(cfg, name="big", load_model=False)
    with pytest.raises(ResourceTimeout) as e:
        group.start()
    message = str(e.value)
    assert "64 bundles of {CPU: 1}" in message and "parallel.degree=64" in message
    assert "no node has that much" in message and "cluster.resource_timeout_s" in message
    assert "\n" not in message and group.pg is None and not group.alive


def test_gpu_ranks_share_their_nodes_visible_devices():
    cfg = load_config(None, ["parallel.degree=4", "cluster.gpus_per_worker=1"])
    group = WorkerGroup(cfg, load_model=False)
    group.placements = [Placement("a", "10.0.0.1", ("6",), 1), Placement("a", "10.0.0.1", ("7",), 2),
                        Placement("b", "10.0.0.2", ("10",), 3), Placement("b", "10.0.0.2", ("2",), 4)]
    assert group.device_plan() == [("6,7", 0), ("6,7", 1), ("2,10", 1), ("2,10", 0)]
