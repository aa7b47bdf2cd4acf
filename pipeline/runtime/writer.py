"""BlockWriter: the writer actor's state, as plain Python (actors/writer.py makes it an actor).

It loads the VAE once and writes one video at a time through pipeline.video.VideoWriter: `open`
per video, `write_block` per latent block in order (causal VAE decode -> fMP4 fragments -> object
store, multipart on S3), then `finish(metadata)` or `abort()` (nothing of the video stays).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING

from pipeline.runtime.worker import select_device
from pipeline.storage import open_store

if TYPE_CHECKING:
    from pipeline.video.writer import VideoWriter


class BlockWriter:
    def __init__(self, model):
        """`model` is the ModelConfig the VAE comes from."""
        self.model_cfg = model
        self.device = "cpu"
        self.vae = None
        self.video: VideoWriter | None = None

    def set_device(self, visible_devices: str | None, index: int | None) -> str:
        self.device = select_device(visible_devices, index)
        return self.device

    def load_vae(self) -> None:
        import pipeline.video.writer  # noqa: F401  (imported with the VAE, not at the first video's open)
        from pipeline.models import load_vae

        self.vae = load_vae(self.model_cfg, self.device)  # the VAE alone: the workers read the transformer

    def ping(self) -> bool:
        return True

    def open(self, cfg) -> None:
        """Start the video `cfg` (its name, fps, storage and output settings); drops any unfinished one."""
        # Imported here, in the writer's process: the decode/encode chain (diffusers, av) costs ~3 s of
        # imports that the scheduler, which only creates this actor from the class, need not pay.
        from pipeline.video.writer import VideoWriter

        self.abort(None)
        self.video = VideoWriter(open_store(cfg.storage), cfg.video.name, self.vae, cfg.video.fps, cfg.output)

    def write_block(self, latents) -> dict:
        """latents (1, C, T_b, h, w) of the next block -> its BlockReport as a dict."""
        if self.video is None:
            raise RuntimeError("writer: no video is open (its open failed or it was aborted)")
        return asdict(self.video.write_block(latents.to(self.device, next(self.vae.parameters()).dtype)))

    def finish(self, metadata: dict) -> dict:
        record = self.video.finish(metadata)
        self.video = None
        return record

    def abort(self, name: str | None) -> None:
        """Drop video `name` if it is the one open (None: whichever is); a no-op otherwise."""
        if self.video is not None and name in (None, self.video.name):
            self.video.abort()
            self.video = None
