"""Benchmark: context parallelism on a Wan2.1-1.3B-shaped transformer (random weights).

    torchrun --nproc-per-node 2 -m jobs.bench_parallel --out DIR                        # 2 GPUs (H200 x2)
    torchrun --nproc-per-node 2 -m jobs.bench_parallel --device cpu --tiny --out DIR    # CPU dry run (gloo)

One denoising step = one forward of the transformer, batch 1, at ~126k and ~376k video tokens
(81 and 241 latent frames of 30x52 tokens: 480x832), bf16 on GPU. For each attention method it
times our model on rank 0 alone (P=1) and sharded over every rank (P=world), then diffusers' own
Ulysses context parallelism (ContextParallelConfig(ulysses_degree=world), cuDNN attention) on the
stock model with the same weights, in the same run, as the peer. Prints one row per (config,
tokens, P): seconds per step (median of --repeats after --warmup), peak memory per GPU (max over
ranks, weights included), speed-up over our P=1, and diffusers CP's time over ours (> 1: faster
than the peer). Writes bench_parallel.json and bench_parallel.md to --out.

On CUDA, when --methods names a method whose cuDNN shapes follow the routing (moga, moga+stga), every
process sets TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1 at its start unless the environment sets it
(pipeline/attention/cudnn_env.py); torch reads it once per process, so dense rows and the peer's
cuDNN calls in the same run have it too. The table's header line says which it was; for dense and
peer rows without it, run `--methods dense` apart (or with TORCH_CUDNN_SDPA_AVOID_RECOMPILE=0).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from jobs.profiling import kernel_profile
from pipeline.attention import AttentionMeta, method_names
from pipeline.attention.cudnn_env import AVOID_RECOMPILE, avoid_recompile_wanted, use_avoid_recompile
from pipeline.config import AttentionConfig
from pipeline.layout import VideoLayout
from pipeline.parallel import ParallelContext, Rendezvous, init_group, parallelize

WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
TINY_WAN = dict(WAN_1_3B, num_attention_heads=4, attention_head_dim=16, text_dim=32, freq_dim=32, ffn_dim=64,
                num_layers=2)
GRIDS = {"full": {"126k": (81, 30, 52), "376k": (241, 30, 52)}, "tiny": {"small": (5, 4, 6), "large": (13, 4, 6)}}
TEXT_LEN = 512


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m jobs.bench_parallel", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/bench_parallel")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="toy model and sizes (CPU dry run)")
    p.add_argument("--dtype", default="", choices=["", "bfloat16", "float32"], help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--methods", default="dense,moga+stga")
    p.add_argument("--sizes", default="", help="comma-separated size names (default: all of the grid set)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1, help="untimed forwards per config, at the smallest size only")
    p.add_argument("--chunks", default="0",
                   help="Ulysses head sub-groups per rank whose all-to-alls overlap attention (0: the default, 1); "
                        "a comma-separated list times P=world once per value")
    p.add_argument("--staged", default="",
                   help="Ulysses q, k, v in three exchanges (1) or one (0); a comma-separated list times P=world once "
                        "per value (default: the library's default)")
    p.add_argument("--no-diffusers", action="store_true", help="skip diffusers' Ulysses CP (the peer)")
    p.add_argument("--timeout-s", type=float, default=1800.0)
    p.add_argument("--profile", action="store_true",
                   help="after each of our rows, one more forward under torch.profiler: every rank's kernels")
    p.add_argument("--trace", action="store_true", help="with --profile: every rank's Chrome trace too, in --out")
    return p.parse_args(argv)


def cudnn_env(args) -> str:
    """Before any CUDA work: TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1 when a requested method wants it on
    this device, unless the environment sets it. Returns the line the table's header prints."""
    given = os.environ.get(AVOID_RECOMPILE)
    methods = [m for m in args.methods.split(",") if m in method_names()]
    for method in methods:
        use_avoid_recompile(attention_cfg(method), args.device)
    value = os.environ.get(AVOID_RECOMPILE)
    if value is None:
        return f"{AVOID_RECOMPILE} unset"
    wanting = ", ".join(m for m in methods if avoid_recompile_wanted(attention_cfg(m)))
    source = "from the environment" if given is not None else f"set for {wanting}"
    scope = "; every cuDNN SDPA call of the run has it, dense and the peer's included" if value == "1" else ""
    return f"{AVOID_RECOMPILE}={value} ({source}{scope})"


def join(args) -> tuple[ParallelContext, torch.device]:
    if "RANK" not in os.environ:
        device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
        return ParallelContext.single(device), device
    rdzv = Rendezvous.from_env(timeout_s=args.timeout_s)
    device = torch.device("cpu")
    if args.device == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rdzv.rank)))
        torch.cuda.set_device(device)
    return init_group(rdzv, device), device


class Timer:
    """Median seconds per call and peak memory, the slowest rank counting, over the ranks that run."""

    def __init__(self, ctx: ParallelContext, device: torch.device, args):
        self.ctx, self.device, self.args = ctx, device, args

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, run, warm: bool, ranks: int) -> tuple[float, float, torch.Tensor | None]:
        """(median seconds, peak GiB, this rank's last output on the CPU or None if it sat out)."""
        active = self.ctx.rank < ranks
        times, peak, result = [0.0], 0.0, None
        if active:
            for _ in range(self.args.warmup if warm else 0):
                run()
            self.sync()
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            times = []
        for _ in range(self.args.repeats if active else 0):
            if ranks > 1:
                dist.barrier(group=self.ctx.group)
            t0 = time.perf_counter()
            result = run()
            self.sync()
            times.append(time.perf_counter() - t0)
        if active and self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) / 2**30
        out = torch.tensor([statistics.median(times), peak], dtype=torch.float64, device=self.device)
        if self.ctx.world > 1:
            dist.all_reduce(out, op=dist.ReduceOp.MAX, group=self.ctx.group)  # the idle ranks report 0
        result = result[0] if isinstance(result, tuple) else result
        return float(out[0]), float(out[1]), None if result is None else result.float().cpu()


def with_chunks(model, chunks: int, staged: bool | None = None):
    """The parallel model with `chunks` head sub-groups (and `staged` exchanges) in every Ulysses wrapper
    (parallelize wraps an adapter once; later calls keep its wrappers, so a second setting is made here)."""
    from pipeline.parallel.dit import DEFAULT_CHUNKS, DEFAULT_STAGED
    from pipeline.parallel.ulysses import UlyssesAttention, pick_staged

    for fn in model.adapter.attention:
        if isinstance(fn, UlyssesAttention):
            fn.chunks = chunks or DEFAULT_CHUNKS
            fn.staged = pick_staged(fn.method, DEFAULT_STAGED if staged is None else staged)
    return model


def staged_of(model) -> bool:
    """Whether the model's Ulysses wrappers stage their exchanges (they all do the same)."""
    from pipeline.parallel.ulysses import UlyssesAttention

    return any(fn.staged for fn in model.adapter.attention if isinstance(fn, UlyssesAttention))


def exchange_ms(ctx: ParallelContext, num_tokens: int, arch: dict, device: torch.device, dtype, chunks: int,
                staged: bool = False, repeats: int = 5) -> float:
    """Milliseconds of one layer's Ulysses exchanges with nothing else running: q, k, v in and the output
    back, in the sub-groups the wrapper uses (seq_to_heads / heads_to_seq), the slowest rank counting.
    What overlap can hide at most; the step's time over P=1's ideal share shows how much stayed exposed."""
    from pipeline.parallel.dit import DEFAULT_CHUNKS
    from pipeline.parallel.shard import ShardPlan
    from pipeline.parallel.ulysses import heads_to_seq, seq_to_heads

    chunks = chunks or DEFAULT_CHUNKS
    heads, dim = arch["num_attention_heads"], arch["attention_head_dim"]
    local = ShardPlan(num_tokens, ctx.world).local_len
    q, k, v = (torch.randn(1, local, heads, dim, device=device, dtype=dtype) for _ in range(3))
    o = torch.randn(1, local * ctx.world, heads // ctx.world // chunks, dim, device=device, dtype=dtype)  # a method's

    def layer():
        incoming = [seq_to_heads((q, k, v), ctx, c, chunks, staged=staged) for c in range(chunks)]
        outgoing = [heads_to_seq(o, ctx, local) for e in incoming if e.result()]  # each output after its input
        return [e.result() for e in outgoing]

    layer()
    times = []
    for _ in range(repeats):
        dist.barrier(group=ctx.group)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        layer()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    out = torch.tensor([statistics.median(times) * 1e3], dtype=torch.float64, device=device)
    dist.all_reduce(out, op=dist.ReduceOp.MAX, group=ctx.group)
    return float(out[0])


def profile_ranks(run, title: str, ranks: int, ctx: ParallelContext, device: torch.device, out: Path, say,
                  trace: bool = False) -> None:
    """One more forward under torch.profiler on each of the `ranks` ranks that ran it: every rank's
    tables go to out/profile.txt, their summary lines to the console (rank 0 writes; ranks meet here);
    with `trace`, each rank's Chrome trace to out/trace_<title>_rank<r>.json."""
    path = None
    if trace:
        out.mkdir(parents=True, exist_ok=True)
        path = str(out / f"trace_{re.sub(r'[^A-Za-z0-9]+', '_', title).strip('_')}_rank{ctx.rank}.json")
    table = kernel_profile(run, device, top=60, gaps_top=12, trace=path)
    tables = [table]
    if ranks > 1:
        tables = [None] * ranks
        dist.all_gather_object(tables, table, group=ctx.group)
    if ctx.rank != 0:
        return
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "profile.txt", "a") as f:
        f.writelines(f"{title}: kernels of one forward, rank {r}\n{text}\n\n" for r, text in enumerate(tables))
    for r, text in enumerate(tables):
        summary = [x for x in text.splitlines() if x.lstrip().startswith(("kernels ", "compute stream"))]
        say(f"    rank {r}:\n" + "\n".join(summary or [f"    operators of one forward: {out / 'profile.txt'}"]))


def relative_error(got: torch.Tensor | None, want: torch.Tensor | None) -> float | None:
    """max |got - want| / max |want|: the sharded prediction against rank 0's one-GPU prediction."""
    if got is None or want is None:
        return None
    return float((got - want).abs().max() / want.abs().max())


def build_transformer(arch: dict, device: torch.device, dtype: torch.dtype):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)  # the same weights on every rank
    with torch.device(device):
        model = WanTransformer3DModel(**arch).to(dtype).eval()
    keep = set(model._keep_in_fp32_modules or ())  # as from_pretrained(torch_dtype=...) loads them
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if keep & set(name.split(".")):
            tensor.data = tensor.data.float()
    return model


def attention_cfg(method: str):
    return OmegaConf.merge(OmegaConf.structured(AttentionConfig), {"method": method, "moga": {"router_init": "random"}})


def inputs(grid, arch, device, dtype):
    t, h, w = grid
    g = torch.Generator("cpu").manual_seed(1)
    latents = torch.randn(1, arch["in_channels"], t, 2 * h, 2 * w, generator=g).to(device, dtype)
    text = torch.randn(1, 1, TEXT_LEN, arch["text_dim"], generator=g).to(device, dtype)
    return latents, torch.tensor([500.0], device=device), text, VideoLayout(t, h, w)


@torch.no_grad()
def main(argv=None) -> int:
    args = parse(argv)
    cudnn = cudnn_env(args)  # before join: nothing may touch cuDNN first
    ctx, device = join(args)
    dtype = getattr(torch, args.dtype or ("float32" if args.device == "cpu" else "bfloat16"))
    arch = TINY_WAN if args.tiny else WAN_1_3B
    grids = GRIDS["tiny" if args.tiny else "full"]
    sizes = args.sizes.split(",") if args.sizes else list(grids)
    world, timer, rows, one_gpu = ctx.world, Timer(ctx, device, args), [], {}
    say = print if ctx.rank == 0 else (lambda *a, **k: None)
    transformer = build_transformer(arch, device, dtype)
    from pipeline.models.wan import WanAdapter

    for method in args.methods.split(","):
        if method not in method_names():
            say(f"skip {method}: not in the attention registry (known: {', '.join(method_names())})")
            continue
        adapter = WanAdapter(transformer, attention_cfg(method))  # sets its processors on the shared weights
        chunk_counts = [int(c) for c in args.chunks.split(",")]
        stagings = [bool(int(x)) for x in args.staged.split(",")] if args.staged else [None]
        runs = [(1, ParallelContext.single(device), 0, None)] + [
            (world, ctx, c, st) for c in chunk_counts for st in stagings if world > 1]
        for p, group, chunks, staged in runs:
            model = with_chunks(parallelize(adapter, group), chunks, staged) if p > 1 else adapter
            name = (f"ours {method}" + (f" chunks={chunks}" if p > 1 and len(chunk_counts) > 1 else "")
                    + (f" staged={int(staged)}" if p > 1 and len(stagings) > 1 else ""))
            for i, size in enumerate(sizes):
                latents, t, text, layout = inputs(grids[size], arch, device, dtype)
                states = adapter.new_states()
                sec, gib, pred = timer(lambda: model(latents, t, text, layout, AttentionMeta(layout), states),
                                       warm=i == 0, ranks=p)
                if p == 1:
                    one_gpu[(method, size)] = pred
                a2a = (exchange_ms(group, layout.num_tokens, arch, device, dtype, chunks, staged_of(model))
                       if p > 1 else None)
                rows.append(dict(config=name, method=method, size=size, tokens=layout.num_tokens, P=p, s_per_step=sec,
                                 peak_gib=gib, a2a_ms_per_layer=a2a,
                                 rel_err_vs_p1=relative_error(pred, one_gpu.get((method, size)))))
                say(f"  {name:<24} {size:>6} P={p}: {sec:.3f} s/step, {gib:.2f} GiB"
                    + (f", all-to-alls alone {a2a:.2f} ms/layer" if a2a is not None else ""))
                if args.profile and ctx.rank < p:
                    profile_ranks(lambda: model(latents, t, text, layout, AttentionMeta(layout), states),
                                  f"{name} {size} P={p}", p, ctx, device, Path(args.out), say, args.trace)
    if world > 1 and not args.no_diffusers:
        rows += diffusers_ulysses(transformer, ctx, timer, args, arch, grids, sizes, device, dtype, say, one_gpu)
    if ctx.rank == 0:
        report(rows, Path(args.out), dict(world=world, device=str(device), dtype=str(dtype), tiny=args.tiny,
                                          repeats=args.repeats, warmup=args.warmup, cudnn_sdpa=cudnn,
                                          gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"))
    if world > 1:
        dist.destroy_process_group()
    return 0


def diffusers_ulysses(transformer, ctx, timer, args, arch, grids, sizes, device, dtype, say, one_gpu) -> list[dict]:
    """The peer: the stock model (diffusers' own processors) with ContextParallelConfig(ulysses_degree=P)."""
    from diffusers import ContextParallelConfig
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    for block in transformer.blocks:
        block.attn1.set_processor(WanAttnProcessor())
        block.attn2.set_processor(WanAttnProcessor())
    if device.type == "cpu":
        torch.accelerator.device_count = lambda: 1  # CPU dry run only: diffusers takes rank % device_count
    else:
        transformer.set_attention_backend("_native_cudnn")
    transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=ctx.world))
    rows = []
    for i, size in enumerate(sizes):
        latents, t, text, layout = inputs(grids[size], arch, device, dtype)
        sec, gib, pred = timer(lambda: transformer(hidden_states=latents, timestep=t, encoder_hidden_states=text[:, 0],
                                                  return_dict=False), warm=i == 0, ranks=ctx.world)
        rows.append(dict(config="diffusers Ulysses (dense)", size=size, tokens=layout.num_tokens, P=ctx.world,
                         s_per_step=sec, peak_gib=gib, rel_err_vs_p1=relative_error(pred, one_gpu.get(("dense", size)))))
        say(f"  diffusers Ulysses {size:>6} P={ctx.world}: {sec:.3f} s/step, {gib:.2f} GiB")
    return rows


def report(rows: list[dict], out: Path, setup: dict) -> None:
    p1 = {(r.get("method"), r["size"]): r["s_per_step"] for r in rows if r["P"] == 1}
    peer = {r["size"]: r["s_per_step"] for r in rows if r["config"].startswith("diffusers")}
    for r in rows:
        base = p1.get((r.get("method"), r["size"]))
        r["speedup_vs_p1"] = base / r["s_per_step"] if base and r["s_per_step"] else None
        ours_cp = r["P"] > 1 and not r["config"].startswith("diffusers")
        r["diffusers_cp_over_ours"] = (peer[r["size"]] / r["s_per_step"]
                                       if r["size"] in peer and ours_cp and r["s_per_step"] else None)
    head = ["config", "tokens", "P", "s/step", "peak GiB/GPU", "speed-up vs P=1", "diffusers CP (dense) / ours",
            "all-to-alls alone, ms/layer", "rel. err vs our P=1"]
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    lines = [[r["config"], str(r["tokens"]), str(r["P"]), fmt(r["s_per_step"], ".3f"), fmt(r["peak_gib"], ".2f"),
              fmt(r["speedup_vs_p1"], ".2f"), fmt(r["diffusers_cp_over_ours"], ".2f"), fmt(r.get("a2a_ms_per_layer"), ".2f"),
              fmt(r["rel_err_vs_p1"] if r["P"] > 1 else None, ".1e")] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *lines)]
    print(f"\n{setup['cudnn_sdpa']}")
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    for line in lines:
        print("  ".join(x.ljust(w) for x, w in zip(line, widths)))
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_parallel.json").write_text(json.dumps({"setup": setup, "rows": rows}, indent=2))
    md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(x) + " |" for x in lines]
    (out / "bench_parallel.md").write_text(f"setup: {json.dumps(setup)}\n\n" + "\n".join(md) + "\n")
    print(f"\nwrote {out / 'bench_parallel.json'} and {out / 'bench_parallel.md'}")


if __name__ == "__main__":
    raise SystemExit(main())
