"""Video geometry: seconds -> pixel frames -> latent frames -> tokens, and token <-> (t, y, x, shot).

Rounding rules (Wan VAE: 4x temporal with the 1+4k rule, 8x spatial; patch 1x2x2):
- a shot of `seconds` at `fps` asks for f = seconds * fps pixel frames;
- the first latent frame of a video decodes to 1 pixel frame, every later one to 4, so the first
  shot gets 1 + round((f - 1) / 4) latent frames and every other shot round(f / 4), each at least 1
  (round half up); the video then has 1 + 4 * (T - 1) pixel frames for T latent frames;
- height and width must be multiples of 16 (8x VAE * 2 patch): no silent cropping.
Tokens are ordered frame-major: index = (t * h + y) * w + x over the token grid (T, h, w).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import cached_property

import torch


def round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def shot_latent_frames(seconds: list[float], fps: int, vae_temporal: int = 4) -> list[int]:
    """Latent frames per shot (see the module docstring for the rule)."""
    out = []
    for i, s in enumerate(seconds):
        f = s * fps
        n = 1 + round_half_up((f - 1) / vae_temporal) if i == 0 else round_half_up(f / vae_temporal)
        out.append(max(1, n))
    return out


def pixel_frames(latent_frames: int, vae_temporal: int = 4) -> int:
    """Pixel frames decoded from `latent_frames` latent frames of a whole video (1 + 4k rule)."""
    return 1 + vae_temporal * (latent_frames - 1) if latent_frames > 0 else 0


def shot_pixel_frames(shot_frames: list[int], vae_temporal: int = 4) -> list[int]:
    """Pixel frames each shot decodes to: the first latent frame of the video yields one."""
    return [1 + vae_temporal * (n - 1) if i == 0 else vae_temporal * n for i, n in enumerate(shot_frames)]


@dataclass(frozen=True)
class VideoLayout:
    """The token grid one attention call sees: `frames` x `height` x `width` video tokens.

    `shot_frames` splits the frames into shots (sum == frames). `frame_offset` is the absolute
    index of the first frame (block mode: RoPE positions and windows use absolute frames).
    `block_frames` splits the frames into blocks for block-causal methods (empty: one block).
    `first_shot` is the video-level index of the layout's first shot (a block may start mid-video).
    `text_tokens` > 0 puts that many text tokens ahead of the video tokens in the same sequence
    (joint-attention models); Wan and SANA-Video use cross-attention, so it is 0 for them.
    """

    frames: int
    height: int
    width: int
    shot_frames: tuple[int, ...] = ()
    frame_offset: int = 0
    block_frames: tuple[int, ...] = ()
    text_tokens: int = 0
    first_shot: int = 0  # absolute index of shot_frames[0] in the video (prompts are per shot)

    def __post_init__(self) -> None:
        if not self.shot_frames:
            object.__setattr__(self, "shot_frames", (self.frames,))
        if not self.block_frames:
            object.__setattr__(self, "block_frames", (self.frames,))
        if sum(self.shot_frames) != self.frames or min(self.shot_frames) < 1:
            raise ValueError(f"shot_frames {self.shot_frames} must be >= 1 each and sum to {self.frames}")
        if sum(self.block_frames) != self.frames or min(self.block_frames) < 1:
            raise ValueError(f"block_frames {self.block_frames} must be >= 1 each and sum to {self.frames}")

    # --- sizes ---------------------------------------------------------------------------------
    @property
    def tokens_per_frame(self) -> int:
        return self.height * self.width

    @property
    def video_tokens(self) -> int:
        return self.frames * self.tokens_per_frame

    @property
    def num_tokens(self) -> int:
        """Length of the attention sequence: text tokens (if any) then video tokens."""
        return self.text_tokens + self.video_tokens

    @property
    def num_shots(self) -> int:
        return len(self.shot_frames)

    # --- per-token maps (video tokens only; text tokens come first in the sequence) ------------
    @cached_property
    def _coords(self) -> torch.Tensor:
        t = torch.arange(self.frames).repeat_interleave(self.tokens_per_frame)
        y = torch.arange(self.height).repeat_interleave(self.width).repeat(self.frames)
        x = torch.arange(self.width).repeat(self.frames * self.height)
        return torch.stack([t, y, x], 1)  # (Nv, 3), t relative to frame_offset

    def token_coords(self, absolute: bool = False) -> torch.Tensor:
        """(Nv, 3) int64 (t, y, x) of every video token, in sequence order."""
        c = self._coords
        if absolute and self.frame_offset:
            c = c + torch.tensor([self.frame_offset, 0, 0])
        return c

    @cached_property
    def frame_shot(self) -> torch.Tensor:
        """(frames,) shot index of each latent frame."""
        return torch.repeat_interleave(torch.arange(self.num_shots), torch.tensor(self.shot_frames))

    @cached_property
    def frame_block(self) -> torch.Tensor:
        """(frames,) block index of each latent frame."""
        return torch.repeat_interleave(torch.arange(len(self.block_frames)), torch.tensor(self.block_frames))

    def token_shot(self) -> torch.Tensor:
        """(Nv,) shot index of every video token."""
        return self.frame_shot.repeat_interleave(self.tokens_per_frame)

    def token_block(self) -> torch.Tensor:
        """(Nv,) block index of every video token."""
        return self.frame_block.repeat_interleave(self.tokens_per_frame)

    def token_index(self, t: int, y: int, x: int) -> int:
        """Sequence index of video token (t, y, x) (t relative), text tokens counted."""
        return self.text_tokens + (t * self.height + y) * self.width + x

    def shot_token_range(self, shot: int) -> tuple[int, int]:
        start = sum(self.shot_frames[:shot]) * self.tokens_per_frame + self.text_tokens
        return start, start + self.shot_frames[shot] * self.tokens_per_frame

    # --- sub-layouts ---------------------------------------------------------------------------
    def frames_slice(self, start: int, end: int) -> "VideoLayout":
        """The layout of frames [start, end) (relative), shots cut to fit, absolute offset kept."""
        shots, first, pos = [], None, 0
        for i, n in enumerate(self.shot_frames):
            lo, hi = max(pos, start), min(pos + n, end)
            if hi > lo:
                shots.append(hi - lo)
                first = i if first is None else first
            pos += n
        return replace(self, frames=end - start, shot_frames=tuple(shots), block_frames=(end - start,),
                       frame_offset=self.frame_offset + start, first_shot=self.first_shot + (first or 0))

    def with_blocks(self, block_frames: tuple[int, ...]) -> "VideoLayout":
        return replace(self, block_frames=tuple(block_frames))
