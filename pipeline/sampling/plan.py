"""ShotPlan: shots [{prompt, seconds}] -> latent frames -> the blocks a video is denoised in.

Frames (pipeline.layout's rules): the first shot gets 1 + round((f - 1) / 4) latent frames, later
shots round(f / 4), each at least 1, for f = seconds * fps; T latent frames decode to 1 + 4 (T - 1)
pixel frames. Tokens: latent frames x (height / 16) x (width / 16) (8x VAE, 2x2 patch).

Blocks: joint mode is one block, the whole video one sequence. Block mode is a block per shot
(sampling.block_frames == 0) or per sampling.block_frames latent frames, the last one shorter; such
a block may cover parts of several shots (cross-attention is per shot, token by token).
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.layout import VideoLayout, pixel_frames, shot_latent_frames, shot_pixel_frames


@dataclass(frozen=True)
class Block:
    """One unit of denoising: latent frames [frame_start, frame_end) of the video."""

    index: int
    frame_start: int
    frame_end: int
    layout: VideoLayout  # the block's token grid: absolute frame_offset, the shots it covers (first_shot..)
    pixel_frames: int  # frames it decodes to (the video's first latent frame decodes to one, later ones to 4)

    @property
    def frames(self) -> int:
        return self.frame_end - self.frame_start

    @property
    def shots(self) -> tuple[int, ...]:
        """Video-level indices of the shots the block covers (in part or whole)."""
        return tuple(range(self.layout.first_shot, self.layout.first_shot + self.layout.num_shots))


@dataclass(frozen=True)
class ShotPlan:
    prompts: tuple[str, ...]  # one per shot
    seconds: tuple[float, ...]  # asked for, per shot
    fps: int
    height: int  # pixels
    width: int
    latent_channels: int
    vae_spatial: int
    vae_temporal: int
    shot_frames: tuple[int, ...]  # latent frames per shot
    layout: VideoLayout  # the whole video; its block_frames are the blocks'
    blocks: tuple[Block, ...]
    mode: str  # joint | block

    @classmethod
    def from_config(cls, cfg, latent_channels: int = 16) -> "ShotPlan":
        """The plan of cfg.video under cfg.sampling's mode; latent_channels: the transformer's in_channels."""
        v, m, s = cfg.video, cfg.model, cfg.sampling
        shots = shot_latent_frames([shot.seconds for shot in v.shots], v.fps, m.vae_temporal)
        total = sum(shots)
        if s.mode == "joint":
            sizes = [total]
        elif s.block_frames == 0:
            sizes = list(shots)
        else:
            sizes = [min(s.block_frames, total - start) for start in range(0, total, s.block_frames)]
        unit = m.vae_spatial * m.patch[1]  # pixels per token side
        layout = VideoLayout(total, v.height // unit, v.width // unit, tuple(shots), block_frames=tuple(sizes))
        blocks, start = [], 0
        for index, n in enumerate(sizes):
            decoded = pixel_frames(start + n, m.vae_temporal) - pixel_frames(start, m.vae_temporal)
            blocks.append(Block(index, start, start + n, layout.frames_slice(start, start + n), decoded))
            start += n
        return cls(tuple(shot.prompt for shot in v.shots), tuple(float(shot.seconds) for shot in v.shots), v.fps,
                   v.height, v.width, latent_channels, m.vae_spatial, m.vae_temporal, tuple(shots), layout,
                   tuple(blocks), s.mode)

    @property
    def shot_pixel_frames(self) -> list[int]:
        return shot_pixel_frames(list(self.shot_frames), self.vae_temporal)

    @property
    def pixel_frames(self) -> int:
        return pixel_frames(self.layout.frames, self.vae_temporal)

    def latent_shape(self, block: Block) -> tuple[int, int, int, int, int]:
        """(1, C, T_b, h, w) of a block's latents."""
        return (1, self.latent_channels, block.frames, self.height // self.vae_spatial, self.width // self.vae_spatial)

    def to_dict(self) -> dict:
        return {"mode": self.mode, "fps": self.fps, "height": self.height, "width": self.width,
                "shot_latent_frames": list(self.shot_frames), "shot_pixel_frames": self.shot_pixel_frames,
                "pixel_frames": self.pixel_frames, "seconds": round(self.pixel_frames / self.fps, 4),
                "tokens": self.layout.num_tokens,
                "token_grid": [self.layout.frames, self.layout.height, self.layout.width],
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
