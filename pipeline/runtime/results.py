"""What became of each video of a batch: one JSON line per video in the results manifest."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields


@dataclass
class Timings:
    """Seconds. `denoise_s` is the group's compute (sum over blocks); the rest is what the batch hides
    behind it or pays on top: a video's `wall_s` near `denoise_s` means decode, encode, upload and
    checkpoints ran in the shadow of denoising."""

    wall_s: float = 0.0  # from the scheduler taking the video to the video's JSON being written
    denoise_s: float = 0.0
    decode_s: float = 0.0
    encode_s: float = 0.0
    upload_s: float = 0.0
    checkpoint_s: float = 0.0
    writer_wait_s: float = 0.0  # the scheduler waiting on the writer (backpressure and the final flush)
    rebuild_s: float = 0.0  # rebuilding the worker group after a worker died
    resume_s: float = 0.0  # reading the checkpoint and re-writing its blocks


@dataclass
class VideoResult:
    name: str
    status: str  # done | skipped | failed
    line: int = 0  # the manifest line of the entry
    video_uri: str = ""
    metadata_uri: str = ""
    error: str = ""
    blocks: int = 0
    resumed_blocks: int = 0  # blocks taken from a checkpoint instead of being denoised again
    rebuilds: int = 0  # worker-group rebuilds during this video
    tokens: int = 0  # video tokens of the whole video (one denoising pass)
    frames: int = 0
    group: str = ""
    timings: Timings = field(default_factory=Timings)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_dict(cls, data: dict) -> VideoResult:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["timings"] = Timings(**data.get("timings", {}))
        return cls(**values)


def existing_result(entry) -> VideoResult | None:
    """A `skipped` result if the manifest entry's video is already in its store (MP4 and JSON: the
    JSON is written last), else None."""
    from pipeline.storage import open_store

    store = open_store(entry.config.storage)
    mp4, meta = f"{entry.name}.mp4", f"{entry.name}.json"
    if store.exists(meta) and store.exists(mp4):
        return VideoResult(name=entry.name, status="skipped", line=entry.line, video_uri=store.uri(mp4),
                           metadata_uri=store.uri(meta))
    return None


def results_jsonl(results: list[VideoResult]) -> bytes:
    return "".join(r.to_json() + "\n" for r in results).encode()


def parse_results(data: bytes) -> list[VideoResult]:
    return [VideoResult.from_dict(json.loads(line)) for line in data.decode().splitlines() if line.strip()]


class RemoteError(RuntimeError):
    """An error raised in another process, carried as its `Type: message` line (actors/errors.py)."""


def one_line(e: BaseException) -> str:
    """An exception as the results manifest and logs show it: its type and its first line."""
    if isinstance(e, RemoteError):
        return str(e)
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__
