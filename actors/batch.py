"""The driver's side of a batch: as many worker groups as the cluster allows, a queue of videos,
progress polled from every scheduler, one VideoResult per video.

Each group lives inside a Scheduler actor (actors/scheduler.py), which builds it, keeps it across
videos and runs one video at a time. Groups that cannot be placed yet stay pending: their
placement groups are what the cluster autoscaler scales up for. A group that never gets its
resources (cluster.resource_timeout_s) is dropped; the batch fails only if no group starts.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from actors.errors import REMOTE_ERRORS, remote_error
from actors.group import WorkerGroup
from actors.scheduler import Scheduler
from pipeline.manifest import VideoEntry
from pipeline.runtime.progress import Progress, ProgressDisplay, finished
from pipeline.runtime.results import VideoResult, one_line

POLL_S = 0.5  # how often the driver refreshes progress


def worker_gpus(cfg) -> float:
    """GPUs per worker. model.device=cpu or cluster.gpus_per_worker=0: CPU workers (gloo);
    model.device=cuda: GPU workers, waiting for GPU nodes if there are none yet (autoscaling from
    zero); model.device=auto: GPU workers if the cluster has GPUs now, else CPU workers."""
    if cfg.model.device == "cpu" or cfg.cluster.gpus_per_worker <= 0:
        return 0.0
    if cfg.model.device.startswith("cuda"):
        return float(cfg.cluster.gpus_per_worker)
    return float(cfg.cluster.gpus_per_worker) if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def group_capacity(cfg, gpus: float) -> int:
    """How many worker groups (workers and writer) the alive nodes hold at once (STRICT_PACK: per node)."""
    bundles = WorkerGroup(cfg, gpus_per_worker=gpus).bundles()
    need = {k: sum(b.get(k, 0) for b in bundles) for k in ("CPU", "GPU")}
    total = 0
    for node in ray.nodes():
        if node.get("Alive"):
            have = node["Resources"]
            total += min((math.floor(have.get(k, 0) / v + 1e-9) for k, v in need.items() if v > 0), default=0)
    return total


@dataclass
class BatchRun:
    results: list[VideoResult]  # in the order the videos were given
    group_start_s: dict[str, float]  # per group that started: seconds until it was ready
    videos_s: float  # from the first group being ready to the last video's end (the batch's work)
    group_phases: dict[str, dict[str, float]] = field(default_factory=dict)  # per group: seconds per phase


def run_batch(videos: list[VideoEntry], cfg, display: ProgressDisplay, groups: int = 0) -> BatchRun:
    """Run `videos` (resolved configs) on `groups` worker groups (0: cluster.groups, else as many as
    fit now, at least one)."""
    gpus = worker_gpus(cfg)
    groups = min(groups or cfg.cluster.groups or max(1, group_capacity(cfg, gpus)), len(videos))
    kind = f"{gpus:g} GPU + {cfg.cluster.cpus_per_worker:g} CPU" if gpus else f"{cfg.cluster.cpus_per_worker:g} CPU"
    display.message(f"{len(videos)} videos on {groups} worker groups of {cfg.parallel.degree} x ({kind})")
    actor = ray.remote(Scheduler)
    # Named (in the job's own namespace) so `ray list actors` shows which is which: g0-scheduler,
    # g0-build1-worker0, ..., g0-build1-writer.
    batch = _Batch(videos, display, {f"g{i}": actor.options(
        name=f"g{i}-scheduler", num_cpus=0, max_concurrency=4, max_restarts=0).remote(cfg, f"g{i}", gpus)
        for i in range(groups)})
    try:
        batch.run()
    finally:
        _stop(batch.schedulers)
    return BatchRun([batch.results[v.name] for v in videos], batch.started, batch.videos_s, batch.phases)


class _Batch:
    """The driver's loop: start groups, hand out videos, collect results, show progress.

    A scheduler takes a new video once its last one is denoised and at most one of its videos is
    still with the writer (so the writer overlaps the next video without falling behind by more)."""

    def __init__(self, videos: list[VideoEntry], display: ProgressDisplay, schedulers: dict):
        self.queue, self.display, self.schedulers = deque(videos), display, schedulers
        self.starting = {s.start.remote(): name for name, s in schedulers.items()}
        self.created = time.perf_counter()  # the schedulers' actors were just created
        self.denoising: dict = {}  # ref of run_video -> (scheduler, entry)
        self.finishing: dict = {}  # ref of finish_video -> (scheduler, entry)
        self.results: dict[str, VideoResult] = {}
        self.started: dict[str, float] = {}  # scheduler -> seconds its group took to start
        self.phases: dict[str, dict[str, float]] = {}  # scheduler -> its group's start-up phases
        self.start_errors: list[str] = []
        self.first_ready, self.videos_s = 0.0, 0.0

    def run(self) -> None:
        while self.queue or self.denoising or self.finishing:
            ready, _ = ray.wait([*self.starting, *self.denoising, *self.finishing], num_returns=1, timeout=POLL_S)
            for ref in ready:
                if ref in self.starting:
                    self._started(ref, self.starting.pop(ref))
                elif ref in self.denoising:
                    self._denoised(ref, *self.denoising.pop(ref))
                else:
                    self._finished(ref, *self.finishing.pop(ref))
            self._dispatch()
            _poll_progress(self.schedulers, {n for n, _ in [*self.denoising.values(), *self.finishing.values()]},
                           self.display)
        if self.first_ready:
            self.videos_s = time.perf_counter() - self.first_ready

    def _started(self, ref, name: str) -> None:
        try:
            info = ray.get(ref)
        except Exception as e:
            error = remote_error(e) if isinstance(e, REMOTE_ERRORS) else e
            self.start_errors.append(f"group {name}: {one_line(error)}")
            self.display.message(self.start_errors[-1])
            ray.kill(self.schedulers.pop(name), no_restart=True)
            return
        self.started[name] = info["start_s"]
        # the scheduler's own process start (imports included) precedes its group's phases
        scheduler_s = max(0.0, time.perf_counter() - self.created - info["start_s"])
        self.phases[name] = {"scheduler": scheduler_s, **info.get("phases", {})}
        self.first_ready = self.first_ready or time.perf_counter()
        self.display.message(f"group {name}: ready in {info['start_s']:.1f} s on {info['node_ip']}")

    def _denoised(self, ref, name: str, entry: VideoEntry) -> None:
        try:
            ray.get(ref)
        except RayActorError as e:
            self._record(entry, VideoResult(name=entry.name, status="failed", line=entry.line, group=name,
                                            error=f"scheduler died: {one_line(e)}"))
            self.schedulers.pop(name, None)
            return
        self.finishing[self.schedulers[name].finish_video.remote(entry.name)] = (name, entry)

    def _finished(self, ref, name: str, entry: VideoEntry) -> None:
        try:
            result = ray.get(ref)
        except RayActorError as e:
            result = VideoResult(name=entry.name, status="failed", line=entry.line, group=name,
                                 error=f"scheduler died: {one_line(e)}")
            self.schedulers.pop(name, None)
        self._record(entry, result)

    def _record(self, entry: VideoEntry, result: VideoResult) -> None:
        self.results[entry.name] = result
        self.display.update(finished(Progress(entry.name, blocks=result.blocks), result.status))

    def _dispatch(self) -> None:
        busy = [n for n, _ in self.denoising.values()]
        writing = [n for n, _ in self.finishing.values()]
        for name, scheduler in self.schedulers.items():
            if self.queue and name in self.started and name not in busy and writing.count(name) <= 1:
                entry = self.queue.popleft()
                self.denoising[scheduler.run_video.remote(entry.config, entry.line)] = (name, entry)
        serving = self.started.keys() & self.schedulers.keys()
        if self.queue and not (self.starting or serving):
            reason = "; ".join(self.start_errors) or "no worker group is left"
            while self.queue:
                entry = self.queue.popleft()
                self._record(entry, VideoResult(name=entry.name, status="failed", line=entry.line, error=reason))


def _poll_progress(schedulers: dict, names: set[str], display: ProgressDisplay) -> None:
    refs = [schedulers[n].progress.remote() for n in names if n in schedulers]
    try:
        for videos in ray.get(refs, timeout=POLL_S * 4):
            for p in videos:
                display.update(p)
    except (GetTimeoutError, RayActorError):
        pass  # a busy or dying scheduler: its video's result says what happened


def _stop(schedulers: dict) -> None:
    stops = [s.shutdown.remote() for s in schedulers.values()]
    try:
        ray.get(stops, timeout=60)
    except (GetTimeoutError, RayActorError):
        pass  # killing the scheduler below takes its group and writer with it
    for s in schedulers.values():
        ray.kill(s, no_restart=True)
