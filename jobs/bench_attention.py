"""Attention kernels against dense cuDNN SDPA, one table: `python -m jobs.bench_attention`.

For each sequence length (--sizes, mapped to whole 480p latent frames of 30 x 52 tokens; the table
reports the actual N), B=1, H=12, D=128, bf16 on the GPU, every row times one forward:

  method    the attention method (and its setting)
  ms        median over --repeats after warm-up (CUDA events; FlexAttention compiles untimed)
  TFLOP/s   the method's FLOPs (4 * D per computed (query, key) pair and head) / time
  density   the method's FLOPs / dense FLOPs
  ideal     1 / density: the speed-up if time followed FLOPs
  speed-up  dense time / this time, dense measured in the same run
  of ideal  speed-up / ideal

Rows: dense; moga with balanced routing (random router on random hidden states) and with routing
from a k-means-initialised router on clustered hidden states (unbalanced groups), both timed as the
whole layer (router, gate, gather/scatter); moga with a new random router every call (group sizes
change every call, as they do between steps and layers of a real run: cuDNN builds an execution
plan per new shape unless TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1); stga with whole-frame and
quarter-frame windows (both divide the 480p grid: one batched call); moga+stga (lse merge; on the
GPU both exact routes, cells (the default) and bias, on the same inputs); moc (4 shots, chunk size and top-k set
for ~15% density); lite (a sparse step after the full steps, one full step, and one full step with
the STGA base); linear. The note column names the kernel path where a method has several.
q and k carry a per-frame component (tokens of a frame share a direction), so lite and moc have
structure to find; that does not change what dense, moga or stga compute.

--check runs every registered method against its masked dense reference at a small size on the
CPU and prints the max error per method. --out DIR writes bench_attention.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from omegaconf import OmegaConf

from jobs.profiling import kernel_profile
from pipeline.attention import METHODS, build_method, method_names
from pipeline.attention.base import AttentionMeta, Routing, StateSlot
from pipeline.attention.backends.blockmask import choose_block_sparse_path
from pipeline.attention.moga import MoGARouter, kmeans_init
from pipeline.attention.reference import reference_attention
from pipeline.attention.rope import apply_rope
from pipeline.config import AttentionConfig
from pipeline.layout import VideoLayout

GRID = (30, 52)  # 480p: 480 / 16 x 832 / 16 tokens per latent frame
DEFAULT_SIZES = "32768,150000,580000"


def avoid_recompile() -> bool:
    """Whether torch's cuDNN attention rounds sequence lengths up (ragged path) instead of building a
    plan per new shape: the opt-in TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1 (torch >= 2.9, no bias)."""
    return os.environ.get("TORCH_CUDNN_SDPA_AVOID_RECOMPILE", "") == "1"


def attention_config(method: str, **sections) -> AttentionConfig:
    return OmegaConf.merge(OmegaConf.structured(AttentionConfig), {"method": method, **sections})


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def frames_for(tokens: int) -> int:
    return max(1, round(tokens / (GRID[0] * GRID[1])))


def structured_qkv(layout: VideoLayout, heads: int, dim: int, device, dtype, strength: float = 12.0):
    """q, k (1, N, H, D) = strength * (unit direction of the token's frame) + noise; v noise."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    directions = torch.nn.functional.normalize(torch.randn(layout.frames, heads, dim, generator=gen), dim=-1)
    frame = directions.to(device, dtype).repeat_interleave(layout.tokens_per_frame, 0)[None]  # (1, N, H, D)
    q = strength * frame + torch.randn(frame.shape, device=device, dtype=dtype)
    k = strength * frame + torch.randn(frame.shape, device=device, dtype=dtype)
    return q, k, torch.randn(frame.shape, device=device, dtype=dtype)


def clustered_hidden(n: int, channels: int, device, dtype, shares=(0.4, 0.25, 0.15, 0.12, 0.08)):
    """(1, N, C) hidden states drawn around len(shares) centres with those shares of the tokens."""
    gen = torch.Generator(device="cpu").manual_seed(1)
    centres = 4.0 * torch.randn(len(shares), channels, generator=gen)
    labels = torch.multinomial(torch.tensor(shares), n, replacement=True, generator=gen)
    hidden = centres.to(device, dtype)[labels.to(device)]
    return (hidden + torch.randn(hidden.shape, device=device, dtype=dtype))[None]


# ---------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------


@dataclass
class Case:
    label: str
    run: Callable[[], torch.Tensor]
    flops: Callable[[], float]  # after a run: the FLOPs it computed
    note: str = ""


def method_case(label, method, q, k, v, meta_of: Callable[[], AttentionMeta], before=None, note: str = "") -> Case:
    """A row that times method(q, k, v, meta) (plus `before(meta)`, e.g. the router)."""
    last = {}

    def run():
        meta = meta_of()
        if before is not None:
            before(meta)
        last["meta"] = meta
        return method(q, k, v, meta)

    return Case(label, run, lambda: method.flops(last["meta"], q.shape), note)


def build_cases(n_tokens: int, heads: int, dim: int, device, dtype, only: set[str] | None) -> list[Case]:
    frames = frames_for(n_tokens)
    layout = VideoLayout(frames, *GRID)
    n = layout.num_tokens
    q, k, v = structured_qkv(layout, heads, dim, device, dtype)
    channels = heads * dim
    cases = []
    want = lambda name: only is None or name in only

    def build(name, **sections):
        return build_method(attention_config(name, **sections), device, dtype)

    if want("dense"):
        cases.append(method_case("dense", build("dense"), q, k, v, lambda: AttentionMeta(layout=layout)))

    def routed(router, hidden):
        def route(meta):
            meta.routing, _ = router(hidden)
        return route

    if want("moga") or want("moga+stga"):
        torch.manual_seed(2)
        random_hidden = torch.randn(1, n, channels, device=device, dtype=dtype)
        balanced = MoGARouter(channels, 5).to(device)
        balanced.requires_grad_(False)
    if want("moga"):
        clustered = clustered_hidden(n, channels, device, dtype)
        fitted = MoGARouter(channels, 5).to(device)
        kmeans_init(fitted, clustered, iters=10)  # untimed: once per video
        fitted.requires_grad_(False)
        method = build("moga", moga={"num_groups": 5})
        cases.append(method_case("moga M=5 balanced (layer)", method, q, k, v, lambda: AttentionMeta(layout=layout),
                                 routed(balanced, random_hidden)))
        cases.append(method_case("moga M=5 k-means, clustered (layer)", method, q, k, v,
                                 lambda: AttentionMeta(layout=layout), routed(fitted, clustered)))
        fresh = MoGARouter(channels, 5).to(device)
        fresh.requires_grad_(False)

        def reroute(meta):
            fresh.proj.weight.normal_(0.0, channels ** -0.5)  # new group sizes: new kernel shapes
            meta.routing, _ = fresh(random_hidden)

        cases.append(method_case("moga M=5 rerouted every call (layer)", method, q, k, v,
                                 lambda: AttentionMeta(layout=layout), reroute,
                                 "TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1" if avoid_recompile() else ""))
    if want("stga"):
        for window in ([1, GRID[0], GRID[1]], [1, GRID[0] // 2, GRID[1] // 2]):
            cases.append(method_case(f"stga {'x'.join(map(str, window))}", build("stga", stga={"window": window}),
                                     q, k, v, lambda: AttentionMeta(layout=layout)))
    if want("moga+stga"):
        method = build("moga+stga", merge="lse", stga={"window": [1, GRID[0], GRID[1]]})
        cases.append(method_case("moga+stga lse, 1x30x52 (layer)", method, q, k, v,
                                 lambda: AttentionMeta(layout=layout), routed(balanced, random_hidden),
                                 f"{method.route} route"))
        if torch.device(device).type == "cuda" and dtype != torch.float32:  # the other exact route on the same inputs
            bias = build("moga+stga", merge="lse", stga={"window": [1, GRID[0], GRID[1]]})
            bias.route = "bias"
            cases.append(method_case("moga+stga lse, 1x30x52 (layer)", bias, q, k, v,
                                     lambda: AttentionMeta(layout=layout), routed(balanced, random_hidden),
                                     "bias route (forced)"))
    if want("moc"):
        shots = [frames // 4 + (1 if i < frames % 4 else 0) for i in range(4)] if frames >= 4 else [frames]
        shot_layout = VideoLayout(frames, *GRID, shot_frames=tuple(shots))
        chunk_frames = max(1, frames // 40)
        chunks = sum(-(-s // chunk_frames) for s in shots)
        top_k = max(0, round(0.15 * chunks) - 3)  # ~3 anchors (own + local) + top-k of the chunks
        method = build("moc", moc={"chunk_frames": chunk_frames, "top_k": top_k, "local_frames": 1})
        path = choose_block_sparse_path((method.route(q, k, shot_layout),), n, torch.device(device), dtype, False)
        cases.append(method_case(f"moc 4 shots, chunk {chunk_frames}f, top-{top_k}", method, q, k, v,
                                 lambda: AttentionMeta(layout=shot_layout), note=f"{path} path"))
    if want("lite"):
        method = build("lite")
        full_steps = method.cfg.lite.full_steps
        slot = StateSlot()
        for step in range(full_steps):  # untimed: record the skips
            method(q, k, v, AttentionMeta(layout=layout, step=step, state=slot))
        cases.append(method_case(f"lite sparse step (after {full_steps} full)", method, q, k, v,
                                 lambda: AttentionMeta(layout=layout, step=full_steps, state=slot)))
        cases.append(method_case("lite full step", method, q, k, v,
                                 lambda: AttentionMeta(layout=layout, step=0, state=StateSlot())))
        windowed = build("lite", lite={"base": "stga"}, stga={"window": [1, GRID[0], GRID[1]]})
        cases.append(method_case("lite full step, stga 1x30x52 base", windowed, q, k, v,
                                 lambda: AttentionMeta(layout=layout, step=0, state=StateSlot())))
    if want("linear"):
        rope = (torch.ones(1, n, 1, dim, device=device), torch.zeros(1, n, 1, dim, device=device))
        cases.append(method_case("linear", build("linear"), q, k, v,
                                 lambda: AttentionMeta(layout=layout, rope=rope)))
    return cases


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def time_ms(run: Callable[[], torch.Tensor], device: torch.device, warmup: int, repeats: int,
            slow_ms: float = 2000.0) -> float:
    """Median ms of `repeats` calls after `warmup` untimed ones; a call slower than slow_ms is timed
    once (dense and lite's full step at 580k: seconds each, the table must stay within minutes)."""
    def once() -> float:
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        run()
        return (time.perf_counter() - t0) * 1e3

    for _ in range(warmup):
        run()
    times = [once()]
    while len(times) < repeats and times[0] < slow_ms:
        times.append(once())
    return statistics.median(times)


def bench(sizes: list[int], heads: int, dim: int, device: torch.device, dtype, warmup: int, repeats: int,
          only: set[str] | None, profile: bool = False) -> list[dict]:
    rows = []
    for size in sizes:
        try:
            cases = build_cases(size, heads, dim, device, dtype, only)
        except torch.cuda.OutOfMemoryError:
            rows.append(dict(method="(all)", N=size, note="out of memory building inputs"))
            torch.cuda.empty_cache()
            continue
        n = frames_for(size) * GRID[0] * GRID[1]
        dense_flops = 4.0 * dim * heads * n * n
        dense_ms = None
        for case in cases:
            row = dict(method=case.label, N=n, **({"note": case.note} if case.note else {}))
            try:
                with torch.inference_mode():
                    ms = time_ms(case.run, device, warmup, repeats)
                flops = case.flops()
            except torch.cuda.OutOfMemoryError:
                row["note"] = "skipped: out of memory"
                rows.append(row)
                torch.cuda.empty_cache()
                continue
            if case.label == "dense":
                dense_ms = ms
            density = flops / dense_flops
            row.update(ms=ms, tflops=flops / (ms * 1e-3) / 1e12, density=density, ideal=1.0 / density)
            if dense_ms is not None:
                row["speedup"] = dense_ms / ms
                row["of_ideal"] = row["speedup"] * density
            rows.append(row)
            print(format_row(row), flush=True)
            if profile:
                with torch.inference_mode():
                    print(kernel_profile(case.run, device), flush=True)
    return rows


COLUMNS = [("method", "{}", 38), ("N", "{:d}", 7), ("ms", "{:.2f}", 9), ("tflops", "{:.3g}", 7),
           ("density", "{:.4f}", 8), ("ideal", "{:.1f}x", 8), ("speedup", "{:.2f}x", 8), ("of_ideal", "{:.2f}", 8)]
HEADERS = {"tflops": "TFLOP/s", "speedup": "speed-up", "of_ideal": "of ideal"}


def format_row(row: dict) -> str:
    cells = []
    for key, fmt, width in COLUMNS:
        cells.append((fmt.format(row[key]) if key in row else "-").rjust(width) if key != "method"
                     else row[key].ljust(width))
    return " ".join(cells) + (f"  {row['note']}" if row.get("note") else "")


def header() -> str:
    return " ".join(HEADERS.get(k, k).ljust(w) if k == "method" else HEADERS.get(k, k).rjust(w) for k, _, w in COLUMNS)


def markdown(rows: list[dict], context: str) -> str:
    keys = [k for k, _, _ in COLUMNS]
    lines = [context, "", "| " + " | ".join(HEADERS.get(k, k) for k in keys) + " | note |",
             "|" + "---|" * (len(keys) + 1)]
    for row in rows:
        cells = [fmt.format(row[k]) if k in row else "-" for k, fmt, _ in COLUMNS]
        lines.append("| " + " | ".join(cells) + f" | {row.get('note', '')} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# --check: every method against its reference, small, on the CPU
# ---------------------------------------------------------------------------------------------


def check_methods() -> dict[str, float]:
    """Max |error| of every registered method against masked dense fp32 attention."""
    torch.manual_seed(0)
    layout = VideoLayout(4, 4, 6, shot_frames=(2, 2))
    n, b, h, d = layout.num_tokens, 2, 2, 16
    q, k, v = (torch.randn(b, n, h, d) for _ in range(3))
    groups, gate = torch.randint(0, 4, (b, n)), torch.rand(b, n)
    routing = Routing(groups, gate, 5)
    same_group = (groups[:, :, None] == groups[:, None, :])[:, None]
    g = gate[:, :, None, None]
    errors = {}
    for name in method_names():
        method = build_method(attention_config(name, stga={"window": [2, 2, 3]},
                                               lite={"full_steps": 1, "threshold": -2.0, "tile": [8, 8]}))
        meta = AttentionMeta(layout=layout, routing=routing)
        if name == "dense":
            got, want = method(q, k, v, meta), reference_attention(q, k, v)
        elif name == "moga":
            got, want = method(q, k, v, meta), reference_attention(q, k, v, same_group) * g
        elif name == "stga":
            got, want = method(q, k, v, meta), reference_attention(q, k, v, method.mask(layout).token_mask())
        elif name == "moga+stga":
            window = method.windows(layout).token_window
            union = same_group | (window[:, None] == window[None, :])[None, None]
            got, want = method(q, k, v, meta), reference_attention(q, k, v, union) * g
        elif name == "moc":
            got, want = method(q, k, v, meta), reference_attention(q, k, v, method.route(q, k, layout).token_mask())
        elif name == "lite":
            slot = StateSlot()
            method(q, k, v, AttentionMeta(layout=layout, step=0, state=slot))
            got = method(q, k, v, AttentionMeta(layout=layout, step=1, state=slot))
            tq, tk = method.cfg.lite.tile
            keep = ~slot.value.skip[:, :, torch.arange(n) // tq][:, :, :, torch.arange(n) // tk]
            want = reference_attention(q, k, v, keep)
        elif name == "linear":
            angle = torch.rand(1, n, 1, d // 2).repeat_interleave(2, -1)
            rope = (angle.cos(), angle.sin())
            got = method(q, k, v, AttentionMeta(layout=layout, rope=rope))
            fq, fk = torch.relu(q), torch.relu(k)
            num = torch.einsum("bihd,bjhd->bhij", apply_rope(fq, rope), apply_rope(fk, rope))
            den = torch.einsum("bihd,bjhd->bhij", fq, fk).sum(-1)  # (B, H, N)
            want = (torch.einsum("bhij,bjhd->bihd", num, v) / (den.transpose(1, 2)[..., None] + method.cfg.linear.eps))
        else:
            raise SystemExit(f"--check: no reference for method {name!r} here; add one")
        errors[name] = (got - want).abs().max().item()
    return errors


# ---------------------------------------------------------------------------------------------


def parse_sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"--sizes: {text!r} is not a comma-separated list of token counts") from None
    if not sizes or min(sizes) < 1:
        raise SystemExit(f"--sizes: {text!r} must list token counts >= 1")
    return sizes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default=DEFAULT_SIZES, help="token counts, comma-separated (rounded to whole frames)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per row (default: 1 on CUDA, 0 on CPU)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per row (default: 3 on CUDA, 1 on CPU)")
    p.add_argument("--methods", default="", help=f"only these methods (comma-separated: {', '.join(METHODS)})")
    p.add_argument("--out", default="", help="directory for bench_attention.json and bench_attention.md")
    p.add_argument("--check", action="store_true", help="max error of every method vs its reference (CPU)")
    p.add_argument("--profile", action="store_true", help="after each row, its kernels under torch.profiler")
    args = p.parse_args(argv)

    if args.check:
        errors = check_methods()
        for name, err in errors.items():
            print(f"{name:10s} max |error| {err:.2e}")
        return 0 if max(errors.values()) <= 1e-5 else 1

    sizes = parse_sizes(args.sizes)
    only = {m.strip() for m in args.methods.split(",") if m.strip()} or None
    unknown = (only or set()) - set(METHODS)
    if unknown:
        raise SystemExit(f"--methods: unknown {sorted(unknown)} (known: {', '.join(method_names())})")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device: cuda requested but torch sees no CUDA device")
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    warmup = args.warmup if args.warmup is not None else (1 if cuda else 0)
    repeats = args.repeats if args.repeats is not None else (3 if cuda else 1)
    if only is not None:
        only |= {"dense"}  # the baseline of every ratio
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    context = (f"attention bench: {name}, torch {torch.__version__}, B=1, H={args.heads}, D={args.head_dim}, "
               f"{str(dtype).removeprefix('torch.')}, 480p grid {GRID[0]}x{GRID[1]}, median of {repeats} "
               f"after {warmup} warm-up")
    print(context)
    print(header())
    rows = bench(sizes, args.heads, args.head_dim, device, dtype, warmup, repeats, only, args.profile)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench_attention.json").write_text(json.dumps({"context": context, "rows": rows}, indent=1))
        (out / "bench_attention.md").write_text(markdown(rows, context))
    return 0


if __name__ == "__main__":
    sys.exit(main())
