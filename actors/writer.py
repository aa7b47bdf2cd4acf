"""The scheduler's handle on a group's writer actor (pipeline.runtime.writer.BlockWriter under
`ray.remote`, started by the WorkerGroup in its last bundle, on rank 0's node and GPU).

RemoteWriter gives the VideoScheduler what it expects of a block sink: `write_block` returns at
once with a pending write, so decode, encode and upload of block k overlap denoising of block k+1.
"""

from __future__ import annotations

import ray
from ray.exceptions import RayActorError

from actors.errors import REMOTE_ERRORS, remote_error

from pipeline.storage import S3Store, open_store


class PendingRef:
    def __init__(self, ref):
        self.ref = ref

    def done(self) -> bool:
        ready, _ = ray.wait([self.ref], timeout=0)
        return bool(ready)

    def result(self):
        try:
            return ray.get(self.ref)
        except REMOTE_ERRORS as e:
            raise remote_error(e) from None


class RemoteWriter:
    """The group's writer actor, as the VideoScheduler's block sink."""

    def __init__(self, group):
        self.group = group  # its `writer` handle changes when a dead writer is replaced

    def open(self, cfg) -> PendingRef:
        return PendingRef(self.group.writer.open.remote(cfg))

    def write_block(self, latents) -> PendingRef:
        return PendingRef(self.group.writer.write_block.remote(latents))

    def finish(self, metadata: dict) -> PendingRef:
        return PendingRef(self.group.writer.finish.remote(metadata))

    def abort(self, cfg) -> None:
        try:
            ray.get(self.group.writer.abort.remote(cfg.video.name))
        except RayActorError:
            # The writer died with the upload open: abort that one upload from here (the video's key
            # is written by this writer alone). A file:// temporary stays as a hidden .partial file.
            store = open_store(cfg.storage)
            if isinstance(store, S3Store):
                store.abort_incomplete(f"{cfg.video.name}.mp4")
