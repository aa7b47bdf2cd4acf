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

Execution (memory traffic is the cost: the matmuls are tiny): phi(x) in fp32 in one pass from x
(a max against an fp32 zero); RoPE as one complex multiply of phi's pairs by e^{i theta} (the pair
rotation of rope.py, one pass), k~ written head-major so that sum_j v_j k~_j^T runs as one batched
matmul over (head, token chunk) pairs (the token dimension is the reduction: without chunks there
are only B * H output tiles to spread over the GPU), then a sum over chunks. The queries' matmuls
(S q~ and z . phi(q)) have the tokens as rows and need no chunks; the division writes o in q's dtype
directly. All of it fp32 (no TF32): the CPU tests hold at 1e-5 against a float64 formula.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from pipeline.attention.base import AttentionMeta, AttentionMethod

CHUNK_TOKENS = 1024  # the kv sum's token chunks hold at least this many tokens ...
MAX_CHUNKS = 64  # ... and there are at most this many per block (enough (head, chunk) tiles for a GPU)


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


def _phi(x: torch.Tensor) -> torch.Tensor:
    """relu(x) in fp32 (B, n, H, D), one pass (relu is exact in any dtype, the cast too)."""
    return torch.maximum(x, x.new_zeros(1, dtype=torch.float32))


def _rotation(rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """(cos, sin) (1, n, 1, D) in the interleaved layout -> e^{i theta} (1, n, 1, D/2) complex64."""
    cos, sin = rope
    return torch.complex(cos[..., 0::2].float(), sin[..., 1::2].float())


def _rotate(phi: torch.Tensor, rotation: torch.Tensor, head_major: bool = False) -> torch.Tensor:
    """rope(phi): pairs (x[2i], x[2i+1]) times e^{i theta_i} (one complex multiply); phi (B, n, H, D)
    fp32 contiguous -> (B, n, H, D), or (B, H, n, D) contiguous with head_major."""
    b, n, h, d = phi.shape
    pairs = torch.view_as_complex(phi.view(b, n, h, d // 2, 2))
    if not head_major:
        return torch.view_as_real(pairs * rotation).view(b, n, h, d)
    out = torch.empty(b, h, n, d // 2, dtype=pairs.dtype, device=phi.device)
    torch.mul(pairs, rotation, out=out.transpose(1, 2))
    return torch.view_as_real(out).view(b, h, n, d)


def _token_chunks(n: int) -> int:
    """Chunks of the kv sum for a block of n tokens: the largest count <= MAX_CHUNKS that divides n
    into chunks of >= CHUNK_TOKENS tokens (1 when none does)."""
    for chunks in range(min(MAX_CHUNKS, n // CHUNK_TOKENS), 1, -1):
        if n % chunks == 0:
            return chunks
    return 1


def _kv_sum(v_hm: torch.Tensor, k_hm: torch.Tensor) -> torch.Tensor:
    """sum_j v_j k~_j^T: v_hm, k_hm (B, H, n, D) fp32 contiguous -> (B, H, D, D), rows index v."""
    b, h, n, d = k_hm.shape
    p = _token_chunks(n)
    parts = torch.bmm(v_hm.view(b * h * p, n // p, d).transpose(1, 2), k_hm.view(b * h * p, n // p, d))
    return parts.view(b, h, p, d, d).sum(2)


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
        rotation = _rotation(meta.rope)
        nb = len(meta.layout.block_frames)
        sums = BlockSums(torch.zeros(b, nb, h, d, d, device=k.device), torch.zeros(b, nb, h, d, device=k.device))
        for block, lo, hi in self._blocks(meta, start, end):
            phi_k = _phi(k[:, lo:hi])  # (B, n, H, D) fp32
            sums.z[:, block] = phi_k.sum(1)
            k_hm = _rotate(phi_k, rotation[:, lo:hi], head_major=True)  # (B, H, n, D)
            del phi_k
            v_hm = torch.empty_like(k_hm).copy_(v[:, lo:hi].transpose(1, 2))  # (B, H, n, D) fp32
            sums.S[:, block] = _kv_sum(v_hm, k_hm)
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
        rotation = _rotation(meta.rope)
        o = torch.empty(b, n, h, d, device=q.device, dtype=q.dtype)
        for group, lo, hi in self._query_groups(meta, start, end):
            phi_q = _phi(q[:, lo:hi])  # (B, n, H, D) fp32
            q_rot = _rotate(phi_q, rotation[:, lo:hi])
            for row in range(b):
                num = torch.bmm(q_rot[row].transpose(0, 1), seen_S[row, group].transpose(1, 2))  # (H, n, D)
                den = torch.bmm(phi_q[row].transpose(0, 1), seen_z[row, group][:, :, None])  # (H, n, 1)
                torch.div(num.transpose(0, 1), den.add_(self.cfg.linear.eps).transpose(0, 1), out=o[row, lo:hi])
        if meta.commit:
            if meta.state is None:
                raise ValueError("linear: meta.commit is set but meta.state is None (no slot to commit to)")
            total = LinearState(sums.S.sum(1), sums.z.sum(1))
            meta.state.value = total if state is None else LinearState(state.S + total.S, state.z + total.z)
        return o

    def forward(self, q, k, v, meta: AttentionMeta):
        return self.attend(q, self.block_sums(k, v, meta), meta)

    def flops(self, meta: AttentionMeta, shape: tuple[int, int, int, int]) -> float:
        """Sums (v k~^T and phi(k)) and their use (S q~ and z . phi(q)): about 4 * D * (D + 1) per
        token and head, multiply-adds counted as two."""
        b, n, h, d = shape
        return 4.0 * b * n * h * d * (d + 1)
