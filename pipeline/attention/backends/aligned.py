"""Dense attention over a key count cuDNN runs at its full rate: whole 128-key tiles, the rest merged.

On the H100 (torch 2.11, cuDNN's sm90 flash forward kernel) the rate of a call follows its key
count: 29,952 keys (234 x 128) ran at 636-661 TFLOP/s, 29,950 or 30,000 at 577-613, whatever the
query count (`python -m jobs.bench_key_tiles`, docs/results/bench_key_tiles_h100.md). MoGA's
groups, MoC's gathered keys and most videos' token counts are not whole tiles, so a call over n
keys with r = n % 128 > 0 runs as two: the first n - r keys (the full-rate call, almost all of the
work) and the last r, merged exactly by their log-sum-exps:

    o = sigmoid(lse1 - lse2) * o1 + sigmoid(lse2 - lse1) * o2,   lse = logaddexp(lse1, lse2)

The merge is one pass (merge.merge_rows: the Triton kernel on CUDA) that also applies a per-row
output scale (MoGA's gate) and may write straight into the caller's packed buffer. Same machine,
five ~30k-token groups: 47.9-48.3 ms as they come, 44.4-45.5 ms split, 43.9-44.3 ms at whole-tile
sizes; full attention over 126,360 tokens 166.3 -> 155.9 ms.
"""

from __future__ import annotations

import torch

from pipeline.attention.backends.merge import merge_rows

KEY_TILE = 128  # cuDNN sm90 forward: key tiles of 128 (knob_7_64x128x128)
# Below this the second call and the merge pass (~3 reads/writes of the output) cost more than the
# ~8% the full tiles save: 1-frame STGA windows (1,560 keys) ran 2.83 -> 3.81 ms with the split.
MIN_KEYS = 64 * KEY_TILE


def split_keys(num_keys: int, q: torch.Tensor, needs_grad: bool, tile: int | None = None) -> int:
    """How many keys the full-rate call takes (0: do not split). tile: None for the rule above, 0 never
    splits, a size forces tiles of that size on any device (tests, benchmarks)."""
    if tile == 0:
        return 0
    if tile is None:
        if q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16) or needs_grad:
            return 0
        tile, least = KEY_TILE, MIN_KEYS
    else:
        least = tile
    whole = num_keys - num_keys % tile
    return whole if num_keys >= least and whole != num_keys else 0


def split_key_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, whole: int, scale: float | None,
                        out: torch.Tensor | None = None, out_scale: torch.Tensor | None = None,
                        return_lse: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q (B, H, Nq, D), k and v (B, H, Nk, D) -> o as rows (B * Nq, H, D) in q's dtype, and lse (B, H, Nq)
    fp32 with return_lse (of the unscaled o). Keys [0, whole) and [whole, Nk) run as two dense calls.
    out: a contiguous (B * Nq, H, D) buffer for o; out_scale: (B * Nq, 1 or H) multiplies o."""
    from pipeline.attention.backends.segments import dense_lse  # segments imports this module

    b, h, nq, d = q.shape
    o1, lse1 = dense_lse(q, k[:, :, :whole], v[:, :, :whole], scale)
    o2, lse2 = dense_lse(q, k[:, :, whole:], v[:, :, whole:], scale)
    w1 = torch.sigmoid(lse1 - lse2)  # (B, H, Nq) fp32: the main call's share of the softmax mass
    weights = [w.transpose(1, 2).reshape(b * nq, h) for w in (w1, 1.0 - w1)]  # (B * Nq, H)
    if out_scale is not None:
        scale_rows = out_scale.float().reshape(b * nq, -1)
        weights = [w * scale_rows for w in weights]
    rows = [o.transpose(1, 2).reshape(b * nq, h, d) for o in (o1, o2)]  # views when the layout is BSHD
    src = torch.arange(b * nq, device=q.device)
    o = merge_rows(rows[0], weights[0], rows[1], weights[1], src, out=out)
    return o, (torch.logaddexp(lse1, lse2) if return_lse else None)
