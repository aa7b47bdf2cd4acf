"""WorkerGroup on a real local Ray cluster: placement group, rank order, rendezvous, gloo group,
health checks, rebuild after a worker dies (beside an undisturbed group), and the resource-timeout
message. No model and no writer here: the group mechanics alone."""

import pytest

from actors.group import WorkerGroup
from pipeline.config import load_config
from pipeline.runtime.worker import Placement, ResourceTimeout, WorkerLost
from tests.ray_local import local_ray

CPU_GROUP = ["parallel.degree=2", "cluster.gpus_per_worker=0", "cluster.cpus_per_worker=0.5"]


@pytest.fixture(scope="module")
def ray_cluster(s3_server):
    return local_ray()


def test_two_groups_rank_order_and_a_rebuild_beside_an_undisturbed_group(ray_cluster):
    ray = ray_cluster
    cfg = load_config(None, CPU_GROUP)
    hit, calm = (WorkerGroup(cfg, name=n, load_model=False, writer=False) for n in ("hit", "calm"))
    try:
        for g in (hit, calm):
            g.start()
            assert len(g.workers) == 2 and g.health() == 2  # gloo all-reduce of ranks: 0 + 1
            assert ray.get([w.ping.remote() for w in g.workers]) == [0, 1]
            assert [p.sort_key() for p in g.placements] == sorted(p.sort_key() for p in g.placements)
            assert len({p.node_id for p in g.placements}) == 1  # STRICT_PACK
            assert g.device_plan() == [(None, None), (None, None)]
            # the start-up's phases, in order, account for its time (no model: no weights or model phase)
            assert list(g.start_phases) == ["bundles", "processes", "device", "process_group", "writer_wait"]
            assert min(g.start_phases.values()) >= 0 and sum(g.start_phases.values()) <= g.start_s

        ray.kill(hit.workers[1], no_restart=True)
        with pytest.raises(WorkerLost, match="worker group hit"):
            hit.health()
        assert not hit.alive and hit.pg is not None  # every rank killed, the bundles kept for the rebuild
        hit.rebuild()
        assert hit.builds == 2 and hit.health() == 2
        assert calm.builds == 1 and calm.health() == 2
    finally:
        hit.shutdown()
        calm.shutdown()
    assert hit.pg is None and not hit.alive


def test_waiting_for_resources_times_out_with_what_to_change(ray_cluster):
    cfg = load_config(None, ["parallel.degree=64", "parallel.ring=true",  # 64 ranks over tiny-wan's 4 heads
                             "cluster.gpus_per_worker=0", "cluster.cpus_per_worker=1", "cluster.resource_timeout_s=1"])
    group = WorkerGroup(cfg, name="big", load_model=False)
    with pytest.raises(ResourceTimeout) as e:
        group.start()
    message = str(e.value)
    assert message.startswith("worker group big: waited 1 s for {CPU: 65} on one node (64 workers of {CPU: 1} "
                              "+ the writer; parallel.degree=64, STRICT_PACK); no node has that much")
    assert "cluster.resource_timeout_s" in message and "\n" not in message
    assert group.pg is None and not group.alive


def test_gpu_ranks_share_their_nodes_visible_devices():
    cfg = load_config(None, ["parallel.degree=4", "cluster.gpus_per_worker=1"])
    group = WorkerGroup(cfg, load_model=False)
    group.placements = [Placement("a", "10.0.0.1", ("6",), 1), Placement("a", "10.0.0.1", ("7",), 2),
                        Placement("b", "10.0.0.2", ("10",), 3), Placement("b", "10.0.0.2", ("2",), 4)]
    assert group.device_plan() == [("6,7", 0), ("6,7", 1), ("2,10", 1), ("2,10", 0)]
    assert group.bundles() == [{"CPU": 1.0, "GPU": 1.0}] * 4 + [{"CPU": 1.0}]
