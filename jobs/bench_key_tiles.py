"""cuDNN's rate against the key count: why aligned.py splits keys into whole 128-key tiles.

    python -m jobs.bench_key_tiles [--out DIR]

One dense bf16 call (B=1, H=12, D=128) at ~30k queries for key counts that are and are not whole
tiles of 128, then MoGA-like groups (five ~30k-token segments) as they come, with the split
(whole tiles + the rest, merged by lse), and at whole-tile sizes, then full attention at the token
counts of a 5 s and a 20 s 480p video, as they come and split. Ratios against the whole-tile
call measured in the same run. CUDA only.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend

from pipeline.attention.backends import segments as seg
from pipeline.attention.backends import select_backend
from pipeline.attention.backends.segments import cu_seqlens_from_counts, segment_attention

H, D = 12, 128


def time_ms(run, repeats: int = 7) -> float:
    run()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def dense(q, k, v):
    return seg.dense_lse(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="", help="directory for bench_key_tiles.md")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_key_tiles: needs CUDA")
    q, k, v = (torch.randn(1, 160_000, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    lines = [f"cuDNN key tiles: {torch.cuda.get_device_name()}, torch {torch.__version__}, H={H}, D={D}, bf16", "",
             "| case | queries | keys | ms | TFLOP/s | vs whole tiles |", "|---|---|---|---|---|---|"]
    with torch.inference_mode():
        base = None
        for nq, nk in ((29952, 29952), (29952, 29950), (29950, 29952), (29950, 29950), (30000, 30000),
                       (29888, 29888)):
            ms = time_ms(lambda: dense(q[:, :nq], k[:, :nk], v[:, :nk]))
            rate = 4.0 * nq * nk * H * D / ms / 1e9
            base = base or rate
            lines.append(f"| one call | {nq} | {nk} | {ms:.3f} | {rate:.0f} | {rate / base:.3f} |")
            print(lines[-1], flush=True)
        for label, sizes in (("5 segments", [29000, 31000, 30500, 29500, 29760]),
                             ("5 segments, whole tiles", [29056, 30976, 30464, 29440, 29824])):
            t = sum(sizes)
            cu = cu_seqlens_from_counts(torch.tensor(sizes, device="cuda"))
            flops = sum(4.0 * s * s * H * D for s in sizes)
            for split in (False, True):
                if split and label.endswith("tiles"):
                    continue
                ms = time_ms(lambda: segment_attention(q[0, :t], k[0, :t], v[0, :t], cu, counts=sizes,
                                                       path="per_segment", key_tile=None if split else 0,
                                                       sdpa_order=[SDPBackend.CUDNN_ATTENTION]))
                rate = flops / ms / 1e9
                name = label + (", split (aligned.py)" if split else "")
                lines.append(f"| {name} | {t} | {'/'.join(map(str, sizes))} | {ms:.2f} | {rate:.0f} | "
                             f"{rate / base:.3f} |")
                print(lines[-1], flush=True)
        # full attention at token counts of real videos (not whole tiles): as they come and split
        backend = select_backend("auto", "cuda", torch.bfloat16)
        for n in (32760, 126360):
            times = [time_ms(lambda: backend.dense(q[:, :n], k[:, :n], v[:, :n], key_tile=tile), 3)
                     for tile in (0, None)]  # 0: never split; None: the rule (splits these)
            rate = [4.0 * n * n * H * D / ms / 1e9 for ms in times]
            for name, ms, r in zip(("dense", "dense, split (aligned.py)"), times, rate):
                lines.append(f"| {name} | {n} | {n} | {ms:.2f} | {r:.0f} | {r / base:.3f} |")
                print(lines[-1], flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "bench_key_tiles.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
