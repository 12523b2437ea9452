"""What one training step of each recipe costs, relative to one SGD step.

A step is ``fprecond.loss_and_grads`` + ``opt.update(grads, state, params,
batch=batch, key=key)`` + ``fprecond.apply_updates``, with the optimizer's state
and the parameters carried from step to step and the fixed key
``fprecond.random.key(0)``. The baseline is ``fprecond.sgd(0.1, momentum=0.9)``
on the same model and batch (the MLP at batch 256, the CNN at its usual 64).

Scheduled recipes run once per interval ``k`` (``--intervals``, default 1 and
10) with ``curvature_every = inverse_every = k``; ``diag_ng`` takes
``curvature_every = k`` (its solve is a division, done every step); ``newton``
``curvature_every = k`` (its eigendecomposition follows the Hessian); ``ekfac``
``scale_every = k`` and ``basis_every = max(1, 10 // k)`` estimates, so that its
eigenbases are refreshed about every 10 steps at every interval (every 10th
estimate at ``k = 1``, every estimate at ``k = 10``). The statistics recipes:
``shampoo`` and ``soap`` take ``statistics_every = precondition_frequency = k``
(Shampoo preconditions from step ``k``; the ``*_block128`` rows split dimensions
larger than 128 into blocks), ``psgd`` ``update_interval = k``, ``kbfgs``
``inverse_every = k``, ``sophia`` ``update_interval = k``, ``adahessian``
``update_each = k``. ``sgd``, ``adam``, ``newton_cg`` and ``muon`` have no
schedule and get one row each. Targets against Adam (Shampoo and SOAP) divide
the recipe's ratio to SGD by Adam's, each SGD timed in its own row's process.

Amortisation: a scheduled step is expensive on refresh steps and cheap between
them, so the reported step time is the average over whole periods of the
schedule (``k`` steps; ``k · basis_every`` for ``ekfac``): one timed call runs a
full period and its time is divided by the period's length. Before timing, the
recipe runs untimed until its own warm-up (``kfac``'s ``warmup`` steps that
refresh every step) is over and the step count is at the start of a period
(:func:`lead_steps`), then ``--warmup`` untimed periods.

As in :mod:`fprecond.bench.curvature`, each row is measured in its own
subprocess, pinned to ``--threads`` CPUs; SGD is timed in the same process
right before and right after the recipe and the median of both runs is the
denominator of the time ratio. Peak memory is that of one more period above what
the process held before it (the optimizer state carried in is not counted; its
size is reported as ``state MiB``); the memory ratio divides by the SGD step's
peak from its own subprocess. ``newton`` forms the exact Hessian of each layer
(one Hessian-vector product per parameter) and is measured only where the largest
layer is small (the ``--quick`` workloads); elsewhere its rows say why not.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import time
from typing import Any, Callable

import torch

import fprecond as fp
from fprecond.base import GradientTransformation
from fprecond.bench.runner import (Column, RunConfig, Table, error_fields, mib, prepare_worker, ratio, run_settings,
                                   run_worker, time_and_peak, worker_main, finish_report)
from fprecond.bench.workloads import largest_layer_size, workload
from fprecond.modeling import Model
from fprecond.tree import tree_leaves

__all__ = ["RECIPES", "INTERVALS", "TARGETS", "RecipeBenchConfig", "RowPlan", "lead_steps", "plan_rows", "measure",
           "run_recipe_bench", "target_checks"]

_MODULE = "fprecond.bench.recipes"
INTERVALS: tuple[int, ...] = (1, 10)
# Batch sizes where they differ from the workload's default (not with --quick).
_BATCH_SIZES = {"mlp": 256}
_EKFAC_BASIS_STEPS = 10
# newton: one Hessian-vector product per parameter of a layer, and a dense block of
# that size squared: 5,000 parameters is ~100 MB and seconds per step.
_NEWTON_MAX_LAYER = 5000
# (recipe, interval, most step time as a multiple of the baseline's, baseline): the goals the footer checks.
TARGETS: tuple[tuple[str, int, float, str], ...] = (
    ("kfac", 10, 1.5, "sgd"), ("kfac", 1, 3.0, "sgd"), ("shampoo", 10, 1.5, "adam"), ("soap", 10, 1.5, "adam"),
    ("shampoo_block128", 10, 1.5, "adam"), ("soap_block128", 10, 1.5, "adam"))


# ---- the recipes -------------------------------------------------------------------------------
Builder = Callable[[Model, torch.Tensor, int], GradientTransformation]


def _ekfac_basis_every(interval: int) -> int:
    return max(1, _EKFAC_BASIS_STEPS // interval)


def _one_interval(interval: int) -> int:
    return interval


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How the bench builds one recipe: ``build(model, example_inputs, interval)``;
    ``function``, the public recipe (whose ``warmup`` default, if any, is the number
    of steps before its schedule is periodic); ``scheduled``, whether it takes an
    interval; ``period(interval)``, the steps after which its schedule repeats."""

    build: Builder
    function: Callable[..., GradientTransformation]
    scheduled: bool = True
    period: Callable[[int], int] = _one_interval

    def schedule_warmup(self) -> int:
        parameter = inspect.signature(self.function).parameters.get("warmup")
        return 0 if parameter is None else int(parameter.default)


def _both(function: Callable[..., GradientTransformation]) -> Builder:
    return lambda model, inputs, k: function(model, curvature_every=k, inverse_every=k)


def _with_inputs(function: Callable[..., GradientTransformation]) -> Builder:
    return lambda model, inputs, k: function(model, example_inputs=inputs, curvature_every=k, inverse_every=k)


RECIPES: dict[str, Recipe] = {
    "sgd": Recipe(lambda model, inputs, k: fp.sgd(0.1, momentum=0.9), fp.sgd, scheduled=False),
    "adam": Recipe(lambda model, inputs, k: fp.adam(), fp.adam, scheduled=False),
    "kfac": Recipe(_both(fp.kfac), fp.kfac),
    "ekfac": Recipe(lambda model, inputs, k: fp.ekfac(model, scale_every=k, basis_every=_ekfac_basis_every(k)),
                    fp.ekfac, period=lambda k: k * _ekfac_basis_every(k)),
    "natural_gradient": Recipe(_both(fp.natural_gradient), fp.natural_gradient),
    "unit_wise_ng": Recipe(_both(fp.unit_wise_ng), fp.unit_wise_ng),
    "diag_ng": Recipe(lambda model, inputs, k: fp.diag_ng(model, curvature_every=k), fp.diag_ng),
    "smw_ng": Recipe(_with_inputs(fp.smw_ng), fp.smw_ng),
    "seng": Recipe(_with_inputs(fp.seng), fp.seng),
    "newton_cg": Recipe(lambda model, inputs, k: fp.newton_cg(model), fp.newton_cg, scheduled=False),
    "newton": Recipe(lambda model, inputs, k: fp.newton(model, structure="layer", curvature_every=k), fp.newton),
    # Statistics and roots/bases both every k steps; Shampoo starts preconditioning at step k.
    "shampoo": Recipe(lambda model, inputs, k: fp.shampoo(statistics_every=k, precondition_frequency=k),
                      fp.shampoo),
    "shampoo_block128": Recipe(lambda model, inputs, k: fp.shampoo(statistics_every=k, precondition_frequency=k,
                                                                   max_preconditioner_dim=128), fp.shampoo),
    "soap": Recipe(lambda model, inputs, k: fp.soap(statistics_every=k, precondition_frequency=k), fp.soap),
    "soap_block128": Recipe(lambda model, inputs, k: fp.soap(statistics_every=k, precondition_frequency=k,
                                                             block_size=128), fp.soap),
    "psgd": Recipe(lambda model, inputs, k: fp.psgd(model, update_interval=k), fp.psgd),
    "kbfgs": Recipe(lambda model, inputs, k: fp.kbfgs(model, inverse_every=k), fp.kbfgs),
    "muon": Recipe(lambda model, inputs, k: fp.muon(model), fp.muon, scheduled=False),
    "sophia": Recipe(lambda model, inputs, k: fp.sophia(model, update_interval=k), fp.sophia),
    "adahessian": Recipe(lambda model, inputs, k: fp.adahessian(model, update_each=k), fp.adahessian),
}


def lead_steps(period: int, schedule_warmup: int) -> int:
    """Untimed steps that bring a schedule of ``period`` steps, refreshing every step
    during its first ``schedule_warmup``, to a steady state at the start of a period:
    the smallest multiple of ``period`` not below ``schedule_warmup``."""
    if period < 1 or schedule_warmup < 0:
        raise ValueError(f"lead_steps: period must be positive and schedule_warmup not negative, got "
                         f"{period!r}, {schedule_warmup!r}")
    return math.ceil(schedule_warmup / period) * period


@dataclasses.dataclass(frozen=True)
class RowPlan:
    """One row of the recipe table: ``interval`` (``None`` for unscheduled recipes),
    the steps one timed call runs (a period), the untimed ``lead`` steps, and
    ``skip`` (the reason) where the row is not measured."""

    recipe: str
    interval: int | None
    steps_per_call: int
    lead: int
    note: str = ""
    skip: str | None = None


def plan_rows(recipe: str, intervals: tuple[int, ...], largest_layer: int) -> list[RowPlan]:
    """The rows of ``recipe`` on a workload whose largest layer has ``largest_layer`` parameters."""
    spec = RECIPES[recipe]
    rows = []
    for interval in (intervals if spec.scheduled else (None,)):
        period = 1 if interval is None else spec.period(interval)
        notes = ["baseline: sgd(0.1, momentum=0.9)"] if recipe == "sgd" else []
        if recipe == "ekfac" and interval is not None:
            notes.append(f"basis_every={_ekfac_basis_every(interval)}")
        if period > 1:
            notes.append(f"mean of {period}-step periods")
        skip = None
        if recipe == "newton" and largest_layer > _NEWTON_MAX_LAYER:
            skip = (f"skipped: the exact Hessian takes one HVP per parameter of a layer ({largest_layer:,} in the "
                    f"largest, limit {_NEWTON_MAX_LAYER:,}); measured on --quick workloads")
        rows.append(RowPlan(recipe, interval, period, lead_steps(period, spec.schedule_warmup()),
                            "; ".join(notes), skip))
    return rows


# ---- measuring (in the worker) -----------------------------------------------------------------
class _Training:
    """An optimizer training on one batch, carrying its parameters and state."""

    def __init__(self, md: Model, optimizer: GradientTransformation, params: dict[str, torch.Tensor],
                 batch: tuple[torch.Tensor, torch.Tensor], key: torch.Tensor) -> None:
        self.md, self.optimizer, self.batch, self.key = md, optimizer, batch, key
        self.params = params
        self.state = optimizer.init(params)
        self.loss = torch.tensor(float("nan"))

    def step(self) -> None:
        self.loss, grads = fp.loss_and_grads(self.md, self.params, self.batch)
        updates, self.state = self.optimizer.update(grads, self.state, self.params, batch=self.batch, key=self.key)
        self.params = fp.apply_updates(self.params, updates)

    def run(self, steps: int) -> None:
        for _ in range(steps):
            self.step()


def _state_bytes(state: Any) -> int:
    """Bytes of the distinct storages behind the tensors of ``state``."""
    storages = {}
    for leaf in tree_leaves(state):
        if isinstance(leaf, torch.Tensor):
            storage = leaf.untyped_storage()
            storages[(leaf.device, storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure one recipe's step as described by ``spec`` (what :func:`run_recipe_bench`
    sends a worker): ``model``, ``batch_size``, ``quick``, ``seed``, ``device``,
    ``threads``, ``warmup``, ``repeats``, ``recipe``, ``interval``,
    ``steps_per_call`` and ``lead``.

    Returns times in seconds per step, peaks in bytes (``None`` where unknown),
    ``state_bytes``, ``final_loss`` and ``error`` (a message where the recipe
    raised, else ``None``).
    """
    device, sync, cpus = prepare_worker(spec)
    work = workload(spec["model"], quick=bool(spec["quick"]), seed=int(spec["seed"]), device=spec["device"],
                    batch_size=spec["batch_size"])
    md = fp.model(work.module, fp.losses.cross_entropy())
    params = md.params()
    key = fp.random.key(0).to(device)
    sgd = _Training(md, RECIPES["sgd"].build(md, work.batch[0], 1), params, work.batch, key)
    baseline = sgd.step
    baseline()  # warm-up step before anything is measured
    result: dict[str, Any] = {"error": None, "cpus": cpus}
    if spec["recipe"] == "sgd":
        training, operation = sgd, baseline
    else:
        try:
            training = _Training(md, RECIPES[spec["recipe"]].build(md, work.batch[0], spec["interval"] or 1),
                                 params, work.batch, key)
            training.run(int(spec["lead"]))
        except Exception as error:  # reported in the table; the other rows still run
            return {**result, "error": f"{type(error).__name__}: {error}"}
        steps = int(spec["steps_per_call"])

        def operation() -> None:
            training.run(steps)

    result.update(time_and_peak(operation, baseline, warmup=int(spec["warmup"]), repeats=int(spec["repeats"]),
                                sync=sync, device=device, steps_per_call=int(spec["steps_per_call"])))
    result.update(state_bytes=_state_bytes(training.state), final_loss=float(training.loss))
    return result


# ---- driving (in the parent) -------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RecipeBenchConfig(RunConfig):
    """Options of ``fprecond bench --suite recipes`` (see :func:`fprecond.cli.main`).
    ``sgd``, the baseline, is measured whether listed or not."""

    recipes: tuple[str, ...] = tuple(RECIPES)
    intervals: tuple[int, ...] = INTERVALS
    timeout: float = 1800.0


def _row(model: str, plan: RowPlan, measured: dict[str, Any] | None, sgd_peak: int | None) -> dict[str, Any]:
    row: dict[str, Any] = {"model": model, "recipe": plan.recipe, "interval": plan.interval, "status": "ok",
                           "step_ms": None, "sgd_step_ms": None, "time_ratio": None, "peak_mib": None,
                           "sgd_peak_mib": mib(sgd_peak), "memory_ratio": None, "state_mib": None,
                           "steps_per_call": plan.steps_per_call, "lead_steps": plan.lead,
                           "note": plan.skip or plan.note}
    if measured is None:
        row["status"] = "skipped"
        return row
    if measured.get("error"):
        row.update(error_fields(row["note"], measured["error"]))
        return row
    time_s, base_s = measured["time_s"], measured["baseline_time_s"]
    row.update(step_ms=1e3 * time_s, sgd_step_ms=1e3 * base_s, time_ratio=time_s / base_s,
               peak_mib=mib(measured["peak_bytes"]), memory_ratio=ratio(measured["peak_bytes"], sgd_peak),
               state_mib=mib(measured["state_bytes"]), final_loss=measured["final_loss"], cpus=measured.get("cpus"),
               time_samples_ms=[1e3 * t for t in measured["time_samples"]],
               sgd_samples_ms=[1e3 * t for t in measured["baseline_samples"]])
    if not math.isfinite(measured["final_loss"]):
        row["note"] = "; ".join(part for part in (row["note"], "loss not finite") if part)
    return row


_TABLE = Table([Column("model", 5, text=True), Column("recipe", 16, text=True), Column("interval", 8),
                Column("step ms", 10), Column("SGD ms", 8), Column("time ratio", 10), Column("peak MiB", 9),
                Column("memory ratio", 12), Column("state MiB", 9)])


def _format_row(row: dict[str, Any]) -> str:
    number = Table.number
    interval = "-" if row["interval"] is None else str(row["interval"])
    cells = (row["model"], row["recipe"], interval, number(row, row["step_ms"], ".2f"),
             number(row, row["sgd_step_ms"], ".2f"), number(row, row["time_ratio"], ".2f", "x"),
             number(row, row["peak_mib"], ".2f"), number(row, row["memory_ratio"], ".2f", "x"),
             number(row, row["state_mib"], ".2f"))
    return _TABLE.line(cells, row["note"])


def _time_ratio(rows: list[dict[str, Any]], model: str, recipe: str, interval: int | None) -> float | None:
    found = [row for row in rows if (row["model"], row["recipe"]) == (model, recipe)
             and (interval is None or row["interval"] in (interval, None)) and row["time_ratio"] is not None]
    return found[0]["time_ratio"] if found else None


def target_checks(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each model and each of :data:`TARGETS`: the measured time ratio to the target's
    baseline (``None`` if not measured) and whether it is within the limit (``None`` if
    not measured). Against Adam the ratio is (recipe / SGD) / (Adam / SGD), each SGD
    timed in the same process as what it divides."""
    checks = []
    for model in dict.fromkeys(row["model"] for row in rows):
        for recipe, interval, limit, baseline in TARGETS:
            measured = _time_ratio(rows, model, recipe, interval)
            if measured is not None and baseline != "sgd":
                base = _time_ratio(rows, model, baseline, None)
                measured = None if base is None else measured / base
            checks.append({"model": model, "recipe": recipe, "interval": interval, "limit": limit,
                           "baseline": baseline, "time_ratio": measured,
                           "met": None if measured is None else measured <= limit})
    return checks


def _format_check(check: dict[str, Any]) -> str:
    head = f"  {check['model']:<5}  {check['recipe']} at interval {check['interval']}:"
    target = f"target at most {check['limit']:g}x {check['baseline']}"
    if check["met"] is None:
        return f"{head} not measured ({target})"
    return (f"{head} {check['time_ratio']:.2f}x {check['baseline'].upper() if check['baseline'] == 'sgd' else 'Adam'}"
            f", {target}: {'met' if check['met'] else 'NOT met'}")


def run_recipe_bench(config: RecipeBenchConfig, out: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure every model x recipe x interval of ``config``, print the table through
    ``out`` as rows arrive and the targets after it, write JSON to ``config.output``
    if set, and return the same report (``rows``, ``targets`` and the settings)."""
    start = time.perf_counter()
    report = run_settings(config)
    report.update(suite="recipes", intervals=list(config.intervals))
    out(f"fprecond bench --suite recipes: torch {report['torch']}, device {config.device}, threads "
        f"{config.threads}, float32, {config.warmup} warm-up + median of {config.repeats} calls per measurement")
    largest: dict[str, int] = {}
    for name in config.models:
        work = workload(name, quick=config.quick, seed=config.seed,
                        batch_size=None if config.quick else _BATCH_SIZES.get(name))
        report["workloads"][name] = work.description
        largest[name] = largest_layer_size(work.module)
        out(f"  {name}: {work.description}")
    out("  step: loss_and_grads + update + apply_updates; time ratio: step / SGD step (sgd(0.1, momentum=0.9)), "
        "the SGD ms timed in the same process before and after")
    out(f"  interval k: curvature_every = inverse_every = k (ekfac: scale_every = k, basis_every = "
        f"max(1, {_EKFAC_BASIS_STEPS} // k)); step time: mean over whole periods of the schedule")
    out(f"  peak memory: {report['memory']}, one process per row; memory ratio: step / SGD step; state MiB: the "
        "optimizer state carried between steps")
    out("")
    out(_TABLE.header())

    recipes = ("sgd", *(recipe for recipe in config.recipes if recipe != "sgd"))
    for name in config.models:
        batch_size = None if config.quick else _BATCH_SIZES.get(name)
        sgd_peak: int | None = None
        for recipe in recipes:
            for plan in plan_rows(recipe, config.intervals, largest[name]):
                if plan.skip is not None:
                    row = _row(name, plan, None, sgd_peak)
                else:
                    spec = config.worker_spec(model=name, batch_size=batch_size, recipe=recipe,
                                              interval=plan.interval, steps_per_call=plan.steps_per_call,
                                              lead=plan.lead)
                    measured = run_worker(_MODULE, spec, config.timeout)
                    if recipe == "sgd":
                        sgd_peak = measured.get("peak_bytes")
                    row = _row(name, plan, measured, sgd_peak)
                report["rows"].append(row)
                out(_format_row(row))
    report["targets"] = target_checks(report["rows"])
    out("\ntargets (step time / SGD step time):")
    for check in report["targets"]:
        out(_format_check(check))
    finish_report(report, start, config.output, out)
    return report


if __name__ == "__main__":  # the measuring subprocess
    import sys

    sys.exit(worker_main(sys.argv[1:], _MODULE, measure))
