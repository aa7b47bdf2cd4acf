"""Dense vs sparse attention on the trained tiny model, scored by the procedural checker.

    python -m jobs.eval_methods [--videos 4] [--shots 3] [--weights DIR] [--out DIR] [key=value ...]

The same scripts (captions from the procedural grammar, seeded) are generated with every method on
the shipped weights, in this process (pipeline.Pipeline, the demo's config plus the overrides),
and each MP4 is scored with jobs.eval_tiny (1.0 = every check passes). Rows:
  ground truth       the scripts rendered by pipeline.procedural, through H.264 (the checker's ceiling)
  dense              tiny-trained, full attention (the twin trained dense)
  moga+stga          tiny-trained-moga, the twin trained with MoGA + STGA and its learned routers
  moga+stga k-means  tiny-trained (dense weights), training-free routers (k-means at the first step)
  moc, lite          tiny-trained (dense weights), training-free by design
The last line is `score=` per row, comma-separated, in table order.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from pipeline.cli import parse_with_overrides

METHODS = (  # (row, model preset, attention overrides)
    ("dense", "tiny-trained", ["attention=dense"]),
    ("moga+stga", "tiny-trained-moga", ["attention=moga+stga"]),
    ("moga+stga k-means", "tiny-trained", ["attention=moga+stga", "attention.moga.router_init=kmeans"]),
    ("moc", "tiny-trained", ["attention=moc"]),
    ("lite", "tiny-trained", ["attention=lite"]),
)
CHECKS = ("background", "colour", "shape", "motion", "consistent")
SCRIPT_STREAM = 5  # pipeline.training.trainer's streams are 1-4: these scripts were never trained on


def scripts(count: int, shots: int, seconds: float, seed: int) -> list[list[str]]:
    from pipeline.procedural.scenes import sample_script

    return [[spec.caption for spec in sample_script(np.random.default_rng([seed, SCRIPT_STREAM, i]), shots)]
            for i in range(count)]


def evaluate_method(row: str, overrides: list[str], videos: list[list[str]], seconds: float, out: Path) -> dict:
    from jobs.eval_tiny import evaluate
    from pipeline import Pipeline

    pipe = Pipeline.from_config(None, [*overrides, f"storage.uri=file://{out / row.replace(' ', '-')}"])
    reports, densities, t0 = [], [], time.perf_counter()
    for i, captions in enumerate(videos):
        result = pipe.generate({"name": f"video{i}", "seed": i,
                                "shots": [{"prompt": c, "seconds": seconds} for c in captions]}, progress=False)
        reports.append(evaluate(_local_path(result.video_uri)))
        densities += [m.stats["density"] for m in pipe.adapter.last_meta.values() if "density" in m.stats]
    return {"reports": reports, "density": float(np.mean(densities)) if densities else 1.0,
            "seconds_per_video": (time.perf_counter() - t0) / len(videos)}


def ground_truth(videos: list[list[str]], seconds: float, fps: int, height: int, width: int, out: Path) -> dict:
    from jobs.eval_tiny import evaluate
    from pipeline.procedural import render_shot, shot_frame_counts
    from pipeline.procedural.videofile import save_clip

    out.mkdir(parents=True, exist_ok=True)
    reports = []
    for i, captions in enumerate(videos):
        rng = np.random.default_rng(i)
        counts = shot_frame_counts([seconds] * len(captions), fps)
        shots = [render_shot(c, n, height, width, rng) for c, n in zip(captions, counts)]
        save_clip(out / f"video{i}.mp4", shots, captions, [seconds] * len(captions), fps)
        reports.append(evaluate(out / f"video{i}.mp4"))
    return {"reports": reports, "density": None, "seconds_per_video": None}


def _local_path(uri: str) -> Path:
    return Path(uri[len("file://"):]) if uri.startswith("file://") else Path(uri)


def table(rows: dict[str, dict]) -> str:
    header = ["method", "score", "±", *CHECKS, "density", "s/video"]
    lines = []
    for name, r in rows.items():
        scores = [rep.score for rep in r["reports"]]
        checks = [np.mean([v for v in (rep.check_mean(c) for rep in r["reports"]) if v is not None] or [np.nan])
                  for c in CHECKS]
        lines.append([name, f"{np.mean(scores):.3f}", f"{np.std(scores):.3f}", *(f"{c:.2f}" for c in checks),
                      "-" if r["density"] is None else f"{r['density']:.2f}",
                      "-" if r["seconds_per_video"] is None else f"{r['seconds_per_video']:.1f}"])
    widths = [max(len(x[i]) for x in [header, *lines]) for i in range(len(header))]
    return "\n".join("| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |"
                     for line in [header, ["-" * w for w in widths], *lines])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.eval_methods", description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=4)
    parser.add_argument("--shots", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="outputs/eval-methods")
    parser.add_argument("--methods", default=",".join(r for r, _, _ in METHODS), help="rows to run, comma-separated")
    parser.add_argument("--weights", default=None, help="directory holding tiny-trained/ and tiny-trained-moga/ "
                                                        "(default: the package's pipeline/models/weights)")
    parser.add_argument("overrides", nargs="*", help="config overrides for every method, e.g. sampling.steps=10")
    args = parse_with_overrides(parser, argv)

    from pipeline.config import ConfigError, load_config

    try:
        base = load_config(None, args.overrides)
    except ConfigError as e:
        print(f"eval_methods: {e}", file=sys.stderr)
        return 2
    seconds, v = 2.0, base.video
    videos = scripts(args.videos, args.shots, seconds, args.seed)
    out = Path(args.out)
    rows = {"ground truth": ground_truth(videos, seconds, v.fps, v.height, v.width, out / "ground-truth")}
    from pipeline.training.install import WEIGHTS_DIR

    weights = Path(args.weights) if args.weights else WEIGHTS_DIR
    wanted = args.methods.split(",")
    from pipeline.attention.cudnn_env import use_avoid_recompile
    from pipeline.models.loader import resolve_device

    # torch reads TORCH_CUDNN_SDPA_AVOID_RECOMPILE once, at the first cuDNN attention call of the
    # process, which the dense row would make: settle it for the routed rows first.
    for row, _, attention in METHODS:
        if row in wanted:
            cfg = load_config(None, [*attention, *args.overrides])
            use_avoid_recompile(cfg.attention, resolve_device(cfg.model.device))
    for row, preset, attention in METHODS:
        if row in wanted:
            model = [f"model={preset}", f"model.path={weights / preset}"]
            rows[row] = evaluate_method(row, [*model, *attention, *args.overrides], videos, seconds, out)
            print(f"{row}: {np.mean([r.score for r in rows[row]['reports']]):.3f}", flush=True)
    print(f"{args.videos} scripts of {args.shots} x {seconds:g} s at {v.fps} fps, {v.width}x{v.height}, "
          f"{base.sampling.steps} steps, guidance {base.sampling.guidance_scale}")
    print(table(rows))
    print("score=" + ",".join(f"{np.mean([r.score for r in row['reports']]):.4f}" for row in rows.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
