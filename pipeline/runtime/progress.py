"""Progress of the videos of a batch: what a scheduler reports, and how the driver shows it.

On a terminal each video gets a rich progress bar (steps over the whole video); in logs (`ray job
logs`, CI) a plain line is printed whenever a video changes phase or finishes a block.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from typing import TextIO


@dataclass(frozen=True)
class Progress:
    name: str
    phase: str = "queued"  # queued | starting | resuming | denoising | rebuilding | finishing | done | failed | skipped
    block: int = 0  # the block being denoised (0-based); == blocks when all are done
    blocks: int = 0
    step: int = 0  # steps done in the current block
    steps: int = 0  # steps per block
    tokens_per_s: float = 0.0  # video tokens x steps per second of denoising, over the finished blocks
    eta_s: float | None = None

    @property
    def fraction(self) -> float:
        total = self.blocks * self.steps
        return (self.block * self.steps + self.step) / total if total else 0.0

    def line(self) -> str:
        parts = [f"{self.name}: {self.phase}"]
        if self.blocks:
            parts.append(f"block {min(self.block + 1, self.blocks)}/{self.blocks}")
            if self.steps and self.phase == "denoising":
                parts.append(f"step {self.step}/{self.steps}")
        if self.tokens_per_s:
            parts.append(f"{self.tokens_per_s:,.0f} tok/s")
        if self.eta_s is not None and self.phase not in ("done", "failed", "skipped"):
            parts.append(f"ETA {self.eta_s:.0f}s")
        return " | ".join(parts)


class ProgressDisplay:
    """`update(progress)` as often as the driver polls; `close()` at the end."""

    def __init__(self, stream: TextIO | None = None, rich: bool | None = None):
        self.stream = stream or sys.stdout
        self.rich = self.stream.isatty() if rich is None else rich
        self._last: dict[str, tuple] = {}
        self._bars = None
        self._tasks: dict[str, int] = {}
        if self.rich:
            from rich.console import Console
            from rich.progress import BarColumn, Progress as Bars, TextColumn, TimeRemainingColumn

            self._bars = Bars(TextColumn("{task.description}"), BarColumn(), TimeRemainingColumn(),
                              console=Console(file=self.stream))
            self._bars.start()

    def update(self, p: Progress) -> None:
        if self._bars is not None:
            if p.name not in self._tasks:
                self._tasks[p.name] = self._bars.add_task(p.name, total=1.0)
            self._bars.update(self._tasks[p.name], completed=p.fraction, description=p.line())
            return
        key = (p.phase, p.block)  # plain logs: one line per phase change or finished block
        if self._last.get(p.name) != key:
            self._last[p.name] = key
            print(p.line(), file=self.stream, flush=True)

    def message(self, text: str) -> None:
        if self._bars is not None:
            self._bars.console.print(text)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bars is not None:
            self._bars.stop()


def finished(p: Progress, phase: str) -> Progress:
    return replace(p, phase=phase, block=p.blocks, step=0, eta_s=None)
