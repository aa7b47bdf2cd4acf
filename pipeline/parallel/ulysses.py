"""Ulysses context parallelism around any attention method of the registry.

Each rank holds a contiguous shard of L tokens (pad included, see shard.py) for all H heads.
One all-to-all of the stacked q, k, v turns (B, L, H, D) into (B, P * L, H / P, D): the whole
sequence for this rank's H / P heads. The pad is stripped, the method runs unchanged on the full
layout (MoC chunks, STGA windows, lite's skip tiles all see every token for their heads), the
output is re-padded and one all-to-all brings it back to (B, L, H, D). q and k arrive unrotated with
this rank's RoPE and are rotated as they are copied into the send buffer (one pass for both); a
method that rotates by itself (after a feature map) gets the whole sequence's RoPE instead.

Overlap (chunks > 1, calls that neither read nor write state): this rank's heads are split into
sub-groups, each with its own pair of exchanges; all inputs are sent at once, and each sub-group's
output is sent while the next one attends, so on GPU the all-to-alls run on NCCL's stream under the
attention kernels. Staged (routed methods by default): q, k and v go in three exchanges, v's first:
v's packing is a plain copy, so its exchange runs while k and q are rotated into their send buffers,
and k's while q is.

MoGA routing is per token and shared by all heads, so it is computed before the exchange on the
local tokens (meta.routing holds (B, L) groups and gates) and all-gathered here (one float pair per
token): every rank then sorts the full sequence identically. Stateful methods (lite) keep their
state per rank, for their own heads, in the StateSlot the sampler gives this rank.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist

from pipeline.attention.backends.rows import last_dim_words
from pipeline.attention.base import AttentionMeta, AttentionMethod, Routing, StateSlot
from pipeline.attention.rope import apply_rope
from pipeline.parallel.groups import ParallelContext
from pipeline.parallel.shard import all_gather_seq, plan_of_shard


def check_heads(heads: int, world: int) -> None:
    """One line when Ulysses cannot shard `heads` over `world` ranks."""
    if heads % world:
        divisors = ", ".join(str(p) for p in range(1, heads + 1) if heads % p == 0)
        raise ValueError(f"parallel.degree: {world} does not divide the {heads} attention heads (Ulysses shards "
                         f"heads over ranks; use one of {divisors})")


class Exchange:
    """An all-to-all in flight (asynchronous: NCCL runs it on its own stream, gloo on its thread);
    result() waits for it and returns the exchanged tensors."""

    def __init__(self, send: torch.Tensor, ctx: ParallelContext, unpack):
        self.send, self.recv, self.unpack = send, torch.empty_like(send), unpack
        self.work = dist.all_to_all_single(self.recv, send, group=ctx.group, async_op=True)

    def result(self):
        self.work.wait()
        self.send = None
        return self.unpack(self.recv)


def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst.copy_(src), as int64 words along the last dim where both allow it (rows.last_dim_words):
    the exchanges' transposing copies then move 4x fewer elements of bf16. Collectives are not
    autograd-aware, so nothing here needs a gradient."""
    dst_words, src_words = last_dim_words(dst), last_dim_words(src)
    if dst_words.dtype == src_words.dtype:
        dst_words.copy_(src_words)
    else:
        dst.copy_(src)


def seq_to_heads(tensors: tuple[torch.Tensor, ...], ctx: ParallelContext, chunk: int = 0, chunks: int = 1,
                 rope: tuple[torch.Tensor, torch.Tensor] | None = None, staged: bool = False) -> "Exchange | Staged":
    """All `tensors` exchanged: each (B, L, H, D) token shard -> (B, P * L, H / P / chunks, D), the whole
    sequence for sub-group `chunk` of this rank's H / P heads; result() returns them in order.

    One all-to-all for all of them, or with `staged` one per tensor, the last first: v's copy is quick,
    so its exchange runs while k and q are rotated, k's while q is (see UlyssesAttention).
    rope: the local tokens' (cos, sin) (1, L, 1, D): the first two tensors (q, k) are rotated as they
    are packed, so RoPE costs no pass of its own."""
    rotated = 2 if rope is not None else 0
    if not staged:
        return _pack(tensors, ctx, chunk, chunks, rope, rotated)
    launched = {i: _pack(tensors[i:i + 1], ctx, chunk, chunks, rope, int(i < rotated))
                for i in reversed(range(len(tensors)))}
    return Staged([launched[i] for i in range(len(tensors))])


class Staged:
    """Several exchanges in flight; result() waits for each and returns all their tensors in order."""

    def __init__(self, exchanges: list[Exchange]):
        self.exchanges = exchanges

    def result(self) -> list[torch.Tensor]:
        return [t for exchange in self.exchanges for t in exchange.result()]


def _pack(tensors: tuple[torch.Tensor, ...], ctx: ParallelContext, chunk: int, chunks: int,
          rope: tuple[torch.Tensor, torch.Tensor] | None, rotated: int) -> Exchange:
    """One all-to-all for `tensors` (seq_to_heads), its first `rotated` rotated by `rope` while packed.

    The send buffer is (P, B, L, T, Hc, D) for T tensors: what goes to rank j is contiguous (NCCL's
    split), and a token's T tensors are adjacent, so with B = 1 every received tensor is a view
    (1, P * L, Hc, D) of the receive buffer, tokens in sequence order (rank j's L after rank j-1's),
    its token stride T * Hc * D; SDPA and the row gathers take such strides. Only the packing copies."""
    p = ctx.world
    b, n, h, d = tensors[0].shape
    check_heads(h, p)
    hc = h // p // chunks
    count = len(tensors)
    send = tensors[0].new_empty((p, b, n, count, hc, d))
    for i, t in enumerate(tensors):  # head group j (its sub-group `chunk`) goes to rank j
        part = t.reshape(b, n, p, chunks, hc, d)[:, :, :, chunk].permute(2, 0, 1, 3, 4)  # (P, B, L, Hc, D)
        if i < rotated:
            apply_rope(part, rope, out=send[:, :, :, i])  # (1, L, 1, D) broadcasts over (P, B, L, Hc, D)
        else:
            _copy(send[:, :, :, i], part)

    def unpack(recv):  # recv[j]: rank j's tokens (B, L, T, Hc, D) for this rank's heads
        if b == 1:
            whole = recv.view(1, p * n, count, hc, d)  # rank order = sequence order
            return [whole[:, :, i] for i in range(count)]
        return [recv[:, :, :, i].transpose(0, 1).reshape(b, p * n, hc, d) for i in range(count)]

    return Exchange(send, ctx, unpack)


def heads_to_seq(x: torch.Tensor, ctx: ParallelContext, n_local: int) -> Exchange:
    """The inverse exchange: x (B, N, Hc, D), N <= P * L real tokens -> (P, B, L, Hc, D), [j] = rank j's
    heads for this rank's L tokens (see merge_heads). With B = 1, no pad and x contiguous, x itself is the
    send buffer; else one copy into it, pad rows zero."""
    p = ctx.world
    b, total, hc, d = x.shape
    if b == 1 and total == p * n_local and x.is_contiguous():  # x is that buffer already: rank j's L tokens at [j]
        return Exchange(x.view(p, 1, n_local, hc, d), ctx, lambda recv: recv)
    send = x.new_empty((p, b, n_local, hc, d))  # [j]: the tokens of rank j
    dst = send.transpose(0, 1)  # (B, P, L, Hc, D)
    whole, rest = divmod(total, n_local)  # ranks whose L tokens are all real; the real tokens of the next
    _copy(dst[:, :whole], x[:, :whole * n_local].unflatten(1, (whole, n_local)))
    if whole < p:  # the pad: x's last tokens, then zeros (written in place, not through a padded copy of x)
        _copy(dst[:, whole, :rest], x[:, whole * n_local:])
        dst[:, whole, rest:].zero_()
        dst[:, whole + 1:].zero_()
    return Exchange(send, ctx, lambda recv: recv)


def merge_heads(parts: list[torch.Tensor]) -> torch.Tensor:
    """heads_to_seq results of chunks 0..c-1, each (P, B, L, Hc, D) -> (B, L, H, D), head order
    (rank j, chunk c, head within the chunk) = the original head order. One copy per chunk."""
    p, b, n, hc, d = parts[0].shape
    out = parts[0].new_empty((b, n, p, len(parts), hc, d))
    for c, part in enumerate(parts):
        _copy(out[:, :, :, c], part.permute(1, 2, 0, 3, 4))
    return out.view(b, n, p * len(parts) * hc, d)


def merge_stats(target: dict[str, float], parts: list[dict[str, float]]) -> None:
    """Per-chunk stats of one call -> one: pair counts add up, ratios (equal heads per chunk) average."""
    for key in parts[0]:
        values = [part[key] for part in parts]
        target[key] = sum(values) if key == "pairs" else sum(values) / len(values)


def gather_routing(routing: Routing, ctx: ParallelContext, num_tokens: int) -> Routing:
    """Local (B, L) groups and gates -> the whole sequence's (B, N), in one all-gather."""
    packed = torch.stack([routing.groups.to(torch.float32), routing.gate.to(torch.float32)], -1)  # (B, L, 2)
    full = all_gather_seq(packed, ctx, dim=1)[:, :num_tokens]  # group ids < 2^24 are exact in fp32
    return Routing(groups=full[..., 0].round().to(routing.groups.dtype), gate=full[..., 1].to(routing.gate.dtype),
                   num_groups=routing.num_groups)


def pick_staged(method, staged: bool | None) -> bool:
    """`staged` as given, or for None the choice for `method` (see UlyssesAttention)."""
    return bool(method.needs_routing) if staged is None else staged


class UlyssesAttention:
    """`method` over a context-parallel group: the same forward(q, k, v, meta) -> o contract, with q, k, v
    and o this rank's token shard (B, L, H, D) and meta describing the whole (unpadded) sequence, except
    meta.rope: this rank's (cos, sin), q and k unrotated (the wrapper's applies_rope)."""

    def __init__(self, method: AttentionMethod, ctx: ParallelContext, chunks: int = 1, staged: bool | None = None):
        """`chunks` > 1 splits this rank's heads into that many sub-groups, each with its own exchanges,
        so that the exchanges of one overlap the attention of another (calls without state, see _chunks).
        `staged`: q, k and v in three exchanges, v's and k's running while k and q are rotated; None picks
        it for routed methods (MoGA's first step after the exchange is a gather by group, so the received
        layout does not matter) and one exchange for the others. 2x H200, 126k tokens, per step: dense
        3.056 s with one exchange (it reads the one receive buffer as it lies) vs 3.159 s staged;
        moga+stga 1.284 s with one vs 1.273 s staged."""
        if not method.supports_context_parallel:
            raise ValueError(f"attention.method: {method.name} does not support context parallelism")
        self.method, self.ctx, self.chunks = method, ctx, chunks
        self.staged = pick_staged(method, staged)
        self.records_state = False  # learnt: the method writes its slot even without a commit (lite)
        self.name, self.cp_strategy = method.name, method.cp_strategy
        self.needs_routing, self.has_state = method.needs_routing, method.has_state
        # Always: q and k come unrotated with meta.rope (this rank's tokens). A method that rotates by
        # itself gets the whole sequence's rope; for the others q and k are rotated while packed.
        self.applies_rope = True

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMeta) -> torch.Tensor:
        b, n_local, h, _ = q.shape
        ctx, num_tokens = self.ctx, meta.layout.num_tokens
        check_heads(h, ctx.world)
        plan_of_shard(meta.layout, ctx.world, n_local)  # refuses a shard that is not a cut of the layout
        chunks = self._chunks(h, meta)
        full = self._full_meta(meta, n_local)  # its small gathers go first on the communication stream
        rope = None if self.method.applies_rope else meta.rope  # rotated in the packing copy
        if rope is not None and rope[0].shape[1] != n_local:
            raise ValueError(f"ulysses: meta.rope covers {rope[0].shape[1]} tokens, expected this rank's {n_local}")
        incoming = [seq_to_heads((q, k, v), ctx, c, chunks, rope, self.staged) for c in range(chunks)]  # all in flight
        self._prepare_method(full)  # done already when the caller ran prepare(meta); else under the exchange
        outgoing, stats = [], []
        for c, exchange in enumerate(incoming):
            qkv = [t[:, :num_tokens] for t in exchange.result()]  # q, k, v (B, N, H/P/chunks, D)
            # A stateful method with an empty slot and no commit computes as if stateless, unless it
            # records state on any call (lite): each chunk gets a private slot to find that out.
            part = replace(full, stats={}, state=StateSlot() if self.has_state else full.state) if chunks > 1 else full
            o = self.method(*qkv, part)  # (B, N, H/P/chunks, D)
            if chunks > 1 and self.has_state and part.state.value is not None:
                self.records_state = True  # from now on one exchange; this call: all heads at once, real slot
                rest = [[t[:, :num_tokens] for t in later.result()] for later in incoming[c + 1:]]
                done = [[t[:, :num_tokens] for t in e.result()] for e in incoming[:c]]  # already-used inputs
                qkv = [torch.cat([x[i] for x in done + [qkv] + rest], 2) for i in range(3)]  # (B, N, H/P, D)
                for e in outgoing:
                    e.result()  # drain: every rank takes this branch at the same chunk
                o = self.method(*qkv, full)
                return merge_heads([heads_to_seq(o, ctx, n_local).result()])
            outgoing.append(heads_to_seq(o, ctx, n_local))
            stats.append(part.stats)
        if chunks > 1:
            merge_stats(meta.stats, stats)
        return merge_heads([exchange.result() for exchange in outgoing])  # (B, L, H, D)

    def prepare(self, meta: AttentionMeta) -> None:
        """Before q, k, v exist (meta with this rank's routing): the routing's all-gather and the method's
        prepare on the whole sequence, launched now; forward finds both cached on meta.routing."""
        if meta.routing is not None:
            self._prepare_method(self._full_meta(meta, meta.routing.groups.shape[1]))

    def _prepare_method(self, full: AttentionMeta) -> None:
        prepare = getattr(self.method, "prepare", None)  # optional for method-like wrappers (carry.py)
        if prepare is not None:
            prepare(full)

    def _chunks(self, heads: int, meta: AttentionMeta) -> int:
        """Head sub-groups for this call: self.chunks where they divide this rank's heads and the call
        neither reads nor writes state (a stateful method: an empty slot, no commit, and it has not
        been seen to record state on such calls), else 1."""
        if self.chunks == 1 or (heads // self.ctx.world) % self.chunks:
            return 1
        if self.has_state and (self.records_state or meta.commit
                               or (meta.state is not None and meta.state.value is not None)):
            return 1
        return self.chunks

    def _full_meta(self, meta: AttentionMeta, n_local: int) -> AttentionMeta:
        """meta for the whole sequence: gathered routing and rope (stats and state slot are shared)."""
        num_tokens = meta.layout.num_tokens
        changes = {}
        if meta.routing is not None:
            if meta.routing.groups.shape[1] != n_local:
                raise ValueError(f"ulysses: meta.routing holds {meta.routing.groups.shape[1]} tokens, expected "
                                 f"this rank's {n_local} (route before the all-to-all, on local tokens)")
            routing = meta.routing  # gathered once per layer call, by prepare() or here
            changes["routing"] = routing.plan("ulysses", lambda: gather_routing(routing, self.ctx, num_tokens))
        if meta.rope is not None and not self.method.applies_rope:
            changes["rope"] = None  # applied to q and k before the exchange
        elif meta.rope is not None and meta.rope[0].shape[1] == n_local:
            cos_sin = all_gather_seq(torch.stack(meta.rope), self.ctx, dim=2)[:, :, :num_tokens]  # (2, 1, N, 1, D)
            changes["rope"] = (cos_sin[0], cos_sin[1])
        return replace(meta, **changes) if changes else meta

    def flops(self, meta: AttentionMeta, shape: tuple[int, int, int, int]) -> float:
        """What this rank's forward computed (its H / P heads over the whole sequence)."""
        b, _, h, d = shape
        return self.method.flops(meta, (b, meta.layout.num_tokens, h // self.ctx.world, d))

    def __call__(self, q, k, v, meta):
        return self.forward(q, k, v, meta)

    def __repr__(self) -> str:
        return f"UlyssesAttention({self.method!r}, world={self.ctx.world})"
