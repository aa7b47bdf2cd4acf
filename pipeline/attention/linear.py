"""ReLU linear attention with RoPE (SANA-Video) and a constant-size carried state.

With phi = relu, q~_i = rope_i(phi(q_i)), k~_j = rope_j(phi(k_j)) (RoPE after the feature map):

    O_i = [sum_j v_j k~_j^T] q~_i / ([sum_j phi(k_j)]^T phi(q_i) + eps)

The denominator has no RoPE, so it stays positive. Accumulation is fp32, the output is in q's
dtype. q and k arrive un-rotated (applies_rope): meta.rope holds (cos, sin) of the tokens held.

Key sets:
- linear.causal false: every query sees every key of the call plus the carried state.
- linear.causal true: block-causal over layout.block_frames: a query of block b sees the keys of
  blocks <= b (bidirectional inside its block) plus the carried state.

Carried state (block-autoregressive mode): LinearState(S (B, H, D, D), z (B, H, D)), fp32, in
meta.state.value; its size is the same after 1 block or 1000. Queries see the state plus this
call's sums; with meta.commit the call's total is added to it (SANA's extra pass on the clean
block). Each batch row keeps its own state (cond and uncond of CFG stay separate).

Context parallelism ("state" strategy) splits forward in two so ranks exchange sums, never K/V:
block_sums(k, v) -> per-block partial sums over the tokens this rank holds (meta.token_range);
the sums are all-reduced; attend(q, sums) finishes with the sums of the whole sequence.

Text tokens: video-only (SANA-Video's text goes through cross-attention); a layout with text
tokens is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from pipeline.attention.base import AttentionMeta, AttentionMethod
from pipeline.attention.rope import apply_rope


class BlockSums(NamedTuple):
    """Per-block sums over some tokens of the sequence (all-reducible tensor by tensor)."""

    S: torch.Tensor  # (B, nb, H, D, D) fp32: sum_j v_j k~_j^T, rows index v, columns k~
    z: torch.Tensor  # (B, nb, H, D) fp32: sum_j phi(k_j)


@dataclass
class LinearState:
    """What earlier blocks leave to later ones: the sums of every committed token."""

    S: torch.Tensor  # (B, H, D, D) fp32
    z: torch.Tensor  # (B, H, D) fp32

    @classmethod
    def zeros(cls, batch: int, heads: int, dim: int, device: torch.device | str = "cpu") -> "LinearState":
        return cls(torch.zeros(batch, heads, dim, dim, device=device), torch.zeros(batch, heads, dim, device=device))

    @property
    def nbytes(self) -> int:
        return self.S.numel() * self.S.element_size() + self.z.numel() * self.z.element_size()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"S": self.S, "z": self.z}

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor]) -> "LinearState":
        missing = {"S", "z"} - set(tensors)
        if missing:
            raise ValueError(f"LinearState: missing tensors {sorted(missing)}")
        s, z = tensors["S"].float(), tensors["z"].float()
        if s.dim() != 4 or z.shape != s.shape[:3]:
            raise ValueError(f"LinearState: S {tuple(s.shape)} and z {tuple(z.shape)} are not (B, H, D, D), (B, H, D)")
        return cls(s, z)

    def to_bytes(self) -> bytes:
        """safetensors bytes (no pickle): what a checkpoint of the carried state stores."""
        return save_safetensors({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()})

    @classmethod
    def from_bytes(cls, data: bytes, device: torch.device | str = "cpu") -> "LinearState":
        return cls.from_state_dict({k: v.to(device) for k, v in load_safetensors(data).items()})


def _features(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, n, H, D) -> (phi(x), rope(phi(x))), both fp32."""
    phi = torch.relu(x.float())
    return phi, apply_rope(phi, rope).float()


class LinearAttention(AttentionMethod):
    name = "linear"
    applies_rope = True
    has_state = True
    cp_strategy = "state"

    # --- the tokens of this call --------------------------------------------------------------
    def _held(self, meta: AttentionMeta, n: int) -> tuple[int, int]:
        layout = meta.layout
        if layout.text_tokens > 0:
            raise ValueError(f"attention.method: linear is video-only (text goes through cross-attention), "
                             f"but the layout has text_tokens={layout.text_tokens}")
        start, end = meta.token_range or (0, layout.num_tokens)
        if end - start != n or not 0 <= start < end <= layout.num_tokens:
            raise ValueError(f"linear: token_range {meta.token_range} does not match {n} tokens of a "
                             f"{layout.num_tokens}-token layout")
        if meta.rope is None or meta.rope[0].shape[1] != n:
            raise ValueError(f"linear: meta.rope must hold (cos, sin) of the {n} tokens held "
                             f"(got {None if meta.rope is None else tuple(meta.rope[0].shape)})")
        return start, end

    def _blocks(self, meta: AttentionMeta, start: int, end: int) -> list[tuple[int, int, int]]:
        """(block, lo, hi): the held tokens [lo, hi) (relative to start) of each layout block."""
        tpf, out, token = meta.layout.tokens_per_frame, [], 0
        for block, frames in enumerate(meta.layout.block_frames):
            lo, hi = max(token, start), min(token + frames * tpf, end)
            if hi > lo:
                out.append((block, lo - start, hi - start))
            token += frames * tpf
        return out

    def _query_groups(self, meta: AttentionMeta, start: int, end: int) -> list[tuple[int, int, int]]:
        """(group, lo, hi): held queries [lo, hi) that see the keys of group `group`: their block
        when block-causal; one group (0) for all when bidirectional."""
        return self._blocks(meta, start, end) if self.cfg.linear.causal else [(0, 0, end - start)]

    # --- the two halves of forward ------------------------------------------------------------
    def block_sums(self, k: torch.Tensor, v: torch.Tensor, meta: AttentionMeta) -> BlockSums:
        """Sums over the held tokens, per layout block: S (B, nb, H, D, D), z (B, nb, H, D) fp32."""
        b, n, h, d = k.shape
        start, end = self._held(meta, n)
        phi_k, k_rot = _features(k, meta.rope)
        v32 = v.float()
        nb = len(meta.layout.block_frames)
        sums = BlockSums(torch.zeros(b, nb, h, d, d, device=k.device), torch.zeros(b, nb, h, d, device=k.device))
        for block, lo, hi in self._blocks(meta, start, end):
            sums.S[:, block] = torch.einsum("bnhd,bnhe->bhde", v32[:, lo:hi], k_rot[:, lo:hi])
            sums.z[:, block] = phi_k[:, lo:hi].sum(1)
        return sums

    def attend(self, q: torch.Tensor, sums: BlockSums, meta: AttentionMeta) -> torch.Tensor:
        """o (B, n, H, D) for the held queries, given the block sums of the WHOLE sequence."""
        b, n, h, d = q.shape
        start, end = self._held(meta, n)
        state = meta.state.value if meta.state is not None else None
        if state is not None and tuple(state.S.shape) != (b, h, d, d):
            raise ValueError(f"linear: carried state is {tuple(state.S.shape)}, this call needs {(b, h, d, d)} "
                             f"(reset the state slot per video)")
        if self.cfg.linear.causal:
            seen_S, seen_z = sums.S.cumsum(1), sums.z.cumsum(1)  # block b sees blocks <= b
        else:
            seen_S, seen_z = sums.S.sum(1, keepdim=True), sums.z.sum(1, keepdim=True)
        if state is not None:
            seen_S, seen_z = seen_S + state.S[:, None], seen_z + state.z[:, None]
        phi_q, q_rot = _features(q, meta.rope)
        o = torch.empty(b, n, h, d, device=q.device)
        for group, lo, hi in self._query_groups(meta, start, end):
            num = torch.einsum("bhde,bnhe->bnhd", seen_S[:, group], q_rot[:, lo:hi])
            den = torch.einsum("bhe,bnhe->bnh", seen_z[:, group], phi_q[:, lo:hi])
            o[:, lo:hi] = num / (den + self.cfg.linear.eps)[..., None]
        if meta.commit:
            if meta.state is None:
                raise ValueError("linear: meta.commit is set but meta.state is None (no slot to commit to)")
            total = LinearState(sums.S.sum(1), sums.z.sum(1))
            meta.state.value = total if state is None else LinearState(state.S + total.S, state.z + total.z)
        return o.to(q.dtype)

    def forward(self, q, k, v, meta: AttentionMeta):
        return self.attend(q, self.block_sums(k, v, meta), meta)

    def flops(self, meta: AttentionMeta, shape: tuple[int, int, int, int]) -> float:
        """Sums (v k~^T and phi(k)) and their use (S q~ and z . phi(q)): about 4 * D * (D + 1) per
        token and head, multiply-adds counted as two."""
        b, n, h, d = shape
        return 4.0 * b * n * h * d * (d + 1)
