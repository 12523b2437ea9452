"""``fprecond compare``: train one task with several methods and compare them.

Everything is checked before any training starts (task and data file, methods,
settings: each method's transform is built once on the task's model). Then every
(method, seed) run, and every ASDL reference run, goes to its own process
(:mod:`fprecond.compare.worker`), one at a time, so peak memory is each run's own
and runs do not disturb each other's timings. SGD is always run: step times are
reported as ratios to SGD's in the same comparison.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch

import fprecond as fp
from fprecond.bench.runner import result_from_output, worker_environment
from fprecond.compare.methods import (METHODS, MethodError, build_transform, interval_settings, method_settings)
from fprecond.compare.tasks import Task, TaskError, build_task
from fprecond.compare.worker import PROGRESS_PREFIX

__all__ = ["CompareConfig", "CompareError", "check_config", "run_compare", "machine_description", "summarize"]

_BASELINE = "sgd"


class CompareError(ValueError):
    """Settings that cannot run: reported as one line before any training."""


@dataclasses.dataclass(frozen=True)
class CompareConfig:
    """The settings of one comparison (see ``fprecond compare --help``)."""

    task: str = "mlp"
    data: str | None = None
    methods: tuple[str, ...] = ("sgd", "adam", "kfac", "shampoo", "soap", "ekfac")
    settings: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    epochs: float | None = 10
    seconds: float | None = None
    batch_size: int = 64
    seeds: int = 1
    curvature_every: int | None = None
    inverse_every: int | None = None
    ensemble: int = 1
    eval_every: int | None = None
    target_accuracy: float | None = 0.9
    reference: str | None = None
    device: str = "cpu"
    threads: int | None = None
    output: str = "compare-results"
    timeout: float = 1800.0
    plots: bool = True


def machine_description(device: str) -> dict[str, Any]:
    """Where the comparison ran, so that its figures can be quoted."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    described: dict[str, Any] = {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
                                 "python": sys.version.split()[0], "torch": torch.__version__,
                                 "fprecond": fp.__version__, "device": device}
    if device == "cuda":
        described["gpu"] = torch.cuda.get_device_name(0)
    return described


def check_config(config: CompareConfig) -> Task:
    """Validate ``config`` completely (building every transform once); return the task.

    Raises:
        CompareError: one line naming the setting, method or file at fault.
    """
    unknown = [name for name in config.methods if name not in METHODS]
    if unknown or not config.methods:
        raise CompareError(f"unknown method(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(METHODS)}")
    if config.epochs is None and config.seconds is None:
        raise CompareError("give a budget: --epochs or --time-budget")
    for name, value in (("--epochs", config.epochs), ("--time-budget", config.seconds)):
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise CompareError(f"{name} must be positive, got {value}")
    for name, value in (("--batch-size", config.batch_size), ("--seeds", config.seeds),
                        ("--ensemble", config.ensemble), ("--eval-every", config.eval_every),
                        ("--curvature-every", config.curvature_every), ("--inverse-every", config.inverse_every),
                        ("--threads", config.threads)):
        if value is not None and value < 1:
            raise CompareError(f"{name} must be a positive integer, got {value}")
    if config.target_accuracy is not None and not 0.0 < config.target_accuracy <= 1.0:
        raise CompareError(f"--target-accuracy must be in (0, 1], got {config.target_accuracy}")
    if config.reference not in (None, "asdl"):
        raise CompareError(f"--reference: only 'asdl' is supported, got {config.reference!r}")
    if config.reference is not None and config.ensemble > 1:
        raise CompareError("--reference asdl trains single models: it cannot be combined with --ensemble")
    if config.device not in ("cpu", "cuda"):
        raise CompareError(f"--device must be cpu or cuda, got {config.device!r}")
    if config.device == "cuda" and not torch.cuda.is_available():
        raise CompareError("--device cuda: CUDA is not available on this machine")
    try:
        task = build_task(config.task, config.data)
    except TaskError as error:
        raise CompareError(str(error)) from None
    if config.batch_size > len(task.train[1]):
        raise CompareError(f"--batch-size {config.batch_size} exceeds the {len(task.train[1])} training examples")
    torch.manual_seed(0)
    model = task.model(task.build())
    example = task.train[0][:config.batch_size]
    try:
        model.apply(model.params(), example[:2])
    except Exception as error:
        raise CompareError(f"the {config.task} model does not accept the data: {type(error).__name__}: "
                           f"{error}") from None
    for method in _all_methods(config):
        try:
            build_transform(method, model, example, run_settings(config, method))
        except MethodError as error:
            raise CompareError(str(error)) from None
    return task


def _all_methods(config: CompareConfig) -> tuple[str, ...]:
    """The methods to run: SGD (the baseline) first, then the others in the order given."""
    return (_BASELINE,) + tuple(name for name in config.methods if name != _BASELINE)


def run_settings(config: CompareConfig, method: str) -> dict[str, Any]:
    """The settings ``method`` runs with: the comparison's defaults, the intervals, ``--set``."""
    intervals = interval_settings(method, config.curvature_every, config.inverse_every)
    return method_settings(method, {**intervals, **config.settings.get(method, {})})


def _worker(spec: dict[str, Any], timeout: float, on_progress: Callable[[int, int | None], None]) -> dict[str, Any]:
    """Run one worker process, passing its progress lines to ``on_progress``; kill it
    after ``timeout`` seconds (whether or not it still prints)."""
    command = [sys.executable, "-m", "fprecond.compare.worker", "--worker", json.dumps(spec)]
    errors: list[str] = []
    with tempfile.TemporaryFile("w+") as stdout:
        process = subprocess.Popen(command, stdout=stdout, stderr=subprocess.PIPE, text=True,
                                   env=worker_environment())
        assert process.stderr is not None

        def pump() -> None:  # a thread, so that a silent worker cannot block the timeout
            assert process.stderr is not None
            for line in process.stderr:
                if line.startswith(PROGRESS_PREFIX):
                    step, total = (int(part) for part in line[len(PROGRESS_PREFIX):].split())
                    on_progress(step, None if total < 0 else total)
                else:
                    errors.append(line)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            return {"error": f"timed out after {timeout:g} s"}
        finally:
            reader.join(timeout=5.0)
        stdout.seek(0)
        return result_from_output(stdout.read(), "".join(errors), process.returncode)


def _progress_bar(description: str, enabled: bool):
    try:
        from tqdm import tqdm  # type: ignore[import-untyped]
    except ImportError:  # progress is a convenience: run without it
        return None
    return tqdm(total=None, desc=description, unit="step", leave=False, disable=not enabled, dynamic_ncols=True)


def _run_one(config: CompareConfig, method: str, seed: int, reference: str | None, show_progress: bool
             ) -> dict[str, Any]:
    spec = {"task": config.task, "data": config.data, "method": method, "settings": run_settings(config, method),
            "seed": seed, "epochs": config.epochs, "seconds": config.seconds, "batch_size": config.batch_size,
            "eval_every": _eval_every(config), "target_accuracy": config.target_accuracy, "device": config.device,
            "threads": config.threads or torch.get_num_threads(), "members": config.ensemble,
            "reference": reference}
    label = method if reference is None else f"{method} ({reference})"
    bar = _progress_bar(f"{label} seed {seed}", show_progress)

    def on_progress(step: int, total: int | None) -> None:
        if bar is not None:
            if total is not None and bar.total != total:
                bar.total = total
            bar.n = step
            bar.refresh()

    try:
        result = _worker(spec, config.timeout, on_progress)
    finally:
        if bar is not None:
            bar.close()
    result["seed"] = seed
    return result


def _eval_every(config: CompareConfig) -> int:
    if config.eval_every is not None:
        return config.eval_every
    return 10  # about twice per epoch of digits at batch 64


def _mean_spread(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(method: str, reference: str | None, runs: list[dict[str, Any]], batch_size: int,
              members: int) -> dict[str, Any]:
    """One row of the comparison from the runs of ``method`` over seeds."""
    ok = [run for run in runs if "error" not in run]
    errors = [run["error"] for run in runs if "error" in run]
    row: dict[str, Any] = {"method": method if reference is None else f"{method} ({reference})",
                           "recipe": method, "reference": reference, "seeds": len(runs), "runs": runs,
                           "status": "ok" if ok and not errors else ("error" if not ok else "partial"),
                           "error": errors[0] if errors else None}
    finished = [run for run in ok if not run["diverged"]]
    row["diverged"] = sum(run["diverged"] for run in ok)
    final = [run["evals"][-1]["test_accuracy"] for run in finished]
    best = [max(entry["test_accuracy"] for entry in run["evals"]) for run in finished]
    losses = [run["evals"][-1]["test_loss"] for run in finished]
    step_times = [run["step_time_s"] for run in ok if run.get("step_time_s")]
    peaks = [run["peak_bytes"] for run in ok if run.get("peak_bytes") is not None]
    peaks_above = [run["peak_above_start_bytes"] for run in ok if run.get("peak_above_start_bytes") is not None]
    reached = [run["to_target"] for run in finished if run["to_target"] is not None]
    row["final_accuracy"], row["final_accuracy_std"] = _mean_spread(final)
    row["best_accuracy"], row["best_accuracy_std"] = _mean_spread(best)
    row["final_test_loss"], row["final_test_loss_std"] = _mean_spread(losses)
    row["step_time_s"], row["step_time_std_s"] = _mean_spread(step_times)
    examples = batch_size * members
    row["samples_per_s"] = None if not row["step_time_s"] else examples / row["step_time_s"]
    row["peak_mib"] = None if not peaks else max(peaks) / 2 ** 20
    row["peak_above_start_mib"] = None if not peaks_above else max(peaks_above) / 2 ** 20
    row["steps"] = statistics.fmean(run["steps"] for run in ok) if ok else None
    row["to_target_reached"] = len(reached)
    row["to_target_steps"] = statistics.fmean(entry["step"] for entry in reached) if reached else None
    row["to_target_s"] = statistics.fmean(entry["time"] for entry in reached) if reached else None
    speedups = [run["vmap_speedup"] for run in ok if run.get("vmap_speedup")]
    row["vmap_speedup"] = statistics.fmean(speedups) if speedups else None
    loops = [run["loop_step_time_s"] for run in ok if run.get("loop_step_time_s")]
    row["loop_step_time_s"] = statistics.fmean(loops) if loops else None
    return row


def run_compare(config: CompareConfig, out: Callable[[str], None] = print, show_progress: bool = True
                ) -> dict[str, Any]:
    """Check ``config``, run every method (and reference), write the outputs; return the report.

    Raises:
        CompareError: before any training, for settings that cannot run.
    """
    from fprecond.compare import report as reporting

    task = check_config(config)
    begin = time.perf_counter()
    methods = _all_methods(config)
    header = {"machine": machine_description(config.device), "task": task.name,
              "task_description": task.description, "train_examples": len(task.train[1]),
              "test_examples": len(task.test[1]), "settings": _jsonable(dataclasses.asdict(config)),
              "method_settings": {name: _jsonable(run_settings(config, name)) for name in methods},
              "eval_every": _eval_every(config)}
    for line in reporting.header_lines(header):
        out(line)
    ensemble = config.ensemble > 1
    for line in reporting.table_header(ensemble):
        out(line)
    rows: list[dict[str, Any]] = []

    def add(row: dict[str, Any]) -> None:
        # SGD runs first, so every later row has its time ratio when it is printed.
        reporting.add_ratio(row, rows[0] if rows else row)
        rows.append(row)
        out(reporting.table_row(row, ensemble))

    for method in methods:
        runs = [_run_one(config, method, seed, None, show_progress) for seed in range(config.seeds)]
        add(summarize(method, None, runs, config.batch_size, config.ensemble))
        if config.reference == "asdl":
            from fprecond.compare.asdl_reference import asdl_note

            note = asdl_note(method)
            if note is None:
                runs = [_run_one(config, method, seed, "asdl", show_progress) for seed in range(config.seeds)]
                add(summarize(method, "asdl", runs, config.batch_size, 1))
            elif method != _BASELINE:
                add({"method": f"{method} (asdl)", "recipe": method, "reference": "asdl", "status": "skipped",
                     "note": note, "runs": [], "seeds": 0})
    report = {**header, "rows": rows, "wall_s": time.perf_counter() - begin}
    paths = reporting.write_outputs(report, Path(config.output), plots=config.plots)
    out(f"\nwrote {', '.join(str(path) for path in paths)}")
    out(f"total wall time {report['wall_s']:.1f} s")
    return report


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)
