"""What a vmapped ensemble step saves over a Python loop over the members.

The workload: an ensemble of 8 MLPs 784-256-256-10 (ReLU), each initialised from
its own seed (:func:`fprecond.ensemble.init_ensemble`, seeds ``seed .. seed+7``),
trained with ``fprecond.kfac(model)`` at its default settings on one batch of 128
random examples (cross-entropy, float32, data fixed by the seed as in
:mod:`fprecond.bench.workloads`), each member with its own key
``fprecond.random.key(seed + k)``. ``--quick``: 3 MLPs 64-32-10 on 16 examples.

Two ways to take a step of all members, each carrying its own parameters and
optimizer state from step to step:

- ``vmap``: :func:`fprecond.ensemble.ensemble_step` of
  :func:`fprecond.training.train_step`, one call on stacked params, states, keys;
- ``loop``: the same ``train_step`` called for member 0, 1, ..., 7 in turn.

Both run in one worker process (:mod:`fprecond.bench.runner`), pinned to
``--threads`` CPUs. Each first runs untimed until K-FAC's warm-up (inverses
every step for ``warmup = 5`` steps) is over and the step count starts a period
of the inverse schedule (``inverse_every = 10``): :func:`fprecond.bench.recipes.lead_steps`.
One timed call runs a whole period (one refresh step and nine cheap ones) and its
time is divided by the period, so the step time is the schedule's average. The
loop is timed right before and right after the vmapped step (``--warmup``
untimed periods, then ``--repeats`` timed ones, each time), and the median of
each is reported. The speed-up is loop / vmap; the target is at least 2x.
Peak memory is that of one more period of each, above what the process held
before it (measured after all timing, see :mod:`fprecond.bench.memory`). After
the lead, the two runs' parameters are compared (``max_param_diff``): vmap
should give what the loop gives, up to float32 rounding.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Callable

import torch
from torch import nn

import fprecond as fp
from fprecond.bench.recipes import lead_steps
from fprecond.bench.runner import (Column, RunConfig, Table, error_fields, finish_report, mib, prepare_worker, ratio,
                                   run_settings, run_worker, time_and_peak, worker_main)
from fprecond.ensemble import ensemble_step, init_ensemble, member, stack_members
from fprecond.training import train_step
from fprecond.tree import tree_leaves

__all__ = ["EnsembleBenchConfig", "TARGET_SPEEDUP", "ensemble_workload", "measure", "run_ensemble_bench"]

_MODULE = "fprecond.bench.ensemble"
TARGET_SPEEDUP = 2.0
"""The least loop / vmap step-time ratio the footer checks for."""
# K-FAC's defaults (fprecond.kfac): inverses every 10 steps after 5 warm-up steps that refresh every step.
_PERIOD, _SCHEDULE_WARMUP = 10, 5


@dataclasses.dataclass(frozen=True)
class _Sizes:
    members: int
    widths: tuple[int, ...]
    batch: int


_FULL = _Sizes(members=8, widths=(784, 256, 256, 10), batch=128)
_QUICK = _Sizes(members=3, widths=(64, 32, 10), batch=16)


def _description(sizes: _Sizes) -> str:
    return (f"{sizes.members} MLPs {'-'.join(map(str, sizes.widths))} (ReLU), batch {sizes.batch}, "
            "cross-entropy mean, kfac defaults")


def ensemble_workload(quick: bool, seed: int, device: str = "cpu"
                      ) -> tuple[str, nn.Module, dict[str, torch.Tensor], tuple[torch.Tensor, torch.Tensor], list[int]]:
    """``(description, module, stacked params, batch, member seeds)`` in float32 on ``device``.

    The module is the template (its own parameters are not trained); member ``k``
    has seed ``seed + k``. The batch comes from ``torch.Generator().manual_seed(seed + 1)``,
    as the other workloads' batches do.
    """
    sizes = _QUICK if quick else _FULL
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(sizes.widths[:-1], sizes.widths[1:]):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    module = nn.Sequential(*layers[:-1]).to(device=device, dtype=torch.float32)
    seeds = [seed + k for k in range(sizes.members)]
    params = init_ensemble(module, seeds)
    generator = torch.Generator().manual_seed(seed + 1)
    inputs = torch.randn((sizes.batch, sizes.widths[0]), generator=generator, dtype=torch.float32)
    targets = torch.randint(0, sizes.widths[-1], (sizes.batch,), generator=generator, dtype=torch.int64)
    return _description(sizes), module, params, (inputs.to(device), targets.to(device)), seeds


# ---- measuring (in the worker) -----------------------------------------------------------------
class _Ensemble:
    """Training all members, either in one vmapped call or in a Python loop."""

    def __init__(self, step: Callable[..., Any], params: dict[str, torch.Tensor], init: Callable[[Any], Any],
                 batch: tuple[torch.Tensor, torch.Tensor], keys: torch.Tensor, vmapped: bool) -> None:
        self.batch, self.keys, self.vmapped = batch, keys, vmapped
        count = keys.shape[0]
        if vmapped:
            self.step = ensemble_step(step)
            self.params = params
            self.state = torch.func.vmap(init)(params)
        else:
            self.step = step
            self.members = [member(params, k) for k in range(count)]
            self.states = [init(p) for p in self.members]

    def run(self, steps: int) -> None:
        for _ in range(steps):
            if self.vmapped:
                self.params, self.state, _ = self.step(self.params, self.state, self.batch, self.keys)
            else:
                for k in range(len(self.members)):
                    self.members[k], self.states[k], _ = self.step(self.members[k], self.states[k], self.batch,
                                                                   self.keys[k])

    def stacked_params(self) -> dict[str, torch.Tensor]:
        return self.params if self.vmapped else stack_members(self.members)

    def state_bytes(self) -> int:
        states = self.state if self.vmapped else self.states
        return sum(leaf.numel() * leaf.element_size() for leaf in tree_leaves(states))


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Time the vmapped ensemble step against the loop as described in the module docstring.

    ``spec``: ``quick``, ``seed``, ``device``, ``threads``, ``warmup``, ``repeats``.
    Returns seconds per step of all members (``vmap_samples``/``loop_samples`` and
    their medians ``vmap_s``/``loop_s``), peaks in bytes (``None`` where unknown),
    ``state_bytes`` of each, ``max_param_diff`` after the lead, ``final_loss``,
    ``lead``, ``period``, ``cpus`` and ``error``.
    """
    device, sync, cpus = prepare_worker(spec)
    result: dict[str, Any] = {"error": None, "cpus": cpus, "period": _PERIOD,
                              "lead": lead_steps(_PERIOD, _SCHEDULE_WARMUP)}
    try:
        _, module, params, batch, seeds = ensemble_workload(bool(spec["quick"]), int(spec["seed"]), spec["device"])
        md = fp.model(module, fp.losses.cross_entropy())
        optimizer = fp.kfac(md)
        step = train_step(md, optimizer)
        keys = torch.stack([fp.random.key(seed) for seed in seeds]).to(device)
        vmapped = _Ensemble(step, params, optimizer.init, batch, keys, vmapped=True)
        looped = _Ensemble(step, params, optimizer.init, batch, keys, vmapped=False)
        vmapped.run(result["lead"])
        looped.run(result["lead"])
        result["max_param_diff"] = max(float((a - b).abs().max()) for a, b in
                                       zip(tree_leaves(vmapped.stacked_params()), tree_leaves(looped.stacked_params())))
    except Exception as error:  # reported in the table
        return {**result, "error": f"{type(error).__name__}: {error}"}

    def vmap_period() -> None:
        vmapped.run(_PERIOD)

    def loop_period() -> None:
        looped.run(_PERIOD)

    timed = time_and_peak(vmap_period, loop_period, warmup=int(spec["warmup"]), repeats=int(spec["repeats"]),
                          sync=sync, device=device, steps_per_call=_PERIOD)
    if timed["error"] is not None:
        return {**result, "error": timed["error"]}
    from fprecond.bench.memory import peak_bytes

    _, loop_peak = peak_bytes(loop_period, device)
    loop_samples = [t / _PERIOD for t in timed["baseline_samples"]]  # the runner leaves the baseline per call
    outputs = torch.func.vmap(md.apply, in_dims=(0, None))(vmapped.params, batch[0])
    final_loss = float(torch.func.vmap(md.loss, in_dims=(0, None))(outputs, batch[1]).mean())
    result.update(vmap_samples=timed["time_samples"], loop_samples=loop_samples, vmap_s=timed["time_s"],
                  loop_s=statistics.median(loop_samples), vmap_peak_bytes=timed["peak_bytes"],
                  loop_peak_bytes=loop_peak, vmap_state_bytes=vmapped.state_bytes(),
                  loop_state_bytes=looped.state_bytes(), final_loss=final_loss)
    return result


# ---- driving (in the parent) -------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class EnsembleBenchConfig(RunConfig):
    """Options of ``fprecond bench --suite ensemble`` (see :func:`fprecond.cli.main`);
    ``models`` is not used (the suite has its own workload)."""

    timeout: float = 1800.0


_TABLE = Table([Column("method", 6, text=True), Column("members", 7), Column("step ms", 9), Column("per member ms", 13),
                Column("speed-up", 8), Column("peak MiB", 9), Column("state MiB", 9)])


def _rows(members: int, measured: dict[str, Any]) -> list[dict[str, Any]]:
    note = f"mean of {measured.get('period', _PERIOD)}-step periods after {measured.get('lead', '?')} lead steps"
    rows = []
    for method in ("vmap", "loop"):
        row: dict[str, Any] = {"method": method, "members": members, "status": "ok", "step_ms": None,
                               "member_step_ms": None, "speedup": None, "peak_mib": None, "state_mib": None,
                               "note": note}
        if measured.get("error"):
            row.update(error_fields(note, measured["error"]))
        else:
            step_s = measured[f"{method}_s"]
            row.update(step_ms=1e3 * step_s, member_step_ms=1e3 * step_s / members,
                       speedup=ratio(measured["loop_s"], step_s), peak_mib=mib(measured[f"{method}_peak_bytes"]),
                       state_mib=mib(measured[f"{method}_state_bytes"]),
                       samples_ms=[1e3 * t for t in measured[f"{method}_samples"]])
        rows.append(row)
    return rows


def _format_row(row: dict[str, Any]) -> str:
    number = Table.number
    cells = (row["method"], str(row["members"]), number(row, row["step_ms"], ".2f"),
             number(row, row["member_step_ms"], ".2f"), number(row, row["speedup"], ".2f", "x"),
             number(row, row["peak_mib"], ".2f"), number(row, row["state_mib"], ".2f"))
    return _TABLE.line(cells, row["note"])


def run_ensemble_bench(config: EnsembleBenchConfig, out: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure the vmapped ensemble step against the loop (one worker process), print the
    table and the target check through ``out``, write JSON to ``config.output`` if set,
    and return the report (``rows``, ``target``, ``max_param_diff`` and the settings)."""
    start = time.perf_counter()
    report = run_settings(config)
    sizes = _QUICK if config.quick else _FULL
    description = _description(sizes)
    report.update(suite="ensemble", workloads={"ensemble": description})
    out(f"fprecond bench --suite ensemble: torch {report['torch']}, device {config.device}, threads "
        f"{config.threads}, float32, {config.warmup} warm-up + median of {config.repeats} calls per measurement")
    out(f"  workload: {description}")
    out("  vmap: ensemble_step(train_step(model, kfac)) on stacked members; loop: train_step per member in turn "
        "(timed before and after vmap, same process)")
    out(f"  step ms: one step of all members, averaged over whole periods of kfac's inverse schedule; speed-up: "
        f"loop / vmap; peak memory: {report['memory']}")
    out("")
    out(_TABLE.header())
    spec = config.worker_spec()
    measured = run_worker(_MODULE, spec, config.timeout)
    report["rows"] = _rows(sizes.members, measured)
    for row in report["rows"]:
        out(_format_row(row))
    speedup = report["rows"][0]["speedup"]
    report["max_param_diff"] = measured.get("max_param_diff")
    report["final_loss"] = measured.get("final_loss")
    report["cpus"] = measured.get("cpus")
    report["target"] = {"limit": TARGET_SPEEDUP, "speedup": speedup,
                        "met": None if speedup is None else speedup >= TARGET_SPEEDUP}
    if report["max_param_diff"] is not None:
        out(f"\nvmap vs loop after the lead: max |param difference| {report['max_param_diff']:.2e} (float32)")
    if speedup is None:
        out(f"target: vmap at least {TARGET_SPEEDUP:g}x faster than the loop: not measured")
    else:
        out(f"target: vmap at least {TARGET_SPEEDUP:g}x faster than the loop: {speedup:.2f}x, "
            f"{'met' if speedup >= TARGET_SPEEDUP else 'NOT met'}")
    finish_report(report, start, config.output, out)
    return report


if __name__ == "__main__":  # the measuring subprocess
    import sys

    sys.exit(worker_main(sys.argv[1:], _MODULE, measure))
