"""Contact sheet of a run's validation videos (samples.npz): per video, one row per source
(ground truth, VAE reconstruction, each twin) and `columns` frames spread over the video; or of one
generated video (decoded as the checker decodes it), in one row."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

SOURCE_ORDER = ("ground_truth", "vae")  # then the twins, in the order the run saved them


def contact_sheet(samples: dict[str, np.ndarray], columns: int = 5) -> np.ndarray:
    """(rows x H, columns x W, 3) uint8 from arrays named `<source>_<video>` of shape (T, H, W, 3)."""
    if columns < 1:
        raise ValueError(f"columns: {columns} (must be >= 1)")
    keyed: dict[int, dict[str, np.ndarray]] = {}
    for name, frames in samples.items():
        m = re.fullmatch(r"(.+)_(\d+)", name)
        if m is None or frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"samples: {name!r} is not <source>_<video> frames of shape (T, H, W, 3)")
        keyed.setdefault(int(m[2]), {})[m[1]] = frames
    if not keyed:
        raise ValueError("samples: no videos")
    rows = []
    for video in sorted(keyed):
        sources = keyed[video]
        ordered = [s for s in SOURCE_ORDER if s in sources] + [s for s in sources if s not in SOURCE_ORDER]
        for source in ordered:
            frames = sources[source]
            picks = np.linspace(0, len(frames) - 1, columns).round().astype(int)
            rows.append(np.concatenate([frames[i] for i in picks], axis=1))
    return np.concatenate(rows, axis=0)


def read_samples(path: Path) -> dict[str, np.ndarray]:
    """samples.npz as saved by a run, or a video file as the one source `video_0`."""
    if path.suffix == ".npz":
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    from pipeline.procedural.videofile import read_mp4

    return {"video_0": read_mp4(path)}


def write_sheet(source: Path, png: Path, columns: int = 5) -> tuple[int, int]:
    """Write the sheet of `source` (.npz or a video) to `png` through a temporary name; returns (height, width)."""
    from PIL import Image

    if not source.is_file():
        raise FileNotFoundError(f"samples: no file {source}")
    sheet = contact_sheet(read_samples(source), columns)
    tmp = png.with_name(png.name + ".part")
    try:
        Image.fromarray(sheet).save(tmp, format="PNG")
        tmp.replace(png)
    finally:
        tmp.unlink(missing_ok=True)  # gone already after the rename
    return sheet.shape[:2]
