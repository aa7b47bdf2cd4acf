"""A video on disk as the pipeline leaves it: NAME.mp4 (H.264) and NAME.json beside it (captions,
fps, per-shot pixel frames). Read for the checker; written for ground-truth references and tests.

The sidecar needs at least {"video": {"shots": [{"prompt", "seconds"}], "fps"}} (also accepted under
"config", or bare {"shots", "fps"}); "plan": {"shot_pixel_frames": [...]} is used when present,
otherwise the frames are recomputed from seconds and fps by the pipeline's rule (pipeline.layout,
with model.vae_temporal when given).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

from pipeline.procedural.render import shot_frame_counts


class VideoFileError(ValueError):
    """A missing or malformed video or sidecar; str() is one line naming the file and key."""


@dataclass(frozen=True)
class Sidecar:
    captions: list[str]
    seconds: list[float]
    fps: int
    shot_pixel_frames: list[int]


def sidecar_path(video_path: str | Path) -> Path:
    return Path(video_path).with_suffix(".json")


def read_sidecar(path: str | Path) -> Sidecar:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise VideoFileError(f"{path}: sidecar not found (the captions go in NAME.json beside NAME.mp4)") from None
    except json.JSONDecodeError as e:
        raise VideoFileError(f"{path}: not valid JSON (line {e.lineno})") from None
    if not isinstance(data, dict):
        raise VideoFileError(f"{path}: expected a JSON object with video.shots and video.fps")
    root, prefix = data, ""
    if "video" not in data and isinstance(data.get("config"), dict):  # the whole config stored under "config"
        root, prefix = data["config"], "config."
    video, prefix = (root["video"], prefix + "video.") if "video" in root else (root, prefix)
    if not isinstance(video, dict) or not isinstance(video.get("shots"), list) or not video["shots"]:
        raise VideoFileError(f"{path}: {prefix}shots: expected a non-empty list of {{prompt, seconds}}")
    captions, seconds = [], []
    for i, shot in enumerate(video["shots"]):
        if not isinstance(shot, dict) or not isinstance(shot.get("prompt"), str):
            raise VideoFileError(f"{path}: {prefix}shots.{i}.prompt: expected a string (got {shot!r})")
        if not isinstance(shot.get("seconds"), (int, float)) or shot["seconds"] <= 0:
            raise VideoFileError(f"{path}: {prefix}shots.{i}.seconds: expected a number > 0 "
                                 f"(got {shot.get('seconds')!r})")
        captions.append(shot["prompt"])
        seconds.append(float(shot["seconds"]))
    fps = video.get("fps")
    if not isinstance(fps, int) or fps <= 0:
        raise VideoFileError(f"{path}: {prefix}fps: expected an integer > 0 (got {fps!r})")
    plan = data.get("plan") if isinstance(data.get("plan"), dict) else {}
    frames = plan.get("shot_pixel_frames")
    if frames is None:
        model = root.get("model") if isinstance(root.get("model"), dict) else {}
        frames = shot_frame_counts(seconds, fps, model.get("vae_temporal", 4))
    elif (not isinstance(frames, list) or len(frames) != len(captions)
          or not all(isinstance(n, int) and n >= 1 for n in frames)):
        raise VideoFileError(f"{path}: plan.shot_pixel_frames: expected {len(captions)} integers >= 1 (got {frames!r})")
    return Sidecar(captions, seconds, fps, list(frames))


def write_sidecar(path: str | Path, captions: list[str], seconds: list[float], fps: int,
                  shot_pixel_frames: list[int]) -> None:
    """The pipeline's sidecar layout, reduced to what the checker reads."""
    data = {"video": {"shots": [{"prompt": c, "seconds": s} for c, s in zip(captions, seconds)], "fps": fps},
            "plan": {"shot_pixel_frames": list(shot_pixel_frames)}}
    _write_atomic(Path(path), json.dumps(data, indent=2).encode())


def _write_atomic(path: Path, payload: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(payload)
    os.replace(tmp, path)


def write_mp4(path: str | Path, frames: np.ndarray, fps: int, crf: int = 18, preset: str = "veryfast") -> None:
    """(F, H, W, 3) uint8 -> H.264 yuv420p MP4 at `path` (written to a temp name, then renamed)."""
    path = Path(path)
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise VideoFileError(f"{path}: frames must be (F, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise VideoFileError(f"{path}: yuv420p needs an even height and width, got {frames.shape[1]}x{frames.shape[2]}")
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with av.open(str(tmp), mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.height, stream.width = frames.shape[1], frames.shape[2]
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": str(crf), "preset": preset}
            for frame in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_mp4(path: str | Path) -> np.ndarray:
    """All frames of the first video stream as (F, H, W, 3) uint8 RGB."""
    path = Path(path)
    if not path.is_file():
        raise VideoFileError(f"{path}: video not found")
    try:
        with av.open(str(path)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except (av.error.FFmpegError, IndexError) as e:
        raise VideoFileError(f"{path}: cannot decode a video stream ({type(e).__name__})") from None
    if not frames:
        raise VideoFileError(f"{path}: the video stream has no frames")
    return np.stack(frames)


def save_clip(path: str | Path, shots: list[np.ndarray], captions: list[str], seconds: list[float], fps: int,
              crf: int = 18) -> None:
    """NAME.mp4 of the shots back to back and NAME.json beside it, as the pipeline leaves a video."""
    write_mp4(path, np.concatenate(shots), fps, crf)
    write_sidecar(sidecar_path(path), captions, seconds, fps, [len(s) for s in shots])
