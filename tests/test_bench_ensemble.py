"""``fprecond bench --suite ensemble``: the quick run end to end, and its rows."""

from __future__ import annotations

import json
import math

import pytest

from fprecond.bench.ensemble import TARGET_SPEEDUP, _rows
from fprecond.cli import main


def test_quick_ensemble_bench_writes_sane_numbers(tmp_path, capsys):
    output = tmp_path / "ensemble.json"
    status = main(["bench", "--suite", "ensemble", "--quick", "--output", str(output)])
    assert status == 0
    report = json.loads(output.read_text())
    assert report["suite"] == "ensemble" and report["quick"] and report["threads"] == 1
    assert "3 MLPs 64-32-10" in report["workloads"]["ensemble"]
    rows = {row["method"]: row for row in report["rows"]}
    assert set(rows) == {"vmap", "loop"}
    for row in rows.values():
        assert row["status"] == "ok", row
        assert row["members"] == 3
        assert math.isfinite(row["step_ms"]) and row["step_ms"] > 0
        assert row["member_step_ms"] * 3 == pytest.approx(row["step_ms"], rel=1e-12)
        assert row["state_mib"] > 0
        assert row["peak_mib"] is None or row["peak_mib"] >= 0
    speedup = rows["vmap"]["speedup"]
    assert speedup == pytest.approx(rows["loop"]["step_ms"] / rows["vmap"]["step_ms"], rel=1e-12)
    assert rows["loop"]["speedup"] == 1.0
    # vmap trains the members as the loop does: float32 rounding only.
    assert report["max_param_diff"] < 1e-4
    assert math.isfinite(report["final_loss"])
    assert report["target"] == {"limit": TARGET_SPEEDUP, "speedup": speedup, "met": speedup >= TARGET_SPEEDUP}
    printed = capsys.readouterr().out
    assert "speed-up" in printed and "target: vmap at least 2x faster than the loop" in printed


def test_a_failed_measurement_gives_error_rows():
    rows = _rows(8, {"error": "RuntimeError: out of memory", "period": 10, "lead": 10})
    assert [row["status"] for row in rows] == ["error", "error"]
    assert all(row["step_ms"] is None and "out of memory" in row["note"] for row in rows)
