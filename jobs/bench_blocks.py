"""Benchmark: block-autoregressive generation with a constant-size carried state (random weights).

    python -m jobs.bench_blocks --out DIR                        # one GPU (H100/H200), a few minutes
    python -m jobs.bench_blocks --device cpu --tiny --out DIR    # CPU dry run (toy models and sizes)

Models, bf16 on GPU: SANA-Video 2B shape (diffusers SanaVideoTransformer3DModel defaults: 20 layers,
dim 2240, 20 heads x 112, linear self-attention with the carried sums, Mix-FFN temporal-conv tail)
and Wan2.1-1.3B shape (30 layers, 12 heads x 128, dense attention with a rolling KV cache of
--sink-frames + --window-frames clean latent frames). Videos: one shot of 10 s and of 60 s at
480x832, 16 fps (41 and 241 latent frames of 30x52 tokens), a block per --block-frames latent
frames (the last block is what remains), CFG batched (batch 2) unless --no-cfg.

Each block is timed as ONE denoising step plus the commit pass (the forward on the clean block at
t = 0 that writes the carried state): a real run costs steps x (one step) + one commit per block,
so the per-block numbers scale, the shape of the curve does not. A warm-up block runs first
(untimed). The last block has no commit (nothing follows it) and is usually shorter: per-block
statistics use the full-size blocks that commit; the total covers every block.

Columns: s/block of the first, median and last full block, last/first (flat: ~1.0), total seconds,
total / (blocks x median) (linear in length: ~1.0), peak GPU memory of the run (weights included;
torch.cuda.max_memory_allocated, reset at the start of each video), peak / peak at the shortest
video (constant memory: ~1.0), and the carried state's size after the last commit.
Writes bench_blocks.json and bench_blocks.md to --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from pipeline.config import build_config, load_config
from pipeline.models.loader import ModelBundle
from pipeline.sampling.denoise import Denoiser, VideoText
from pipeline.sampling.plan import ShotPlan

SANA_2B = dict(in_channels=16, out_channels=16, num_attention_heads=20, attention_head_dim=112, num_layers=20,
               num_cross_attention_heads=20, cross_attention_head_dim=112, cross_attention_dim=2240,
               caption_channels=2304, mlp_ratio=2.5, sample_size=30, patch_size=[1, 2, 2],
               qk_norm="rms_norm_across_heads", rope_max_seq_len=1024)
WAN_1_3B = dict(patch_size=[1, 2, 2], num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
TEXT_LEN = {"sana": 300, "wan": 512}
ATTENTION = {"sana": "linear", "wan": "dense"}
NAMES = {"sana": "SANA-Video 2B shape", "wan": "Wan2.1 1.3B shape"}
TINY_NAMES = {"sana": "SANA-Video tiny", "wan": "Wan2.1 tiny"}


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m jobs.bench_blocks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/bench_blocks")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="toy models and sizes (CPU dry run)")
    p.add_argument("--models", default="sana,wan")
    p.add_argument("--seconds", default="", help="comma-separated video lengths (default 10,60; tiny: 2,6)")
    p.add_argument("--block-frames", type=int, default=0, help="latent frames per block (default 10; tiny: 2)")
    p.add_argument("--sink-frames", type=int, default=1)
    p.add_argument("--window-frames", type=int, default=8)
    p.add_argument("--no-cfg", action="store_true", help="batch 1 (no classifier-free guidance)")
    return p.parse_args(argv)


def make_cfg(family: str, seconds: float, args) -> object:
    """The video's Config: the model's shape as its architecture (built here, not loaded)."""
    if args.tiny:
        preset = load_config(None, [f"model=tiny-{family}", f"attention={ATTENTION[family]}"])
        arch = OmegaConf.to_container(preset.model.architecture.transformer)
        size, fps, text_len = {"height": 64, "width": 64}, 4, 16
    else:
        arch = SANA_2B if family == "sana" else WAN_1_3B
        size, fps, text_len = {"height": 480, "width": 832}, 16, TEXT_LEN[family]
    data = {
        "model": {"preset": f"bench-{family}", "family": family, "device": args.device, "text_max_length": text_len,
                  "dtype": "bfloat16" if args.device == "cuda" else "float32", "architecture": {"transformer": arch}},
        "attention": {"method": ATTENTION[family]},
        "video": {"name": "bench", "fps": fps, **size, "shots": [{"prompt": "bench", "seconds": seconds}]},
        "sampling": {"mode": "block", "block_frames": args.block_frames or (2 if args.tiny else 10), "steps": 1,
                     "guidance_scale": 1.0 if args.no_cfg else 5.0, "sink_frames": args.sink_frames,
                     "window_frames": args.window_frames},
    }
    return build_config(data)


def build(family: str, cfg, device: torch.device):
    """The transformer with seeded random weights, made on the device, and its adapter."""
    from diffusers import SanaVideoTransformer3DModel, WanTransformer3DModel

    from pipeline.models.sana import SanaAdapter
    from pipeline.models.wan import WanAdapter

    dtype = torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32
    cls, adapter_cls = {"sana": (SanaVideoTransformer3DModel, SanaAdapter),
                        "wan": (WanTransformer3DModel, WanAdapter)}[family]
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: seconds, not minutes, for 2B parameters
        transformer = cls(**OmegaConf.to_container(cfg.model.architecture.transformer))
    keep = set(transformer._keep_in_fp32_modules or ())  # what from_pretrained(torch_dtype=bf16) keeps in fp32
    for name, tensor in [*transformer.named_parameters(), *transformer.named_buffers()]:
        if not keep & set(name.split(".")):
            tensor.data = tensor.data.to(dtype)
    transformer.eval().requires_grad_(False)
    bundle = ModelBundle(family, "random weights", transformer, None, None, None, device, dtype)
    return bundle, adapter_cls(transformer, cfg.attention)


def random_text(family: str, cfg, bundle, batch: int) -> VideoText:
    t = bundle.transformer.config
    channels = t.caption_channels if family == "sana" else t.text_dim
    g = torch.Generator().manual_seed(1)
    embeds = torch.randn(batch, 1, cfg.model.text_max_length, channels, generator=g)
    return VideoText(embeds.to(bundle.device, bundle.dtype), torch.ones(batch, 1, cfg.model.text_max_length,
                                                                         dtype=torch.bool, device=bundle.device))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_video(adapter, bundle, cfg, text: VideoText, device: torch.device, blocks: int | None = None) -> dict:
    """Denoise the video's blocks (one step + commit each); per-block seconds, peak memory, state size."""
    plan = ShotPlan.from_config(cfg, bundle.transformer.config.in_channels)
    denoiser = Denoiser(adapter, bundle, cfg)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    seconds = []
    for block in plan.blocks[:blocks]:
        sync(device)
        t0 = time.perf_counter()
        denoiser.denoise_block(plan, block, text)
        sync(device)
        seconds.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    full = [s for b, s in zip(plan.blocks, seconds)  # full-size blocks that commit
            if b.frames == cfg.sampling.block_frames and b.index + 1 < len(plan.blocks)]
    return {"plan": plan, "seconds": seconds, "full": full or seconds, "peak": peak,
            "state_bytes": denoiser.states.nbytes}


def row(name: str, seconds: float, cfg, result: dict, base_peak: int) -> dict:
    plan, full = result["plan"], result["full"]
    median = statistics.median(full)
    return {"model": name, "video_s": seconds, "tokens": plan.layout.num_tokens, "blocks": len(plan.blocks),
            "block_tokens": plan.blocks[0].layout.num_tokens, "s_block_first": full[0], "s_block_median": median,
            "s_block_last": full[-1], "last_over_first": full[-1] / full[0], "total_s": sum(result["seconds"]),
            "total_over_blocks_x_median": sum(result["seconds"]) / (len(plan.blocks) * median),
            "peak_gib": result["peak"] / 2**30, "peak_ratio": result["peak"] / base_peak if base_peak else None,
            "state_mib": result["state_bytes"] / 2**20, "block_frames": cfg.sampling.block_frames,
            "sink_frames": cfg.sampling.sink_frames, "window_frames": cfg.sampling.window_frames,
            "batch": 1 if cfg.sampling.guidance_scale <= 1.0 else 2}


COLUMNS = [("model", "{}"), ("video_s", "{:g}"), ("tokens", "{:,}"), ("blocks", "{}"), ("s_block_first", "{:.3f}"),
           ("s_block_median", "{:.3f}"), ("s_block_last", "{:.3f}"), ("last_over_first", "{:.3f}"),
           ("total_s", "{:.2f}"), ("total_over_blocks_x_median", "{:.3f}"), ("peak_gib", "{:.2f}"),
           ("peak_ratio", "{:.3f}"), ("state_mib", "{:.3g}")]
HEADERS = ["model", "video s", "tokens", "blocks", "s/block first", "median", "last", "last/first", "total s",
           "total/(blocks x median)", "peak GiB", "peak / shortest", "state MiB"]


def table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    for r in rows:
        lines.append("| " + " | ".join("n/a" if r[key] is None else fmt.format(r[key]) for key, fmt in COLUMNS) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device: cuda is not available here (use --device cpu --tiny for a dry run)")
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    lengths = [float(s) for s in (args.seconds or ("2,6" if args.tiny else "10,60")).split(",")]
    rows = []
    for family in args.models.split(","):
        cfgs = [make_cfg(family, s, args) for s in lengths]
        bundle, adapter = build(family, cfgs[0], device)
        text = random_text(family, cfgs[0], bundle, 1 if args.no_cfg else 2)
        run_video(adapter, bundle, cfgs[0], text, device, blocks=2)  # warm-up: kernels for both cache states
        base_peak = 0
        for seconds, cfg in zip(lengths, cfgs):
            result = run_video(adapter, bundle, cfg, text, device)
            base_peak = base_peak or result["peak"]
            rows.append(row((TINY_NAMES if args.tiny else NAMES)[family], seconds, cfg, result, base_peak))
            print(f"{rows[-1]['model']}, {seconds:g} s: {rows[-1]['blocks']} blocks in {rows[-1]['total_s']:.2f} s",
                  flush=True)
        del adapter, bundle
        if device.type == "cuda":
            torch.cuda.empty_cache()
    md = table(rows)
    note = ("One denoising step + the commit pass per block; CFG batch {}; blocks of {} latent frames; Wan cache: "
            "{} sink + {} window frames; {}.").format(rows[0]["batch"], rows[0]["block_frames"], args.sink_frames,
                                                     args.window_frames,
                                                     torch.cuda.get_device_name(device) if device.type == "cuda"
                                                     else "CPU")
    print(md)
    print(note)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_blocks.json").write_text(json.dumps({"rows": rows, "note": note}, indent=2))
    (out / "bench_blocks.md").write_text(md + "\n\n" + note + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
