"""jobs/profiling.gaps on a hand-made timeline: idle time on the compute stream is split into
time an NCCL kernel covered and time nothing ran; each gap is charged to the launching operator, and
the host's gaps to what the launching thread was running when the stream went idle."""

from jobs.profiling import Span, gaps


def kernel(name, start, end, stream, op):
    return Span(name, "CUDA", start, end, stream=stream, corr=1000 + op, linked=op)


def launch(op_name, op, start, end=None, thread=1):
    """An operator (id `op`) and the cudaLaunchKernel inside it."""
    end = start + 10 if end is None else end
    return [Span(op_name, "CPU", start, end, corr=op, thread=thread),
            Span("cudaLaunchKernel", "CPU", start + 1, start + 5, corr=1000 + op, linked=op, thread=thread)]


def timeline():
    return [
        kernel("gemm", 0, 100, 7, 1), *launch("aten::mm", 1, 0),
        kernel("ncclDevKernel_SendRecv", 90, 300, 20, 2), *launch("c10d::alltoall_base_", 2, 20),
        kernel("flash_fwd", 300, 500, 7, 3), *launch("aten::_flash_attention_forward", 3, 40),  # gap 100..300: comm
        kernel("gather", 505, 600, 7, 4), *launch("aten::index", 4, 60),  # 5 us: jitter, not counted
        # the host blocks in a sync from 550 to 1590 us, inside aten::item; then launches the next gemm
        Span("aten::item", "CPU", 540, 1595, corr=5, thread=1),
        Span("cudaEventSynchronize", "CPU", 550, 1590, corr=6, thread=1),
        kernel("gemm", 1600, 1700, 7, 8), *launch("aten::mm", 8, 1596),  # gap 600..1600: the host
        kernel("copy", 1900, 1950, 7, 9), *launch("aten::copy_", 9, 1890),  # gap 1700..1900: python
        Span("aten::empty", "CPU", 1650, 1660, corr=10, thread=2),  # another thread: not the launching one
    ]


def test_gaps_split_between_collective_and_host():
    lines = gaps(timeline(), top=4)
    assert "0.200 ms while a collective ran, 1.200 ms with nothing running" in lines[0]
    assert "0.545 ms of kernels in a 1.950 ms span" in lines[0]
    text = "\n".join(lines)
    waiting = text.split("gaps with nothing running")[0]
    assert "aten::_flash_attention_forward -> flash_fwd" in waiting
    by_launch = text.split("gaps with nothing running, by the launch")[1].split("by what the host ran")[0]
    assert "aten::mm -> gemm" in by_launch and "1.000" in by_launch and "aten::copy_ -> copy" in by_launch
    assert "aten::index" not in text
    doing = text.split("by what the host ran when they began")[1]
    assert "aten::item > cudaEventSynchronize" in doing and "1.000" in doing
    assert "python" in doing and "0.200" in doing and "aten::empty" not in doing
    waits = text.split("collective kernels under those gaps")[1].split("gaps while")[0]
    assert "ncclDevKernel_SendRecv" in waits and "0.200" in waits


def test_no_kernels_no_lines():
    assert gaps(launch("aten::mm", 1, 0), top=3) == []
