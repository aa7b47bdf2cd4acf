"""WorkerGroup: one context-parallel group of P worker actors and its writer, in one placement group.

It owns the placement group (P worker bundles and one writer bundle, STRICT_PACK: a CP group's
all-to-all wants one node's NVLink, and the writer decodes on rank 0's GPU), the actors, their
ranks (sorted by node and GPU), the rendezvous (rank 0 publishes it), phased start-up (device ->
process group -> model), health checks, and teardown/rebuild.

Workers run with max_restarts=0: a torch.distributed group cannot take back a restarted member, so
when any rank dies every rank is killed and new workers are started in the same bundles
(`rebuild`: the reservation is kept, so a rebuild never waits behind other work; after a node loss
Ray re-places the bundles first), and the caller re-runs the block it lost (WorkerLost). The
writer lives in its own bundle and keeps its video open across a rebuild.
"""

from __future__ import annotations

import time
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.errors import REMOTE_ERRORS, remote_error
from actors.worker import RayWorker
from pipeline.runtime.writer import BlockWriter
from pipeline.parallel.rendezvous import Rendezvous
from pipeline.runtime.scheduler import BlockOutput
from pipeline.runtime.worker import Placement, ResourceTimeout, WorkerLost


# A second lane of calls into workers and the writer: progress and liveness answer at once, while
# the default lane (one thread) keeps the work in the order it was sent.
CONTROL = "control"


def _fmt(resources: dict) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items())) + "}"


class WorkerGroup:
    """`cfg` is the (batch-wide) Config: parallel.degree ranks with cluster.{gpus,cpus}_per_worker each."""

    def __init__(self, cfg, name: str = "group", gpus_per_worker: float | None = None, load_model: bool = True,
                 writer: bool = True):
        """`gpus_per_worker` as resolved for this cluster (actors.batch.worker_gpus); default the config's.
        `load_model` and `writer` off: the bare group mechanics (tests)."""
        self.cfg, self.name, self.load_model, self.with_writer = cfg, name, load_model, writer
        self.size = cfg.parallel.degree
        self.gpus = float(cfg.cluster.gpus_per_worker if gpus_per_worker is None else gpus_per_worker)
        self.cpus = float(cfg.cluster.cpus_per_worker)
        self.pg = None
        self.workers: list = []  # actor handles in rank order
        self.placements: list[Placement] = []
        self.writer = None  # the BlockWriter actor in the last bundle
        self.builds = 0  # worker sets started (1 + rebuilds)
        self.start_s = 0.0  # seconds the first start took, waiting for resources included
        # seconds of each phase of the last build, in order (what a start-up's time went on)
        self.start_phases: dict[str, float] = {}

    # --- resources --------------------------------------------------------------------------------
    def worker_bundle(self) -> dict[str, float]:
        b = {"CPU": self.cpus} if self.cpus > 0 else {}
        if self.gpus > 0:
            b["GPU"] = self.gpus
        return b

    def bundles(self) -> list[dict[str, float]]:
        writer = [{"CPU": self.cpus if self.cpus > 0 else 1.0}] if self.with_writer else []
        return [self.worker_bundle()] * self.size + writer

    def _shortage(self, waited_s: float) -> str:
        total = {k: sum(b.get(k, 0) for b in self.bundles()) for k in ("CPU", "GPU")}
        need = {k: v for k, v in total.items() if v > 0}
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        fits = [n for n in nodes if all(n.get(k, 0) >= v for k, v in need.items())]
        largest = max(nodes, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)), default={})
        shown = {k: v for k, v in largest.items() if k in ("CPU", "GPU")}
        free = {k: v for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}
        why = ("the nodes that could hold it are busy with other groups" if fits else
               f"no node has that much; the largest offers {_fmt(shown)}")
        hint = "set cluster.gpus_per_worker=0 for CPU-only workers (gloo), " if self.gpus > 0 else ""
        return (f"worker group {self.name}: waited {waited_s:.0f} s for {_fmt(need)} on one node "
                f"({self.size} workers of {_fmt(self.worker_bundle())}{' + the writer' if self.with_writer else ''}; "
                f"parallel.degree={self.size}, "
                f"STRICT_PACK); {why} (free now: {_fmt(free)}). Lower parallel.degree or cluster.cpus_per_worker, "
                f"{hint}add a node type that large to the autoscaler, or raise cluster.resource_timeout_s "
                f"(now {self.cfg.cluster.resource_timeout_s}) while nodes are still being added")

    def _wait_for_bundles(self, timeout_s: float) -> None:
        t0 = time.perf_counter()
        try:
            ray.get(self.pg.ready(), timeout=timeout_s)
        except GetTimeoutError:
            message = self._shortage(time.perf_counter() - t0)
            self.shutdown()
            raise ResourceTimeout(message) from None

    # --- build ------------------------------------------------------------------------------------
    def start(self, timeout_s: float | None = None) -> None:
        """Reserve the bundles (waiting up to cluster.resource_timeout_s), start the workers and the writer."""
        t0 = time.perf_counter()
        self.pg = placement_group(self.bundles(), strategy="STRICT_PACK")
        self._wait_for_bundles(self.cfg.cluster.resource_timeout_s if timeout_s is None else timeout_s)
        bundles_s = time.perf_counter() - t0
        try:
            self.start_phases = {"bundles": bundles_s, **self._start_workers(with_writer=self.with_writer)}
        except BaseException:
            self.shutdown()
            raise
        self.start_s = time.perf_counter() - t0

    def rebuild(self) -> None:
        """New workers in the same bundles (re-placed by Ray first if their node is gone)."""
        if self.pg is None:
            return self.start()
        self._kill_workers()
        self._wait_for_bundles(self.cfg.cluster.resource_timeout_s)
        self.start_phases = self._start_workers(with_writer=self.with_writer and not self.writer_alive())

    def repair(self) -> None:
        """Between videos: dead workers (or a group that failed) are replaced, and so is a dead writer."""
        if self.pg is None:
            return self.start()
        try:
            self.health()
        except WorkerLost:
            return self.rebuild()
        if self.with_writer and not self.writer_alive():
            writer = self._new_writer()
            ray.get(self._load_writer(writer))
            self.writer = writer

    def _start_workers(self, with_writer: bool) -> dict[str, float]:
        """Workers in bundles 0..P-1, through the phases; with `with_writer` a new writer too, started
        alongside (its imports and VAE load overlap the workers' start). Returns seconds per phase."""
        self.builds += 1
        phases, t_phase = {}, time.perf_counter()

        def done(phase: str) -> None:
            nonlocal t_phase
            phases[phase], t_phase = time.perf_counter() - t_phase, time.perf_counter()

        actor = ray.remote(concurrency_groups={CONTROL: 1})(RayWorker)
        actors = [actor.options(**self.worker_options(i)).remote(self.cfg) for i in range(self.size)]
        self.workers = actors  # so that a failure below kills them all
        writer = self._new_writer() if with_writer else None
        try:
            placements = ray.get([a.placement.remote() for a in actors])
            done("processes")  # the actors' processes up (imports included)
            order = sorted(range(self.size), key=lambda i: placements[i].sort_key())
            self.workers = [actors[i] for i in order]
            self.placements = [placements[i] for i in order]
            self._gather([w.set_device.remote(*d) for w, d in zip(self.workers, self.device_plan())])
            done("device")
            writer_ready = self._load_writer(writer) if writer is not None else []
            if self.load_model:
                self._gather([w.import_model_code.remote() for w in self.workers])
                done("imports")  # on every rank at once (Worker.import_model_code)
                self._gather([self.workers[0].fetch_weights.remote()])
                done("weights")
            if self.size == 1:
                self._gather([self.workers[0].join_group.remote(None)])
            else:
                host = self.placements[0].node_ip
                port = ray.get(self.workers[0].publish_rendezvous.remote(host))
                p = self.cfg.parallel
                self._gather([w.join_group.remote(Rendezvous(host, port, r, self.size, p.backend, p.timeout_s))
                              for r, w in enumerate(self.workers)])
            done("process_group")
            if self.load_model:
                self._gather([w.load_model.remote() for w in self.workers])
                done("model")
            ray.get(writer_ready)
            done("writer_wait")  # what the writer's start added after the workers were ready
        except RayActorError as e:
            self._kill_workers()
            if writer is not None:
                ray.kill(writer, no_restart=True)
            raise WorkerLost(f"worker group {self.name}: an actor died while starting: {e}") from None
        if writer is not None:
            self.writer = writer
        return phases

    def worker_options(self, bundle: int) -> dict[str, Any]:
        """Ray actor options of the worker in bundle `bundle` of this build."""
        return dict(name=f"{self.name}-build{self.builds}-worker{bundle}",  # for `ray list actors` (and tests)
                    num_cpus=self.cpus, num_gpus=self.gpus, max_restarts=0,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=bundle))

    def _new_writer(self):
        """The writer in the last bundle: rank 0's node, and it decodes on rank 0's GPU (time-shared)."""
        return ray.remote(concurrency_groups={CONTROL: 1})(BlockWriter).options(
            name=f"{self.name}-build{self.builds}-writer", num_cpus=self.cpus or 1.0, num_gpus=0, max_restarts=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=self.size),
        ).remote(self.cfg.model)

    def _load_writer(self, writer) -> list:
        """Refs of the writer's phases (device, VAE); actor calls run in the order they were sent."""
        return [writer.set_device.remote(*self.device_plan()[0]), writer.load_vae.remote()]

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
        """All results, in rank order. As soon as one rank fails, every worker is killed (the others would
        wait in a collective for it until the timeout); a dead rank raises WorkerLost."""
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            try:
                ray.get(ready[0])
            except RayActorError as e:
                rank = refs.index(ready[0])
                self._kill_workers()
                raise WorkerLost(f"worker group {self.name}: rank {rank} died: {type(e).__name__}") from None
            except REMOTE_ERRORS as e:
                self._kill_workers()  # an error in one rank leaves the others waiting in a collective
                raise remote_error(e) from None
        return ray.get(refs)

    def denoise_block(self, cfg, block: int, restore: bool) -> BlockOutput:
        """Every rank denoises its share of block `block` of the video `cfg` (see Worker.denoise_block
        for `restore`); rank 0 returns the whole block's latents. WorkerLost if a rank dies meanwhile."""
        if not self.workers:
            raise WorkerLost(f"worker group {self.name}: no workers")
        outs = self._gather([w.denoise_block.remote(cfg, block, restore) for w in self.workers])
        return BlockOutput(latents=outs[0].latents, seconds=outs[0].seconds, state_s=max(o.state_s for o in outs))

    def step_progress(self) -> tuple[int, int]:
        """(steps done, steps) of the block rank 0 is denoising; (0, 0) when it cannot tell."""
        workers = self.workers
        if not workers:
            return 0, 0
        try:
            return ray.get(workers[0].step_progress.options(concurrency_group=CONTROL).remote(), timeout=5)
        except (RayActorError, GetTimeoutError):
            return 0, 0

    # --- health -----------------------------------------------------------------------------------
    def health(self, timeout_s: float = 30.0) -> int:
        """Every rank answers and the process group completes an all-reduce; WorkerLost otherwise."""
        if not self.workers:
            raise WorkerLost(f"worker group {self.name}: no workers")
        try:
            sums = ray.get([w.check_group.remote() for w in self.workers], timeout=timeout_s)
        except (RayActorError, GetTimeoutError) as e:
            self._kill_workers()
            raise WorkerLost(f"worker group {self.name}: health check failed: {type(e).__name__}") from None
        expected = self.size * (self.size - 1) // 2
        if any(s != expected for s in sums):
            self._kill_workers()
            raise WorkerLost(f"worker group {self.name}: all-reduce gave {sums}, expected {expected}")
        return self.size

    def writer_alive(self) -> bool:
        if self.writer is None:
            return False
        try:
            return ray.get(self.writer.ping.options(concurrency_group=CONTROL).remote(), timeout=30)
        except (RayActorError, GetTimeoutError):
            return False

    @property
    def alive(self) -> bool:
        return bool(self.workers)

    # --- teardown ---------------------------------------------------------------------------------
    def _kill_workers(self) -> None:
        for w in self.workers:
            ray.kill(w, no_restart=True)
        self.workers, self.placements = [], []

    def shutdown(self) -> None:
        """Abort the writer's video, kill every actor and release the bundles; safe to call twice."""
        if self.writer is not None:
            try:
                ray.get(self.writer.abort.remote(None), timeout=60)
            except (RayActorError, GetTimeoutError):
                pass  # a dead writer's upload: see actors.writer.RemoteWriter.abort
            ray.kill(self.writer, no_restart=True)
            self.writer = None
        self._kill_workers()
        if self.pg is not None:
            remove_placement_group(self.pg)
            self.pg = None
