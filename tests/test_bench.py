"""``fprecond bench``: both suites' quick runs end to end, and the choices they make per row."""

from __future__ import annotations

import json
import math

import pytest
import torch

import fprecond as fp
from fprecond.bench.curvature import _format_row, _row, _run_worker, plan_cell, plan_cells, workload
from fprecond.bench.recipes import RECIPES, _Training, lead_steps, plan_rows, target_checks
from fprecond.bench.recipes import _format_row as _format_recipe_row
from fprecond.bench.recipes import _row as _recipe_row
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
    (["--suite", "curvature,nope"], "--suite"),
    (["--recipes", "kfac,lbfgs"], "--recipes"),
    (["--intervals", "1,0"], "--intervals"),
    (["--intervals", "ten"], "--intervals"),
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


# ---- the recipe suite --------------------------------------------------------------------------
def test_quick_recipe_bench_writes_a_row_per_recipe_and_interval(tmp_path, capsys):
    # Five fresh interpreters (sgd, two recipes at two intervals), about 5 s each.
    output = tmp_path / "recipes.json"
    status = main(["bench", "--suite", "recipes", "--quick", "--models", "mlp", "--recipes", "kfac,diag_ng",
                   "--intervals", "1,2", "--output", str(output)])
    assert status == 0
    report = json.loads(output.read_text())
    assert report["suite"] == "recipes" and report["intervals"] == [1, 2] and report["repeats"] == 1
    rows = {(row["recipe"], row["interval"]): row for row in report["rows"]}
    assert list(rows) == [("sgd", None), ("kfac", 1), ("kfac", 2), ("diag_ng", 1), ("diag_ng", 2)]
    for row in rows.values():
        assert row["status"] == "ok", row
        assert row["model"] == "mlp"
        assert math.isfinite(row["time_ratio"]) and row["time_ratio"] > 0
        assert math.isfinite(row["step_ms"]) and row["step_ms"] > 0
        assert row["memory_ratio"] is None or (math.isfinite(row["memory_ratio"]) and row["memory_ratio"] >= 0)
        assert row["state_mib"] > 0 and math.isfinite(row["final_loss"])
    assert rows[("sgd", None)]["time_ratio"] == 1.0
    # One timed call is one period of the schedule; kfac first runs out its 5 warm-up steps.
    assert [rows[("kfac", k)]["steps_per_call"] for k in (1, 2)] == [1, 2]
    assert [rows[("kfac", k)]["lead_steps"] for k in (1, 2)] == [5, 6]
    targets = {(t["recipe"], t["interval"]): t for t in report["targets"]}
    assert targets[("kfac", 1)]["time_ratio"] == rows[("kfac", 1)]["time_ratio"]
    assert targets[("kfac", 10)]["met"] is None
    printed = capsys.readouterr().out
    assert "step ms" in printed and "diag_ng" in printed and "kfac at interval 10: not measured" in printed


def test_lead_steps_reach_the_start_of_a_period_after_the_warmup():
    assert [lead_steps(period, 5) for period in (1, 2, 5, 10)] == [5, 6, 5, 10]
    assert lead_steps(10, 0) == 0 and lead_steps(1, 0) == 0
    with pytest.raises(ValueError, match="period"):
        lead_steps(0, 5)


def test_row_plans_per_recipe():
    [sgd] = plan_rows("sgd", (1, 10), largest_layer=100)
    assert sgd.interval is None and sgd.steps_per_call == 1 and sgd.lead == 0 and "baseline" in sgd.note
    kfac = plan_rows("kfac", (1, 10), largest_layer=100)
    assert [(p.interval, p.steps_per_call, p.lead) for p in kfac] == [(1, 1, 5), (10, 10, 10)]
    # EKFAC refreshes its eigenbases about every 10 steps at every interval.
    ekfac = plan_rows("ekfac", (1, 3, 10), largest_layer=100)
    assert [p.steps_per_call for p in ekfac] == [10, 9, 10]
    assert [p.note.split(";")[0] for p in ekfac] == ["basis_every=10", "basis_every=3", "basis_every=1"]
    assert all(p.skip is None for p in plan_rows("newton", (1, 10), largest_layer=2080))
    skipped = plan_rows("newton", (1, 10), largest_layer=401920)
    assert len(skipped) == 2 and all("401,920" in p.skip and p.skip.startswith("skipped") for p in skipped)


@pytest.mark.parametrize("recipe, interval", [("kfac", 1), ("kfac", 3), ("ekfac", 1), ("ekfac", 4)])
def test_one_timed_call_is_one_period_of_the_real_schedule(recipe, interval):
    # After the lead steps, a call of steps_per_call steps holds the same refreshes
    # as every other call: one per interval, and (EKFAC) one eigenbasis refresh.
    import fprecond as fp

    work = workload("mlp", quick=True)
    md = fp.model(work.module, fp.losses.cross_entropy())
    [plan] = plan_rows(recipe, (interval,), largest_layer=100)
    training = _Training(md, RECIPES[recipe].build(md, work.batch[0], interval), md.params(), work.batch,
                         fp.random.key(0))
    training.run(plan.lead)

    def precondition_state():
        return training.state.inner_state["precondition"]

    for _ in range(2):
        start = precondition_state()
        assert int(start.count) % plan.steps_per_call == 0
        training.run(plan.steps_per_call)
        end = precondition_state()
        assert int(end.refreshes - start.refreshes) == plan.steps_per_call // interval
        if recipe == "ekfac":
            basis_every = plan.steps_per_call // interval
            assert int(start.estimator.count) % basis_every == 0
            assert int(end.estimator.count - start.estimator.count) == basis_every


def test_recipe_workloads_take_a_batch_size():
    work = workload("mlp", batch_size=256)
    assert work.batch[0].shape == (256, 784) and "batch 256" in work.description
    assert workload("mlp").batch[0].shape[0] == 128  # the curvature suite's default stays
    with pytest.raises(ValueError, match="batch_size"):
        workload("mlp", quick=True, batch_size=0)


def test_recipe_rows_print_skips_errors_and_targets():
    plan = plan_rows("newton", (10,), largest_layer=401920)[0]
    skipped = _recipe_row("mlp", plan, None, None)
    assert skipped["status"] == "skipped" and skipped["interval"] == 10
    assert _format_recipe_row(skipped).split()[2:9] == ["10"] + ["-"] * 6
    assert "one HVP per parameter" in _format_recipe_row(skipped)
    failed = _recipe_row("cnn", plan_rows("seng", (1,), 100)[0], {"error": "RuntimeError: boom\nmore"}, None)
    assert failed["status"] == "error" and failed["note"] == "error: RuntimeError: boom"
    rows = [{"model": "mlp", "recipe": "kfac", "interval": 10, "time_ratio": 1.2},
            {"model": "mlp", "recipe": "kfac", "interval": 1, "time_ratio": 3.5},
            {"model": "mlp", "recipe": "adam", "interval": None, "time_ratio": 2.0},
            {"model": "mlp", "recipe": "shampoo", "interval": 10, "time_ratio": 2.8},
            {"model": "mlp", "recipe": "soap", "interval": 10, "time_ratio": 3.2}]
    checks = {(c["recipe"], c["interval"]): c for c in target_checks(rows)}
    assert checks[("kfac", 10)]["met"] is True and checks[("kfac", 1)]["met"] is False
    assert checks[("kfac", 1)]["limit"] == 3.0 and checks[("kfac", 1)]["baseline"] == "sgd"
    # Against Adam: (recipe / SGD) / (Adam / SGD).
    assert checks[("shampoo", 10)]["time_ratio"] == pytest.approx(1.4) and checks[("shampoo", 10)]["met"] is True
    assert checks[("soap", 10)]["time_ratio"] == pytest.approx(1.6) and checks[("soap", 10)]["met"] is False
    assert checks[("soap_block128", 10)]["met"] is None


@pytest.mark.parametrize("recipe", ["shampoo", "shampoo_block128", "soap", "soap_block128", "psgd", "kbfgs", "muon",
                                    "sophia", "adahessian"])
def test_statistics_recipes_build_and_step_in_the_bench(recipe):
    work = workload("mlp", quick=True)
    md = fp.model(work.module, fp.losses.cross_entropy())
    training = _Training(md, RECIPES[recipe].build(md, work.batch[0], 2), md.params(), work.batch,
                         fp.random.key(0))
    training.run(4)
    assert math.isfinite(float(training.loss))
    assert all(torch.isfinite(p).all() for p in training.params.values())
