"""Batch generation, the `ray job submit` entrypoint:

    ray job submit --address http://HEAD:8265 -- python -m jobs.generate MANIFEST [key=value ...]
    python -m jobs.generate configs/examples/batch.jsonl          # a local Ray cluster, CPU is fine

MANIFEST (JSONL or YAML, see pipeline/manifest.py) lists videos; `key=value` overrides apply to all
of them on top of --config (default: the demo). Videos whose MP4 and JSON exist are skipped; the
others run over as many worker groups as the cluster holds. The results manifest
(MANIFEST-STEM.results.jsonl in the storage) gets one line per video; the exit status is 1 if any
video failed (they are named), 2 if the manifest is bad (nothing started).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.cli import parse_with_overrides
from pipeline.config import ConfigError
from pipeline.manifest import load_manifest
from pipeline.runtime.progress import Progress, ProgressDisplay, finished
from pipeline.runtime.results import existing_result, results_jsonl
from pipeline.storage import open_store


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("manifest", help="JSONL or YAML manifest of videos")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every video")
    parser.add_argument("--config", default=None, help="base config (default configs/examples/demo.yaml)")
    parser.add_argument("--results", default=None, help="results manifest key in the storage "
                                                        "(default MANIFEST-STEM.results.jsonl)")
    return parse_with_overrides(parser, argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:  # every entry is resolved and validated before Ray starts or any actor is asked for
        manifest = load_manifest(args.manifest, args.config, args.overrides)
    except ConfigError as e:
        print(f"generate: error: {e}", file=sys.stderr)
        return 2
    display = ProgressDisplay()
    results = {v.name: existing_result(v) for v in manifest.videos}
    for name, result in results.items():
        if result is not None:
            display.update(finished(Progress(name), "skipped"))
    todo = [v for v in manifest.videos if results[v.name] is None]
    if todo:
        import ray

        from actors.batch import run_batch

        owns_ray = not ray.is_initialized()  # in a notebook or a test, use the cluster already joined
        if owns_ray:
            ray.init(address=manifest.base.cluster.address or None)
        try:
            for r in run_batch(todo, manifest.base, display).results:
                results[r.name] = r
        finally:
            display.close()
            if owns_ray:
                ray.shutdown()
    else:
        display.close()
    ordered = [results[v.name] for v in manifest.videos]
    key = args.results or f"{Path(args.manifest).stem}.results.jsonl"
    uri = open_store(manifest.base.storage).put(key, results_jsonl(ordered))
    for r in ordered:
        shown = r.video_uri if r.status != "failed" else r.error
        print(f"{r.status:8} {r.name}: {shown}" + (f" ({r.timings.wall_s:.1f} s wall, "
                                                     f"{r.timings.denoise_s:.1f} s denoising)" if r.status == "done" else ""))
    print(f"results: {uri}")
    failed = [r.name for r in ordered if r.status == "failed"]
    if failed:
        print(f"generate: {len(failed)} of {len(ordered)} videos failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
