"""Train the tiny model on procedural videos, and install its weights into the package.

    python -m jobs.train_tiny train --out DIR [--resume PREV_DIR] [--smoke] [--time-budget-s 540] [...]
    python -m jobs.train_tiny install DIR/weights.tar [--dest pipeline/models/weights]
    python -m jobs.train_tiny sheet DIR/samples.npz|VIDEO.mp4 OUT.png [--columns 5]

`train` runs on the GPU machine (torch + diffusers + omegaconf suffice) within one call's wall clock
and leaves weights.tar, ckpt-*.pt, summary.json, samples.npz and train.log in --out; --resume DIR
continues from a previous --out. `--smoke` is the same run at toy sizes on a CPU in seconds.
`install` (here, with transformers) completes the diffusers layout (tokenizer/), links the shared
VAE, loads every model through the pipeline's loader, and replaces the package's weights.
See docs/training.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import fields
from pathlib import Path

STARTED = time.monotonic()


def _parse_value(text: str, like):
    if isinstance(like, bool):
        if text not in ("true", "false", "1", "0"):
            raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
        return text in ("true", "1")
    if isinstance(like, tuple):
        return tuple(int(x) if isinstance(like[0], int) else x for x in text.split(",") if x)
    return type(like)(text)


def train_parser(sub) -> None:
    from pipeline.training.trainer import TrainConfig, Trainer

    p = sub.add_parser("train", help="train the VAE and the DiT twins (GPU; --smoke on a CPU)")
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        like = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(like, bool):
            p.add_argument(flag, action="store_true", default=None)
        else:
            p.add_argument(flag, default=None, metavar=type(like).__name__.upper(),
                           type=lambda text, like=like: _parse_value(text, like))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.train_tiny", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train_parser(sub)
    install = sub.add_parser("install", help="put a run's weights.tar into the package (needs transformers)")
    install.add_argument("weights", help="weights.tar of a training run (or the --out directory holding it)")
    install.add_argument("--dest", default=None, help="default: pipeline/models/weights")
    sheet = sub.add_parser("sheet", help="a PNG of a run's validation videos (rows: ground truth, VAE, twins) "
                                         "or of one generated video")
    sheet.add_argument("samples", help="samples.npz of a training run, or a video file")
    sheet.add_argument("png")
    sheet.add_argument("--columns", type=int, default=5, help="frames per row, spread over the video")
    args = parser.parse_args(argv)

    if args.command == "sheet":
        from pipeline.training.sheet import write_sheet

        try:
            height, width = write_sheet(Path(args.samples), Path(args.png), args.columns)
        except (FileNotFoundError, ValueError) as e:
            print(f"train_tiny sheet: {e}", file=sys.stderr)
            return 2
        print(f"{args.png}: {width}x{height}")
        return 0
    if args.command == "install":
        from pipeline.training.install import WEIGHTS_DIR, install_weights

        try:
            installed = install_weights(Path(args.weights), Path(args.dest) if args.dest else WEIGHTS_DIR)
        except (FileNotFoundError, ValueError) as e:
            print(f"train_tiny install: {e}", file=sys.stderr)
            return 2
        for line in installed:
            print(line)
        return 0

    import torch

    from pipeline.training.trainer import TrainConfig, Trainer

    # A process policy, so it is set by the entry point: fp32 matmuls and convs (outside bf16
    # autocast) may use TF32. No cudnn.benchmark: autotuning every VAE conv shape eats the budget.
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    given = {k: v for k, v in vars(args).items() if k != "command" and v is not None}
    values = {**(TrainConfig.smoke_defaults() if given.get("smoke") else {}), **given}
    try:  # options, and what --resume / --init-from point at, are checked before any training
        trainer = Trainer(TrainConfig(**values), STARTED)
    except (ValueError, FileNotFoundError) as e:
        print(f"train_tiny: {e}", file=sys.stderr)
        return 2
    summary = trainer.run()
    state = summary["state"]
    print(f"vae_steps={state['vae_step']} dit_steps={state['dit_step']} dropped={list(summary['dropped'])} "
          f"scores={ {k: v['mean'] for k, v in summary['scores'].items() if isinstance(v, dict) and 'mean' in v} }")
    return 0


if __name__ == "__main__":
    sys.exit(main())
