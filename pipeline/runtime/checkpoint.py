"""Block checkpoints of one video in the object store, so that a killed job resumes where it stopped.

Under `NAME.ckpt/` the scheduler keeps, after each finished block k:
    block-0000k.pt   the block's clean latents (1, C, T_k, h, w) (re-decoded on resume: the MP4
                     encoder's state cannot be saved, decoding is cheap next to denoising)
    state-0000k.pt   the carried state after block k (what block k+1 starts from; None in joint mode)
    progress.json    {"blocks_done": k + 1, "fingerprint": ..., "seed": ...}: written last, so it
                     only ever names blocks whose files are complete (the commit point)
Older states are deleted once the next progress.json is written. A checkpoint made under a
different config (another seed, steps, model...) is ignored and replaced: resuming must give the
video an uninterrupted run would have given. `clear()` removes it all once the video is finished.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.config import to_dict
from pipeline.storage.base import ObjectStore

# Sections whose values change the latents; storage, output and cluster do not.
FINGERPRINT_SECTIONS = ("video", "model", "attention", "sampling", "parallel")


def fingerprint(cfg) -> str:
    data = to_dict(cfg)
    content = {k: data[k] for k in FINGERPRINT_SECTIONS}
    content["video"] = {k: v for k, v in content["video"].items() if k != "name"}
    content["parallel"] = {"degree": content["parallel"]["degree"]}  # timeouts and backend don't matter
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def _to_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _from_bytes(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


@dataclass
class Resume:
    """What a checkpoint gives back: the finished blocks' latents (in order) and the state after them."""

    latents: list[torch.Tensor]
    state: Any

    @property
    def blocks_done(self) -> int:
        return len(self.latents)


class BlockCheckpoint:
    def __init__(self, store: ObjectStore, name: str, cfg):
        self.store, self.prefix = store, f"{name}.ckpt/"
        self.fingerprint, self.seed = fingerprint(cfg), int(cfg.video.seed)

    def _key(self, kind: str, block: int) -> str:
        return f"{self.prefix}{kind}-{block:05d}.pt"

    def save(self, block: int, latents: torch.Tensor, state: Any) -> None:
        """Record block `block` as finished; blocks 0..block-1 must have been saved before."""
        self.store.put(self._key("block", block), _to_bytes(latents.detach().cpu()))
        self.store.put(self._key("state", block), _to_bytes(state))
        progress = {"blocks_done": block + 1, "fingerprint": self.fingerprint, "seed": self.seed}
        self.store.put(f"{self.prefix}progress.json", json.dumps(progress).encode())
        if block > 0:
            self.store.delete(self._key("state", block - 1))

    def load(self) -> Resume | None:
        """The saved blocks, or None when there is no checkpoint (or one from another config)."""
        key = f"{self.prefix}progress.json"
        if not self.store.exists(key):
            return None
        progress = json.loads(self.store.get(key))
        if progress.get("fingerprint") != self.fingerprint:
            self.clear()
            return None
        done = int(progress["blocks_done"])
        latents = [_from_bytes(self.store.get(self._key("block", k))) for k in range(done)]
        return Resume(latents=latents, state=_from_bytes(self.store.get(self._key("state", done - 1))))

    def clear(self) -> None:
        for key in self.store.list(self.prefix):
            self.store.delete(key)
