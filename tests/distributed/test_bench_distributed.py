"""``fprecond bench --suite distributed``: the quick run end to end (2 processes)."""

from __future__ import annotations

import json
import math

from fprecond.bench.distributed import TARGET_RATIO, TARGET_WORLD
from fprecond.cli import main


def test_quick_distributed_bench_writes_sane_numbers(tmp_path, capsys):
    output = tmp_path / "distributed.json"
    status = main(["bench", "--suite", "distributed", "--quick", "--repeats", "2", "--warmup", "1",
                   "--output", str(output)])
    assert status == 0
    report = json.loads(output.read_text())
    assert report["suite"] == "distributed" and report["quick"] and report["worlds"] == [1, 2]
    rows = {row["world_size"]: row for row in report["rows"]}
    assert set(rows) == {1, 2}
    for world, row in rows.items():
        assert row["status"] == "ok", row
        assert len(row["cpu_ms_ranks"]) == world and len(row["wall_ms_ranks"]) == world
        assert math.isfinite(row["cpu_ms"]) and row["cpu_ms"] > 0 and row["wall_ms"] > 0
        assert row["cpu_ms"] == max(row["cpu_ms_ranks"])
        assert row["max_abs_diff"] == 0.0  # broadcast blocks are the owners' bits
    assert rows[1]["blocks"] == 4 and rows[1]["cost_share"] == 1.0 and rows[1]["cpu_ratio"] == 1.0
    # 4 layers of width 32 (the last one 32 -> 10) split 2 + 2 between two ranks.
    assert rows[2]["blocks"] == 2 and 0.5 <= rows[2]["cost_share"] < 0.6
    assert rows[2]["cpu_ratio"] == rows[2]["cpu_ms"] / rows[1]["cpu_ms"]
    ekfac = {row["world_size"]: row for row in report["ekfac_rows"]}
    assert set(ekfac) == {1, 2} and all(row["status"] == "ok" for row in ekfac.values())
    assert all(row["max_abs_diff"] == 0.0 for row in ekfac.values())  # the owners' eigenbases, broadcast
    assert ekfac[1]["blocks"] == 4 and ekfac[2]["blocks"] == 2 and 0.5 <= ekfac[2]["cost_share"] < 0.6
    assert ekfac[1]["cpu_ms"] > 0 and ekfac[2]["cpu_ratio"] == ekfac[2]["cpu_ms"] / ekfac[1]["cpu_ms"]
    assert report["target"]["limit"] == TARGET_RATIO and report["target"]["world_size"] == TARGET_WORLD
    assert report["target"]["met"] is None  # 4 ranks were not measured
    printed = capsys.readouterr().out
    assert "CPU ratio" in printed and "not measured" in printed and "EKFAC's new eigenbasis" in printed
