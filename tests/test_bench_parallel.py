"""jobs/bench_parallel end to end on the CPU (gloo, 2 processes under torchrun, the tiny model): every
P=2 row, for each head sub-group count and exchange staging, predicts what rank 0 alone predicts, and the table has the
figures the GPU run reports (speed-up against the same run's P=1, the exchanges timed alone)."""

import json
import subprocess
import sys


def test_cpu_dry_run_matches_one_rank(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "jobs.bench_parallel",
           "--device", "cpu", "--tiny", "--repeats", "1", "--chunks", "1,2", "--staged", "0,1",
           "--methods", "dense,moga+stga", "--no-diffusers", "--sizes", "small", "--out", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "bench_parallel.json").read_text())["rows"]
    sharded = [r for r in rows if r["P"] == 2]
    assert sorted(r["config"] for r in sharded) == [f"ours {m} chunks={c} staged={s}" for m in ("dense", "moga+stga")
                                                    for c in (1, 2) for s in (0, 1)]
    for r in sharded:
        assert r["rel_err_vs_p1"] <= 1e-5, r
        assert r["a2a_ms_per_layer"] > 0 and r["speedup_vs_p1"] > 0, r
    assert "| ours dense chunks=2 staged=1 |" in (tmp_path / "bench_parallel.md").read_text()


def test_exchange_bench_cpu_dry_run(tmp_path):
    """jobs/bench_exchange under torchrun on gloo: both sizes timed, and the bytes that cross are the
    exchange's: (q, k, v in + o out) * (P - 1) / P of each rank's buffers."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "jobs.bench_exchange",
           "--device", "cpu", "--tiny", "--repeats", "2", "--attn-tokens", "256", "--attn-calls", "2",
           "--out", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "bench_exchange.json").read_text())["rows"]
    assert [(r["size"], r["tokens"], r["P"]) for r in rows] == [("small", 120, 2), ("large", 312, 2)]
    for r in rows:
        local, heads, dim = r["tokens"] // 2, 4, 16
        assert r["cross_mb"] * 1e6 == (3 + 1) * local * heads * dim * 4 / 2, r  # fp32 on the CPU
        assert min(r["raw_ms"], r["ours_ms"], r["attention_ms"]) > 0 and r["both_ms"] is None, r
    assert "| large | 312 | 2 |" in (tmp_path / "bench_exchange.md").read_text()
