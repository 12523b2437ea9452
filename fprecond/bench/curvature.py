"""What one curvature estimate costs, relative to one forward+backward pass.

For each workload (model + batch) and each kind x structure, one estimate
``fprecond.curvature.estimate(..., kind, structure)`` is measured against the
baseline ``fprecond.loss_and_grads`` (one forward, one backward) of the same
model, parameters and batch:

- time: ``warmup`` untimed calls (default 2), then the median of ``repeats``
  calls timed with ``time.perf_counter`` (CUDA synchronised before and after).
  The baseline is timed in the same process right before and right after the
  estimate, and its median over both runs is the denominator of the time ratio,
  so that the ratio compares like with like on a noisy machine. The C
  allocator's thresholds are fixed first (:func:`fprecond.bench.memory.steady_allocator`),
  as otherwise a fresh process's fwd+bwd is slower until something large has
  been freed, which would make the baseline depend on what ran before it. Each
  worker is pinned to ``threads`` CPUs, as unpinned processes ran at one of two
  speeds.
- peak memory: see :mod:`fprecond.bench.memory`. Each measurement (the baseline,
  and every kind x structure) runs in its own subprocess: one warm-up
  forward+backward, the timings above (whose warm-up calls keep one-time costs
  such as loading kernels out of the peak), then one more call of the measured
  operation, whose peak above the memory held before it is reported. The memory
  ratio divides by the baseline's peak from its own subprocess.

Workers are ``python -m fprecond.bench.curvature --worker SPEC`` and print one
JSON line; :func:`run_bench` runs them one after another (never in parallel,
which would disturb the timings) and prints a table as rows arrive.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

__all__ = ["BenchConfig", "MODELS", "KINDS", "STRUCTURES", "run_bench", "measure", "plan_cells", "workload"]

MODELS: tuple[str, ...] = ("mlp", "cnn")
# Cheapest first: the two one-backward kinds are the ones a K-FAC step pays each time.
KINDS: tuple[str, ...] = ("empirical_fisher", "fisher_mc", "ggn", "fisher", "hessian")
STRUCTURES: tuple[str, ...] = ("kron", "unit", "diag")
_RESULT_PREFIX = "BENCH-RESULT "
_MIB = 1024.0 * 1024.0
_NOTE_WIDTH = 160
_HESSIAN_SHARED_DIAG = "skipped: exact Hessian diagonal of a weight-sharing layer needs one HVP per weight"


# ---- workloads ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Workload:
    """A model and a batch of random float32 data. ``shares_weights``: has layers that
    apply one weight at many positions (convolutions), which changes which Hessian
    structures are defined or affordable."""

    name: str
    description: str
    module: nn.Module
    batch: tuple[torch.Tensor, torch.Tensor]
    shares_weights: bool


def _mlp(quick: bool) -> tuple[str, nn.Module, tuple[int, ...], int]:
    sizes = (64, 32, 10) if quick else (784, 512, 512, 10)
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    batch = 16 if quick else 128
    description = f"MLP {'-'.join(map(str, sizes))} (ReLU), batch {batch}"
    return description, nn.Sequential(*layers[:-1]), (sizes[0],), batch


def _cnn(quick: bool) -> tuple[str, nn.Module, tuple[int, ...], int]:
    width, side, batch = ((4, 8), 8, 8) if quick else ((16, 32), 32, 64)
    narrow, wide = width
    module = nn.Sequential(
        nn.Conv2d(3, narrow, 3, padding=1), nn.ReLU(),
        nn.Conv2d(narrow, wide, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(wide, wide, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(wide * (side // 4) ** 2, 10),
    )
    description = f"CNN 3 conv ({narrow}-{wide}-{wide} channels) + linear on 3x{side}x{side}, batch {batch}"
    return description, module, (3, side, side), batch


_BUILDERS: dict[str, Callable[[bool], tuple[str, nn.Module, tuple[int, ...], int]]] = {"mlp": _mlp, "cnn": _cnn}


def workload(name: str, quick: bool = False, seed: int = 0, device: str = "cpu") -> Workload:
    """Build workload ``name`` (``"mlp"`` or ``"cnn"``) in float32 on ``device``, with
    parameters and data fixed by ``seed``; cross-entropy over 10 classes, mean."""
    # float32 explicitly: the default dtype may have been changed by the caller (tests use float64).
    torch.manual_seed(seed)
    description, module, input_shape, size = _BUILDERS[name](quick)
    module = module.to(device=device, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed + 1)
    inputs = torch.randn((size, *input_shape), generator=generator, dtype=torch.float32)
    targets = torch.randint(0, 10, (size,), generator=generator, dtype=torch.int64)
    return Workload(name, f"{description}, cross-entropy mean", module, (inputs.to(device), targets.to(device)),
                    shares_weights=any(isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) for m in module.modules()))


@dataclasses.dataclass(frozen=True)
class CellPlan:
    """How to measure one kind x structure on one workload: the ``approx`` to use,
    a note for the table, and ``skip`` (the reason) where it is not measured."""

    approx: str
    note: str = ""
    skip: str | None = None


def plan_cell(shares_weights: bool, kind: str, structure: str) -> CellPlan:
    """Choose ``approx`` and skips. ``expand`` throughout, except the Hessian in
    ``kron`` with weight sharing, where ``expand`` takes one Hessian-vector product per
    position and output unit (tens of thousands here) and only ``reduce`` is measured."""
    if kind == "hessian" and shares_weights:
        if structure == "kron":
            return CellPlan("reduce", note="approx=reduce (expand: one HVP per position and output unit)")
        # The exact block takes one Hessian-vector product per parameter of each conv layer,
        # vmapped: thousands of batched backward passes (minutes, gigabytes) at these sizes.
        return CellPlan("expand", skip=_HESSIAN_SHARED_DIAG)
    return CellPlan("expand")


def plan_cells(shares_weights: bool, kind: str, structure: str) -> list[CellPlan]:
    """The measurements of one kind x structure: :func:`plan_cell`, plus the ``reduce``
    approximation of the same kind in ``kron`` when the workload shares weights (where
    the two approximations differ in cost, Eschenhagen et al. 2023)."""
    first = plan_cell(shares_weights, kind, structure)
    cells = [first]
    if shares_weights and structure == "kron" and first.approx == "expand" and first.skip is None:
        cells.append(CellPlan("reduce", note="approx=reduce"))
    return cells


# ---- measuring (in the worker) -----------------------------------------------------------------
def _synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _pin(threads: int) -> list[int] | None:
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


def _time_calls(fn: Callable[[], Any], warmup: int, repeats: int, sync: Callable[[], None]) -> list[float]:
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


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure one operation as described by ``spec`` (what :func:`run_bench` sends a
    worker): ``model``, ``quick``, ``seed``, ``device``, ``threads``, ``warmup``,
    ``repeats`` and ``op``, either ``"baseline"`` or ``{"kind", "structure", "approx"}``.

    Returns times in seconds, peaks in bytes (``None`` where unknown) and ``error``
    (a message where the operation raised, else ``None``).
    """
    import fprecond as fp
    from fprecond.bench.memory import peak_bytes, steady_allocator
    from fprecond.curvature import estimate

    # Before the first tensor: every timing below then sees the same C allocator.
    steady_allocator()
    threads = int(spec["threads"])
    cpus = _pin(threads)
    torch.set_num_threads(threads)
    device = torch.device(spec["device"])
    sync = _synchronizer(device)
    work = workload(spec["model"], quick=bool(spec["quick"]), seed=int(spec["seed"]), device=spec["device"])
    md = fp.model(work.module, fp.losses.cross_entropy())
    params = md.params()
    batch = work.batch
    # On the data's device: fisher_mc draws its targets where the key lives.
    key = fp.random.key(int(spec["seed"])).to(device)
    warmup, repeats = int(spec["warmup"]), int(spec["repeats"])

    def baseline() -> Any:
        return fp.loss_and_grads(md, params, batch)

    op_spec = spec["op"]
    if op_spec == "baseline":
        operation = baseline
    else:
        def operation() -> Any:
            return estimate(md, params, batch, kind=op_spec["kind"], structure=op_spec["structure"],
                            approx=op_spec["approx"], key=key, samples=1)

    result: dict[str, Any] = {"error": None, "cpus": cpus}
    baseline()  # warm-up forward+backward before anything is measured
    try:
        # Time first: the timing's warm-up calls also keep one-time costs (kernels and
        # modules loaded on first use) out of the peak, and measuring memory pins the C
        # allocator's settings in a way that slows allocation (see fprecond.bench.memory).
        if operation is baseline:
            samples = _time_calls(baseline, warmup, repeats, sync)
            result.update(time_samples=samples, baseline_samples=samples)
        else:
            before = _time_calls(baseline, warmup, repeats, sync)
            samples = _time_calls(operation, warmup, repeats, sync)
            after = _time_calls(baseline, warmup, repeats, sync)
            result.update(time_samples=samples, baseline_samples=before + after)
        _, result["peak_bytes"] = peak_bytes(operation, device)
    except Exception as error:  # reported in the table; the other cells still run
        result["error"] = f"{type(error).__name__}: {error}"
        return result
    result["time_s"] = statistics.median(result["time_samples"])
    result["baseline_time_s"] = statistics.median(result["baseline_samples"])
    return result


def _worker_main(argv: Sequence[str]) -> int:
    if len(argv) != 2 or argv[0] != "--worker":
        print("usage: python -m fprecond.bench.curvature --worker SPEC_JSON", file=sys.stderr)
        return 2
    result = measure(json.loads(argv[1]))
    print(_RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


# ---- driving (in the parent) -------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """Options of ``fprecond bench`` (see :func:`fprecond.cli.main`)."""

    models: tuple[str, ...] = MODELS
    kinds: tuple[str, ...] = KINDS
    structures: tuple[str, ...] = ("kron", "diag")
    repeats: int = 5
    warmup: int = 2
    threads: int = 1
    device: str = "cpu"
    quick: bool = False
    seed: int = 0
    timeout: float = 600.0
    output: str | None = None


def _run_worker(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run :func:`measure` in a fresh interpreter; failures come back as ``error``."""
    env = dict(os.environ)
    # Let the worker import this very copy of fprecond, installed or not.
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    command = [sys.executable, "-m", "fprecond.bench.curvature", "--worker", json.dumps(spec)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:g} s"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(_RESULT_PREFIX):
            return json.loads(line[len(_RESULT_PREFIX):])
    last = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"worker exited with {done.returncode}: {last}"}


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def _mib(value: int | None) -> float | None:
    return None if value is None else value / _MIB


def _row(model: str, kind: str, structure: str, approx: str | None, note: str, measured: dict[str, Any] | None,
         baseline_peak: int | None) -> dict[str, Any]:
    row: dict[str, Any] = {"model": model, "kind": kind, "structure": structure, "approx": approx,
                           "status": "ok", "time_ms": None, "baseline_ms": None, "time_ratio": None,
                           "peak_mib": None, "baseline_peak_mib": _mib(baseline_peak), "memory_ratio": None,
                           "note": note}
    if measured is None:
        row["status"] = "skipped"
        return row
    if measured.get("error"):
        # The full message goes to the JSON; the table gets its first line, shortened.
        row.update(status="error", error=measured["error"])
        first_line = (measured["error"].strip().splitlines() or ["?"])[0]
        if len(first_line) > _NOTE_WIDTH:
            first_line = first_line[:_NOTE_WIDTH - 3] + "..."
        row["note"] = "; ".join(part for part in (note, "error: " + first_line) if part)
        return row
    time_s, base_s = measured["time_s"], measured["baseline_time_s"]
    row.update(time_ms=1e3 * time_s, baseline_ms=1e3 * base_s, time_ratio=time_s / base_s,
               peak_mib=_mib(measured["peak_bytes"]), memory_ratio=_ratio(measured["peak_bytes"], baseline_peak),
               cpus=measured.get("cpus"), time_samples_ms=[1e3 * t for t in measured["time_samples"]],
               baseline_samples_ms=[1e3 * t for t in measured["baseline_samples"]])
    return row


_COLUMNS = (("model", 5), ("kind", 16), ("structure", 9), ("time ms", 10), ("time ratio", 10), ("peak MiB", 9),
            ("memory ratio", 12))


def _format_row(row: dict[str, Any]) -> str:
    def number(value: float | None, spec: str, suffix: str = "") -> str:
        if row["status"] != "ok":
            return "-"
        return "n/a" if value is None else f"{value:{spec}}{suffix}"

    cells = (row["model"], row["kind"], row["structure"], number(row["time_ms"], ".2f"),
             number(row["time_ratio"], ".2f", "x"), number(row["peak_mib"], ".2f"),
             number(row["memory_ratio"], ".2f", "x"))
    text = "  ".join(f"{cell:<{width}}" if i < 3 else f"{cell:>{width}}"
                     for i, (cell, (_, width)) in enumerate(zip(cells, _COLUMNS)))
    return f"{text}  {row['note']}".rstrip()


def _table_header() -> str:
    names = "  ".join(f"{name:<{width}}" if i < 3 else f"{name:>{width}}" for i, (name, width) in enumerate(_COLUMNS))
    return f"{names}  note\n{'-' * (len(names) + 6)}"


def run_bench(config: BenchConfig, out: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure every model x kind x structure of ``config``, print the table through
    ``out`` as rows arrive, write JSON to ``config.output`` if set, and return the
    same report (``rows`` plus the run's settings)."""
    from fprecond.bench.memory import cpu_peak_supported

    start = time.perf_counter()
    memory_method = ("CUDA max_memory_allocated above the start of the call" if config.device == "cuda" else
                     "resident set (VmHWM - VmRSS) above the start of the call" if cpu_peak_supported() else
                     "n/a (/proc/self/clear_refs is not writable)")
    report: dict[str, Any] = {
        "torch": torch.__version__, "python": sys.version.split()[0], "device": config.device,
        "threads": config.threads, "repeats": config.repeats, "warmup": config.warmup, "dtype": "float32",
        "quick": config.quick, "seed": config.seed, "memory": memory_method, "workloads": {}, "rows": [],
    }
    out(f"fprecond bench: torch {torch.__version__}, device {config.device}, threads {config.threads}, "
        f"float32, {config.warmup} warm-up + median of {config.repeats} calls per measurement")
    shares_weights: dict[str, bool] = {}
    for name in config.models:
        work = workload(name, quick=config.quick, seed=config.seed)
        report["workloads"][name] = work.description
        shares_weights[name] = work.shares_weights
        out(f"  {name}: {work.description}")
    out("  time ratio: estimate / forward+backward (loss_and_grads), timed in the same process, pinned to "
        f"{config.threads} CPU{'s' if config.threads > 1 else ''}")
    out(f"  peak memory: {memory_method}, one process per row; memory ratio: estimate / forward+backward")
    out("")
    out(_table_header())

    def common(op: Any) -> dict[str, Any]:
        return {"quick": config.quick, "seed": config.seed, "device": config.device, "threads": config.threads,
                "warmup": config.warmup, "repeats": config.repeats, "op": op}

    for name in config.models:
        baseline = _run_worker({"model": name, **common("baseline")}, config.timeout)
        baseline_peak = baseline.get("peak_bytes")
        rows = [_row(name, "fwd+bwd", "-", None, "baseline: loss_and_grads", baseline, baseline_peak)]
        out(_format_row(rows[0]))
        for kind in config.kinds:
            for structure in config.structures:
                for plan in plan_cells(shares_weights[name], kind, structure):
                    if plan.skip is not None:
                        row = _row(name, kind, structure, plan.approx, plan.skip, None, baseline_peak)
                    else:
                        op = {"kind": kind, "structure": structure, "approx": plan.approx}
                        measured = _run_worker({"model": name, **common(op)}, config.timeout)
                        row = _row(name, kind, structure, plan.approx, plan.note, measured, baseline_peak)
                    rows.append(row)
                    out(_format_row(row))
        report["rows"].extend(rows)
    report["wall_s"] = time.perf_counter() - start
    out(f"\ntotal wall time {report['wall_s']:.1f} s")
    if config.output is not None:
        Path(config.output).write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    return report


def all_measured(report: dict[str, Any]) -> bool:
    """Whether no row of ``report`` ended in an error (skips are fine)."""
    return all(row["status"] != "error" for row in report["rows"])


if __name__ == "__main__":  # the measuring subprocess
    sys.exit(_worker_main(sys.argv[1:]))
