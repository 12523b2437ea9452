"""One training run in its own process, so that peak memory is the run's own.

``python -m fprecond.compare.worker --worker SPEC_JSON`` builds the task, runs
:func:`fprecond.compare.train.train_run` (or the ensemble, or ASDL's
implementation), reports progress on stderr as ``PROGRESS step total`` lines, and
prints the result as one JSON line (see :func:`fprecond.bench.runner.worker_main`).
"""

from __future__ import annotations

import sys
import time
from typing import Any

import torch

from fprecond.bench.memory import ProcessPeak
from fprecond.bench.runner import worker_main
from fprecond.compare.tasks import Task, build_task
from fprecond.compare.train import Budget, run_loop, train_ensemble, train_run, batches

__all__ = ["measure"]

PROGRESS_PREFIX = "PROGRESS "
_PROGRESS_SECONDS = 0.2  # at most about five progress lines a second


def _progress_printer():
    last = [0.0]

    def report(step: int, total: int | None) -> None:
        now = time.perf_counter()
        if now - last[0] >= _PROGRESS_SECONDS or step == total:
            last[0] = now
            print(f"{PROGRESS_PREFIX}{step} {total if total is not None else -1}", file=sys.stderr, flush=True)

    return report


def _train(spec: dict[str, Any], task: Task, device: torch.device) -> dict[str, Any]:
    budget = Budget(epochs=spec["epochs"], seconds=spec["seconds"])
    common = dict(seed=spec["seed"], batch_size=spec["batch_size"], budget=budget, eval_every=spec["eval_every"],
                  target_accuracy=spec["target_accuracy"], device=device, progress=_progress_printer())
    if spec.get("reference") == "asdl":
        from fprecond.compare.asdl_reference import AsdlStepper

        stepper = AsdlStepper(task, spec["method"], spec["settings"], spec["seed"], spec["batch_size"], device)
        stream = batches(task, spec["batch_size"], spec["seed"], device)
        result = run_loop(stepper, stream, steps_per_epoch=len(task.train[1]) // spec["batch_size"],
                          **{k: v for k, v in common.items() if k not in ("seed", "batch_size")})
        result.update(skipped=None, parameters=sum(p.numel() for p in stepper.module.parameters()))
        return result
    if spec.get("members", 1) > 1:
        return train_ensemble(task, spec["method"], spec["settings"], members=spec["members"], **common)
    return train_run(task, spec["method"], spec["settings"], **common)


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Train as ``spec`` says; return the history, timings and peak memory, or ``error``."""
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    peak = ProcessPeak(device)
    try:
        # The data (and scikit-learn with it) are loaded before the peak is reset: the rise
        # above the start is then the run's own model, optimizer state and activations.
        task = build_task(spec["task"], spec.get("data"))
        peak.start()
        result = _train(spec, task, device)
    except Exception as error:  # reported in the table; the other methods still run
        return {"error": f"{type(error).__name__}: {error}"}
    total, above = peak.stop()
    result.pop("step_times", None)
    result.update(peak_bytes=total, peak_above_start_bytes=above)
    return result


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:], "fprecond.compare.worker", measure))
