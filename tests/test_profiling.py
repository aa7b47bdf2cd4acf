"""jobs/profiling.gaps on a hand-made timeline: idle time on the compute stream is split into
time an NCCL kernel covered and time nothing ran, and each gap is charged to the launching operator."""

from types import SimpleNamespace as NS

from jobs.profiling import gaps


def kernel(name, start, end, stream, corr):
    return NS(name=name, time_range=NS(start=start, end=end), device_type=NS(name="CUDA"),
              device_resource_id=stream, linked_correlation_id=corr, id=1000 + corr, cpu_parent=None)


def launch(op, corr):
    return NS(name="cudaLaunchKernel", time_range=NS(start=0, end=1), device_type=NS(name="CPU"),
              device_resource_id=0, linked_correlation_id=corr, id=corr, cpu_parent=NS(name=op))


def test_gaps_split_between_collective_and_host():
    events = [
        kernel("gemm", 0, 100, 7, 1), launch("aten::mm", 1),
        kernel("ncclDevKernel_SendRecv", 90, 300, 20, 2), launch("c10d::alltoall_base_", 2),
        kernel("flash_fwd", 300, 500, 7, 3), launch("aten::_flash_attention_forward", 3),  # gap 100..300: comm
        kernel("gather", 505, 600, 7, 4), launch("aten::index", 4),  # 5 us: jitter, not counted
        kernel("gemm", 1600, 1700, 7, 5), launch("aten::mm", 5),  # gap 600..1600: the host
    ]
    lines = gaps(events, top=4)
    assert "0.200 ms while a collective ran, 1.000 ms with nothing running" in lines[0]
    assert "400.000 ms of kernels" not in lines[0] and "0.495 ms of kernels in a 1.700 ms span" in lines[0]
    text = "\n".join(lines)
    assert "aten::_flash_attention_forward -> flash_fwd" in text.split("gaps with nothing running")[0]
    host_part = text.split("gaps with nothing running")[1]
    assert "aten::mm -> gemm" in host_part and "1.000" in host_part
    assert "aten::index" not in text
    waits = text.split("collective kernels under those gaps")[1].split("gaps while")[0]
    assert "ncclDevKernel_SendRecv" in waits and "0.200" in waits


def test_no_kernels_no_lines():
    assert gaps([launch("aten::mm", 1)], top=3) == []
