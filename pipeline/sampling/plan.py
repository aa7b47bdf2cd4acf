"""ShotPlan: shots [{prompt, seconds}] -> latent frames -> the blocks a video is denoised in.

joint mode: one block, the whole video one sequence. block mode: a block per shot, or per
sampling.block_frames latent frames; blocks never span a shot cut, so each block has one prompt
and shot boundaries are block boundaries.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.layout import VideoLayout, pixel_frames, shot_latent_frames, shot_pixel_frames


@dataclass(frozen=True)
class Block:
    index: int
    frame_start: int  # latent frames [frame_start, frame_end) of the video
    frame_end: int
    layout: VideoLayout  # the block's token grid, absolute frame offset and shots kept
    pixel_frames: int  # frames it decodes to (the video's first latent frame decodes to one)

    @property
    def frames(self) -> int:
        return self.frame_end - self.frame_start

    @property
    def shots(self) -> tuple[int, ...]:
        return tuple(range(self.layout.first_shot, self.layout.first_shot + self.layout.num_shots))


@dataclass(frozen=True)
class ShotPlan:
    prompts: tuple[str, ...]
    seconds: tuple[float, ...]
    fps: int
    height: int  # pixels
    width: int
    latent_channels: int
    vae_spatial: int
    shot_frames: tuple[int, ...]  # latent frames per shot
    layout: VideoLayout  # the whole video; block_frames = the blocks
    blocks: tuple[Block, ...]
    mode: str

    @classmethod
    def from_config(cls, cfg, latent_channels: int = 16) -> "ShotPlan":
        v, m, s = cfg.video, cfg.model, cfg.sampling
        shots = shot_latent_frames([shot.seconds for shot in v.shots], v.fps, m.vae_temporal)
        unit = m.vae_spatial * m.patch[1]
        if s.mode == "joint":
            sizes = [sum(shots)]
        else:  # never across a shot cut: each block has one prompt
            step = s.block_frames or max(shots)
            sizes = [min(step, n - i) for n in shots for i in range(0, n, step)]
        layout = VideoLayout(sum(shots), v.height // unit, v.width // unit, tuple(shots), block_frames=tuple(sizes))
        blocks, start = [], 0
        for i, n in enumerate(sizes):
            sub = layout.frames_slice(start, start + n)
            blocks.append(Block(i, start, start + n, sub, pixel_frames(start + n) - pixel_frames(start)))
            start += n
        return cls(tuple(shot.prompt for shot in v.shots), tuple(float(shot.seconds) for shot in v.shots), v.fps,
                   v.height, v.width, latent_channels, m.vae_spatial, tuple(shots), layout, tuple(blocks), s.mode)

    @property
    def shot_pixel_frames(self) -> list[int]:
        return shot_pixel_frames(list(self.shot_frames))

    @property
    def pixel_frames(self) -> int:
        return pixel_frames(self.layout.frames)

    def latent_shape(self, block: Block) -> tuple[int, int, int, int, int]:
        """(1, C, T_b, h, w) of a block's latents."""
        return (1, self.latent_channels, block.frames, self.height // self.vae_spatial, self.width // self.vae_spatial)

    def to_dict(self) -> dict:
        return {"mode": self.mode, "fps": self.fps, "height": self.height, "width": self.width,
                "shot_latent_frames": list(self.shot_frames), "shot_pixel_frames": self.shot_pixel_frames,
                "pixel_frames": self.pixel_frames, "seconds": round(self.pixel_frames / self.fps, 4),
                "tokens": self.layout.num_tokens, "token_grid": [self.layout.frames, self.layout.height,
                                                                  self.layout.width],
                "blocks": [{"index": b.index, "latent_frames": [b.frame_start, b.frame_end], "shots": list(b.shots),
                            "pixel_frames": b.pixel_frames, "tokens": b.layout.num_tokens} for b in self.blocks]}

    def describe(self) -> str:
        d = self.to_dict()
        lines = [f"{len(self.prompts)} shots, {d['pixel_frames']} frames ({d['seconds']} s at {self.fps} fps), "
                 f"{self.width}x{self.height}; {self.layout.frames} latent frames x {self.layout.height}x"
                 f"{self.layout.width} tokens = {self.layout.num_tokens:,} tokens; {self.mode} mode, "
                 f"{len(self.blocks)} block(s)"]
        for i, (p, n, f) in enumerate(zip(self.prompts, self.shot_frames, self.shot_pixel_frames)):
            lines.append(f"  shot {i}: {n} latent frames, {f} frames: {p}")
        for b in self.blocks:
            lines.append(f"  block {b.index}: latent frames {b.frame_start}-{b.frame_end - 1}, shots "
                         f"{list(b.shots)}, {b.layout.num_tokens:,} tokens, {b.pixel_frames} frames")
        return "\n".join(lines)
