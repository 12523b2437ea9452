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
which would disturb the timings) and prints a table as rows arrive. The
machinery is shared with the recipe suite (:mod:`fprecond.bench.runner`).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

from fprecond.bench.runner import (Column, RunConfig, Table, all_measured, error_fields, mib, prepare_worker, ratio,
                                   run_settings, run_worker, time_and_peak, worker_main, finish_report)
from fprecond.bench.workloads import MODELS, workload

__all__ = ["BenchConfig", "MODELS", "KINDS", "STRUCTURES", "run_bench", "measure", "plan_cells", "workload",
           "all_measured"]

_MODULE = "fprecond.bench.curvature"
# Cheapest first: the two one-backward kinds are the ones a K-FAC step pays each time.
KINDS: tuple[str, ...] = ("empirical_fisher", "fisher_mc", "ggn", "fisher", "hessian")
STRUCTURES: tuple[str, ...] = ("kron", "unit", "diag")
_HESSIAN_SHARED_DIAG = "skipped: exact Hessian diagonal of a weight-sharing layer needs one HVP per weight"


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
def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure one operation as described by ``spec`` (what :func:`run_bench` sends a
    worker): ``model``, ``quick``, ``seed``, ``device``, ``threads``, ``warmup``,
    ``repeats`` and ``op``, either ``"baseline"`` or ``{"kind", "structure", "approx"}``.

    Returns times in seconds, peaks in bytes (``None`` where unknown) and ``error``
    (a message where the operation raised, else ``None``).
    """
    import fprecond as fp
    from fprecond.curvature import estimate

    device, sync, cpus = prepare_worker(spec)
    work = workload(spec["model"], quick=bool(spec["quick"]), seed=int(spec["seed"]), device=spec["device"])
    md = fp.model(work.module, fp.losses.cross_entropy())
    params = md.params()
    batch = work.batch
    # On the data's device: fisher_mc draws its targets where the key lives.
    key = fp.random.key(int(spec["seed"])).to(device)

    def baseline() -> Any:
        return fp.loss_and_grads(md, params, batch)

    op_spec = spec["op"]
    if op_spec == "baseline":
        operation = baseline
    else:
        def operation() -> Any:
            return estimate(md, params, batch, kind=op_spec["kind"], structure=op_spec["structure"],
                            approx=op_spec["approx"], key=key, samples=1)

    baseline()  # warm-up forward+backward before anything is measured
    result = time_and_peak(operation, baseline, warmup=int(spec["warmup"]), repeats=int(spec["repeats"]),
                           sync=sync, device=device)
    return {**result, "cpus": cpus}


# ---- driving (in the parent) -------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BenchConfig(RunConfig):
    """Options of ``fprecond bench --suite curvature`` (see :func:`fprecond.cli.main`)."""

    kinds: tuple[str, ...] = KINDS
    structures: tuple[str, ...] = ("kron", "diag")


def _run_worker(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run :func:`measure` in a fresh interpreter; failures come back as ``error``."""
    return run_worker(_MODULE, spec, timeout)


def _row(model: str, kind: str, structure: str, approx: str | None, note: str, measured: dict[str, Any] | None,
         baseline_peak: int | None) -> dict[str, Any]:
    row: dict[str, Any] = {"model": model, "kind": kind, "structure": structure, "approx": approx,
                           "status": "ok", "time_ms": None, "baseline_ms": None, "time_ratio": None,
                           "peak_mib": None, "baseline_peak_mib": mib(baseline_peak), "memory_ratio": None,
                           "note": note}
    if measured is None:
        row["status"] = "skipped"
        return row
    if measured.get("error"):
        row.update(error_fields(note, measured["error"]))
        return row
    time_s, base_s = measured["time_s"], measured["baseline_time_s"]
    row.update(time_ms=1e3 * time_s, baseline_ms=1e3 * base_s, time_ratio=time_s / base_s,
               peak_mib=mib(measured["peak_bytes"]), memory_ratio=ratio(measured["peak_bytes"], baseline_peak),
               cpus=measured.get("cpus"), time_samples_ms=[1e3 * t for t in measured["time_samples"]],
               baseline_samples_ms=[1e3 * t for t in measured["baseline_samples"]])
    return row


_TABLE = Table([Column("model", 5, text=True), Column("kind", 16, text=True), Column("structure", 9, text=True),
                Column("time ms", 10), Column("time ratio", 10), Column("peak MiB", 9), Column("memory ratio", 12)])


def _format_row(row: dict[str, Any]) -> str:
    number = Table.number
    cells = (row["model"], row["kind"], row["structure"], number(row, row["time_ms"], ".2f"),
             number(row, row["time_ratio"], ".2f", "x"), number(row, row["peak_mib"], ".2f"),
             number(row, row["memory_ratio"], ".2f", "x"))
    return _TABLE.line(cells, row["note"])


def run_bench(config: BenchConfig, out: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure every model x kind x structure of ``config``, print the table through
    ``out`` as rows arrive, write JSON to ``config.output`` if set, and return the
    same report (``rows`` plus the run's settings)."""
    start = time.perf_counter()
    report = run_settings(config)
    out(f"fprecond bench: torch {report['torch']}, device {config.device}, threads {config.threads}, "
        f"float32, {config.warmup} warm-up + median of {config.repeats} calls per measurement")
    shares_weights: dict[str, bool] = {}
    for name in config.models:
        work = workload(name, quick=config.quick, seed=config.seed)
        report["workloads"][name] = work.description
        shares_weights[name] = work.shares_weights
        out(f"  {name}: {work.description}")
    out("  time ratio: estimate / forward+backward (loss_and_grads), timed in the same process, pinned to "
        f"{config.threads} CPU{'s' if config.threads > 1 else ''}")
    out(f"  peak memory: {report['memory']}, one process per row; memory ratio: estimate / forward+backward")
    out("")
    out(_TABLE.header())

    for name in config.models:
        baseline = _run_worker(config.worker_spec(model=name, op="baseline"), config.timeout)
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
                        measured = _run_worker(config.worker_spec(model=name, op=op), config.timeout)
                        row = _row(name, kind, structure, plan.approx, plan.note, measured, baseline_peak)
                    rows.append(row)
                    out(_format_row(row))
        report["rows"].extend(rows)
    finish_report(report, start, config.output, out)
    return report


if __name__ == "__main__":  # the measuring subprocess
    import sys

    sys.exit(worker_main(sys.argv[1:], _MODULE, measure))
