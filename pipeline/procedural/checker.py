"""Scores a video against its captions by colour segmentation: did each shot show what it says?

Per shot (frames [start, end) of the video, caption parsed by scenes.parse_caption):
- background: fraction of frames where the caption's background colour covers >= half the pixels;
- colour (per subject): fraction of frames where the subject's colour forms one compact blob of a
  plausible size (that is where the subject is "seen");
- shape (per subject): fraction of frames where it is seen and its blob reads as the caption's shape
  (from the blob's box: how far below the middle its centroid sits, how full its corner cells are);
- motion (per subject): 1 if the centroid / size trajectory over the frames where it is seen reads
  as the caption's motion, else 0;
- consistent (per subject that already appeared in an earlier shot, same colour and shape): 1 if it is
  seen in both shots and reads as the same shape in both, else 0.
The score is the mean of all these checks over all shots, in [0, 1]. Chance: on uniform RGB noise
every check is ~0 (noise forms no compact blobs and no dominant colour), so noise scores ~0.0; the
right backgrounds alone score ~0.18; a ground-truth video of another random script ~0.1.

Pixels are labelled with the nearest palette colour (the eight RGB cube corners) when within
MAX_COLOUR_DISTANCE of it, and a 3x3 majority filter drops isolated pixels (encoder ringing, noise).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Sequence

import numpy as np

from pipeline.procedural.scenes import COLOUR_NAMES, COLOURS, SHAPES, ShotSpec, Subject, parse_caption

MAX_COLOUR_DISTANCE = 110.0  # RGB distance to the nearest palette colour; farther pixels get no label
BACKGROUND_COVER = 0.5  # the background colour covers at least this fraction of a frame
MIN_AREA, MAX_AREA = 0.002, 0.4  # a subject's area as a fraction of the frame
MIN_FILL = 0.3  # blob pixels / box pixels below this: scattered, not one subject
# Shapes, from the blob's box. Triangle evidence = centroid drop below the box's middle in units of an
# upward triangle's (1/6 of the box) + bottom corner fill - top corner fill: ideal triangle ~1.9,
# circle and square ~0. Otherwise the corner cells tell a square (filled, ~1) from a circle (~0.3).
TRIANGLE_MIN_EVIDENCE = 0.9
SQUARE_MIN_CORNERS = 0.7
MOVE_MIN = 0.1  # net displacement (fraction of the frame) that counts as moving
BOUNCE_RANGE, BOUNCE_HYSTERESIS = 0.08, 0.03  # vertical range and turn size (fractions of the height)
SIZE_CHANGE_MIN = 0.3  # |log(last size / first size)| that counts as growing or shrinking
MIN_SEEN = 0.5  # motion and consistency need the subject seen in at least this fraction of frames



def _corner_lookup() -> np.ndarray:
    """(8,) int8: (r >= 128) * 4 + (g >= 128) * 2 + (b >= 128) -> index into COLOUR_NAMES."""
    lookup = np.full(8, -1, dtype=np.int8)
    for i, (r, g, b) in enumerate(COLOURS.values()):
        if {r, g, b} - {0, 255}:
            raise ValueError(f"the checker labels pixels by RGB cube corner; colour {COLOUR_NAMES[i]} is {(r, g, b)}")
        lookup[(r // 255) * 4 + (g // 255) * 2 + b // 255] = i
    return lookup


_CORNER_INDEX = _corner_lookup()


# ---------------------------------------------------------------------------------------------
# 1. Pixels -> colour labels -> blobs
# ---------------------------------------------------------------------------------------------


def label_pixels(frames: np.ndarray) -> np.ndarray:
    """(F, H, W, 3) uint8 -> (F, H, W) int8 index into COLOUR_NAMES, -1 where no colour is near."""
    high = frames >= 128
    corner = high[..., 0] * 4 + high[..., 1] * 2 + high[..., 2]
    off = np.where(high, 255 - frames.astype(np.int32), frames.astype(np.int32))  # per-channel distance
    near = (off * off).sum(-1) <= MAX_COLOUR_DISTANCE ** 2  # to the nearest corner, channel by channel
    return np.where(near, _CORNER_INDEX[corner], -1).astype(np.int8)


def majority_mask(labels: np.ndarray, colour: int) -> np.ndarray:
    """(F, H, W) bool: pixels of `colour` with at least 5 of their 3x3 neighbourhood (self included) alike."""
    mask = labels == colour
    padded = np.pad(mask, ((0, 0), (1, 1), (1, 1))).astype(np.uint8)
    h, w = mask.shape[1:]
    votes = sum(padded[:, dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3))
    return mask & (votes >= 5)


def _run_around_median(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of (F, L) projection counts, the contiguous nonzero run [lo, hi] holding the median
    pixel: a blob's extent along one axis, stray pixels beyond an empty line left out."""
    length = counts.shape[1]
    cumulative = counts.cumsum(1)
    median = np.argmax(cumulative * 2 > cumulative[:, -1:], axis=1)[:, None]  # (F, 1), a nonzero line
    index, empty = np.arange(length)[None, :], counts == 0
    lo = np.where(empty & (index < median), index, -1).max(1) + 1
    hi = np.where(empty & (index > median), index, length).min(1) - 1
    return lo, hi


def _box_sums(integral: np.ndarray, y0, y1, x0, x1) -> np.ndarray:
    """Sums over the boxes [y0, y1] x [x0, x1] (inclusive, one per frame) of an (F, H+1, W+1) integral image."""
    k = np.arange(len(integral))
    return integral[k, y1 + 1, x1 + 1] - integral[k, y0, x1 + 1] - integral[k, y1 + 1, x0] + integral[k, y0, x0]


def _integral(values: np.ndarray) -> np.ndarray:
    out = np.zeros((values.shape[0], values.shape[1] + 1, values.shape[2] + 1), dtype=np.int64)
    out[:, 1:, 1:] = values.cumsum(1, dtype=np.int64).cumsum(2)
    return out


@dataclass(frozen=True)
class Blobs:
    """One colour's main blob per frame, all (F,): area, centroid, shape features, whether seen."""

    area: np.ndarray  # pixels of the colour inside the blob's box
    x: np.ndarray  # centroid, fraction of the width
    y: np.ndarray  # centroid, fraction of the height
    fill: np.ndarray  # area / box pixels
    drop: np.ndarray  # centroid depth in the box: 0 at its top row, 1 at its bottom row
    top_corners: np.ndarray  # fill of the box's top corner cells (a quarter of its height and width each)
    bottom_corners: np.ndarray  # ... and of its bottom corner cells
    seen: np.ndarray  # bool: a compact blob of plausible size


def measure_blobs(mask: np.ndarray, chunk_frames: int = 64) -> Blobs:
    """The main blob of a (F, H, W) bool mask in each frame, vectorised over up to `chunk_frames`
    frames at a time (bounded memory). Its box is the contiguous run of occupied rows (columns)
    around the median pixel's row (column)."""
    if len(mask) > chunk_frames:
        parts = [_measure_blobs(mask[i:i + chunk_frames]) for i in range(0, len(mask), chunk_frames)]
        return Blobs(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(Blobs)))
    return _measure_blobs(mask)


def _measure_blobs(mask: np.ndarray) -> Blobs:
    h, w = mask.shape[1:]
    y0, y1 = _run_around_median(mask.sum(2))
    x0, x1 = _run_around_median(mask.sum(1))
    integral = _integral(mask)
    area = _box_sums(integral, y0, y1, x0, x1).astype(np.float64)
    ch, cw = (y1 - y0 + 4) // 4, (x1 - x0 + 4) // 4  # corner cell size, at least one pixel
    top, bottom = (sum(_box_sums(integral, row, row + ch - 1, left, left + cw - 1) for left in (x0, x1 - cw + 1))
                   / (2 * ch * cw) for row in (y0, y1 - ch + 1))  # fill of the top (bottom) two corner cells
    safe = np.maximum(area, 1.0)
    ys = np.arange(h, dtype=np.int64)[None, :, None]
    xs = np.arange(w, dtype=np.int64)[None, None, :]
    cy = (_box_sums(_integral(mask * ys), y0, y1, x0, x1) / safe + 0.5)  # pixel centres
    cx = (_box_sums(_integral(mask * xs), y0, y1, x0, x1) / safe + 0.5)
    box = (y1 - y0 + 1) * (x1 - x0 + 1)
    present = area > 0
    fill = np.where(present, area / box, 0.0)
    drop = np.where(present, (cy - y0) / (y1 - y0 + 1), 0.5)
    frac = area / (h * w)
    seen = (frac >= MIN_AREA) & (frac <= MAX_AREA) & (fill >= MIN_FILL)
    return Blobs(area, cx / w, cy / h, fill, drop, top_corners=np.where(present, top, 0.0),
                 bottom_corners=np.where(present, bottom, 0.0), seen=seen)


def classify_shape(blobs: Blobs) -> np.ndarray:
    """(F,) index into SHAPES of each frame's blob (meaningful where blobs.seen)."""
    triangle = (blobs.drop - 0.5) * 6 + blobs.bottom_corners - blobs.top_corners >= TRIANGLE_MIN_EVIDENCE
    square = (blobs.top_corners + blobs.bottom_corners) / 2 >= SQUARE_MIN_CORNERS
    otherwise = np.where(square, SHAPES.index("square"), SHAPES.index("circle"))
    return np.where(triangle, SHAPES.index("triangle"), otherwise)


# ---------------------------------------------------------------------------------------------
# 2. Trajectories -> motion
# ---------------------------------------------------------------------------------------------


def count_turns(values: np.ndarray, hysteresis: float) -> int:
    """Direction reversals of a 1-D path, ignoring wiggles smaller than `hysteresis`."""
    turns, direction = 0, 0  # direction: +1 rising, -1 falling, 0 not decided yet
    low = high = float(values[0]) if len(values) else 0.0  # extremes since the last turn
    for v in map(float, values[1:]):
        low, high = min(low, v), max(high, v)
        if direction >= 0 and v < high - hysteresis:
            turns, direction, low = turns + (direction > 0), -1, v
        elif direction <= 0 and v > low + hysteresis:
            turns, direction, high = turns + (direction < 0), 1, v
    return turns


def classify_motion(u: np.ndarray, x: np.ndarray, y: np.ndarray, size: np.ndarray) -> str:
    """A trajectory sampled at shot times u in [0, 1] (x, y: fractions of the frame; size: any unit)
    -> one of MOTIONS. Order: bounce (vertical turns), size change, net displacement, else still."""
    if len(u) < 3:
        return "stays still"
    if count_turns(y, BOUNCE_HYSTERESIS) >= 2 and np.ptp(y) >= BOUNCE_RANGE:
        return "bounces"
    growth = np.polyfit(u, np.log(np.maximum(size, 1e-6)), 1)[0]
    if abs(growth) >= SIZE_CHANGE_MIN:
        return "grows" if growth > 0 else "shrinks"
    dx, dy = np.polyfit(u, x, 1)[0], np.polyfit(u, y, 1)[0]  # displacement over the shot
    if max(abs(dx), abs(dy)) < MOVE_MIN:
        return "stays still"
    if abs(dx) >= abs(dy):
        return "moves right" if dx > 0 else "moves left"
    return "moves down" if dy > 0 else "moves up"


# ---------------------------------------------------------------------------------------------
# 3. Reports
# ---------------------------------------------------------------------------------------------


@dataclass
class SubjectReport:
    subject: Subject  # what the caption asks for
    colour: float
    shape: float
    motion: float
    seen_shape: str | None  # the most frequent shape read where seen (None: not seen)
    seen_motion: str | None  # None: seen in too few frames to judge a motion
    consistent: float | None = None  # None: first appearance of this subject in the video

    def checks(self) -> list[float]:
        return [self.colour, self.shape, self.motion] + ([] if self.consistent is None else [self.consistent])


@dataclass
class ShotReport:
    index: int
    frames: tuple[int, int]  # [start, end) in the video
    caption: str
    spec: ShotSpec
    background: float
    seen_background: str | None  # the colour covering most pixels over the shot
    subjects: list[SubjectReport] = field(default_factory=list)

    def checks(self) -> list[float]:
        return [self.background] + [c for s in self.subjects for c in s.checks()]

    @property
    def score(self) -> float:
        return float(np.mean(self.checks()))

    def mean_of(self, name: str) -> float | None:
        """Mean over subjects of one per-subject check (None when no subject has it)."""
        values = [getattr(s, name) for s in self.subjects if getattr(s, name) is not None]
        return float(np.mean(values)) if values else None


@dataclass
class VideoReport:
    shots: list[ShotReport]

    @property
    def score(self) -> float:
        return float(np.mean([c for shot in self.shots for c in shot.checks()]))

    def check_mean(self, name: str) -> float | None:
        """One kind of check ("background", "colour", "shape", "motion", "consistent") over all shots."""
        if name == "background":
            return float(np.mean([s.background for s in self.shots]))
        values = [getattr(r, name) for s in self.shots for r in s.subjects if getattr(r, name) is not None]
        return float(np.mean(values)) if values else None


def _measure_subject(labels: np.ndarray, subject: Subject) -> SubjectReport:
    blobs = measure_blobs(majority_mask(labels, COLOUR_NAMES.index(subject.colour)))
    n = len(blobs.seen)
    shapes = classify_shape(blobs)
    want = SHAPES.index(subject.shape)
    seen_shape = SHAPES[np.bincount(shapes[blobs.seen], minlength=len(SHAPES)).argmax()] if blobs.seen.any() else None
    seen_motion = None
    if blobs.seen.sum() >= max(3, MIN_SEEN * n):
        u = np.linspace(0.0, 1.0, n)[blobs.seen]
        seen_motion = classify_motion(u, blobs.x[blobs.seen], blobs.y[blobs.seen], np.sqrt(blobs.area[blobs.seen]))
    return SubjectReport(subject, colour=float(blobs.seen.mean()),
                         shape=float((blobs.seen & (shapes == want)).mean()),
                         motion=float(seen_motion == subject.motion), seen_shape=seen_shape, seen_motion=seen_motion)


def score_video(frames: np.ndarray, captions: Sequence[str], shot_frames: Sequence[int]) -> VideoReport:
    """Check (F, H, W, 3) uint8 frames against one caption per shot; shot i spans shot_frames[i]
    frames, back to back (sum(shot_frames) == F). Raises ValueError on mismatched inputs and
    scenes.CaptionError on a caption outside the grammar."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (F, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    if len(captions) != len(shot_frames):
        raise ValueError(f"{len(captions)} captions for {len(shot_frames)} shots")
    if sum(shot_frames) != len(frames) or min(shot_frames) < 1:
        raise ValueError(f"shot frames {list(shot_frames)} (sum {sum(shot_frames)}) do not split the "
                         f"video's {len(frames)} frames")
    specs = [parse_caption(c) for c in captions]
    first_seen: dict[tuple[str, str], SubjectReport] = {}  # identity -> its report in its first shot
    shots, start = [], 0
    for i, (caption, spec, n) in enumerate(zip(captions, specs, shot_frames)):
        labels = label_pixels(frames[start:start + n])  # (n, H, W)
        counts = np.stack([(labels == c).mean((1, 2)) for c in range(len(COLOUR_NAMES))], 1)  # (n, colours)
        bg = COLOUR_NAMES.index(spec.background)
        seen_bg = COLOUR_NAMES[counts.mean(0).argmax()] if counts.mean(0).max() >= BACKGROUND_COVER else None
        shot = ShotReport(i, (start, start + n), caption, spec,
                          background=float((counts[:, bg] >= BACKGROUND_COVER).mean()), seen_background=seen_bg)
        for subject in spec.subjects:
            report = _measure_subject(labels, subject)
            earlier = first_seen.get(subject.identity)
            if earlier is None:
                first_seen[subject.identity] = report
            else:
                both_seen = report.colour >= MIN_SEEN and earlier.colour >= MIN_SEEN
                report.consistent = float(both_seen and report.seen_shape == earlier.seen_shape)
            shot.subjects.append(report)
        shots.append(shot)
        start += n
    return VideoReport(shots)


# ---------------------------------------------------------------------------------------------
# 4. Tables
# ---------------------------------------------------------------------------------------------

_CHECKS = ("background", "colour", "shape", "motion", "consistent")


def _check_value(shot: ShotReport, name: str) -> float | None:
    return shot.background if name == "background" else shot.mean_of(name)


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _seen(shot: ShotReport) -> str:
    parts = [f"{s.subject.colour} {s.seen_shape or '?'} {s.seen_motion or '?'}" if s.seen_shape
             else f"no {s.subject.colour}" for s in shot.subjects]
    return "; ".join(parts) + f" / bg {shot.seen_background or '?'}"


def _render_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows])


def format_report(report: VideoReport) -> str:
    """One row per shot: frame range, each check (averaged over the shot's subjects), what was seen;
    then a row of each check over all shots."""
    rows = [[str(s.index), f"{s.frames[0]}-{s.frames[1] - 1}", *(_cell(_check_value(s, c)) for c in _CHECKS),
             f"{s.score:.2f}", _seen(s), s.caption] for s in report.shots]
    rows.append(["all", f"0-{report.shots[-1].frames[1] - 1}", *(_cell(report.check_mean(c)) for c in _CHECKS),
                 f"{report.score:.2f}", "", ""])
    return _render_table(["shot", "frames", *_CHECKS, "mean", "seen", "caption"], rows)


def format_comparison(reports: Sequence[VideoReport], names: Sequence[str]) -> str:
    """One column per video: a row per (shot, check) and per shot mean, then each check over all shots,
    then the score."""
    rows = []
    for i in range(max(len(r.shots) for r in reports)):
        shots = [r.shots[i] if i < len(r.shots) else None for r in reports]
        for check in _CHECKS:
            values = [_check_value(s, check) if s else None for s in shots]
            if any(v is not None for v in values):
                rows.append([f"shot {i} {check}", *map(_cell, values)])
        rows.append([f"shot {i} mean", *(_cell(s.score if s else None) for s in shots)])
    for check in _CHECKS:
        rows.append([f"all {check}", *(_cell(r.check_mean(check)) for r in reports)])
    rows.append(["score", *(f"{r.score:.3f}" for r in reports)])
    return _render_table(["check", *names], rows)
