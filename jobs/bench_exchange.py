"""Benchmark: one layer's Ulysses exchange alone, and how much of it attention running beside it hides.

    torchrun --nproc-per-node 2 -m jobs.bench_exchange --out DIR                        # 2 GPUs (H200 x2)
    torchrun --nproc-per-node 2 -m jobs.bench_exchange --device cpu --tiny --out DIR    # CPU dry run (gloo)

Wan2.1-1.3B's attention shape (12 heads of 128, bf16) at ~126k and ~376k tokens, per layer:
  raw          all_to_all_single of the same bytes, nothing packed: what NCCL alone takes
  ours         seq_to_heads(q, k, v) + heads_to_seq(o) (pipeline/parallel/ulysses.py): packing copies included
  attention    cuDNN SDPA over this rank's heads (--attn-calls calls on --attn-tokens tokens): a stand-in
               for attention that the exchange could run under
  both         the same attention with `ours` on a side stream at the same time
hidden = (attention + ours - both) / ours: the share of the exchange that overlap takes off the step (1: all
of it; what head sub-groups, parallel.chunks > 1, could gain at most). The link column is the bytes that
cross to other ranks over raw's time. On a machine with two GPUs visible, rank 0 also times copies of
the q, k, v bytes from GPU 0 to GPU 1, back to back, by the copy engine (no SMs): the link's other reference.
Medians of --repeats, the slowest rank counting. Writes bench_exchange.json and bench_exchange.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from jobs.bench_parallel import GRIDS, TINY_WAN, WAN_1_3B, join
from pipeline.parallel.shard import ShardPlan
from pipeline.parallel.ulysses import heads_to_seq, seq_to_heads

def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m jobs.bench_exchange", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/bench_exchange")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="toy shapes (CPU dry run)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--attn-tokens", type=int, default=32768)
    p.add_argument("--attn-calls", type=int, default=6)
    p.add_argument("--timeout-s", type=float, default=600.0)
    return p.parse_args(argv)


def timed_ms(fn, ctx, device: torch.device, repeats: int) -> float:
    for _ in range(2):
        fn()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dist.barrier(group=ctx.group)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        samples.append((time.perf_counter() - t0) * 1e3)
    out = torch.tensor([statistics.median(samples)], dtype=torch.float64, device=device)
    dist.all_reduce(out, op=dist.ReduceOp.MAX, group=ctx.group)
    return float(out[0])


def peer_copy_gbps(nbytes: int, repeats: int) -> float | None:
    """GB/s of copies GPU 0 -> GPU 1 by the copy engine, in this process (rank 0 with both GPUs visible);
    None with one GPU."""
    if torch.cuda.device_count() < 2:
        return None
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda:0")
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda:1")
    for _ in range(3):  # the first copies also set up peer access
        dst.copy_(src)
    torch.cuda.synchronize(0), torch.cuda.synchronize(1)
    t0 = time.perf_counter()
    for _ in range(repeats):  # back to back: the link's sustained rate, not a synchronisation's latency
        dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize(0), torch.cuda.synchronize(1)
    return nbytes * repeats / (time.perf_counter() - t0) / 1e9


def measure(ctx, device, dtype, tokens: int, heads: int, head_dim: int, args) -> dict:
    p = ctx.world
    local = ShardPlan(tokens, p).local_len
    q, k, v = (torch.randn(1, local, heads, head_dim, device=device, dtype=dtype) for _ in range(3))
    send_qkv = torch.randn(p, local, 3, heads // p, head_dim, device=device, dtype=dtype)
    send_o = torch.randn(p, local, heads // p, head_dim, device=device, dtype=dtype)
    recv_qkv, recv_o = torch.empty_like(send_qkv), torch.empty_like(send_o)
    att = torch.randn(1, heads // p, min(args.attn_tokens, tokens), head_dim, device=device, dtype=dtype)

    def raw():
        dist.all_to_all_single(recv_qkv, send_qkv, group=ctx.group)
        dist.all_to_all_single(recv_o, send_o, group=ctx.group)

    o = torch.randn(1, local * p, heads // p, head_dim, device=device, dtype=dtype)  # a method's output

    def ours():
        seq_to_heads((q, k, v), ctx).result()
        heads_to_seq(o, ctx, local).result()

    def attention():
        for _ in range(args.attn_calls):
            F.scaled_dot_product_attention(att, att, att)

    row = {"tokens": tokens, "P": p, "raw_ms": timed_ms(raw, ctx, device, args.repeats),
           "ours_ms": timed_ms(ours, ctx, device, args.repeats),
           "attention_ms": timed_ms(attention, ctx, device, args.repeats), "both_ms": None, "hidden": None}
    crossing = (send_qkv.nbytes + send_o.nbytes) * (p - 1) / p
    row["cross_mb"] = crossing / 1e6
    row["link_gbps"] = crossing / row["raw_ms"] / 1e6
    if device.type == "cuda":  # on the CPU gloo's thread and the attention share the cores: no overlap to see
        side = torch.cuda.Stream(device)

        def both():
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                ours()
            attention()
            torch.cuda.current_stream(device).wait_stream(side)

        row["both_ms"] = timed_ms(both, ctx, device, args.repeats)
        row["hidden"] = (row["attention_ms"] + row["ours_ms"] - row["both_ms"]) / row["ours_ms"]
    row["peer_copy_gbps"] = None
    dist.barrier(group=ctx.group)
    if device.type == "cuda" and ctx.rank == 0:
        row["peer_copy_gbps"] = peer_copy_gbps(send_qkv.nbytes, args.repeats)
    dist.barrier(group=ctx.group)
    return row


def main(argv=None) -> int:
    args = parse(argv)
    ctx, device = join(args)
    if ctx.world < 2:
        raise SystemExit("bench_exchange: run it under torchrun with --nproc-per-node >= 2")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    arch = TINY_WAN if args.tiny else WAN_1_3B  # bench_parallel's models: the same attention shapes
    shape = {"heads": arch["num_attention_heads"], "head_dim": arch["attention_head_dim"]}
    grids = GRIDS["tiny" if args.tiny else "full"]
    context = sdpa_kernel(SDPBackend.CUDNN_ATTENTION) if device.type == "cuda" else contextlib.nullcontext()
    rows = []
    with context:
        for name, (f, h, w) in grids.items():
            row = measure(ctx, device, dtype, f * h * w, shape["heads"], shape["head_dim"], args)
            rows.append({"size": name, **row})
    if ctx.rank == 0:
        report(rows, Path(args.out), {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                                      "nccl": ".".join(map(str, torch.cuda.nccl.version())) if device.type == "cuda"
                                      else None, "dtype": str(dtype), **shape,
                                      "attention": f"{args.attn_calls} x SDPA over {args.attn_tokens} tokens"})
    dist.destroy_process_group()
    return 0


def report(rows: list[dict], out: Path, setup: dict) -> None:
    def num(x, fmt):
        return "-" if x is None else format(x, fmt)

    head = ["size", "tokens", "P", "MB across", "raw ms", "link GB/s", "ours ms", "attention ms", "both ms",
            "hidden", "copy engine GB/s"]
    lines = [[r["size"], str(r["tokens"]), str(r["P"]), num(r["cross_mb"], ".3g"), num(r["raw_ms"], ".3f"),
              num(r["link_gbps"], ".3g"), num(r["ours_ms"], ".3f"), num(r["attention_ms"], ".3f"),
              num(r["both_ms"], ".3f"), num(r["hidden"], ".2f"), num(r["peer_copy_gbps"], ".0f")] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *lines)]
    print(f"setup: {json.dumps(setup)}")
    for line in [head] + lines:
        print("  ".join(x.ljust(wd) for x, wd in zip(line, widths)))
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_exchange.json").write_text(json.dumps({"setup": setup, "rows": rows}, indent=2))
    md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(x) + " |" for x in lines]
    (out / "bench_exchange.md").write_text(f"setup: {json.dumps(setup)}\n\n" + "\n".join(md) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
