"""Training the tiny model: the VAE first, then DiT twins (one per attention method) side by side.

    stage 1  VAE     procedural clips drawn on the device, L1 + small KL, EMA; then latent moments
    stage 2  DiTs    a pool of encoded videos per shot count, refreshed as training goes; every step
                     draws one batch (latents, noise, noise levels, dropped captions) and every twin
                     takes a step on that same batch, so the twins differ only in their attention

A run stops at its wall-clock budget (one GPU call is at most 10 minutes) and leaves, in --out:
    weights.tar     the EMA weights in diffusers layout, one directory per twin (install puts them
                    in the package: `python -m jobs.train_tiny install OUT/weights.tar`)
    ckpt-vae.pt, ckpt-<twin>.pt   what --resume needs (each file < 16 MB: the transfer cap)
    summary.json    configuration, progress (the resume state), loss curves, throughput, scores
    samples.npz     validation videos sampled from each twin (+ ground truth, VAE reconstruction)
    train.log       the log
Checkpoints are also written every --checkpoint-every-s, so a killed run still leaves the last one.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import platform
import tarfile
import tempfile
import time
import traceback
from contextlib import nullcontext
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from pipeline.layout import VideoLayout, shot_latent_frames
from pipeline.training.data import SceneStream, draw, random_crops, scene_loader, to_video
from pipeline.training.ema import EMA
from pipeline.training.text import ByteTokenizer
from pipeline.training.twin import Twin, save_vae, shifted_sigmas, write_model_index
from pipeline.training.vae import (build_vae, check_pixel_loss, encode_normalised, latent_moments,
                                   reconstruction_loss, set_latent_moments)

# Twin name -> (attention preset, overrides for training, the model directory / preset it ships as).
TWINS = {
    "dense": ("dense", [], "tiny-trained"),
    "moga": ("moga+stga", ["attention.moga.router_init=random"], "tiny-trained-moga"),
}
STREAM_VAE, STREAM_DIT, STREAM_MOMENTS, STREAM_VALIDATION = 1, 2, 3, 4
# What a resumed run must share with the run it continues (the data and the model's shape).
RESUME_MUST_MATCH = ("preset", "smoke", "seed", "height", "width", "fps", "seconds_per_shot", "shot_cycle",
                     "vae_clip_seconds", "refresh_videos")

# --smoke: the whole run in seconds on a CPU (tiny shapes; numbers mean nothing).
SMOKE_ARCHITECTURE = {
    "transformer": {"patch_size": [1, 2, 2], "num_attention_heads": 2, "attention_head_dim": 16, "in_channels": 16,
                    "out_channels": 16, "text_dim": 32, "freq_dim": 32, "ffn_dim": 64, "num_layers": 2,
                    "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 32},
    "vae": {"base_dim": 4, "z_dim": 16, "dim_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_scales": [],
            "temperal_downsample": [False, True, True]},
    "text_encoder": {"vocab_size": 384, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 1, "num_heads": 4,
                     "relative_attention_num_buckets": 8},
}


@dataclass
class TrainConfig:
    out: str = "outputs/train-tiny"
    resume: str = ""  # a previous run's --out (its summary.json and ckpt-*.pt)
    # or: installed weights to go on from (`install`'s layout, e.g. pipeline/models/weights): the VAE as
    # trained, each twin from its EMA weights. Checkpoints die with the machine; installed weights are
    # what a later development session still has (they are in git).
    init_from: str = ""
    reopen_vae: bool = False  # with --resume: train the VAE on (to --vae-seconds in all), DiTs start over
    preset: str = "tiny-trained"  # configs/models/<preset>.yaml: architecture and text length
    twins: tuple[str, ...] = ("dense", "moga")
    seed: int = 0
    device: str = "auto"
    smoke: bool = False
    # video format
    height: int = 128
    width: int = 128
    fps: int = 8
    seconds_per_shot: float = 2.0
    shot_cycle: tuple[int, ...] = (3, 2, 3, 1)  # DiT batch k has shot_cycle[k % len] shots
    second_subject_prob: float = 0.3
    # stage 1: VAE
    vae_steps: int = 1_000_000  # whichever comes first: steps or seconds
    vae_seconds: float = 270.0
    # Batch sizes, measured on an H100 (docs/training.md): the VAE step cost 1.45x for 4x the clips
    # (16 -> 64 whole frames); the DiT twins' step nothing for 64 -> 256 videos (launch-bound) and 1.7x
    # for 256 -> 512 (~60 MiB of activations per video in bf16: 512 fit an 80 GB GPU).
    vae_batch: int = 64
    # 0: whole frames. Random crops of this many pixels (multiples of 8) are a quarter of the pixels at
    # 64, but trained worse per step (run 5: L1 0.52 after 715 steps against run 4's 0.36 after 453).
    vae_crop: int = 0
    vae_clip_seconds: float = 1.0  # two shots of this length per clip (a cut inside every clip)
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-4
    # On pixels: l1 | mse | l1+mse | l1-clamped (pipeline/training/vae.py). From the same seed and
    # data, L1 runs (4-7) settled into reconstructions with a few colours (L1 0.36-0.53 on the decoded
    # output); MSE (runs 8-9) left that state at step ~700 and reached 0.080 by step 1,329.
    vae_loss: str = "mse"
    vae_ema: float = 0.999
    moment_batches: int = 8
    # stage 2: DiT twins
    dit_steps: int = 1_000_000
    batch: int = 512
    lr: float = 1e-3
    warmup: int = 300  # steps, restarted by every resumed run (AdamW moments are not checkpointed)
    ema: float = 0.999
    shift: float = 3.0
    uncond_prob: float = 0.1  # whole video's prompts dropped to "" (classifier-free guidance)
    paraphrase_prob: float = 0.25
    pool_videos: int = 12_288  # encoded videos kept (split over shot counts as the cycle uses them)
    refresh_every: int = 2  # encode refresh_videos new videos every this many steps
    refresh_videos: int = 64  # not tied to `batch`: encoding 256 every 2 steps took 40% of an H100 step
    # Learning rate after warmup, per stage and per call: constant, or cosine down to lr_floor x the
    # peak over the time the stage has in this call (steps are not known ahead: the budget is wall
    # clock). A resumed call warms up and decays again (a warm restart); the EMA spans the restarts.
    lr_schedule: str = "cosine"
    lr_floor: float = 0.05
    # run control
    time_budget_s: float = 540.0
    reserve_s: float = 45.0  # kept for the final checkpoint, export and validation
    checkpoint_every_s: float = 150.0
    log_every: int = 50
    workers: int = 8  # CPU processes planning scenes (0: in the main process)
    # validation at the end of the run
    val_videos: int = 4  # two scored the same VAE 0.84 and 0.48 in run 9: too few to read a trend
    val_shots: int = 3
    val_steps: int = 8
    val_guidance: float = 3.0

    def __post_init__(self):
        # one line naming the key, before the run spends its budget on start-up
        if self.vae_crop and (self.vae_crop % 8 or not 0 < self.vae_crop <= min(self.height, self.width)):
            raise ValueError(f"vae_crop: {self.vae_crop} must be 0 or a multiple of 8 up to "
                             f"{min(self.height, self.width)}")
        check_pixel_loss(self.vae_loss)
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule: {self.lr_schedule!r} is not one of {', '.join(LR_SCHEDULES)}")
        if self.resume and self.init_from:
            raise ValueError(f"init_from: {self.init_from!r} and resume: {self.resume!r} exclude each other")
        if self.refresh_videos < 1 or self.refresh_every < 1:
            raise ValueError(f"refresh_videos / refresh_every: {self.refresh_videos} / {self.refresh_every} "
                             f"must be >= 1")

    @classmethod
    def smoke_defaults(cls) -> dict:
        return {"smoke": True, "height": 32, "width": 32, "fps": 4, "seconds_per_shot": 1.0, "shot_cycle": (2, 1),
                "vae_steps": 3, "vae_batch": 2, "vae_clip_seconds": 1.0, "moment_batches": 1, "dit_steps": 4,
                "batch": 2, "warmup": 2, "pool_videos": 4, "refresh_every": 2, "refresh_videos": 2, "vae_crop": 16,
                "time_budget_s": 300.0, "reserve_s": 5.0, "checkpoint_every_s": 1e9, "log_every": 1, "workers": 0, "val_videos": 1,
                "val_shots": 2, "val_steps": 2, "device": "cpu"}


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------


class Log:
    def __init__(self, path: Path, started: float):
        self.file, self.started = open(path, "a"), started

    def __call__(self, message: str) -> None:
        line = f"[{time.monotonic() - self.started:7.1f}s] {message}"
        print(line, flush=True)
        self.file.write(line + "\n")
        self.file.flush()


def window_mean(window: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Per key, the mean over a log window of per-step 0-d tensors, read back to the host at once."""
    return {k: float(torch.stack([w[k].float() for w in window]).mean()) for k in window[0]}


LR_SCHEDULES = ("constant", "cosine")


def scheduled_lr(peak: float, step: int, warmup: int, progress: float, schedule: str, floor: float) -> float:
    """Linear warmup over `warmup` steps, then constant or cosine from peak to floor x peak as
    `progress` (the fraction of the stage's time in this call spent) goes from 0 to 1."""
    ramp = min(1.0, (step + 1) / max(1, warmup))
    if schedule == "constant":
        return peak * ramp
    p = min(1.0, max(0.0, progress))
    return peak * ramp * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * p)))


def derived_seed(*parts) -> int:
    """A 63-bit seed from the run seed and what the generator is for (stable across processes)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def _save_torch(path: Path, obj) -> None:
    _write_atomic(path, lambda p: torch.save(obj, p))


def _model_dict(cfg: TrainConfig) -> dict:
    """The model group of the config: the preset's YAML, building from its architecture."""
    from pipeline.config import _preset

    data = _preset("model", cfg.preset)
    data["path"] = ""  # built here, not loaded
    if cfg.smoke:
        data["architecture"] = SMOKE_ARCHITECTURE
        data["text_max_length"] = 32
    return data


def shot_layout(num_shots: int, seconds: float, fps: int, height: int, width: int, vae_temporal: int = 4,
                unit: int = 16) -> VideoLayout:
    """The token grid of a joint-mode video (ShotPlan's rule) of num_shots shots of `seconds` each."""
    shots = shot_latent_frames([seconds] * num_shots, fps, vae_temporal)
    return VideoLayout(sum(shots), height // unit, width // unit, tuple(shots))


class LatentPool:
    """Encoded training videos per shot count, each a ring buffer on the device."""

    def __init__(self, capacity: dict[int, int]):
        self.capacity = capacity
        self.latents: dict[int, torch.Tensor] = {}
        self.ids: dict[int, torch.Tensor] = {}
        self.mask: dict[int, torch.Tensor] = {}
        self.size = {n: 0 for n in capacity}
        self.next = {n: 0 for n in capacity}

    def add(self, num_shots: int, latents: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> None:
        cap = self.capacity[num_shots]
        if num_shots not in self.latents:
            self.latents[num_shots] = latents.new_empty((cap, *latents.shape[1:]))
            self.ids[num_shots] = ids.new_empty((cap, *ids.shape[1:]))
            self.mask[num_shots] = mask.new_empty((cap, *mask.shape[1:]))
        n = min(len(latents), cap)
        slots = (self.next[num_shots] + torch.arange(n, device=latents.device)) % cap
        self.latents[num_shots][slots] = latents[:n]
        self.ids[num_shots][slots] = ids[:n]
        self.mask[num_shots][slots] = mask[:n]
        self.next[num_shots] = (self.next[num_shots] + n) % cap
        self.size[num_shots] = min(cap, self.size[num_shots] + n)

    def full(self) -> bool:
        return all(self.size[n] >= self.capacity[n] for n in self.capacity)

    def sample(self, num_shots: int, batch: int, generator: torch.Generator):
        index = torch.randint(self.size[num_shots], (batch,), generator=generator, device=generator.device)
        index = index.to(self.latents[num_shots].device)
        return self.latents[num_shots][index], self.ids[num_shots][index], self.mask[num_shots][index]


# ---------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------


class Trainer:
    def __init__(self, cfg: TrainConfig, started: float | None = None):
        self.cfg = cfg
        self.started = time.monotonic() if started is None else started
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.log = Log(self.out / "train.log", self.started)
        from pipeline.models.loader import resolve_device

        self.device = resolve_device(cfg.device)
        self.cuda = self.device.type == "cuda"
        self.model = _model_dict(cfg)
        self.architecture = self.model["architecture"]
        self.text_length = int(self.model["text_max_length"])
        self.state = {"segment": 0, "vae_step": 0, "vae_seconds": 0.0, "vae_batches": 0, "vae_done": False,
                      "dit_step": 0, "dit_batches": 0, "dit_seconds": 0.0, "latent_mean": None, "latent_std": None}
        self.history: dict[str, list] = {"vae": [], "dit": []}
        self.dropped: dict[str, str] = {}
        self.scores: dict = {}
        self.timing: dict = {}
        self.twins: dict[str, Twin] = {}
        self.twin_cfgs: dict = {}
        self.vae = build_vae(self.architecture["vae"]).to(self.device)
        self.vae_ema = EMA(self.vae, cfg.vae_ema)
        self.last_checkpoint = time.monotonic()
        self.empty_ids, self.empty_mask = (torch.from_numpy(a[0]) for a in ByteTokenizer().encode([""], self.text_length))
        self.resume_twins: dict[str, dict] = {}
        self.installed_twins: dict[str, Path] = {}
        if cfg.resume:
            self._load_resume(Path(cfg.resume))
            self.state["segment"] += 1
        elif cfg.init_from:
            self._load_installed(Path(cfg.init_from))
            self.state["segment"] += 1
        torch.manual_seed(derived_seed(cfg.seed, self.state["segment"]))
        self.log(f"device {self.device} ({torch.cuda.get_device_name(self.device) if self.cuda else platform.processor()}),"
                 f" torch {torch.__version__}, segment {self.state['segment']}, state {self._progress()}")

    # --- time ----------------------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def time_left(self) -> float:
        return self.cfg.time_budget_s - self.cfg.reserve_s - self.elapsed()

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.cuda else nullcontext()

    def _progress(self) -> str:
        s = self.state
        return (f"vae {s['vae_step']} steps/{s['vae_seconds']:.0f}s{' (done)' if s['vae_done'] else ''}, "
                f"dit {s['dit_step']} steps/{s['dit_seconds']:.0f}s")

    def _stream(self, stream: int, batch: int, cycle, seconds: float, start: int, paraphrase: float = 0.0):
        c = self.cfg
        return SceneStream(stream, c.seed, batch, cycle, seconds, c.fps, c.height, c.width, self.text_length,
                           c.second_subject_prob, paraphrase, start)

    # --- run -----------------------------------------------------------------------------------
    def run(self) -> dict:
        c = self.cfg
        try:
            if not self.state["vae_done"]:
                self.train_vae()
            if self.state["vae_done"] and c.twins:
                self.build_twins()
                if self.twins:
                    self.train_dits()
        finally:
            self.checkpoint(final=True)
        if self.state["vae_done"] and self.cfg.val_videos > 0:
            self.validate()
            self.write_summary()
        self.log(f"done: {self._progress()}; files in {self.out}")
        return self.summary()

    # --- stage 1: VAE --------------------------------------------------------------------------
    def train_vae(self) -> None:
        c, s = self.cfg, self.state
        stream = self._stream(STREAM_VAE, c.vae_batch, (2,), c.vae_clip_seconds, s["vae_batches"])
        batches = scene_loader(stream, c.workers)
        optimizer = torch.optim.AdamW(self.vae.parameters(), lr=c.vae_lr, betas=(0.9, 0.99), weight_decay=0.0)
        generator = torch.Generator(self.device).manual_seed(derived_seed(c.seed, s["segment"], STREAM_VAE))
        self.vae.train()
        segment_steps, window, t_window = 0, [], time.monotonic()
        # the time this stage has in this call: what the schedule decays over
        seconds_at_start = s["vae_seconds"]
        horizon = max(1e-6, min(c.vae_seconds - seconds_at_start, self.time_left()))
        crops = torch.Generator().manual_seed(derived_seed(c.seed, s["segment"], STREAM_VAE, "crops"))
        self.log(f"VAE: {sum(p.numel() for p in self.vae.parameters()) / 1e6:.2f}M parameters, batch {c.vae_batch} "
                 f"clips of 2x{c.vae_clip_seconds}s at {c.height}x{c.width}"
                 + (f", random {c.vae_crop}x{c.vae_crop} crops" if c.vae_crop else ""))
        while s["vae_step"] < c.vae_steps and s["vae_seconds"] < c.vae_seconds and self.time_left() > 0:
            t0 = time.monotonic()
            scene = next(batches)
            s["vae_batches"] = scene.index + 1
            video = to_video(draw(scene, self.device))
            if c.vae_crop:
                video = random_crops(video, c.vae_crop, crops)
            with self.autocast():
                loss, parts = reconstruction_loss(self.vae, video, c.vae_kl_weight, generator, c.vae_loss)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.vae.parameters(), 1.0)
            lr = scheduled_lr(c.vae_lr, segment_steps, 100, (s["vae_seconds"] - seconds_at_start) / horizon,
                              c.lr_schedule, c.lr_floor)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
            self.vae_ema.update()
            s["vae_step"] += 1
            segment_steps += 1
            s["vae_seconds"] += time.monotonic() - t0
            window.append(parts)
            if s["vae_step"] % c.log_every == 0:
                mean = window_mean(window)  # the one sync of the window
                dt = (time.monotonic() - t_window) / len(window)
                self.log(f"vae step {s['vae_step']}: l1 {mean['l1']:.4f} (decoded {mean['l1_decoded']:.4f}) "
                         f"kl {mean['kl']:.3f} psnr {mean['psnr']:.2f} dB"
                         f" | lr {lr:.1e} {dt * 1000:.0f} ms/step, {c.vae_batch / dt:.0f} clips/s")
                self.history["vae"].append({"step": s["vae_step"], "elapsed_s": round(s["vae_seconds"], 1), "lr": lr,
                                            **mean})
                window, t_window = [], time.monotonic()
            self._maybe_checkpoint()
        if s["vae_step"] >= c.vae_steps or s["vae_seconds"] >= c.vae_seconds:
            self.finish_vae()

    @torch.no_grad()
    def finish_vae(self) -> None:
        """Freeze the EMA weights and measure the latent moments the DiT trains in."""
        c, s = self.cfg, self.state
        self.vae_ema.copy_to_module()
        self.vae.eval().requires_grad_(False)
        stream = self._stream(STREAM_MOMENTS, c.batch, (max(c.shot_cycle),), c.seconds_per_shot, 0)
        videos = (to_video(draw(stream.batch(k), self.device)) for k in range(c.moment_batches))
        with self.autocast():
            mean, std = latent_moments(self.vae, videos)
        set_latent_moments(self.vae, mean, std)
        s["latent_mean"], s["latent_std"], s["vae_done"] = mean, std, True
        self.log(f"VAE done after {s['vae_step']} steps; latent mean {np.round(mean, 2).tolist()} "
                 f"std {np.round(std, 2).tolist()}")

    # --- stage 2: DiT twins --------------------------------------------------------------------
    def twin_config(self, name: str, video: dict | None = None):
        from pipeline.config import build_config

        preset, overrides, _ = TWINS[name]
        c = self.cfg
        video = video or {"name": "train", "fps": c.fps, "height": c.height, "width": c.width,
                          "shots": [{"prompt": "a red circle stays still on a blue background",
                                     "seconds": c.seconds_per_shot}]}
        data = {"model": self.model, "video": video, "attention": preset,
                "sampling": {"steps": c.val_steps, "guidance_scale": c.val_guidance, "shift": c.shift}}
        return build_config(data, [tuple(o.split("=", 1)) for o in overrides])

    def build_twins(self) -> None:
        for i, name in enumerate(self.cfg.twins):
            try:
                cfg = self.twin_config(name)
                twin = Twin(name, self.architecture, cfg.attention, self.device, self.cfg.seed + 1000 * (i + 1),
                            self.cfg.lr, self.cfg.ema)
                if name in self.resume_twins:
                    twin.load_state(self.resume_twins[name])
                elif name in self.installed_twins:
                    twin.load_installed(self.installed_twins[name])
                self.twins[name], self.twin_cfgs[name] = twin, cfg
                self.log(f"twin {name}: {twin.method}, {twin.num_parameters() / 1e6:.2f}M parameters "
                         f"({twin.steps} steps so far)")
            except Exception as e:  # one twin's method failing must not cost the others
                self._drop(name, e)

    def _drop(self, name: str, error: BaseException) -> None:
        self.dropped[name] = f"{type(error).__name__}: {error}"
        self.twins.pop(name, None)
        self.log(f"twin {name} DROPPED: {self.dropped[name]}\n{traceback.format_exc()}")

    def _encode_batch(self, scene) -> torch.Tensor:
        with self.autocast():
            return encode_normalised(self.vae, to_video(draw(scene, self.device)))

    def _refresh(self, pool: LatentPool, batches) -> float:
        t0 = time.monotonic()
        scene = next(batches)
        self.state["dit_batches"] = scene.index + 1
        latents = self._encode_batch(scene)
        pool.add(scene.num_shots, latents, scene.input_ids.to(self.device), scene.text_mask.to(self.device))
        return time.monotonic() - t0

    def train_dits(self) -> None:
        c, s = self.cfg, self.state
        counts = {n: c.shot_cycle.count(n) for n in set(c.shot_cycle)}
        pool = LatentPool({n: max(c.batch, c.pool_videos * k // len(c.shot_cycle)) for n, k in counts.items()})
        stream = self._stream(STREAM_DIT, c.refresh_videos, c.shot_cycle, c.seconds_per_shot, s["dit_batches"],
                              c.paraphrase_prob)
        batches = scene_loader(stream, c.workers)
        layouts = {n: shot_layout(n, c.seconds_per_shot, c.fps, c.height, c.width) for n in counts}
        t0 = time.monotonic()
        while not pool.full() and self.time_left() > 0:
            self._refresh(pool, batches)
        self.timing["pool_fill_s"] = round(time.monotonic() - t0, 1)
        self.log(f"pool: {dict(pool.size)} videos encoded in {self.timing['pool_fill_s']} s; layouts "
                 + ", ".join(f"{n} shots = {l.num_tokens} tokens" for n, l in layouts.items()))
        generator = torch.Generator(self.device).manual_seed(derived_seed(c.seed, s["segment"], STREAM_DIT))
        empty_ids, empty_mask = self.empty_ids.to(self.device), self.empty_mask.to(self.device)
        segment_steps, window, t_window, refresh_s = 0, {n: [] for n in self.twins}, time.monotonic(), 0.0
        t_start, horizon = time.monotonic(), max(1e-6, self.time_left())  # what the schedule decays over
        while s["dit_step"] < c.dit_steps and self.time_left() > 0 and self.twins:
            t_step = time.monotonic()
            if segment_steps % c.refresh_every == 0:
                refresh_s += self._refresh(pool, batches)
            n = c.shot_cycle[s["dit_step"] % len(c.shot_cycle)]
            latents, ids, mask = pool.sample(n, c.batch, generator)
            drop = torch.rand(c.batch, generator=generator, device=self.device) < c.uncond_prob
            ids = torch.where(drop[:, None, None], empty_ids, ids)
            mask = torch.where(drop[:, None, None], empty_mask, mask)
            noise = torch.randn(latents.shape, generator=generator, device=self.device)
            sigma = shifted_sigmas(torch.rand(c.batch, generator=generator, device=self.device), c.shift)
            lr = scheduled_lr(c.lr, segment_steps, c.warmup, (time.monotonic() - t_start) / horizon, c.lr_schedule,
                              c.lr_floor)
            for name, twin in list(self.twins.items()):
                try:
                    with self.autocast():
                        loss, parts = twin.loss(latents, noise, sigma, ids, mask, layouts[n])
                    parts["grad_norm"] = twin.step(loss, lr)
                    window[name].append(parts)
                except Exception as e:
                    self._drop(name, e)
            s["dit_step"] += 1
            segment_steps += 1
            s["dit_seconds"] += time.monotonic() - t_step
            if s["dit_step"] % c.log_every == 0 and self.twins:
                if self.cuda:
                    torch.cuda.synchronize()
                dt = (time.monotonic() - t_window) / c.log_every
                row = {"step": s["dit_step"], "elapsed_s": round(s["dit_seconds"], 1), "lr": lr,
                       "ms_per_step": round(dt * 1000, 1), "refresh_ms": round(refresh_s / c.log_every * 1000, 1)}
                text = []
                for name in self.twins:
                    mean = window_mean(window[name])
                    row[name] = mean
                    text.append(f"{name} flow {mean['flow']:.4f}" + (f" bal {mean['balance']:.4f}" if mean['balance']
                                                                     else "") + f" |g| {mean['grad_norm']:.2f}")
                    window[name] = []
                self.history["dit"].append(row)
                self.log(f"dit step {s['dit_step']}: " + "; ".join(text) + f" | lr {lr:.1e} {dt * 1000:.0f} ms/step "
                         f"(refresh {row['refresh_ms']:.0f}), {c.batch / dt:.0f} videos/s")
                t_window, refresh_s = time.monotonic(), 0.0
            self._maybe_checkpoint()

    # --- checkpoints and export ----------------------------------------------------------------
    def _maybe_checkpoint(self) -> None:
        if time.monotonic() - self.last_checkpoint >= self.cfg.checkpoint_every_s:
            self.checkpoint()

    def checkpoint(self, final: bool = False) -> None:
        t0 = time.monotonic()
        _save_torch(self.out / "ckpt-vae.pt", {"weights": {k: v.detach().cpu() for k, v in self.vae.state_dict().items()},
                                               "ema": self.vae_ema.state(torch.float32),
                                               "config": dict(self.vae.config)})
        for name, twin in self.twins.items():
            _save_torch(self.out / f"ckpt-{name}.pt", twin.state())
        if self.state["vae_done"]:
            _write_atomic(self.out / "weights.tar", self.export_tar)
        self.write_summary()
        self.last_checkpoint = time.monotonic()
        self.log(f"{'final ' if final else ''}checkpoint in {time.monotonic() - t0:.1f} s: {self._progress()}; "
                 + ", ".join(f"{p.name} {p.stat().st_size / 2**20:.1f} MiB" for p in sorted(self.out.iterdir())
                             if p.suffix in (".pt", ".tar")))

    def export(self, root: Path) -> None:
        """Diffusers-layout directories under `root`: one per twin; the VAE in the first twin's
        (install links the others to it), tokenizer/ is written by install (it needs transformers)."""
        first = None
        for name, twin in self.twins.items():
            directory = root / TWINS[name][2]
            twin.export(directory)
            if first is None:
                save_vae(self.vae, directory / "vae")
                first = directory.name
            write_model_index(directory, directory.name, {
                "trained_by": "jobs/train_tiny.py", "attention": twin.method, "vae_from": first,
                "steps": twin.steps, "vae_steps": self.state["vae_step"], "resolution": [self.cfg.height, self.cfg.width],
                "fps": self.cfg.fps, "seconds_per_shot": self.cfg.seconds_per_shot, "seed": self.cfg.seed,
                "segment": self.state["segment"], "dit_batches": self.state["dit_batches"],
                "latent_mean": self.state["latent_mean"], "latent_std": self.state["latent_std"]})
        if first is None:  # no twin yet: the VAE alone
            save_vae(self.vae, root / "vae")

    def export_tar(self, path: Path) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            self.export(Path(tmp))
            with tarfile.open(path, "w") as tar:
                for item in sorted(Path(tmp).rglob("*")):
                    if item.is_file():
                        tar.add(item, arcname=str(item.relative_to(tmp)))

    def _load_resume(self, directory: Path) -> None:
        summary_path = directory / "summary.json"
        if not summary_path.is_file():
            raise FileNotFoundError(f"--resume: {summary_path} not found (pass a previous run's --out)")
        summary = json.loads(summary_path.read_text())
        # runs from before a key existed: what that run did instead
        was = {"refresh_videos": summary["config"].get("batch")}
        for key in RESUME_MUST_MATCH:
            before, now = summary["config"].get(key, was.get(key)), getattr(self.cfg, key)
            if (list(before) if isinstance(before, (list, tuple)) else before) != \
                    (list(now) if isinstance(now, (list, tuple)) else now):
                raise ValueError(f"--resume: {key} was {before!r} in {directory}, this run has {now!r}")
        self.state.update(summary["state"])
        self.history = summary.get("history", self.history)
        if self.cfg.reopen_vae:  # the latent space will change: nothing of the DiTs carries over
            self.state.update(vae_done=False, dit_step=0, dit_batches=0, dit_seconds=0.0, latent_mean=None,
                              latent_std=None)
            self.history["dit"] = []
        vae = torch.load(directory / "ckpt-vae.pt", map_location="cpu", weights_only=False)
        self.vae.load_state_dict(vae["weights"])
        if self.cfg.reopen_vae:
            # The average starts again from the weights as trained: a VAE worth reopening is usually
            # still improving fast (run 8's L1 halved in its last 150 steps), and an EMA 0.999 that had
            # passed its warm-up would keep most of its weight on the worse, older weights.
            self.vae_ema = EMA(self.vae, self.cfg.vae_ema)
        else:
            self.vae_ema.load_state(vae["ema"])
        if self.state["vae_done"]:
            set_latent_moments(self.vae, self.state["latent_mean"], self.state["latent_std"])
            self.vae.eval().requires_grad_(False)
        for name in () if self.cfg.reopen_vae else self.cfg.twins:
            path = directory / f"ckpt-{name}.pt"
            if path.is_file():
                self.resume_twins[name] = torch.load(path, map_location="cpu", weights_only=False)

    def _load_installed(self, root: Path) -> None:
        """Go on from weights `install` wrote under `root`: the first twin's directory holds the VAE."""
        from safetensors.torch import load_file

        c = self.cfg
        found = {name: root / TWINS[name][2] for name in c.twins
                 if (root / TWINS[name][2] / "model_index.json").is_file()}
        if not found:
            raise FileNotFoundError(f"init_from: no {' or '.join(TWINS[n][2] for n in c.twins)}/model_index.json "
                                    f"under {root} (a directory `python -m jobs.train_tiny install` wrote)")
        trainings = {n: json.loads((d / "model_index.json").read_text())["longreel_training"] for n, d in found.items()}
        first = next(iter(trainings.values()))
        was = {"height": first["resolution"][0], "width": first["resolution"][1], "fps": first["fps"],
               "seconds_per_shot": first["seconds_per_shot"], "seed": first.get("seed", c.seed)}
        for key, before in was.items():
            if before != getattr(c, key):
                raise ValueError(f"init_from: {key} was {before!r} in {root}, this run has {getattr(c, key)!r}")
        vae_dir = next(iter(found.values())) / "vae"
        self.vae.load_state_dict(load_file(str(vae_dir / "diffusion_pytorch_model.safetensors")))
        self.vae_ema = EMA(self.vae, c.vae_ema)  # the installed weights are already the average
        vae_config = json.loads((vae_dir / "config.json").read_text())
        mean, std = vae_config["latents_mean"], vae_config["latents_std"]
        set_latent_moments(self.vae, mean, std)
        self.vae.eval().requires_grad_(False)
        self.state.update(vae_done=True, vae_step=int(first["vae_steps"]), latent_mean=mean, latent_std=std,
                          segment=int(first.get("segment", 0)), dit_batches=int(first.get("dit_batches", 0)),
                          dit_step=max(int(t["steps"]) for t in trainings.values()))
        self.installed_twins = found

    # --- validation ----------------------------------------------------------------------------
    def validate(self) -> None:
        """Sample val_videos scripts with every twin (EMA weights, the pipeline's sampler and causal
        decoder), score them and the ground truth and its VAE reconstruction with the checker."""
        from pipeline.training.validate import reconstruct, sample_video_with, validation_set

        c = self.cfg
        t0 = time.monotonic()
        arrays = {}
        try:
            truth = validation_set(c.seed, STREAM_VALIDATION, c.val_videos, c.val_shots, c.seconds_per_shot, c.fps,
                                   c.height, c.width)
            results = {"ground_truth": [], "vae": [], **{name: [] for name in self.twins}}
            for i, (frames, captions, shot_frames) in enumerate(truth):
                arrays[f"ground_truth_{i}"] = frames
                results["ground_truth"].append(_score(frames, captions, shot_frames))
                recon = reconstruct(self.vae, frames)
                arrays[f"vae_{i}"] = recon
                results["vae"].append(_score(recon, captions, shot_frames))
                for name, twin in self.twins.items():
                    video = {"name": f"val{i}", "fps": c.fps, "height": c.height, "width": c.width, "seed": i,
                             "shots": [{"prompt": p, "seconds": c.seconds_per_shot} for p in captions]}
                    with twin.ema.applied():
                        twin.use_training_attention(False)  # the registry's kernels, as the pipeline samples
                        try:
                            sampled = sample_video_with(twin, self.vae, self.twin_config(name, video))
                        finally:
                            twin.use_training_attention(True)
                    arrays[f"{name}_{i}"] = sampled
                    results[name].append(_score(sampled, captions, shot_frames))
            self.scores = {k: {"mean": round(float(np.mean(v)), 4), "videos": [round(x, 4) for x in v]}
                           for k, v in results.items()}
            self.scores["captions"] = [t[1] for t in truth]
            self.log("validation scores (checker, 1 = every check passes): "
                     + ", ".join(f"{k} {v['mean']:.3f}" for k, v in self.scores.items() if k != "captions")
                     + f" ({time.monotonic() - t0:.1f} s)")
        except Exception as e:  # the weights are already saved; a failing sampler only costs the scores
            self.scores = {"error": f"{type(e).__name__}: {e}"}
            self.log(f"validation FAILED: {self.scores['error']}\n{traceback.format_exc()}")
        if arrays:
            buffer = io.BytesIO()
            np.savez_compressed(buffer, **arrays)
            _write_atomic(self.out / "samples.npz", lambda p: p.write_bytes(buffer.getvalue()))

    # --- summary -------------------------------------------------------------------------------
    def summary(self) -> dict:
        return {"config": {f.name: getattr(self.cfg, f.name) for f in fields(self.cfg)},
                "architecture": self.architecture, "text_max_length": self.text_length,
                "device": str(self.device), "torch": torch.__version__,
                "gpu": torch.cuda.get_device_name(self.device) if self.cuda else None,
                "state": self.state, "twins": {n: {"method": t.method, "steps": t.steps,
                                                   "parameters": t.num_parameters()} for n, t in self.twins.items()},
                "dropped": self.dropped, "timing": {**self.timing, "elapsed_s": round(self.elapsed(), 1)},
                "scores": self.scores, "history": self.history}

    def write_summary(self) -> None:
        text = json.dumps(self.summary(), indent=1, default=_json_default)
        _write_atomic(self.out / "summary.json", lambda p: p.write_text(text))


def _json_default(value):
    if isinstance(value, (tuple, set)):
        return list(value)
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return str(value)


def _score(frames: np.ndarray, captions: list[str], shot_frames: list[int]) -> float:
    from pipeline.procedural.checker import score_video

    return score_video(frames, captions, shot_frames).score
