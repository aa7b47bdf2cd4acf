"""Where a call's GPU time goes: kernels by time, and the compute stream's idle gaps (benchmarks' --profile).

The kernel table alone cannot say why a call is slower than its kernels: kernels on NCCL's stream
overlap the compute stream, and time with no kernel at all is time the GPU waited for the host.
gaps() walks the compute stream (the stream with the most kernel time outside NCCL) and sums its
idle gaps, split into "a collective was running" (waiting for an exchange) and "nothing ran"
(waiting for the host: launches, a host sync), each attributed to the operator that launched the
kernel ending the gap; the waits are also charged to the collective kernels that covered them, and the
host's gaps to what the launching thread was running when the stream went idle (an operator, a
runtime call such as cudaEventSynchronize, or plain Python between operators).
"""

from __future__ import annotations

import bisect
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

import torch

MIN_GAP_US = 20.0  # gaps shorter than this are launch jitter, not a cause


def kernel_profile(run: Callable[[], object], device: torch.device, top: int = 12, gaps_top: int = 0,
                   trace: str | None = None) -> str:
    """One more call under torch.profiler: where its time goes, kernel by kernel (on the CPU, operator
    by operator). On CUDA a line compares the kernels' summed time with the call's wall time, and with
    gaps_top > 0 the compute stream's idle gaps follow (see the module docstring). trace: a path for the
    call's Chrome trace (Perfetto opens it), to read the timeline itself."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        t0 = time.perf_counter()
        run()
        if cuda:
            torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - t0) * 1e3
    if trace:
        prof.export_chrome_trace(trace)
    events = prof.events()
    if cuda:
        by_name: dict[str, tuple[int, float]] = {}
        for e in events:
            if e.device_type.name == "CUDA":
                count, ms = by_name.get(e.name, (0, 0.0))
                by_name[e.name] = (count + 1, ms + e.device_time_total / 1e3)
    else:
        by_name = {e.key: (e.count, e.self_cpu_time_total / 1e3) for e in prof.key_averages()}
    busy = sum(ms for _, ms in by_name.values())
    lines = [f"    {'kernel' if cuda else 'operator':<90} {'calls':>5} {'ms':>8} {'share':>6}"]
    for name, (count, ms) in sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]:
        lines.append(f"    {name[:90]:<90} {count:5d} {ms:8.3f} {ms / max(busy, 1e-9):6.1%}")
    if cuda:
        lines.append(f"    kernels {busy:.3f} ms of {wall_ms:.3f} ms wall ({sum(c for c, _ in by_name.values())} "
                     f"kernels): {wall_ms - busy:.3f} ms without a kernel running")
        if gaps_top:
            lines += gaps(spans_of(prof), gaps_top)
    return "\n".join(lines)


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(s, e) for s, e in merged]


def _overlap(start: float, end: float, spans: list[tuple[float, float]]) -> float:
    return sum(max(0.0, min(end, e) - max(start, s)) for s, e in spans)


@dataclass(frozen=True)
class Span:
    """One profiler event, as gaps() reads it: times in us; corr: the event's correlation id; linked: the
    operator's id for kernels and runtime calls (0 for operators); thread: the host thread (CPU events)."""

    name: str
    device: str  # "CPU" or "CUDA"
    start: float
    end: float
    stream: int = 0
    corr: int = 0
    linked: int = 0
    thread: int = 0


def spans_of(prof) -> list[Span]:
    """The raw (kineto) events of a finished torch.profiler run: unlike its FunctionEvents on torch < 2.13,
    kernels carry the id of the operator that launched them."""
    return [Span(e.name(), e.device_type().name, e.start_ns() / 1e3, e.end_ns() / 1e3, e.device_resource_id(),
                 e.correlation_id(), e.linked_correlation_id(), e.start_thread_id())
            for e in prof.profiler.kineto_results.events()]


def _host_activity(spans: list[Span]):
    """at(t) -> what the launching thread ran at host time t: "outermost operator > innermost event", or
    "python" where no operator or runtime call was running (interpreter time between operators)."""
    launches = defaultdict(int)
    for e in spans:
        if e.device == "CPU" and e.linked and e.name.startswith("cuda"):
            launches[e.thread] += 1
    if not launches:
        return lambda t: "?"
    main = max(launches, key=launches.get)
    cpu = sorted((e for e in spans if e.device == "CPU" and e.thread == main and e.end > e.start),
                 key=lambda e: e.start)
    starts = [e.start for e in cpu]
    longest = max((e.end - e.start for e in cpu), default=0.0)

    def at(t: float) -> str:
        i = bisect.bisect_right(starts, t)
        covering = [e for e in cpu[bisect.bisect_left(starts, t - longest):i] if e.end > t]
        if not covering:
            return "python"
        outer, inner = max(covering, key=lambda e: e.end - e.start), min(covering, key=lambda e: e.end - e.start)
        return outer.name if outer is inner else f"{outer.name} > {inner.name}"

    return at


def gaps(spans: list[Span], top: int) -> list[str]:
    """Lines on the compute stream's idle gaps in profiler `spans` (module docstring)."""
    kernels = [e for e in spans if e.device == "CUDA" and e.end > e.start]
    if not kernels:
        return []
    is_comm = lambda e: "nccl" in e.name.lower()  # noqa: E731
    per_stream: dict[int, float] = defaultdict(float)
    for e in kernels:
        if not is_comm(e):
            per_stream[e.stream] += e.end - e.start
    compute = max(per_stream, key=per_stream.get)
    stream = sorted((e for e in kernels if e.stream == compute), key=lambda e: e.start)
    comm_kernels = [e for e in kernels if is_comm(e)]
    comm = _union([(e.start, e.end) for e in comm_kernels])
    operators = {e.corr: e.name for e in spans if e.device == "CPU" and not e.linked}  # id -> operator
    host_at = _host_activity(spans)
    waiting, host = defaultdict(lambda: [0, 0.0]), defaultdict(lambda: [0, 0.0])
    doing = defaultdict(lambda: [0, 0.0])  # what the host ran when the stream went idle
    under = defaultdict(lambda: [0, 0.0])  # collective kernel name -> gaps it covered, us of them
    for before, after in zip(stream, stream[1:]):
        start, end = before.end, after.start
        if end - start < MIN_GAP_US:
            continue
        key = f"{operators.get(after.linked, '?')} -> {after.name[:60]}"
        on_comm = _overlap(start, end, comm)
        for e in comm_kernels:  # which collective the stream waited for: the kernel names say (all-to-all, all-gather)
            us = min(end, e.end) - max(start, e.start)
            if us > 0:
                under[e.name[:60]][0] += 1
                under[e.name[:60]][1] += us
        for table, us in ((waiting, on_comm), (host, end - start - on_comm)):
            if us > 0:
                table[key][0] += 1
                table[key][1] += us
        if end - start - on_comm > 0:
            doing[host_at(start)][0] += 1
            doing[host_at(start)][1] += end - start - on_comm
    span = stream[-1].end - stream[0].start
    run = sum(e.end - e.start for e in stream)
    lines = [f"    compute stream {compute}: {run / 1e3:.3f} ms of kernels in a {span / 1e3:.3f} ms span; idle gaps "
             f">= {MIN_GAP_US:.0f} us: {sum(v[1] for v in waiting.values()) / 1e3:.3f} ms while a collective ran, "
             f"{sum(v[1] for v in host.values()) / 1e3:.3f} ms with nothing running (the host)"]
    if under:
        lines.append("    collective kernels under those gaps: count, ms")
        ranked = sorted(under.items(), key=lambda kv: -kv[1][1])
        lines += [f"      {name:<110} {n:5d} {us / 1e3:8.3f}" for name, (n, us) in ranked]
    for title, table in (("while a collective ran, by the launch that ended them (operator -> kernel)", waiting),
                         ("with nothing running, by the launch that ended them (operator -> kernel)", host),
                         ("with nothing running, by what the host ran when they began (operator > innermost call)",
                          doing)):
        ranked = sorted(table.items(), key=lambda kv: -kv[1][1])[:top]
        if ranked:
            lines.append(f"    gaps {title}: count, ms")
            lines += [f"      {key[:110]:<110} {n:5d} {us / 1e3:8.3f}" for key, (n, us) in ranked]
    return lines
