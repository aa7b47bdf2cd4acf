"""Where a call's GPU time goes: kernels by time, and the compute stream's idle gaps (benchmarks' --profile).

The kernel table alone cannot say why a call is slower than its kernels: kernels on NCCL's stream
overlap the compute stream, and time with no kernel at all is time the GPU waited for the host.
gaps() walks the compute stream (the stream with the most kernel time outside NCCL) and sums its
idle gaps, split into "a collective was running" (waiting for an exchange) and "nothing ran"
(waiting for the host: launches, a host sync), each attributed to the operator that launched the
kernel ending the gap; the waits are also charged to the collective kernels that covered them.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Callable

import torch

MIN_GAP_US = 20.0  # gaps shorter than this are launch jitter, not a cause


def kernel_profile(run: Callable[[], object], device: torch.device, top: int = 12, gaps_top: int = 0) -> str:
    """One more call under torch.profiler: where its time goes, kernel by kernel (on the CPU, operator
    by operator). On CUDA a line compares the kernels' summed time with the call's wall time, and with
    gaps_top > 0 the compute stream's idle gaps follow (see the module docstring)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        t0 = time.perf_counter()
        run()
        if cuda:
            torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - t0) * 1e3
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
            lines += gaps(events, gaps_top)
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


def gaps(events, top: int) -> list[str]:
    """Lines on the compute stream's idle gaps in profiler `events` (module docstring)."""
    kernels = [e for e in events if e.device_type.name == "CUDA" and e.time_range.end > e.time_range.start]
    if not kernels:
        return []
    is_comm = lambda e: "nccl" in e.name.lower()  # noqa: E731
    per_stream: dict[int, float] = defaultdict(float)
    for e in kernels:
        if not is_comm(e):
            per_stream[e.device_resource_id] += e.time_range.end - e.time_range.start
    compute = max(per_stream, key=per_stream.get)
    stream = sorted((e for e in kernels if e.device_resource_id == compute), key=lambda e: e.time_range.start)
    comm_kernels = [e for e in kernels if is_comm(e)]
    comm = _union([(e.time_range.start, e.time_range.end) for e in comm_kernels])
    # the operator that launched a kernel: its runtime call (same correlation id) and that call's parent
    # (torch < 2.13 has no linked_correlation_id: the kernel's name alone then)
    launcher: dict[int, str] = {}
    for e in events:
        if e.device_type.name == "CPU" and e.name.startswith("cuda") and e.cpu_parent is not None:
            launcher[getattr(e, "linked_correlation_id", None) or e.id] = e.cpu_parent.name
    waiting, host = defaultdict(lambda: [0, 0.0]), defaultdict(lambda: [0, 0.0])
    under = defaultdict(lambda: [0, 0.0])  # collective kernel name -> gaps it covered, us of them
    for before, after in zip(stream, stream[1:]):
        start, end = before.time_range.end, after.time_range.start
        if end - start < MIN_GAP_US:
            continue
        op = launcher.get(getattr(after, "linked_correlation_id", None), "?")
        key = f"{op} -> {after.name[:60]}"
        on_comm = _overlap(start, end, comm)
        for e in comm_kernels:  # which collective the stream waited for: the kernel names say (all-to-all, all-gather)
            us = min(end, e.time_range.end) - max(start, e.time_range.start)
            if us > 0:
                under[e.name[:60]][0] += 1
                under[e.name[:60]][1] += us
        for table, us in ((waiting, on_comm), (host, end - start - on_comm)):
            if us > 0:
                table[key][0] += 1
                table[key][1] += us
    span = stream[-1].time_range.end - stream[0].time_range.start
    run = sum(e.time_range.end - e.time_range.start for e in stream)
    lines = [f"    compute stream {compute}: {run / 1e3:.3f} ms of kernels in a {span / 1e3:.3f} ms span; idle gaps "
             f">= {MIN_GAP_US:.0f} us: {sum(v[1] for v in waiting.values()) / 1e3:.3f} ms while a collective ran, "
             f"{sum(v[1] for v in host.values()) / 1e3:.3f} ms with nothing running (the host)"]
    if under:
        lines.append("    collective kernels under those gaps: count, ms")
        ranked = sorted(under.items(), key=lambda kv: -kv[1][1])
        lines += [f"      {name:<110} {n:5d} {us / 1e3:8.3f}" for name, (n, us) in ranked]
    for title, table in (("while a collective ran", waiting), ("with nothing running", host)):
        ranked = sorted(table.items(), key=lambda kv: -kv[1][1])[:top]
        if ranked:
            lines.append(f"    gaps {title}, by the launch that ended them (operator -> kernel): count, ms")
            lines += [f"      {key[:110]:<110} {n:5d} {us / 1e3:8.3f}" for key, (n, us) in ranked]
    return lines
