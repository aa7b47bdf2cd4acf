"""WorkerGroup: one context-parallel group of P worker actors in one placement group.

It owns the placement group (P bundles, STRICT_PACK: a CP group's all-to-all wants one node's
NVLink), the actors, their ranks (sorted by node and GPU), the rendezvous (rank 0 publishes it),
phased start-up (device -> process group -> model), health checks, and teardown/rebuild.

Workers run with max_restarts=0: a torch.distributed group cannot take back a restarted member, so
when any rank dies every rank is killed, the placement group is released and the group is built
again (`rebuild`), and the caller re-runs the block it lost (WorkerLost).
"""

from __future__ import annotations

import time
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.worker import RayWorker
from pipeline.runtime.worker import Placement, ResourceTimeout, WorkerLost


def _fmt(resources: dict) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items())) + "}"


class WorkerGroup:
    """`cfg` is the (batch-wide) Config: parallel.degree ranks with cluster.{gpus,cpus}_per_worker each."""

    def __init__(self, cfg, name: str = "group", gpus_per_worker: float | None = None, load_model: bool = True):
        """`gpus_per_worker` as resolved for this cluster (actors.batch.worker_gpus); default the config's."""
        self.cfg, self.name, self.load_model = cfg, name, load_model
        self.size = cfg.parallel.degree
        self.gpus = float(cfg.cluster.gpus_per_worker if gpus_per_worker is None else gpus_per_worker)
        self.cpus = float(cfg.cluster.cpus_per_worker)
        self.pg = None
        self.workers: list = []  # actor handles in rank order
        self.placements: list[Placement] = []
        self.builds = 0  # times the group was built (1 + rebuilds)
        self.start_s = 0.0  # seconds the last build took, waiting for resources included

    # --- resources --------------------------------------------------------------------------------
    def bundle(self) -> dict[str, float]:
        b = {"CPU": self.cpus} if self.cpus > 0 else {}
        if self.gpus > 0:
            b["GPU"] = self.gpus
        return b

    def _shortage(self, waited_s: float) -> str:
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        fits = [n for n in nodes if all(n.get(k, 0) >= v * self.size for k, v in self.bundle().items())]
        largest = max(nodes, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)), default={})
        shown = {k: v for k, v in largest.items() if k in ("CPU", "GPU")}
        free = {k: v for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}
        why = ("the nodes that could hold it are busy with other groups" if fits else
               f"no node has that much; the largest offers {_fmt(shown)}")
        hint = ("set cluster.gpus_per_worker=0 for CPU-only workers (gloo), " if self.gpus > 0 else "")
        return (f"worker group {self.name}: waited {waited_s:.0f} s for {self.size} bundles of {_fmt(self.bundle())} "
                f"on one node (parallel.degree={self.size}, STRICT_PACK); {why} (free now: {_fmt(free)}). "
                f"Lower parallel.degree or cluster.cpus_per_worker, {hint}add a node type with "
                f"{self.size}x that to the autoscaler, or raise cluster.resource_timeout_s "
                f"(now {self.cfg.cluster.resource_timeout_s}) while nodes are still being added")

    # --- build ------------------------------------------------------------------------------------
    def start(self, timeout_s: float | None = None) -> None:
        """Reserve the bundles (waiting up to cluster.resource_timeout_s), start the actors, run the phases."""
        timeout_s = self.cfg.cluster.resource_timeout_s if timeout_s is None else timeout_s
        t0 = time.perf_counter()
        self.builds += 1
        self.pg = placement_group([self.bundle()] * self.size, strategy="STRICT_PACK")
        try:
            ray.get(self.pg.ready(), timeout=timeout_s)
        except GetTimeoutError:
            message = self._shortage(time.perf_counter() - t0)
            self.shutdown()
            raise ResourceTimeout(message) from None
        actor = ray.remote(RayWorker)
        actors = [actor.options(
            num_cpus=self.cpus, num_gpus=self.gpus, max_restarts=0,
            max_concurrency=2,  # a progress query may run while denoise_block does
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i),
        ).remote(self.cfg.parallel, self.cfg.model) for i in range(self.size)]
        self.workers = actors  # so that a failure below tears them all down
        try:
            placements = ray.get([a.placement.remote() for a in actors])
            order = sorted(range(self.size), key=lambda i: placements[i].sort_key())
            self.workers = [actors[i] for i in order]
            self.placements = [placements[i] for i in order]
            self._gather([w.set_device.remote(*d) for w, d in zip(self.workers, self.device_plan())])
            rendezvous = ray.get(self.workers[0].publish_rendezvous.remote(self.placements[0].node_ip))
            self._gather([w.join_group.remote(rendezvous, r, self.size) for r, w in enumerate(self.workers)])
            if self.load_model:
                self._gather([w.load_model.remote() for w in self.workers])
        except RayActorError as e:
            self.shutdown()
            raise WorkerLost(f"worker group {self.name}: a worker died while starting: {e}") from None
        except BaseException:
            self.shutdown()
            raise
        self.start_s = time.perf_counter() - t0

    def device_plan(self) -> list[tuple[str | None, int | None]]:
        """Per rank: (CUDA_VISIBLE_DEVICES for its node, its index there), or (None, None) on CPU."""
        if self.gpus <= 0:
            return [(None, None)] * self.size
        node_gpus: dict[str, list[str]] = {}
        for p in self.placements:
            node_gpus.setdefault(p.node_id, [])
            node_gpus[p.node_id] += [g for g in p.gpu_ids if g not in node_gpus[p.node_id]]
        for ids in node_gpus.values():
            ids.sort(key=lambda g: (not g.isdigit(), int(g) if g.isdigit() else 0, g))
        return [(",".join(node_gpus[p.node_id]), node_gpus[p.node_id].index(p.gpu_ids[0])) for p in self.placements]

    # --- calls ------------------------------------------------------------------------------------
    def _gather(self, refs: list) -> list[Any]:
        """All results, in rank order; as soon as one rank has died the group is torn down (the others
        would wait in a collective for it until the timeout) and WorkerLost is raised."""
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            try:
                ray.get(ready[0])
            except RayActorError as e:
                rank = refs.index(ready[0])
                self.shutdown()
                raise WorkerLost(f"worker group {self.name}: rank {rank} died: {type(e).__name__}") from None
            except BaseException:
                self.shutdown()  # an error inside one rank leaves the others stuck in a collective
                raise
        return ray.get(refs)

    def health(self, timeout_s: float = 30.0) -> int:
        """Every rank answers and the process group completes an all-reduce; WorkerLost otherwise."""
        try:
            sums = ray.get([w.check_group.remote() for w in self.workers], timeout=timeout_s)
        except (RayActorError, GetTimeoutError) as e:
            self.shutdown()
            raise WorkerLost(f"worker group {self.name}: health check failed: {type(e).__name__}") from None
        expected = self.size * (self.size - 1) // 2
        if any(s != expected for s in sums):
            self.shutdown()
            raise WorkerLost(f"worker group {self.name}: all-reduce gave {sums}, expected {expected}")
        return self.size

    # --- teardown ---------------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return bool(self.workers)

    def rebuild(self) -> None:
        self.shutdown()
        self.start()

    def shutdown(self) -> None:
        """Kill every rank and release the placement group; safe to call twice."""
        for w in self.workers:
            ray.kill(w, no_restart=True)
        self.workers, self.placements = [], []
        if self.pg is not None:
            remove_placement_group(self.pg)
            self.pg = None
