"""How a K-FAC refresh's work falls per rank when ranks share it (``fprecond bench --suite distributed``).

The workload: an MLP of 8 Linear layers of width 1024 (1024-1024-...-1024-10,
ReLU), its K-FAC curvature (empirical Fisher, Kronecker factors, float32) on a
batch of 256 random examples, and the refresh ``fprecond.kfac`` runs every
``inverse_every`` steps: the π-damped Cholesky inverses of both factors of every
layer (16 matrices of size 1025 or 1024, and one of size 10). ``--quick``: 4
layers of width 32 on 32 examples.

One run of :func:`fprecond.distributed.launch` starts ``max(worlds)`` gloo
processes (one torch thread each). For each world size ``W`` in turn, ranks
``0 .. W-1`` (a process group of their own) refresh while the others wait at a
barrier: ``W = 1`` times the single-process refresh (``solver.refresh``), larger
worlds :meth:`fprecond.distributed.DataParallel.refresh` (each rank inverts the
blocks assigned to it, longest first, and receives the others by broadcast).
Every timed call starts after a barrier of its group; ``--warmup`` untimed
calls, then ``--repeats`` timed ones, whose median is kept per rank.

Two clocks per call: the **thread CPU time** of the calling thread
(``time.thread_time``: the rank's own factorisations and copies; gloo moves data
in its own threads while this one waits) and the **wall time** including the
broadcasts. The per-rank figure of a world is its busiest rank's median. On a
machine with fewer cores than ranks the processes take turns on the cores, so
wall times there measure the machine, not the method; CPU time is the figure
the target is checked on: with 4 ranks, per-rank refresh time at most
:data:`TARGET_RATIO` x the single process's. Each world's refreshed
preconditioner is compared with the single process's (``max_abs_diff``; broadcast
blocks are the owners' bits, so it is 0).

A second table (``ekfac_rows``) times EKFAC's expensive refresh the same way: the
eigendecompositions of both Kronecker factors of every layer (a new eigenbasis,
every ``basis_every`` estimates), shared by
:class:`~fprecond.distributed.DataParallel` (each rank decomposes its layers and
broadcasts their eigenbases) against one process decomposing them all. The
factors get a ridge of :data:`_EIGH_RIDGE` times their largest entry first: with
fewer examples than inputs they are exactly rank-deficient, and LAPACK's float32
``eigh`` fails to converge on some of them (the time of a converging ``eigh`` is
what is measured).
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

import fprecond as fp
from fprecond.bench.runner import Column, RunConfig, Table, error_fields, finish_report, ratio, run_settings
from fprecond.curvature.blocks import KroneckerBlock
from fprecond.curvature.eigenbasis import _eigen_curvature, _shared_eigenbases
from fprecond.curvature.estimate import estimate
from fprecond.curvature.matrix import Curvature
from fprecond.distributed import Communicator, DataParallel, LaunchError, launch
from fprecond.solvers import cholesky
from fprecond.tree import tree_leaves

__all__ = ["DistributedBenchConfig", "TARGET_RATIO", "TARGET_WORLD", "distributed_workload", "measure",
           "run_distributed_bench"]

TARGET_RATIO = 0.4
"""The largest per-rank refresh time with :data:`TARGET_WORLD` ranks, relative to one process."""
TARGET_WORLD = 4
_DAMPING = 1e-3
_EIGH_RIDGE = 1e-6


@dataclasses.dataclass(frozen=True)
class _Sizes:
    layers: int
    width: int
    classes: int
    batch: int


_FULL = _Sizes(layers=8, width=1024, classes=10, batch=256)
_QUICK = _Sizes(layers=4, width=32, classes=10, batch=32)


def _description(sizes: _Sizes) -> str:
    widths = [sizes.width] * sizes.layers + [sizes.classes]
    return (f"MLP {'-'.join(map(str, widths))} (ReLU, {sizes.layers} layers), K-FAC factors (empirical Fisher, "
            f"batch {sizes.batch}, float32), refresh = pi-damped Cholesky inverses (damping {_DAMPING:g})")


def distributed_workload(quick: bool, seed: int) -> tuple[str, fp.Model, dict[str, torch.Tensor],
                                                          tuple[torch.Tensor, torch.Tensor]]:
    """``(description, model, params, batch)`` in float32, the same in every process of a seed."""
    sizes = _QUICK if quick else _FULL
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for index in range(sizes.layers):
        layers += [nn.Linear(sizes.width, sizes.classes if index == sizes.layers - 1 else sizes.width), nn.ReLU()]
    module = nn.Sequential(*layers[:-1]).float()
    model = fp.model(module, fp.losses.cross_entropy())
    generator = torch.Generator().manual_seed(seed + 1)
    batch = (torch.randn(sizes.batch, sizes.width, generator=generator),
             torch.randint(0, sizes.classes, (sizes.batch,), generator=generator))
    return _description(sizes), model, model.params(), batch


def _timed(spec: dict[str, Any], group: Any, call: Callable[[], Any]) -> tuple[list[float], list[float], Any]:
    """CPU and wall samples (seconds) of ``call`` after ``--warmup`` untimed calls, each
    started after a barrier of ``group`` (if any), and the last result."""
    cpu, wall = [], []
    result = None
    for index in range(int(spec["warmup"]) + int(spec["repeats"])):
        if group is not None:
            dist.barrier(group)
        wall_start, cpu_start = time.perf_counter(), time.thread_time()
        result = call()
        wall_end, cpu_end = time.perf_counter(), time.thread_time()
        if index >= int(spec["warmup"]):
            cpu.append(cpu_end - cpu_start)
            wall.append(wall_end - wall_start)
    return cpu, wall, result


def _ridged(curvature: Curvature) -> Curvature:
    """Kronecker factors plus :data:`_EIGH_RIDGE` times their largest entry on the diagonal."""
    def ridge(factor: torch.Tensor) -> torch.Tensor:
        eye = torch.eye(factor.shape[-1], dtype=factor.dtype, device=factor.device)
        return factor + _EIGH_RIDGE * factor.abs().amax(dim=(-2, -1), keepdim=True) * eye

    return curvature._replace_blocks(tuple(
        KroneckerBlock(ridge(block.input_factor), ridge(block.output_factor), block.damping, block.layout)
        if isinstance(block, KroneckerBlock) else block for block in curvature.blocks))


def _bases(curvature: Any) -> list[torch.Tensor]:
    """The eigenbases of EKFAC eigenbasis blocks (their scaling is not shared, see
    :func:`fprecond.curvature.eigenbasis._shared_eigenbases`)."""
    return [basis for block in curvature.blocks for basis in (block.input_basis, block.output_basis)]


def measure(communicator: Communicator, spec: dict[str, Any]) -> dict[str, Any]:
    """One launched rank's measurements (see the module docstring): per world size and
    refresh (``"kfac"``, ``"ekfac"``) its CPU and wall samples (seconds), the blocks it
    owned, its share of the modelled cost, and the largest difference from one process."""
    worlds = [int(w) for w in spec["worlds"]]
    # Every rank creates every group, members or not (new_group is collective).
    groups = {w: dist.new_group(list(range(w))) for w in worlds if w > 1}
    _, model, params, batch = distributed_workload(bool(spec["quick"]), int(spec["seed"]))
    curvature = estimate(model, params, batch, kind="empirical_fisher", structure="kron")
    solver = cholesky(pi=True)
    damping = torch.tensor(_DAMPING)
    single = solver.refresh(curvature, damping).preconditioner  # the reference, and the template
    factors = _ridged(curvature)
    eigen = _eigen_curvature(factors, None)  # EKFAC's reference and template
    results: dict[str, Any] = {}
    for world in worlds:
        dist.barrier()
        if communicator.rank < world:
            group = groups.get(world)
            local = Communicator.from_group(group) if group is not None else None
            parallel = DataParallel(local)
            if local is None:  # the single-process code paths
                calls: dict[str, Callable[[], Any]] = {
                    "kfac": lambda: solver.refresh(curvature, damping).preconditioner,
                    "ekfac": lambda: _eigen_curvature(factors, None)}
            else:
                calls = {"kfac": lambda: parallel.refresh(solver, curvature, damping, single).preconditioner,
                         "ekfac": lambda: _shared_eigenbases(factors, eigen, parallel.share)}
            # Per refresh: the reference, the leaves compared, and what the assignment prices
            # (EKFAC shares the bases alone, a pair per layer).
            bases = _bases(eigen)
            references = {"kfac": (single, tree_leaves, single.blocks),
                          "ekfac": (eigen, _bases, [tuple(bases[2 * i:2 * i + 2]) for i in range(len(eigen.blocks))])}
            results[str(world)] = {}
            for name, call in calls.items():
                cpu, wall, refreshed = _timed(spec, group, call)
                reference, leaves, priced = references[name]
                assignment = parallel.assignment(priced)
                difference = max(float((a - b).abs().max()) for a, b in zip(leaves(refreshed), leaves(reference)))
                results[str(world)][name] = {"cpu_s": cpu, "wall_s": wall,
                                             "blocks": len(assignment.owned_by(parallel.rank)),
                                             "load_share": assignment.loads[parallel.rank] / sum(assignment.costs),
                                             "max_abs_diff": difference}
        dist.barrier()
    return results


# ---- driving (in the parent) -------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DistributedBenchConfig(RunConfig):
    """Options of ``fprecond bench --suite distributed``; ``worlds``: the world sizes, all
    measured in one launch of ``max(worlds)`` processes (``threads`` torch threads each;
    ``models`` and ``device`` are not used: gloo on CPU)."""

    worlds: tuple[int, ...] = (1, 2, 4)
    timeout: float = 900.0


_TABLE = Table([Column("ranks", 5), Column("blocks/rank", 11), Column("cost share", 10),
                Column("CPU ms/rank", 11), Column("CPU ratio", 9), Column("wall ms/rank", 12), Column("wall ratio", 10),
                Column("max |diff|", 10)])


_NOTES = {"kfac": ("single-process refresh", "DataParallel.refresh: own blocks, broadcast the rest"),
          "ekfac": ("single-process eigendecompositions", "DataParallel.share: own layers, broadcast the bases")}


def _rows(worlds: tuple[int, ...], measured: list[dict[str, Any]] | None, error: str | None, refresh: str = "kfac",
          ) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for world in worlds:
        note = _NOTES[refresh][0 if world == 1 else 1]
        row: dict[str, Any] = {"world_size": world, "status": "ok", "note": note}
        if measured is None:
            row.update(error_fields(note, error or "not measured"))
            rows.append(row)
            continue
        ranks = [measured[rank][str(world)][refresh] for rank in range(world)]
        cpu = [statistics.median(r["cpu_s"]) for r in ranks]
        wall = [statistics.median(r["wall_s"]) for r in ranks]
        row.update(cpu_ms=1e3 * max(cpu), wall_ms=1e3 * max(wall), cpu_ms_ranks=[1e3 * c for c in cpu],
                   wall_ms_ranks=[1e3 * w for w in wall], blocks=max(r["blocks"] for r in ranks),
                   cost_share=max(r["load_share"] for r in ranks), max_abs_diff=max(r["max_abs_diff"] for r in ranks))
        rows.append(row)
    base = rows[0] if rows and rows[0]["world_size"] == 1 and rows[0]["status"] == "ok" else None
    for row in rows:
        if row["status"] == "ok":
            row["cpu_ratio"] = ratio(row["cpu_ms"], base["cpu_ms"]) if base else None
            row["wall_ratio"] = ratio(row["wall_ms"], base["wall_ms"]) if base else None
    return rows


def _format_row(row: dict[str, Any]) -> str:
    number = Table.number
    cells = (str(row["world_size"]), number(row, row.get("blocks"), "d"), number(row, row.get("cost_share"), ".2f"),
             number(row, row.get("cpu_ms"), ".1f"), number(row, row.get("cpu_ratio"), ".2f", "x"),
             number(row, row.get("wall_ms"), ".1f"), number(row, row.get("wall_ratio"), ".2f", "x"),
             number(row, row.get("max_abs_diff"), ".1e"))
    return _TABLE.line(cells, row["note"])


def _cpu_count() -> int | None:
    """The CPUs this process may run on (the ranks share them)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def run_distributed_bench(config: DistributedBenchConfig, out: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure the refresh per rank for each world size (one launch), print the table and
    the target check through ``out``, write JSON to ``config.output`` if set, and return
    the report (``rows``, ``target`` and the settings)."""
    start = time.perf_counter()
    worlds = tuple(sorted(set(config.worlds)))
    if not worlds or worlds[0] != 1:
        raise ValueError(f"distributed bench: worlds must include 1 (the baseline), got {config.worlds}")
    report = run_settings(config)
    sizes = _QUICK if config.quick else _FULL
    description = _description(sizes)
    report.update(suite="distributed", worlds=list(worlds), workloads={"distributed": description},
                  cpus=_cpu_count())
    out(f"fprecond bench --suite distributed: torch {report['torch']}, gloo on CPU, {config.threads} thread(s) per "
        f"rank, {config.warmup} warm-up + median of {config.repeats} calls per rank, {max(worlds)} processes "
        f"launched once, {_cpu_count()} CPUs")
    out(f"  workload: {description}")
    out("  per rank: the busiest rank's median; CPU = thread CPU time of the refresh (own factorisations and "
        "copies), wall = including broadcasts; ratios to 1 rank")
    out("")
    out(_TABLE.header())
    spec = {"worlds": list(worlds), "quick": config.quick, "seed": config.seed, "warmup": config.warmup,
            "repeats": config.repeats}
    measured: list[dict[str, Any]] | None = None
    error = None
    try:
        measured = launch(measure, max(worlds), args=(spec,), timeout=config.timeout,
                          collective_timeout=config.timeout, threads=config.threads)
    except LaunchError as failure:
        error = str(failure).splitlines()[0]
    report["rows"] = _rows(worlds, measured, error)
    for row in report["rows"]:
        out(_format_row(row))
    report["ekfac_rows"] = _rows(worlds, measured, error, "ekfac")
    out("\nEKFAC's new eigenbasis: eigendecompositions of both factors of every layer (float32)")
    out(_TABLE.header())
    for row in report["ekfac_rows"]:
        out(_format_row(row))
    largest = report["rows"][-1]
    value = largest.get("cpu_ratio") if largest["status"] == "ok" else None
    report["target"] = {"world_size": TARGET_WORLD, "limit": TARGET_RATIO,
                        "measured_world_size": largest["world_size"], "cpu_ratio": value,
                        "wall_ratio": largest.get("wall_ratio"),
                        "met": None if value is None or largest["world_size"] != TARGET_WORLD
                        else value <= TARGET_RATIO}
    if value is None or largest["world_size"] != TARGET_WORLD:
        out(f"\ntarget: per-rank refresh CPU time with {TARGET_WORLD} ranks at most {TARGET_RATIO:g}x one "
            "process's: not measured")
    else:
        out(f"\ntarget: per-rank refresh CPU time with {TARGET_WORLD} ranks at most {TARGET_RATIO:g}x one process's: "
            f"{value:.2f}x, {'met' if value <= TARGET_RATIO else 'NOT met'} (wall {largest['wall_ratio']:.2f}x)")
    finish_report(report, start, config.output, out)
    return report
