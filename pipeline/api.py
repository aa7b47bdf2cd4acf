"""The Python API: Pipeline generates videos in this process; submit() sends a batch to a Ray cluster.

This is the one module of pipeline/ that meets Ray (submit); Pipeline itself needs none.
"""

from __future__ import annotations

import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from pipeline.config import Config, build_config, load_config, to_dict


@dataclass
class GenerationResult:
    name: str
    video_uri: str
    metadata_uri: str
    frames: int
    timings: dict[str, float] = field(default_factory=dict)


class Pipeline:
    """Load a model once, generate videos with it (one process; P = 1)."""

    def __init__(self, cfg: Config):
        from pipeline.attention.cudnn_env import use_avoid_recompile
        from pipeline.models import build_adapter, load_model
        from pipeline.models.loader import resolve_device

        t0 = time.perf_counter()
        self.cfg = cfg
        # TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1 for routed methods on CUDA, unless already set: torch reads
        # it at this process's first cuDNN SDPA call, so before anything is built (attention/cudnn_env.py)
        use_avoid_recompile(cfg.attention, resolve_device(cfg.model.device))
        self.bundle = load_model(cfg.model)
        self.adapter = build_adapter(self.bundle, cfg.attention)
        self.load_s = time.perf_counter() - t0

    @classmethod
    def from_config(cls, cfg: Config | str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> "Pipeline":
        if cfg is None or isinstance(cfg, (str, Path)):
            cfg = load_config(cfg, overrides)
        elif overrides:
            cfg = build_config(to_dict(cfg), [tuple(o.split("=", 1)) for o in overrides])
        return cls(cfg)

    def _video_config(self, video: dict[str, Any] | None) -> Config:
        """The pipeline's config with this video's fields (name, shots, seed, ...) merged in."""
        if not video:
            return self.cfg
        data = to_dict(self.cfg)
        data["video"] = {**data["video"], **video}
        return build_config(data)

    def generate(self, video: dict[str, Any] | None = None, progress: bool = True) -> GenerationResult:
        """Generate one video (the config's, or `video` = {name, shots, seed, ...} merged into it),
        write NAME.mp4 and NAME.json to the configured store, and return where they are.

        With more than one block, each finished block and the carried state after it are checkpointed
        under NAME.ckpt/ (pipeline/runtime/checkpoint.py); a video generated again after an
        interruption resumes after its last finished block, with the same result."""
        from pipeline.runtime.checkpoint import BlockCheckpoint
        from pipeline.runtime.progress import ProgressDisplay
        from pipeline.sampling.denoise import Denoiser
        from pipeline.sampling.plan import ShotPlan
        from pipeline.storage import open_store
        from pipeline.video.writer import VideoWriter

        cfg = self._video_config(video)
        t0 = time.perf_counter()
        plan = ShotPlan.from_config(cfg, self.bundle.transformer.config.in_channels)
        store = open_store(cfg.storage)
        denoiser = Denoiser(self.adapter, self.bundle, cfg)  # this video's prompts, seed and carried state
        checkpoint = BlockCheckpoint(store, cfg.video.name, cfg) if len(plan.blocks) > 1 else None
        saved = checkpoint.load() if checkpoint is not None else None
        display = ProgressDisplay() if progress else None
        meter = _StepMeter(cfg.video.name, plan, cfg.sampling.steps, display)
        try:
            with VideoWriter(store, cfg.video.name, self.bundle.vae, cfg.video.fps, cfg.output) as writer:
                start = 0
                if saved is not None:  # finished blocks are decoded again; denoising goes on from their state
                    denoiser.states.load_tensors(saved.state[0], self.bundle.device)
                    for latents in saved.latents:
                        writer.write_block(latents)
                    start = saved.blocks_done
                for block in plan.blocks[start:]:
                    latents = denoiser.denoise_block(plan, block, progress=meter.step)
                    meter.block_done()
                    if checkpoint is not None:
                        checkpoint.save(block.index, latents, [denoiser.states.to_tensors()])  # one entry per rank
                    writer.write_block(latents)
                timings = {"load_s": round(self.load_s, 3), "denoise_s": round(meter.denoise_s, 3),
                           "wall_s": round(time.perf_counter() - t0, 3)}
                info = writer.finish(video_metadata(cfg, plan, timings, self.adapter))
            if checkpoint is not None:
                checkpoint.clear()
        finally:
            if display is not None:
                display.close()
        return GenerationResult(cfg.video.name, info["mp4"]["uri"], info["mp4"]["json_uri"], info["mp4"]["frames"],
                                timings)


class _StepMeter:
    """Turns per-step callbacks into Progress reports (block, step, tokens/s, ETA)."""

    def __init__(self, name: str, plan, steps: int, display):
        from pipeline.runtime.progress import Progress

        self.plan, self.display = plan, display
        self.progress = Progress(name, "denoising", 0, len(plan.blocks), 0, steps)
        self.total = sum(b.layout.num_tokens for b in plan.blocks) * steps  # token-steps of the video
        self.done, self.denoise_s, self._t = 0, 0.0, time.perf_counter()

    def step(self, block: int, step: int, steps: int) -> None:
        from dataclasses import replace

        now = time.perf_counter()
        self.denoise_s, self._t = self.denoise_s + now - self._t, now
        self.done += self.plan.blocks[block].layout.num_tokens
        rate = self.done / self.denoise_s if self.denoise_s else 0.0
        self.progress = replace(self.progress, block=block, step=step, tokens_per_s=rate,
                                eta_s=(self.total - self.done) / rate if rate else None)
        if self.display is not None:
            self.display.update(self.progress)

    def block_done(self) -> None:
        self._t = time.perf_counter()  # what happens between blocks (decode, encode) is not denoising


def video_metadata(cfg: Config, plan, timings: dict, adapter=None) -> dict:
    """What NAME.json records: the config (no credentials: they never enter it), plan, timings."""
    meta = {"config": to_dict(cfg), "video": to_dict(cfg)["video"], "plan": plan.to_dict(),
            "model": {"preset": cfg.model.preset, "family": cfg.model.family, "path": cfg.model.path or None},
            "attention": {"method": cfg.attention.method}, "timings": timings}
    if adapter is not None and adapter.last_meta:
        pairs = [m.stats.get("pairs") for m in adapter.last_meta.values() if m.stats.get("pairs")]
        if pairs:
            meta["attention"]["mean_pairs_last_step"] = float(sum(pairs) / len(pairs))
    return meta


# ---------------------------------------------------------------------------------------------
# Batch jobs on a Ray cluster: submit(manifest) -> Job
# ---------------------------------------------------------------------------------------------

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class Job:
    """A batch submitted to a Ray cluster (jobs/generate.py running there). Cheap to keep: it holds
    the job's id, the cluster's address and where the job writes its results manifest."""

    def __init__(self, client, job_id: str, storage, results_key: str):
        self.client, self.job_id = client, job_id
        self.storage, self.results_key = storage, results_key  # the batch's StorageConfig

    def status(self) -> str:
        """PENDING | RUNNING | SUCCEEDED | FAILED | STOPPED"""
        return str(self.client.get_job_status(self.job_id).value)

    def logs(self) -> str:
        return self.client.get_job_logs(self.job_id)

    def wait(self, timeout_s: float | None = None, follow: TextIO | None = None, poll_s: float = 1.0) -> str:
        """Until the job ends (or `timeout_s`); with `follow`, the job's log is copied there as it grows."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        shown = 0
        while True:
            status = self.status()
            if follow is not None:
                text = self.logs()
                follow.write(text[shown:])
                follow.flush()
                shown = len(text)
            if status in TERMINAL:
                return status
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {self.job_id}: still {status} after {timeout_s:g} s")
            time.sleep(poll_s)

    def results(self) -> list:
        """The results manifest: one VideoResult per video (name, status, URIs, timings, error)."""
        from pipeline.runtime.results import parse_results
        from pipeline.storage import open_store

        return parse_results(open_store(self.storage).get(self.results_key))

    def stop(self) -> bool:
        return self.client.stop_job(self.job_id)

    def __repr__(self) -> str:
        return f"Job({self.job_id!r})"


def submit(manifest: str | Path, overrides: list[str] | tuple[str, ...] = (), address: str | None = None,
           wait: bool = True, config: str | Path | None = None) -> Job:
    """Submit a batch manifest to a Ray cluster as a job (`python -m jobs.generate MANIFEST ...`).

    The manifest is validated here first: a bad entry fails before anything is submitted. `address`
    is the cluster's dashboard (http://HEAD:8265); None: cluster.address, then RAY_ADDRESS, then a
    cluster running on this machine. The manifest (and `config`) travel as the job's working
    directory. A relative file:// storage is made absolute here, so outputs land where they would
    for `jobs.generate` run from this directory (a cluster on this machine or a shared filesystem).
    With `wait`, blocks until the job ends and copies its log to stdout, as `ray job submit` does."""
    import shutil
    import tempfile

    from ray.job_submission import JobSubmissionClient

    from pipeline.manifest import load_manifest

    manifest = Path(manifest)
    overrides = list(overrides)
    base = load_manifest(manifest, config, overrides).base  # raises ConfigError / ManifestError
    uri = base.storage.uri
    if uri.startswith("file://") and not uri.startswith("file:///"):
        overrides.append(f"storage.uri=file://{Path(uri[len('file://'):]).expanduser().absolute().as_posix()}")
        base = load_config(config, overrides)
    results_key = f"{manifest.stem}.results.jsonl"
    client = JobSubmissionClient(address or base.cluster.address or None)
    with tempfile.TemporaryDirectory(prefix="longreel-job-") as workdir:
        shutil.copy(manifest, Path(workdir) / manifest.name)
        args = ["python", "-m", "jobs.generate", manifest.name, *overrides, "--results", results_key]
        if config is not None:
            shutil.copy(config, Path(workdir) / "base-config.yaml")
            args += ["--config", "base-config.yaml"]
        job_id = client.submit_job(entrypoint=shlex.join(args), runtime_env={"working_dir": workdir},
                                   metadata={"manifest": manifest.name})
    job = Job(client, job_id, base.storage, results_key)
    if wait:
        job.wait(follow=sys.stdout)
    return job
