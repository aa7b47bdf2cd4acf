"""jobs/bench_attention.py runs end to end on the CPU: --check passes, and a dry run writes one row per
case with ratios taken against the dense row of the same run (the GPU table is the same code)."""

import json

from jobs.bench_attention import main


def test_check_passes(capsys):
    assert main(["--check"]) == 0
    printed = capsys.readouterr().out
    for name in ("dense", "moga", "stga", "moga+stga", "moc", "lite", "linear"):
        assert f"{name} " in printed


def test_dry_run_table(tmp_path, capsys):
    assert main(["--device", "cpu", "--sizes", "3120", "--heads", "2", "--head-dim", "16", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench_attention.json").read_text())["rows"]
    dense = next(r for r in rows if r["method"] == "dense")
    assert rows[0] is dense and dense["N"] == 3120 and dense["speedup"] == 1.0  # the baseline comes first
    families = {r["method"].split()[0] for r in rows}
    assert families == {"dense", "moga", "stga", "moga+stga", "moc", "lite", "linear"}
    for row in rows:
        assert row["ms"] > 0 and 0 < row["density"] <= 1.0
        assert abs(row["speedup"] - dense["ms"] / row["ms"]) < 1e-9 * row["speedup"]
        assert abs(row["of_ideal"] - row["speedup"] * row["density"]) < 1e-9
    assert (tmp_path / "bench_attention.md").read_text().count("\n| ") == len(rows) + 1  # header + rows
    assert "lite full step, stga 1x30x52 base" in capsys.readouterr().out
