"""VideoScheduler: one video, block by block, on a denoising group, with a writer alongside.

    denoise():  plan -> [resume: checkpointed blocks -> writer]       (not denoised again)
                     -> for each remaining block k:
                          group.denoise_block(k, state)   (WorkerLost: rebuild the group, run k again)
                          checkpoint(k, latents, state)
                          writer.write_block(latents)     (returns at once: decode, encode and upload
                                                           of block k run while block k+1 denoises)
                     -> writer.finish(metadata)           (queued behind the writes, not awaited)
    complete(): wait for the writer, drop the checkpoint, the VideoResult

The group is free as soon as denoise() returns: the next video can start denoising while the writer
still works on this one's last block (a writer handles its calls in order), so even a one-block
video (joint mode) hides its decode, encode and upload. `run()` does both halves.

The carried state lives in the group's processes and, after every block, in the checkpoint (each
rank writes its own); the scheduler commits the block (latents + progress.json) once they have. A
group rebuilt after a worker died, or a resumed video, restores the state of the last committed
block from there (`restore`), so the re-run block starts from exactly the state an uninterrupted run
had: the frames come out identical. Plain Python: the group and the writer are passed in
(Ray-backed in actors/, or in-process).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, replace
from typing import Any, Protocol

from pipeline.runtime.checkpoint import BlockCheckpoint
from pipeline.runtime.progress import Progress
from pipeline.runtime.results import Timings, VideoResult, one_line
from pipeline.runtime.worker import WorkerLost

# Blocks handed to the writer and not yet written: bounds the latents held in flight when the
# writer is slower than denoising (it then sets the pace).
MAX_WRITES_IN_FLIGHT = 2


@dataclass
class BlockOutput:
    """What a group returns for one block: the clean latents (1, C, T_k, h, w), the denoising seconds
    (rank 0's), and the seconds its ranks took to checkpoint their carried state (the slowest's)."""

    latents: Any
    seconds: float
    state_s: float


class DenoiseGroup(Protocol):
    name: str

    def denoise_block(self, cfg, block: int, restore: bool) -> BlockOutput: ...  # WorkerLost when a rank died
    def step_progress(self) -> tuple[int, int]: ...  # (steps done, steps) in the running block
    def rebuild(self) -> None: ...


class PendingWrite(Protocol):
    def done(self) -> bool: ...
    def result(self) -> Any: ...  # raises what the writer raised


class BlockSink(Protocol):
    """A writer: calls are carried out in the order they are made, each returns at once."""

    def open(self, cfg) -> PendingWrite: ...
    def write_block(self, latents) -> PendingWrite: ...
    def finish(self, metadata: dict) -> PendingWrite: ...  # result: the video's JSON record
    def abort(self, cfg) -> None: ...  # waits until video cfg's upload is dropped (if still open)


class VideoScheduler:
    def __init__(self, cfg, plan, group: DenoiseGroup, writer: BlockSink, max_block_retries: int = 2,
                 clock=time.perf_counter):
        """`plan` is the video's ShotPlan. Checkpoints go to the video's own store (cfg.storage)."""
        from pipeline.storage import open_store

        self.cfg, self.plan, self.group, self.writer = cfg, plan, group, writer
        self.name = cfg.video.name
        self.max_block_retries, self.clock = max_block_retries, clock
        self.blocks = len(plan.blocks)
        # One block: nothing to resume between blocks, no checkpoint (as in Pipeline.generate).
        self.checkpoint = BlockCheckpoint(open_store(cfg.storage), self.name, cfg) if self.blocks > 1 else None
        self.steps = int(cfg.sampling.steps)
        self.timings = Timings()
        self.result = VideoResult(name=self.name, status="running", blocks=self.blocks, group=group.name,
                                  tokens=sum(b.layout.num_tokens for b in plan.blocks))
        self._lock = threading.Lock()
        self._progress = Progress(self.name, phase="starting", blocks=self.blocks, steps=self.steps)
        self._block_started = self._t0 = 0.0
        self._pending: list[PendingWrite] = []  # writer calls not yet checked
        self._finished: PendingWrite | None = None

    # --- progress (read from another thread while the video runs) --------------------------------
    def _set(self, **changes) -> None:
        with self._lock:
            self._progress = replace(self._progress, **changes)

    def progress(self) -> Progress:
        with self._lock:
            p = self._progress
        if p.phase != "denoising":
            return p
        step, _ = self.group.step_progress()
        done_blocks = p.block - self.result.resumed_blocks
        if self.timings.denoise_s > 0 and done_blocks > 0:
            per_block = self.timings.denoise_s / done_blocks
            remaining = (self.blocks - p.block) * per_block - (self.clock() - self._block_started)
            return replace(p, step=step, eta_s=max(0.0, remaining))
        return replace(p, step=step)

    # --- the video --------------------------------------------------------------------------------
    def run(self) -> VideoResult:
        self.denoise()
        return self.complete()

    def denoise(self) -> None:
        """Every block denoised and handed to the writer, the finish queued; the group is free after."""
        self._t0 = self.clock()
        try:
            self._pending.append(self.writer.open(self.cfg))
            start = self._resume()
            restore = True  # the first block this run denoises starts from the checkpoint (or afresh)
            for block in range(start, self.blocks):
                self._denoise_block(block, restore)
                restore = False
            self.timings.wall_s = self.clock() - self._t0
            self._finished = self.writer.finish(self._metadata())
            self._set(phase="finishing", block=self.blocks, step=0)
        except Exception as e:
            self._fail(e)

    def complete(self) -> VideoResult:
        """Wait for the writer; the video's result (failed if anything on the way failed)."""
        if self.result.status == "failed":
            return self.result
        try:
            self._wait_writes(keep=0)
            record = self._finished.result()
        except Exception as e:
            self._fail(e)
            return self.result
        if self.checkpoint is not None:
            self.checkpoint.clear()
        mp4 = record["mp4"]
        for key in ("decode_s", "encode_s", "upload_s"):  # the writer's own count, its final flush included
            setattr(self.timings, key, mp4["timings"][key])
        self.timings.wall_s = self.clock() - self._t0
        self.result.video_uri, self.result.metadata_uri = mp4["uri"], mp4["json_uri"]
        self.result.frames, self.result.status, self.result.timings = mp4["frames"], "done", self.timings
        self._set(phase="done")
        return self.result

    def _fail(self, e: Exception) -> None:
        """The video stops here; its upload is dropped, its checkpoint kept (a rerun resumes from it)."""
        self.writer.abort(self.cfg)
        self.timings.wall_s = self.clock() - self._t0
        self.result.status, self.result.error, self.result.timings = "failed", one_line(e), self.timings
        self._set(phase="failed")

    def _resume(self) -> int:
        """Blocks from a checkpoint go straight to the writer; returns the first block to denoise."""
        t = self.clock()
        saved = self.checkpoint.load() if self.checkpoint is not None else None
        if saved is None:
            return 0
        self._set(phase="resuming", block=saved.blocks_done)
        for latents in saved.latents:
            self._write(latents)
        self.result.resumed_blocks = saved.blocks_done
        self.timings.resume_s += self.clock() - t
        return saved.blocks_done

    def _denoise_block(self, block: int, restore: bool) -> None:
        self._set(phase="denoising", block=block, step=0)
        self._block_started = self.clock()
        for attempt in range(self.max_block_retries + 1):
            try:
                out = self.group.denoise_block(self.cfg, block, restore)
                break
            except WorkerLost:
                if attempt == self.max_block_retries:
                    raise
                self._set(phase="rebuilding")
                t = self.clock()
                self.group.rebuild()
                self.timings.rebuild_s += self.clock() - t
                self.result.rebuilds += 1
                restore = True  # new processes: the state comes from the checkpoint
                self._set(phase="denoising", step=0)
                self._block_started = self.clock()
        self.timings.denoise_s += out.seconds
        t = self.clock()
        if self.checkpoint is not None:
            self.checkpoint.save(block, out.latents)  # the ranks have saved their states: commit the block
        self.timings.checkpoint_s += out.state_s + self.clock() - t
        self._write(out.latents)
        tokens = (block + 1 - self.result.resumed_blocks) * self.result.tokens // self.blocks
        self._set(tokens_per_s=tokens * self.steps / max(self.timings.denoise_s, 1e-9))

    # --- the writer -------------------------------------------------------------------------------
    def _write(self, latents) -> None:
        while self._pending and self._pending[0].done():  # a failed write stops the video now
            self._pending.pop(0).result()
        self._pending.append(self.writer.write_block(latents))
        self._wait_writes(keep=MAX_WRITES_IN_FLIGHT)

    def _wait_writes(self, keep: int) -> None:
        t = self.clock()
        while len(self._pending) > keep:
            self._pending.pop(0).result()  # raises what the write raised (the writer has aborted by then)
        self.timings.writer_wait_s += self.clock() - t

    def _metadata(self) -> dict:
        """The video's JSON, as the in-process Pipeline writes it, plus what the batch adds."""
        from pipeline.api import video_metadata

        timings = {k: round(v, 4) for k, v in vars(self.timings).items()}
        meta = video_metadata(self.cfg, self.plan, timings)
        meta.update(seed=int(self.cfg.video.seed), blocks=self.blocks, tokens=self.result.tokens,
                    resumed_blocks=self.result.resumed_blocks, rebuilds=self.result.rebuilds, group=self.group.name)
        return meta
