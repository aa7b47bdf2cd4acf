"""Benchmark: does the batch machinery hide decode, encode, upload and checkpoints behind denoising?

    python -m jobs.bench_ray MANIFEST [key=value ...] [--config FILE]

Runs every video of MANIFEST through the same path as jobs.generate (worker groups, scheduler,
writer actors), into a fresh storage prefix so nothing is skipped, and prints one row per video
and the batch totals: job wall time against the sum of denoising compute measured in the same
run. Target: job wall <= 1.10 x the sum of denoising. The job wall starts at ray.init (the groups'
start and the weights' loading count; random weights are built before it, standing for weights
on disk); the batch wall starts when the first group is ready. A job's start-up is a fixed cost,
so the ratio falls with the manifest's length: configs/examples/bench-ray-long.jsonl has 24
videos (~420 s of denoising on 2x H200) against bench-ray.jsonl's 8.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from pipeline.cli import parse_with_overrides
from pipeline.config import ConfigError
from pipeline.manifest import load_manifest
from pipeline.runtime.progress import ProgressDisplay


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.bench_ray", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("manifest")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--config", default=None)
    args = parse_with_overrides(parser, argv)
    run_id = time.strftime("bench-%Y%m%d-%H%M%S")
    try:
        manifest = load_manifest(args.manifest, args.config, args.overrides)
        base_uri = manifest.base.storage.uri.rstrip("/")
        manifest = load_manifest(args.manifest, args.config, [*args.overrides, f"storage.uri={base_uri}/{run_id}"])
    except ConfigError as e:
        print(f"bench_ray: error: {e}", file=sys.stderr)
        return 2
    import ray

    from actors.batch import run_batch

    # Random weights are built (or found in the cache) before the job's clock starts: they stand for
    # the weights a user's job finds on disk, and are built once here rather than by every actor.
    t_weights = time.perf_counter()
    if not manifest.base.model.path:
        from pipeline.models.random_weights import random_weights_dir

        random_weights_dir(manifest.base.model)
    weights_s = time.perf_counter() - t_weights
    t0 = time.perf_counter()
    ray.init(address=manifest.base.cluster.address or None)
    ray_init_s = time.perf_counter() - t0
    gpus = ray.cluster_resources().get("GPU", 0)
    display = ProgressDisplay(rich=False)
    try:
        run = run_batch(list(manifest.videos), manifest.base, display)
    finally:
        display.close()
    job_wall = time.perf_counter() - t0
    ray.shutdown()
    results = run.results

    print(f"\n{'video':<16}{'status':>8}{'blocks':>7}{'tokens':>9}{'denoise s':>11}{'wall s':>9}{'wall/den':>9}"
          f"{'decode s':>10}{'encode s':>10}{'upload s':>10}{'ckpt s':>8}{'wait s':>8}")
    for r in results:
        t = r.timings
        ratio = t.wall_s / t.denoise_s if t.denoise_s else float("nan")
        print(f"{r.name:<16}{r.status:>8}{r.blocks:>7}{r.tokens:>9}{t.denoise_s:>11.2f}{t.wall_s:>9.2f}{ratio:>9.3f}"
              f"{t.decode_s:>10.2f}{t.encode_s:>10.2f}{t.upload_s:>10.2f}{t.checkpoint_s:>8.2f}{t.writer_wait_s:>8.2f}")
    denoise = sum(r.timings.denoise_s for r in results)
    videos_wall = sum(r.timings.wall_s for r in results)
    groups = len(run.group_start_s) or 1
    per_group = denoise / groups  # the denoising each group did, if the videos were spread evenly
    print(f"\ngroups: {groups} (ready after {', '.join(f'{s:.1f}' for s in run.group_start_s.values())} s); "
          f"videos: {len(results)}; "
          f"failed: {sum(r.status == 'failed' for r in results)}")
    for name, phases in run.group_phases.items():  # where each group's start-up went
        print(f"group {name} start-up: " + ", ".join(f"{k} {v:.2f} s" for k, v in phases.items()))
    print(f"sum of denoising compute:          {denoise:9.2f} s")
    print(f"sum of video wall times:           {videos_wall:9.2f} s  {videos_wall / max(denoise, 1e-9):6.3f}x denoising")
    print(f"batch wall, first group ready..end: {run.videos_s:8.2f} s  "
          f"{run.videos_s / max(per_group, 1e-9):6.3f}x denoising per group   (target <= 1.10x)")
    print(f"job wall, start-up included:       {job_wall:9.2f} s  {job_wall / max(per_group, 1e-9):6.3f}x"
          f"   (from ray.init: the groups' start, loading the weights, the batch, shutdown)")
    # Where the time outside the batch went: what a user's job pays once, however long its manifest.
    outside = job_wall - run.videos_s
    print(f"outside the batch:                 {outside:9.2f} s = ray.init {ray_init_s:.2f} s"
          f" + group start and shutdown {outside - ray_init_s:.2f} s"
          + (f"   (weights from model.path: {manifest.base.model.path})" if manifest.base.model.path
             else f"   (random weights built before the clock: {weights_s:.2f} s)"))
    print(json.dumps({"bench": "ray", "manifest": manifest.source, "videos": len(results), "groups": groups,
                      "parallel_degree": manifest.base.parallel.degree, "cluster_gpus": gpus,
                      "mode": manifest.base.sampling.mode, "steps": manifest.base.sampling.steps,
                      "tokens_per_video": [r.tokens for r in results], "denoise_s": round(denoise, 3),
                      "batch_wall_s": round(run.videos_s, 3), "job_wall_s": round(job_wall, 3),
                      "random_weights_s": round(weights_s, 3), "ray_init_s": round(ray_init_s, 3),
                      "ratio": round(run.videos_s / max(per_group, 1e-9), 4),
                      "group_start_s": {k: round(v, 2) for k, v in run.group_start_s.items()},
                      "group_phases_s": {g: {k: round(v, 3) for k, v in phases.items()}
                                         for g, phases in run.group_phases.items()},
                      "per_video": [{"name": r.name, "status": r.status, **{k: round(v, 3) for k, v in
                                                                            vars(r.timings).items()}}
                                    for r in results]}))
    return 0 if all(r.status == "done" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
