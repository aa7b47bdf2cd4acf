"""The scheduler actor: one worker group and its writer, kept across the videos handed to it.

A thin shell over pipeline.runtime.scheduler.VideoScheduler, with the WorkerGroup (Ray actors) as
its denoising group and the group's writer actor as its block sink. A video takes two calls:
`run_video` returns once its blocks are denoised (the group is free for the next video) and
`finish_video` once the writer has finished it, so the writer's last work on one video overlaps the
next video's denoising. The driver (actors/batch.py) creates it with max_concurrency > 1, so these
and `progress` can run at the same time.
"""

from __future__ import annotations

import threading

from actors.group import WorkerGroup
from actors.writer import RemoteWriter
from pipeline.runtime.progress import Progress
from pipeline.runtime.results import VideoResult
from pipeline.runtime.scheduler import VideoScheduler


def _import_sampling() -> None:
    """torch and the sampler's plan, which the first run_video needs: imported on a thread of their own
    while the group starts (this actor's own start, on the job's critical path, imports no torch)."""
    import pipeline.sampling.plan  # noqa: F401


class Scheduler:
    def __init__(self, cfg, name: str, gpus_per_worker: float):
        """`cfg` is the batch's base Config (model, attention, parallel and cluster hold for every video)."""
        threading.Thread(target=_import_sampling, name="import-sampling", daemon=True).start()
        self.cfg, self.name = cfg, name
        self.group = WorkerGroup(cfg, name, gpus_per_worker=gpus_per_worker)
        self.writer = RemoteWriter(self.group)
        self._videos: dict[str, VideoScheduler] = {}  # running or finishing
        self._lock = threading.Lock()

    def start(self) -> dict:
        """Build the group and its writer (waiting for resources)."""
        self.group.start()
        return {"start_s": self.group.start_s, "node_ip": self.group.placements[0].node_ip,
                "phases": dict(self.group.start_phases)}

    def run_video(self, cfg, line: int = 0) -> str:
        """Denoise every block of video `cfg`; returns its name once the group is free again."""
        from pipeline.sampling.plan import ShotPlan

        self.group.repair()
        video = VideoScheduler(cfg, ShotPlan.from_config(cfg), self.group, self.writer,
                               max_block_retries=cfg.cluster.max_block_retries)
        video.result.line = line
        with self._lock:
            self._videos[video.name] = video
        video.denoise()
        return video.name

    def finish_video(self, name: str) -> VideoResult:
        """Wait for the writer to finish video `name`; its result."""
        result = self._videos[name].complete()
        with self._lock:
            del self._videos[name]
        return result

    def progress(self) -> list[Progress]:
        with self._lock:
            videos = list(self._videos.values())
        return [v.progress() for v in videos]

    def shutdown(self) -> None:
        self.group.shutdown()
