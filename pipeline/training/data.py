"""Training batches of procedural videos: planned on the CPU, drawn with torch where the model is.

pipeline.procedural draws with numpy at ~30-80 ms per 128x128 multi-shot video on one core, far
slower than a tiny model's training step on a GPU. So the CPU part here is only what needs the
random generator (the script and every subject's track, by the exact calls sample_video makes, so
video i of a batch is sample_video's video for the same seed), and `draw` paints the pixels with
torch on any device by draw_shot's rule (pixel centres, hard edges, the same float64 arithmetic).
tests/test_train_tiny.py checks draw(plan) against sample_video frame by frame.

Batch k of a stream holds videos seeded (seed, stream, k, i); a DataLoader worker w of W plans
batches k = start + w, start + w + W, ..., which the DataLoader hands out in order k = start,
start + 1, ... whatever W is: the data of a run depends only on the seed and the batch index.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from pipeline.procedural.render import plan_tracks, shot_frame_counts
from pipeline.procedural.scenes import COLOURS, MAX_SUBJECTS, SHAPES, ShotSpec, sample_script
from pipeline.training.text import ByteTokenizer

# Accepted wordings of canonical phrases (pipeline.procedural.scenes.parse_caption maps them back),
# so the text encoder learns the grammar's variants and not one spelling.
PARAPHRASES = {
    "moves left": ("moves to the left",),
    "moves right": ("moves to the right",),
    "bounces": ("bounces up and down",),
    "stays still": ("stays", "is still"),
    " on a ": (" over a ", " on the ", " over the "),
}


def paraphrase(caption: str, rng: np.random.Generator, prob: float) -> str:
    """With probability `prob`, each phrase of PARAPHRASES in `caption` takes a random variant and
    the leading "a" becomes "the"; the parsed meaning never changes."""
    for phrase, variants in PARAPHRASES.items():
        if phrase in caption and rng.random() < prob:
            caption = caption.replace(phrase, variants[int(rng.integers(len(variants)))])
    if caption.startswith("a ") and rng.random() < prob:
        caption = "the " + caption[2:]
    return caption


@dataclass
class SceneBatch:
    """Everything `draw` needs for B videos of F frames (shots back to back), and their prompts.

    Per frame and subject slot (MAX_SUBJECTS): whether present, shape index into SHAPES, colour,
    centre (x, y) and half-extent r in pixels (float64, as pipeline.procedural plans them)."""

    index: int  # batch index k in its stream
    height: int
    width: int
    shot_pixel_frames: tuple[int, ...]
    background: torch.Tensor  # (B, F, 3) uint8
    present: torch.Tensor  # (B, F, S) bool
    shape: torch.Tensor  # (B, F, S) int64
    colour: torch.Tensor  # (B, F, S, 3) uint8
    x: torch.Tensor  # (B, F, S) float64
    y: torch.Tensor
    r: torch.Tensor
    captions: list[list[str]]  # [B][num_shots], canonical
    input_ids: torch.Tensor  # (B, num_shots, L) int64: the prompts the model reads (maybe paraphrased)
    text_mask: torch.Tensor  # (B, num_shots, L) bool

    @property
    def num_shots(self) -> int:
        return len(self.shot_pixel_frames)

    def __len__(self) -> int:
        return self.background.shape[0]


def plan_video(seed: Sequence[int], num_shots: int, seconds: float, fps: int, height: int, width: int,
               second_subject_prob: float) -> tuple[list[ShotSpec], list[list]]:
    """sample_video's random draws, without the pixels: (shot specs, per-shot Tracks)."""
    rng = np.random.default_rng(list(seed))
    script = sample_script(rng, num_shots, second_subject_prob)
    counts = shot_frame_counts([seconds] * num_shots, fps)
    return script, [plan_tracks(spec, n, height, width, rng) for spec, n in zip(script, counts)]


def plan_batch(index: int, seeds: Sequence[Sequence[int]], num_shots: int, seconds: float, fps: int, height: int,
               width: int, second_subject_prob: float, text_length: int, paraphrase_prob: float = 0.0) -> SceneBatch:
    """The SceneBatch of videos seeded by `seeds` (one each)."""
    counts = shot_frame_counts([seconds] * num_shots, fps)
    b, f, s = len(seeds), sum(counts), MAX_SUBJECTS
    background = np.zeros((b, f, 3), np.uint8)
    present = np.zeros((b, f, s), bool)
    shape = np.zeros((b, f, s), np.int64)
    colour = np.zeros((b, f, s, 3), np.uint8)
    xyr = np.zeros((3, b, f, s), np.float64)
    captions, prompts = [], []
    for i, seed in enumerate(seeds):
        script, tracks = plan_video(seed, num_shots, seconds, fps, height, width, second_subject_prob)
        start = 0
        for spec, shot_tracks, n in zip(script, tracks, counts):
            frames = slice(start, start + n)
            background[i, frames] = COLOURS[spec.background]
            for j, (subject, track) in enumerate(zip(spec.subjects, shot_tracks)):
                present[i, frames, j] = True
                shape[i, frames, j] = SHAPES.index(subject.shape)
                colour[i, frames, j] = COLOURS[subject.colour]
                xyr[:, i, frames, j] = track.x, track.y, track.half_extent
            start += n
        captions.append([spec.caption for spec in script])
        text_rng = np.random.default_rng([*seed, 1])
        prompts += [paraphrase(c, text_rng, paraphrase_prob) for c in captions[-1]]
    ids, mask = ByteTokenizer().encode(prompts, text_length)
    t = torch.from_numpy
    return SceneBatch(index, height, width, tuple(counts), t(background), t(present), t(shape), t(colour),
                      t(xyr[0]), t(xyr[1]), t(xyr[2]), captions, t(ids).view(b, num_shots, text_length),
                      t(mask).view(b, num_shots, text_length))


def draw(batch: SceneBatch, device: torch.device | str) -> torch.Tensor:
    """(B, F, H, W, 3) uint8 frames on `device`: draw_shot's pixels (subjects painted in order)."""
    device = torch.device(device)
    frames = batch.background.to(device)[:, :, None, None, :].expand(-1, -1, batch.height, batch.width, -1).clone()
    py = torch.arange(batch.height, dtype=torch.float64, device=device)[:, None] + 0.5  # (H, 1) pixel centres
    px = torch.arange(batch.width, dtype=torch.float64, device=device)[None, :] + 0.5  # (1, W)
    for j in range(batch.present.shape[2]):
        dx = px - batch.x[:, :, j, None, None].to(device)  # (B, F, 1, W)
        dy = py - batch.y[:, :, j, None, None].to(device)  # (B, F, H, 1)
        r = batch.r[:, :, j, None, None].to(device)
        circle = dx * dx + dy * dy <= r * r
        square = (dx.abs() <= r) & (dy.abs() <= r)
        triangle = (dy >= -r) & (dy <= r) & (2.0 * dx.abs() <= dy + r)
        kind = batch.shape[:, :, j, None, None].to(device)
        inside = torch.where(kind == 0, circle, torch.where(kind == 1, square, triangle))
        inside &= batch.present[:, :, j, None, None].to(device)  # (B, F, H, W)
        frames = torch.where(inside[..., None], batch.colour[:, :, j, None, None, :].to(device), frames)
    return frames


def to_video(frames: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, F, H, W, 3) uint8 -> (B, 3, F, H, W) in [-1, 1], the VAE's input."""
    return frames.permute(0, 4, 1, 2, 3).to(dtype) / 127.5 - 1.0


def random_crops(video: torch.Tensor, size: int, generator: torch.Generator, align: int = 8) -> torch.Tensor:
    """(B, C, F, H, W) -> (B, C, F, size, size): one random window per clip, its corner on a multiple
    of `align` (the VAE's spatial factor, so crops keep the full frame's alignment to latent cells).

    The VAE is convolutional (its one attention block works per latent frame at any size), so it
    trains on crops and runs on whole frames: a 64x64 crop of 128x128 clips costs a quarter of the
    pixels per clip. `generator` is a CPU generator: the offsets never wait for the device."""
    b, _, _, h, w = video.shape
    if size % align or not 0 < size <= min(h, w):
        raise ValueError(f"vae_crop: {size} must be a multiple of {align} in (0, {min(h, w)}]")
    oy = torch.randint((h - size) // align + 1, (b,), generator=generator) * align
    ox = torch.randint((w - size) // align + 1, (b,), generator=generator) * align
    steps = torch.arange(size)
    rows = (oy[:, None] + steps).to(video.device)  # (B, size)
    cols = (ox[:, None] + steps).to(video.device)
    batch = torch.arange(b, device=video.device)[:, None, None]
    crops = video.permute(0, 3, 4, 1, 2)[batch, rows[:, :, None], cols[:, None, :]]  # (B, size, size, C, F)
    return crops.permute(0, 3, 4, 1, 2).contiguous()


class SceneStream(IterableDataset):
    """Endless SceneBatches: batch k has cycle[k % len(cycle)] shots of `seconds` each."""

    def __init__(self, stream: int, seed: int, batch_size: int, cycle: Sequence[int], seconds: float, fps: int,
                 height: int, width: int, text_length: int, second_subject_prob: float = 0.3,
                 paraphrase_prob: float = 0.0, start: int = 0):
        self.stream, self.seed, self.batch_size, self.cycle = stream, seed, batch_size, tuple(cycle)
        self.seconds, self.fps, self.height, self.width = seconds, fps, height, width
        self.text_length, self.second_subject_prob, self.paraphrase_prob = text_length, second_subject_prob, paraphrase_prob
        self.start = start

    def batch(self, k: int) -> SceneBatch:
        seeds = [(self.seed, self.stream, k, i) for i in range(self.batch_size)]
        return plan_batch(k, seeds, self.cycle[k % len(self.cycle)], self.seconds, self.fps, self.height, self.width,
                          self.second_subject_prob, self.text_length, self.paraphrase_prob)

    def __iter__(self) -> Iterator[SceneBatch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        k = self.start + worker
        while True:
            yield self.batch(k)
            k += workers


def scene_loader(stream: SceneStream, num_workers: int) -> Iterator[SceneBatch]:
    """Batches of `stream` in order, planned by `num_workers` processes (0: in this process)."""
    if num_workers == 0:
        return iter(stream)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=num_workers, prefetch_factor=4,
                                         persistent_workers=True, collate_fn=lambda b: b)
    return iter(loader)
