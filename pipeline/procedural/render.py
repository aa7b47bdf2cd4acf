"""Drawing shots of the caption language (scenes.py) as uint8 frames, and streams of training clips.

Geometry is resolution-free: positions are fractions of the frame, a subject's half-extent is a
fraction of min(height, width), and a motion is a path over the shot's normalised time u in [0, 1].
Pixels are hard-edged (no anti-aliasing): a pixel takes a subject's colour when its centre lies inside
the shape. Shapes are axis-aligned: circle (fills pi/4 of its box), square (1), upward triangle (1/2).
With two subjects each keeps to its own half of the frame (top or bottom) so they never overlap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from pipeline.layout import shot_latent_frames, shot_pixel_frames
from pipeline.procedural.scenes import COLOURS, ShotSpec, attribute_ids, parse_caption, sample_script

HALF_EXTENT = {1: 0.2, 2: 0.14}  # subject half-extent / min(H, W), by the number of subjects in the shot
SCALE_RANGE = (0.6, 1.4)  # grows: first -> last frame scale; shrinks: the reverse
PATH_JITTER = 0.1  # start and end points move inward by up to this fraction of the free range
BOUNCES_PER_SHOT = 2


@dataclass(frozen=True)
class Track:
    """Where one subject is in each frame, in pixels: centre (x, y) and half-extent, each (F,)."""

    x: np.ndarray
    y: np.ndarray
    half_extent: np.ndarray


def shot_frame_counts(seconds: Sequence[float], fps: int, vae_temporal: int = 4) -> list[int]:
    """Pixel frames per shot, by the pipeline's own rule (pipeline.layout): 1 + 4k for the video."""
    return shot_pixel_frames(shot_latent_frames(list(seconds), fps, vae_temporal), vae_temporal)


def _lerp(a: float, b: float, t: np.ndarray | float) -> np.ndarray:
    return a + (b - a) * np.asarray(t, dtype=np.float64)


def plan_tracks(spec: ShotSpec, num_frames: int, height: int, width: int,
                rng: np.random.Generator) -> list[Track]:
    """One Track per subject of `spec`; the rng chooses lanes, start and end points."""
    u = np.linspace(0.0, 1.0, num_frames) if num_frames > 1 else np.zeros(1)
    base = HALF_EXTENT[len(spec.subjects)] * min(height, width)
    lanes = [(0.0, 1.0)] if len(spec.subjects) == 1 else [(0.0, 0.5), (0.5, 1.0)]
    if len(lanes) == 2 and rng.random() < 0.5:
        lanes.reverse()
    tracks = []
    for subject, (lane_lo, lane_hi) in zip(spec.subjects, lanes):
        scale = np.ones_like(u)
        if subject.motion in ("grows", "shrinks"):
            lo, hi = SCALE_RANGE
            scale = _lerp(lo, hi, u) if subject.motion == "grows" else _lerp(hi, lo, u)
        reach = base * scale.max()
        x_lo, x_hi = reach / width, 1.0 - reach / width  # centre ranges that keep the subject inside
        y_lo, y_hi = lane_lo + reach / height, lane_hi - reach / height
        jitter = rng.uniform(0.0, PATH_JITTER, size=2)
        x_from, x_to = _lerp(x_lo, x_hi, jitter[0]), _lerp(x_hi, x_lo, jitter[1])  # near the left, near the right
        y_from, y_to = _lerp(y_lo, y_hi, jitter[0]), _lerp(y_hi, y_lo, jitter[1])  # near the top, near the bottom
        x = np.full_like(u, rng.uniform(x_lo, x_hi))
        y = np.full_like(u, rng.uniform(y_lo, y_hi))
        if subject.motion == "moves right":
            x = _lerp(x_from, x_to, u)
        elif subject.motion == "moves left":
            x = _lerp(x_to, x_from, u)
        elif subject.motion == "moves down":
            y = _lerp(y_from, y_to, u)
        elif subject.motion == "moves up":
            y = _lerp(y_to, y_from, u)
        elif subject.motion == "bounces":  # from the floor (y_to) up to y_from and back, twice
            y = _lerp(y_to, y_from, np.abs(np.sin(np.pi * BOUNCES_PER_SHOT * u)))
        tracks.append(Track(x * width, y * height, base * scale))
    return tracks


def draw_shot(spec: ShotSpec, tracks: list[Track], height: int, width: int) -> np.ndarray:
    """(F, H, W, 3) uint8 frames of `spec` with its subjects on `tracks`."""
    frames = np.empty((len(tracks[0].x), height, width, 3), dtype=np.uint8)
    frames[:] = COLOURS[spec.background]
    py = np.arange(height, dtype=np.float64)[None, :, None] + 0.5  # pixel centres
    px = np.arange(width, dtype=np.float64)[None, None, :] + 0.5
    for subject, track in zip(spec.subjects, tracks):
        dx = px - track.x[:, None, None]  # (F, 1, W)
        dy = py - track.y[:, None, None]  # (F, H, 1)
        r = track.half_extent[:, None, None]
        if subject.shape == "circle":
            inside = dx * dx + dy * dy <= r * r
        elif subject.shape == "square":
            inside = (np.abs(dx) <= r) & (np.abs(dy) <= r)
        else:  # triangle: apex at the top centre of the box, base along its bottom edge
            inside = (dy >= -r) & (dy <= r) & (2.0 * np.abs(dx) <= dy + r)
        frames[inside] = COLOURS[subject.colour]  # inside: (F, H, W)
    return frames


def render_shot(spec: ShotSpec | str, num_frames: int, height: int, width: int,
                rng: np.random.Generator) -> np.ndarray:
    """(num_frames, height, width, 3) uint8 frames of one shot (a ShotSpec or its caption); the rng
    places the subjects."""
    if isinstance(spec, str):
        spec = parse_caption(spec)
    if num_frames < 1 or height < 1 or width < 1:
        raise ValueError(f"render_shot needs num_frames, height, width >= 1, got {num_frames}, {height}, {width}")
    return draw_shot(spec, plan_tracks(spec, num_frames, height, width, rng), height, width)


def _seconds_list(seconds_per_shot: float | Sequence[float], num_shots: int) -> list[float]:
    if isinstance(seconds_per_shot, (int, float)):
        return [float(seconds_per_shot)] * num_shots
    seconds = [float(s) for s in seconds_per_shot]
    if len(seconds) != num_shots:
        raise ValueError(f"seconds_per_shot has {len(seconds)} entries for {num_shots} shots")
    return seconds


def sample_video(seed: int | Sequence[int], num_shots: int, seconds_per_shot: float | Sequence[float],
                 fps: int, height: int, width: int,
                 second_subject_prob: float = 0.3) -> tuple[list[np.ndarray], list[str]]:
    """A random multi-shot video, deterministic in `seed`: ([(F_i, H, W, 3) uint8 per shot], captions).

    F_i follows the pipeline's frame rule (shot_frame_counts), so the shots line up with latent frames.
    """
    shots, script = _sample(seed, num_shots, seconds_per_shot, fps, height, width, second_subject_prob)
    return shots, [spec.caption for spec in script]


def _sample(seed, num_shots, seconds_per_shot, fps, height, width, second_subject_prob):
    rng = np.random.default_rng(seed)
    script = sample_script(rng, num_shots, second_subject_prob)
    counts = shot_frame_counts(_seconds_list(seconds_per_shot, num_shots), fps)
    return [render_shot(spec, n, height, width, rng) for spec, n in zip(script, counts)], script


@dataclass(frozen=True)
class Batch:
    frames: np.ndarray  # (B, F, H, W, 3) uint8, the shots of each video back to back
    captions: list[list[str]]  # [B][num_shots]
    attribute_ids: np.ndarray  # (B, num_shots, NUM_ATTRIBUTE_SLOTS) int64, see scenes.attribute_ids
    shot_pixel_frames: tuple[int, ...]  # frames of each shot, the same for every video of the stream
    video_seeds: list[tuple[int, int]]  # (stream seed, video index): sample_video(seed) re-renders one


def iter_batches(batch_size: int, num_shots: int, seconds_per_shot: float | Sequence[float], fps: int,
                 height: int, width: int, seed: int = 0, second_subject_prob: float = 0.3,
                 rank: int = 0, world_size: int = 1) -> Iterator[Batch]:
    """An endless stream of training batches. Video k of the stream is sample_video((seed, k), ...);
    data-parallel rank r of `world_size` takes videos r, r + world_size, ... so ranks never repeat."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
    index = rank
    while True:
        seeds, frames, scripts = [], [], []
        for _ in range(batch_size):
            shots, script = _sample((seed, index), num_shots, seconds_per_shot, fps, height, width,
                                    second_subject_prob)
            seeds.append((seed, index))
            frames.append(np.concatenate(shots))
            scripts.append(script)
            index += world_size
        yield Batch(frames=np.stack(frames),
                    captions=[[spec.caption for spec in script] for script in scripts],
                    attribute_ids=np.stack([np.stack([attribute_ids(spec) for spec in script]) for script in scripts]),
                    shot_pixel_frames=tuple(len(s) for s in shots), video_seeds=seeds)
