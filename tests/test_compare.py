"""fprecond compare: end to end in a subprocess on a tiny budget, every bad input's
one-line error, and the pieces (settings parsing, data files, one run) in process."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fprecond.compare.methods import METHODS, MethodError, parse_settings
from fprecond.compare.tasks import TaskError, build_task, load_npz
from fprecond.compare.train import Budget, train_run

from tests.helpers import require_peer

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return subprocess.run([sys.executable, "-m", "fprecond", "compare", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600)


TINY = ("--epochs", "0.1", "--eval-every", "2", "--no-progress", "--threads", "1")


def test_end_to_end_writes_sane_outputs(tmp_path):
    """A few steps of three methods (one of them made to diverge): exit 0, every file
    written, numbers in range, the diverged method reported as such."""
    out = tmp_path / "out"
    done = run_cli("--methods", "adam,kfac,sgd", "--set", "adam.learning_rate=1e38", *TINY, "--output", str(out),
                   cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "torch " + torch.__version__ in done.stdout and "MLP 64-128-10" in done.stdout
    for name in ("results.json", "results.csv", "loss_vs_steps.png", "loss_vs_time.png", "test_accuracy.png",
                 "throughput_vs_memory.png"):
        path = out / name
        assert path.stat().st_size > 0, name
        if name.endswith(".png"):
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "results.json").read_text())
    rows = {row["method"]: row for row in report["rows"]}
    assert list(rows) == ["sgd", "adam", "kfac"]  # the baseline first
    assert rows["adam"]["diverged"] == 1 and "diverged" in rows["adam"]["note"]
    for name in ("sgd", "kfac"):
        row = rows[name]
        assert row["status"] == "ok" and row["diverged"] == 0
        assert 0.0 <= row["final_accuracy"] <= 1.0 and 0.0 <= row["best_accuracy"] <= 1.0
        assert row["final_accuracy"] <= row["best_accuracy"]
        assert row["step_time_s"] > 0 and row["samples_per_s"] > 0 and row["peak_mib"] > 0
        assert row["steps"] == 3  # ceil(0.1 epochs x 22 full batches)
        run = row["runs"][0]
        assert len(run["losses"]) == len(run["times"]) == 3 and run["times"] == sorted(run["times"])
        assert [entry["step"] for entry in run["evals"]] == [0, 2, 3]
    assert rows["sgd"]["time_ratio_to_sgd"] == pytest.approx(1.0)
    assert rows["kfac"]["time_ratio_to_sgd"] > 0
    # Every method starts from the same initialisation: the same test accuracy before training.
    starts = {row["runs"][0]["evals"][0]["test_accuracy"] for row in rows.values()}
    assert len(starts) == 1
    with (out / "results.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert [line["method"] for line in table] == ["sgd", "adam", "kfac"]
    assert float(table[0]["final_accuracy"]) == pytest.approx(rows["sgd"]["final_accuracy"])


def test_ensemble_reports_vmap_against_loop(tmp_path):
    out = tmp_path / "out"
    done = run_cli("--methods", "kfac", "--ensemble", "2", *TINY, "--output", str(out), "--no-plots", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {row["method"]: row for row in json.loads((out / "results.json").read_text())["rows"]}
    for row in rows.values():
        assert row["vmap_speedup"] > 0 and row["loop_step_time_s"] > 0
        accuracies = row["runs"][0]["evals"][-1]["member_accuracy"]
        assert len(accuracies) == 2 and all(0.0 <= a <= 1.0 for a in accuracies)
    assert "vmap x loop" in done.stdout


def test_reference_asdl_rows(tmp_path):
    require_peer("asdl")
    out = tmp_path / "out"
    done = run_cli("--methods", "kfac,adam", "--reference", "asdl", *TINY, "--output", str(out), "--no-plots",
                   cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {row["method"]: row for row in json.loads((out / "results.json").read_text())["rows"]}
    assert rows["kfac (asdl)"]["status"] == "ok" and rows["kfac (asdl)"]["step_time_s"] > 0
    assert 0.0 <= rows["kfac (asdl)"]["final_accuracy"] <= 1.0
    assert rows["adam (asdl)"]["status"] == "skipped" and rows["adam (asdl)"]["note"] == "not in ASDL"


def _write_npz(path: Path, **arrays) -> str:
    np.savez(path, **arrays)
    return str(path)


def _bad_inputs(tmp: Path) -> dict[str, tuple[list[str], str]]:
    rng = np.random.default_rng(0)
    text = tmp / "notes.npz"
    text.write_text("not a numpy archive")
    return {
        "unknown method": (["--methods", "sgd,lbfgs"], "unknown method(s) lbfgs"),
        "unknown setting": (["--methods", "kfac", "--set", "kfac.dampin=1"], "kfac has no setting 'dampin'"),
        "bad value": (["--methods", "kfac", "--set", "kfac.damping=lots"], "kfac.damping: expected a number"),
        "setting of an absent method": (["--methods", "sgd", "--set", "kfac.damping=1"], "not among --methods"),
        "rejected value": (["--methods", "kfac", "--set", "kfac.damping=-1"], "damping"),
        "unknown workload": (["--workload", "imagenet"], "unknown workload 'imagenet'"),
        "npz without data": (["--workload", "npz"], "needs --data"),
        "missing file": (["--workload", "npz", "--data", str(tmp / "absent.npz")], "does not exist"),
        "unreadable file": (["--workload", "npz", "--data", str(text)], "cannot read data file"),
        "length mismatch": (["--workload", "npz", "--data", _write_npz(
            tmp / "lengths.npz", x=rng.normal(size=(10, 4)), y=np.arange(9) % 2)], "must match"),
        "float targets": (["--workload", "npz", "--data", _write_npz(
            tmp / "floats.npz", x=rng.normal(size=(10, 4)), y=rng.normal(size=10))], "integer class labels"),
        "test shape mismatch": (["--workload", "npz", "--data", _write_npz(
            tmp / "test.npz", x=rng.normal(size=(10, 4)), y=np.arange(10) % 2, x_test=rng.normal(size=(5, 3)),
            y_test=np.arange(5) % 2)], "test inputs have shape (3,)"),
        "batch too large": (["--batch-size", "5000"], "exceeds the 1438 training examples"),
        "zero epochs": (["--epochs", "0"], "--epochs must be positive"),
        "ensemble with reference": (["--ensemble", "2", "--reference", "asdl"], "cannot be combined"),
        "bad option type": (["--seeds", "two"], "invalid int value"),
    }


BAD_INPUTS = ("unknown method", "unknown setting", "bad value", "setting of an absent method", "rejected value",
              "unknown workload", "npz without data", "missing file", "unreadable file", "length mismatch",
              "float targets", "test shape mismatch", "batch too large", "zero epochs", "ensemble with reference",
              "bad option type")


def test_bad_input_cases_are_all_listed(tmp_path):
    assert set(_bad_inputs(tmp_path)) == set(BAD_INPUTS)


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_one_line_error_before_training(case, tmp_path):
    args, message = _bad_inputs(tmp_path)[case]
    out = tmp_path / "out"
    done = run_cli(*args, "--output", str(out), "--no-progress", cwd=tmp_path)
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fprecond compare: error:"), done.stderr
    assert message in lines[0]
    assert not out.exists()  # nothing ran


# ---- in process --------------------------------------------------------------------------------


def test_settings_take_the_recipes_types():
    settings = parse_settings(["kfac.damping=1e-2,kfac.inverse_every=5", "kfac.kl_clip=none",
                               "sgd.nesterov=true"], ("sgd", "kfac"))
    assert settings == {"sgd": {"nesterov": True}, "kfac": {"damping": 0.01, "inverse_every": 5, "kl_clip": None}}
    assert isinstance(settings["kfac"]["inverse_every"], int)
    with pytest.raises(MethodError, match="expected an integer"):
        parse_settings(["kfac.inverse_every=2.5"], ("kfac",))
    with pytest.raises(MethodError, match="expected method.setting=value"):
        parse_settings(["kfac=1"], ("kfac",))
    assert {"sgd", "adam", "kfac"} <= set(METHODS)


def test_npz_splits_and_tasks(tmp_path):
    rng = np.random.default_rng(1)
    path = _write_npz(tmp_path / "d.npz", inputs=rng.normal(size=(50, 2, 3)).astype(np.float32),
                      targets=rng.integers(0, 4, size=50))
    (train_x, train_y), (test_x, test_y) = load_npz(path)
    assert train_x.shape == (40, 2, 3) and test_x.shape == (10, 2, 3) and train_y.dtype == torch.int64
    task = build_task("npz", path)
    module = task.build().float()
    assert module(train_x).shape == (40, 4)
    tokens = _write_npz(tmp_path / "t.npz", x=rng.integers(0, 5, size=(30, 6)), y=rng.integers(0, 3, size=(30, 6)))
    assert build_task("npz", tokens).build().float()(torch.zeros(2, 6, dtype=torch.long)).shape == (2, 6, 3)
    with pytest.raises(TaskError, match="one target per token"):
        build_task("npz", _write_npz(tmp_path / "u.npz", x=rng.integers(0, 5, size=(30, 6)),
                                     y=rng.integers(0, 3, size=30)))


def test_transformer_task_is_learnable_and_runs_kfac():
    task = build_task("transformer")
    inputs, targets = task.train
    assert inputs.shape == (4096, 12) and torch.equal(targets, inputs.flip(-1))
    result = train_run(task, "kfac", {}, seed=0, batch_size=32, budget=Budget(epochs=16 / 128), eval_every=100, target_accuracy=None, device=torch.device("cpu"))
    assert result["steps"] == 16 and not result["diverged"]
    assert result["losses"][-1] < result["losses"][0]


def test_a_silent_worker_is_killed_at_the_timeout():
    """The timeout holds even while the worker prints nothing (here: still importing torch)."""
    import time

    from fprecond.compare.runner import _worker

    spec = {"task": "mlp", "data": None, "method": "sgd", "settings": {"learning_rate": 0.1}, "seed": 0,
            "epochs": 1.0, "seconds": None, "batch_size": 64, "eval_every": 10, "target_accuracy": None,
            "device": "cpu", "threads": 1, "members": 1, "reference": None}
    start = time.monotonic()
    result = _worker(spec, timeout=0.3, on_progress=lambda step, total: None)
    assert result == {"error": "timed out after 0.3 s"}
    assert time.monotonic() - start < 10.0
