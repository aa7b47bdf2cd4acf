"""`longreel` command line: generate one video, or submit a batch manifest to a Ray cluster."""

from __future__ import annotations

import argparse
import sys

from pipeline.config import ConfigError


def parse_with_overrides(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """parser.parse_args, with key=value overrides taken wherever they stand: argparse gives a trailing
    positional list only what comes before the first option, so `MANIFEST --config F key=value` would
    refuse key=value. The parser (or its chosen subparser) must have an `overrides` list."""
    args, rest = parser.parse_known_args(argv)
    unknown = [x for x in rest if x.startswith("-") or "=" not in x]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = [*args.overrides, *rest]
    return args


def _generate(args: argparse.Namespace) -> int:
    from pipeline.config import load_config

    cfg = load_config(args.config, args.overrides)  # bad input fails here, before anything loads
    from pipeline.api import Pipeline

    result = Pipeline.from_config(cfg).generate(progress=not args.quiet)
    print(f"video: {result.video_uri}\nmetadata: {result.metadata_uri}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from pipeline.sampling.plan import ShotPlan

    print(ShotPlan.from_config(load_config(args.config, args.overrides)).describe())
    return 0


def _submit(args: argparse.Namespace) -> int:
    from pipeline.api import submit

    job = submit(args.manifest, overrides=args.overrides, address=args.address, wait=not args.no_wait)
    print(f"job: {job.job_id} {job.status()}")
    return 0 if args.no_wait or job.status() == "SUCCEEDED" else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="longreel", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate one video from a config (default: the demo)")
    g.add_argument("config", nargs="?", default=None, help="YAML config (default configs/examples/demo.yaml)")
    g.add_argument("overrides", nargs="*", help="key=value overrides, e.g. video.fps=16 model=tiny-sana")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    g.set_defaults(run=_generate)
    p = sub.add_parser("plan", help="print the shot plan (frames, tokens, blocks) without generating")
    p.add_argument("config", nargs="?", default=None)
    p.add_argument("overrides", nargs="*")
    p.set_defaults(run=_plan)
    s = sub.add_parser("submit", help="submit a batch manifest as a Ray job")
    s.add_argument("manifest", help="JSONL or YAML manifest of videos")
    s.add_argument("overrides", nargs="*", help="key=value overrides for every video")
    s.add_argument("--address", default=None, help="Ray dashboard address, e.g. http://head:8265")
    s.add_argument("--no-wait", action="store_true", help="return once submitted")
    s.set_defaults(run=_submit)
    args = parse_with_overrides(parser, argv)
    if getattr(args, "config", None) and "=" in args.config:  # `longreel generate key=value`: no config given
        args.overrides, args.config = [args.config, *args.overrides], None
    try:
        return args.run(args)
    except ConfigError as e:
        print(f"longreel: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("longreel: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
