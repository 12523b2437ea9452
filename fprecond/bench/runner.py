"""What every ``fprecond bench`` suite shares: measuring workers, timing against a
baseline in the same process, the run's settings, and the printed table.

A suite's parent process sends each measurement, as a JSON spec, to a fresh
interpreter (``python -m <suite module> --worker SPEC``, see :func:`run_worker`)
and never runs two at once, which would disturb the timings. The worker
(:func:`prepare_worker`, then :func:`time_and_peak`) fixes the C allocator's
thresholds (:func:`fprecond.bench.memory.steady_allocator`), pins itself to
``threads`` CPUs, times the measured operation between two timings of the
baseline, measures the operation's peak memory last, and prints one JSON line
(:func:`worker_main`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from fprecond.bench.workloads import MODELS

__all__ = ["RunConfig", "Column", "Table", "pin_cpus", "prepare_worker", "time_calls", "time_and_peak",
           "worker_main", "run_worker", "run_settings", "error_fields", "ratio", "mib", "all_measured",
           "write_report", "finish_report", "worker_environment", "result_from_output", "json_safe"]

_RESULT_PREFIX = "BENCH-RESULT "
_MIB = 1024.0 * 1024.0
_NOTE_WIDTH = 160


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Options every suite of ``fprecond bench`` takes (see :func:`fprecond.cli.main`).

    ``warmup``: untimed calls before each timing; ``repeats``: timed calls, whose
    median is reported; ``threads``: torch intra-op threads and pinned CPUs per
    worker; ``timeout``: seconds one measurement may take before it is abandoned.
    """

    models: tuple[str, ...] = MODELS
    repeats: int = 5
    warmup: int = 2
    threads: int = 1
    device: str = "cpu"
    quick: bool = False
    seed: int = 0
    timeout: float = 600.0
    output: str | None = None

    def worker_spec(self, **fields: Any) -> dict[str, Any]:
        """The settings a worker needs, plus ``fields`` (the model and what to measure)."""
        return {"quick": self.quick, "seed": self.seed, "device": self.device, "threads": self.threads,
                "warmup": self.warmup, "repeats": self.repeats, **fields}


# ---- in the worker -----------------------------------------------------------------------------
def pin_cpus(threads: int) -> list[int] | None:
    """Keep this process on the last ``threads`` of the CPUs it may use, and return them.

    Unpinned, the same single-threaded fwd+bwd ran at either of two speeds (22 or
    36 ms for the CNN) depending on the process, steady within each; pinned, every
    process ran at the faster one. The last CPUs are taken because the first one
    tends to serve interrupts. ``None`` where affinity cannot be set.
    """
    if not hasattr(os, "sched_setaffinity"):
        return None
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < threads:
        return None
    chosen = allowed[-threads:]
    os.sched_setaffinity(0, chosen)
    return chosen


def _synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def prepare_worker(spec: dict[str, Any]) -> tuple[torch.device, Callable[[], None], list[int] | None]:
    """Set a worker up before its first tensor: steady C allocator, pinned CPUs,
    ``spec["threads"]`` torch threads. Returns the device, a function that waits
    for it, and the pinned CPUs."""
    from fprecond.bench.memory import steady_allocator

    # Before the first tensor: every timing then sees the same C allocator.
    steady_allocator()
    threads = int(spec["threads"])
    cpus = pin_cpus(threads)
    torch.set_num_threads(threads)
    device = torch.device(spec["device"])
    return device, _synchronizer(device), cpus


def time_calls(fn: Callable[[], Any], warmup: int, repeats: int, sync: Callable[[], None]) -> list[float]:
    """``warmup`` untimed calls, then the wall time of each of ``repeats`` calls (seconds)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - start)
    return samples


def time_and_peak(operation: Callable[[], Any], baseline: Callable[[], Any], *, warmup: int, repeats: int,
                  sync: Callable[[], None], device: torch.device, steps_per_call: int = 1) -> dict[str, Any]:
    """Time ``operation`` against ``baseline`` in this process, then measure its peak memory.

    The baseline is timed right before and right after the operation (``warmup``
    untimed calls, then ``repeats`` timed ones, each time), and the median over
    both runs is the denominator a suite divides by, so that the ratio compares like
    with like on a noisy machine; where ``operation is baseline`` it is timed once.
    One call of ``operation`` may stand for ``steps_per_call`` steps, and its times
    are then divided by that (the average step over the call). Timing comes first:
    the warm-up calls also keep one-time costs (kernels and modules loaded on first
    use) out of the peak, and measuring memory pins the C allocator's settings in a
    way that slows allocation (see :mod:`fprecond.bench.memory`). The peak is that
    of one more call.

    Returns ``time_samples`` and ``baseline_samples`` (seconds per step), their
    medians ``time_s`` and ``baseline_time_s``, ``peak_bytes`` (``None`` where
    unknown) and ``error``: ``None``, or the message where a call raised.
    """
    from fprecond.bench.memory import peak_bytes

    result: dict[str, Any] = {"error": None}
    try:
        if operation is baseline:
            samples = time_calls(baseline, warmup, repeats, sync)
            result.update(time_samples=samples, baseline_samples=samples)
        else:
            before = time_calls(baseline, warmup, repeats, sync)
            calls = time_calls(operation, warmup, repeats, sync)
            after = time_calls(baseline, warmup, repeats, sync)
            result.update(time_samples=[t / steps_per_call for t in calls], baseline_samples=before + after)
        _, result["peak_bytes"] = peak_bytes(operation, device)
    except Exception as error:  # reported in the table; the other rows still run
        result["error"] = f"{type(error).__name__}: {error}"
        return result
    result["time_s"] = statistics.median(result["time_samples"])
    result["baseline_time_s"] = statistics.median(result["baseline_samples"])
    return result


def worker_main(argv: Sequence[str], module: str, measure: Callable[[dict[str, Any]], dict[str, Any]]) -> int:
    """The entry point of ``python -m <module> --worker SPEC_JSON``: print ``measure(spec)``
    as one JSON line that :func:`run_worker` picks out of the output."""
    if len(argv) != 2 or argv[0] != "--worker":
        print(f"usage: python -m {module} --worker SPEC_JSON", file=sys.stderr)
        return 2
    result = measure(json.loads(argv[1]))
    print(_RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


# ---- in the parent -----------------------------------------------------------------------------
def run_worker(module: str, spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run ``python -m <module> --worker SPEC`` in a fresh interpreter and return what it
    measured; failures (a crash, a timeout) come back as ``error``."""
    env = worker_environment()
    command = [sys.executable, "-m", module, "--worker", json.dumps(spec)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:g} s"}
    return result_from_output(done.stdout, done.stderr, done.returncode)


def worker_environment() -> dict[str, str]:
    """The environment for a worker: this process's, with this very copy of fprecond
    (installed or not) first on the import path."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


def result_from_output(stdout: str, stderr: str, returncode: int) -> dict[str, Any]:
    """The JSON result a worker printed (see :func:`worker_main`), or an ``error`` with the
    last line of its error output."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(_RESULT_PREFIX):
            return json.loads(line[len(_RESULT_PREFIX):])
    last = (stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"worker exited with {returncode}: {last}"}


def memory_method(device: str) -> str:
    """How peak memory is measured on ``device`` here, in words."""
    from fprecond.bench.memory import cpu_peak_supported

    if device == "cuda":
        return "CUDA max_memory_allocated above the start of the call"
    if cpu_peak_supported():
        return "resident set (VmHWM - VmRSS) above the start of the call"
    return "n/a (/proc/self/clear_refs is not writable)"


def run_settings(config: RunConfig) -> dict[str, Any]:
    """The start of a suite's report: versions and the settings of the run."""
    return {"torch": torch.__version__, "python": sys.version.split()[0], "device": config.device,
            "threads": config.threads, "repeats": config.repeats, "warmup": config.warmup, "dtype": "float32",
            "quick": config.quick, "seed": config.seed, "memory": memory_method(config.device), "workloads": {},
            "rows": []}


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator``, or ``None`` where either is unknown or the denominator is 0."""
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def mib(value: float | None) -> float | None:
    """Bytes in MiB (``None`` stays ``None``)."""
    return None if value is None else value / _MIB


def error_fields(note: str, error: str) -> dict[str, Any]:
    """The fields of a row whose measurement failed: the full message for the JSON,
    and its first line, shortened, appended to the row's note for the table."""
    first_line = (error.strip().splitlines() or ["?"])[0]
    if len(first_line) > _NOTE_WIDTH:
        first_line = first_line[:_NOTE_WIDTH - 3] + "..."
    return {"status": "error", "error": error,
            "note": "; ".join(part for part in (note, "error: " + first_line) if part)}


def all_measured(report: dict[str, Any]) -> bool:
    """Whether no row of ``report`` ended in an error (skips are fine)."""
    return all(row["status"] != "error" for row in report["rows"])


def json_safe(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by ``None`` (strict JSON has neither)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def write_report(path: str, report: dict[str, Any]) -> None:
    """Write ``report`` as JSON, NaN and infinities as ``null`` (a diverged recipe's final loss)."""
    Path(path).write_text(json.dumps(json_safe(report), indent=2, allow_nan=False) + "\n")


def finish_report(report: dict[str, Any], start: float, output: str | None, out: Callable[[str], None]) -> None:
    """Record and print the wall time since ``start``, and write ``report`` to ``output`` if given."""
    report["wall_s"] = time.perf_counter() - start
    out(f"\ntotal wall time {report['wall_s']:.1f} s")
    if output is not None:
        write_report(output, report)


# ---- the table ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Column:
    """A column of the printed table: its header, width, and whether it is text
    (left-aligned) or a number (right-aligned)."""

    name: str
    width: int
    text: bool = False


class Table:
    """A fixed-width table printed line by line, with a free-form note last."""

    def __init__(self, columns: Sequence[Column]) -> None:
        self.columns = tuple(columns)

    def _join(self, cells: Sequence[str]) -> str:
        return "  ".join(f"{cell:<{column.width}}" if column.text else f"{cell:>{column.width}}"
                         for cell, column in zip(cells, self.columns))

    def header(self) -> str:
        names = self._join([column.name for column in self.columns])
        return f"{names}  note\n{'-' * (len(names) + 6)}"

    def line(self, cells: Sequence[str], note: str) -> str:
        return f"{self._join(cells)}  {note}".rstrip()

    @staticmethod
    def number(row: dict[str, Any], value: float | None, spec: str, suffix: str = "") -> str:
        """A measured number of ``row`` as printed: ``-`` for a row not measured,
        ``n/a`` where the value is unknown."""
        if row["status"] != "ok":
            return "-"
        return "n/a" if value is None else f"{value:{spec}}{suffix}"
