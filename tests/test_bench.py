"""``fprecond bench``: the quick run end to end, and the choices it makes per cell."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fprecond.bench.curvature import _format_row, _row, _run_worker, plan_cell, plan_cells, workload
from fprecond.cli import main


def test_quick_bench_writes_a_row_per_kind_and_structure(tmp_path, capsys):
    # Each row is a fresh interpreter (about 4-5 s to import torch and torch.func):
    # the baseline and two estimates keep this test short.
    output = tmp_path / "bench.json"
    kinds, structures = ("empirical_fisher", "fisher_mc"), ("kron",)
    status = main(["bench", "--quick", "--models", "mlp", "--kinds", ",".join(kinds),
                   "--structures", ",".join(structures), "--output", str(output)])
    assert status == 0
    report = json.loads(output.read_text())
    assert report["dtype"] == "float32" and report["threads"] == 1 and report["repeats"] == 1
    rows = {(row["kind"], row["structure"]): row for row in report["rows"] if row["model"] == "mlp"}
    assert set(rows) == {("fwd+bwd", "-")} | {(k, s) for k in kinds for s in structures}
    for row in rows.values():
        assert row["status"] == "ok", row
        assert math.isfinite(row["time_ratio"]) and row["time_ratio"] > 0
        assert math.isfinite(row["time_ms"]) and row["time_ms"] > 0
    assert rows[("empirical_fisher", "kron")]["approx"] == "expand"
    assert rows[("fwd+bwd", "-")]["time_ratio"] == 1.0
    printed = capsys.readouterr().out
    assert "torch" in printed and "time ratio" in printed and "empirical_fisher  kron" in printed


def test_workloads_are_float32_whatever_the_default_dtype():
    # The suite runs with float64 as the default dtype.
    for name in ("mlp", "cnn"):
        work = workload(name, quick=True)
        inputs, targets = work.batch
        assert inputs.dtype == torch.float32 and targets.dtype == torch.int64
        assert all(p.dtype == torch.float32 for p in work.module.parameters())
        assert work.shares_weights == (name == "cnn")


def test_cell_plans_for_the_hessian_with_weight_sharing():
    assert plan_cell(True, "hessian", "kron").approx == "reduce"
    assert "HVP per weight" in plan_cell(True, "hessian", "diag").skip
    assert plan_cell(False, "hessian", "diag").skip is None
    assert plan_cell(True, "empirical_fisher", "kron") == plan_cell(False, "empirical_fisher", "kron")
    assert [c.approx for c in plan_cells(True, "fisher_mc", "kron")] == ["expand", "reduce"]
    assert [c.approx for c in plan_cells(False, "fisher_mc", "kron")] == ["expand"]
    assert [c.approx for c in plan_cells(True, "hessian", "kron")] == ["reduce"]


@pytest.mark.parametrize("argv, message", [
    (["--kinds", "empirical_fisher,nonsense"], "--kinds"),
    (["--structures", "full"], "--structures"),
    (["--repeats", "0"], "--repeats"),
])
def test_bad_bench_arguments_exit_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--quick", *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err



def test_a_failing_measurement_becomes_an_error_row():
    # A worker that dies before measuring (unknown model) reports its last stderr line.
    spec = {"model": "nope", "quick": True, "seed": 0, "device": "cpu", "threads": 1, "warmup": 0, "repeats": 1,
            "op": "baseline"}
    measured = _run_worker(spec, timeout=120)
    assert "exited with" in measured["error"] and "nope" in measured["error"]
    row = _row("mlp", "ggn", "kron", "expand", "", {"error": "ValueError: first line\nsecond line"}, None)
    assert row["status"] == "error" and row["error"].endswith("second line")
    assert row["note"] == "error: ValueError: first line"
    assert _format_row(row).split()[3:7] == ["-"] * 4


def test_unknown_peak_prints_as_not_available():
    measured = {"error": None, "time_s": 0.02, "baseline_time_s": 0.01, "peak_bytes": None,
                "time_samples": [0.02], "baseline_samples": [0.01]}
    row = _row("mlp", "ggn", "diag", "expand", "", measured, baseline_peak=None)
    assert row["time_ratio"] == 2.0 and row["memory_ratio"] is None
    assert _format_row(row).split()[3:7] == ["20.00", "2.00x", "n/a", "n/a"]
