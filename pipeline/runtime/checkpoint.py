"""Block checkpoints of one video in the object store, so that a killed job resumes where it stopped.

Under `NAME.ckpt/`, after each finished block k:
    block-0000k.safetensors          the block's clean latents (1, C, T_k, h, w): re-decoded on resume
                                     (the MP4 encoder's state cannot be saved; decoding is cheap next
                                     to denoising)
    state-0000k-rank{r}.safetensors  rank r's carried state after block k (CarriedState.to_tensors();
                                     block mode only: what block k+1 starts from). Under context
                                     parallelism every rank writes its own, straight from its process.
    progress.json                    {"blocks_done": k + 1, "ranks": P, "fingerprint": ...}: written
                                     last, so it only names blocks whose files are complete (the
                                     commit point)
The states of block k-1 are deleted once block k is committed. Everything is safetensors (names
and tensors): loading a checkpoint from a shared bucket runs no code. A checkpoint made under a
different config (another seed, steps, model...) is ignored and replaced: resuming must give the
video an uninterrupted run would have given. `clear()` removes it all once the video is finished.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pipeline.config import to_dict
from pipeline.storage.base import ObjectStore

if TYPE_CHECKING:
    import torch


# torch (safetensors.torch) is imported on first use: the scheduler's process imports this module on the
# job's start-up path and needs torch only once a block's latents arrive.
def save_tensors(tensors: dict) -> bytes:
    from safetensors.torch import save

    return save(tensors)


def load_tensors(data: bytes) -> dict:
    from safetensors.torch import load

    return load(data)

# Sections whose values change the latents; storage, output and cluster do not.
FINGERPRINT_SECTIONS = ("video", "model", "attention", "sampling", "parallel")


def fingerprint(cfg) -> str:
    data = to_dict(cfg)
    content = {k: data[k] for k in FINGERPRINT_SECTIONS}
    content["video"] = {k: v for k, v in content["video"].items() if k != "name"}
    content["parallel"] = {"degree": content["parallel"]["degree"]}  # timeouts and backend don't matter
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Resume:
    """A checkpoint's finished blocks: their latents (in order), and each rank's state after them."""

    checkpoint: BlockCheckpoint
    latents: list[torch.Tensor]
    ranks: int
    _states: list | None = field(default=None, repr=False)

    @property
    def blocks_done(self) -> int:
        return len(self.latents)

    @property
    def state(self) -> list[dict[str, torch.Tensor]]:
        """Per rank, the carried state after the last finished block (read on first use)."""
        if self._states is None:
            self._states = [self.checkpoint.load_state(self.blocks_done - 1, r) for r in range(self.ranks)]
        return self._states


class BlockCheckpoint:
    def __init__(self, store: ObjectStore, name: str, cfg):
        self.store, self.prefix = store, f"{name}.ckpt/"
        self.fingerprint, self.seed = fingerprint(cfg), int(cfg.video.seed)
        self.ranks = int(cfg.parallel.degree)

    def _block_key(self, block: int) -> str:
        return f"{self.prefix}block-{block:05d}.safetensors"

    def _state_key(self, block: int, rank: int) -> str:
        return f"{self.prefix}state-{block:05d}-rank{rank}.safetensors"

    def save_state(self, block: int, rank: int, tensors: dict[str, torch.Tensor]) -> None:
        """Rank `rank`'s carried state after block `block` (before the block is committed by save)."""
        self.store.put(self._state_key(block, rank), save_tensors({k: v.contiguous() for k, v in tensors.items()}))

    def save(self, block: int, latents: torch.Tensor, states: list[dict[str, torch.Tensor]] | None = None) -> None:
        """Commit block `block` (blocks 0..block-1 are committed already). `states`, one per rank, are
        saved first when given; otherwise the ranks have saved theirs with save_state."""
        for rank, tensors in enumerate(states or ()):
            self.save_state(block, rank, tensors)
        self.store.put(self._block_key(block), save_tensors({"latents": latents.detach().cpu().contiguous()}))
        progress = {"blocks_done": block + 1, "ranks": self.ranks, "fingerprint": self.fingerprint, "seed": self.seed}
        self.store.put(f"{self.prefix}progress.json", json.dumps(progress).encode())
        if block > 0:
            for rank in range(self.ranks):
                self.store.delete(self._state_key(block - 1, rank))

    def load(self) -> Resume | None:
        """The committed blocks, or None when there is no checkpoint (or one from another config)."""
        key = f"{self.prefix}progress.json"
        if not self.store.exists(key):
            return None
        progress = json.loads(self.store.get(key))
        if progress.get("fingerprint") != self.fingerprint:
            self.clear()
            return None
        latents = [load_tensors(self.store.get(self._block_key(k)))["latents"] for k in range(progress["blocks_done"])]
        return Resume(self, latents, int(progress["ranks"]))

    def load_state(self, block: int, rank: int) -> dict[str, torch.Tensor]:
        """Rank `rank`'s carried state after block `block` (ObjectNotFound if it was never saved)."""
        return load_tensors(self.store.get(self._state_key(block, rank)))

    def clear(self) -> None:
        for key in self.store.list(self.prefix):
            self.store.delete(key)
