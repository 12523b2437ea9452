"""What the launched processes of the distributed tests run (module-level, so that
``fprecond.distributed.launch`` can start them by name), and the single-process
references they are compared with."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

import fprecond as fp
import fprecond.distributed as fpd
from fprecond.curvature.estimate import estimate
from fprecond.solvers import CholeskySolver

STEPS = 4
GLOBAL_BATCH = 8
SEED = 0


def problem() -> tuple[fp.Model, dict[str, torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]]:
    """A float64 MLP 4-6-3 with cross-entropy, its initial parameters, and one global
    batch of 8 examples per step."""
    torch.manual_seed(SEED)
    # An explicit dtype: the launched processes do not share the test process's default dtype.
    module = nn.Sequential(nn.Linear(4, 6, dtype=torch.float64), nn.Tanh(), nn.Linear(6, 3, dtype=torch.float64))
    model = fp.model(module, fp.losses.cross_entropy())
    generator = torch.Generator().manual_seed(SEED + 1)
    batches = [(torch.randn(GLOBAL_BATCH, 4, generator=generator, dtype=torch.float64),
                torch.randint(0, 3, (GLOBAL_BATCH,), generator=generator)) for _ in range(STEPS)]
    return model, model.params(), batches


def kfac(model: fp.Model, distributed: Any = None) -> fp.GradientTransformation:
    # The exact Fisher: sampling-free, so one process on the whole batch is an exact reference.
    return fp.kfac(model, learning_rate=0.2, kind="fisher", warmup=1, inverse_every=2, distributed=distributed)


def shampoo(model: fp.Model, distributed: Any = None) -> fp.GradientTransformation:
    del model
    # epsilon 1e-8, not 1e-12: with 8 examples the statistics are singular, and a 1e-12 ridge
    # would amplify the rounding of the averaged gradient (~1e-16) to ~1e-7 in the roots.
    return fp.shampoo(learning_rate=0.05, epsilon=1e-8, precondition_frequency=2, start_preconditioning_step=2,
                      distributed=distributed)


def ekfac(model: fp.Model, distributed: Any = None) -> fp.GradientTransformation:
    # The exact Fisher again; a new eigenbasis every 2 estimates (steps 0 and 2, both shared),
    # the moments re-estimated every step.
    return fp.ekfac(model, learning_rate=0.2, kind="fisher", basis_every=2, distributed=distributed)


def diagonal(model: fp.Model, distributed: Any = None) -> fp.GradientTransformation:
    # Diagonal statistics, averaged like the Kronecker factors; refreshed on every rank.
    return fp.natural_gradient(model, learning_rate=0.2, kind="fisher", structure="diag", distributed=distributed)


RECIPES: dict[str, tuple[Callable[..., fp.GradientTransformation], str]] = {
    "kfac_inverse": (kfac, "inverse"),
    "kfac_gradient": (kfac, "gradient"),
    "shampoo_inverse": (shampoo, "inverse"),
    "shampoo_gradient": (shampoo, "gradient"),
    "ekfac_inverse": (ekfac, "inverse"),
    "diagonal_replicate": (diagonal, "replicate"),
}


def train(name: str, communicator: fpd.Communicator | None) -> dict[str, torch.Tensor]:
    """The parameters after :data:`STEPS` steps of recipe ``name``: on this rank's shard of
    every batch with ``communicator``, on the whole batches with ``None``."""
    return train_with_state(name, communicator)[0]


def held_blocks(state: Any) -> int | None:
    """How many preconditioner blocks a K-FAC state holds itself (not :class:`RemoteBlock`), or
    how many Shampoo roots (matrices, counted over batched blocks) and statistics a Shampoo state holds."""
    inner = state["recipe"].inner_state if isinstance(state, dict) else None
    if inner is None:
        return None
    if "precondition" in inner:
        return sum(not isinstance(block, fpd.RemoteBlock) for block in inner["precondition"].preconditioner.blocks)
    if "shampoo" in inner:
        shampoo_state = inner["shampoo"]["shampoo"].direction_state  # partition -> graft -> scale_by_shampoo
        roots = sum(leaf.shape[0] for leaf in fp.tree.tree_leaves(shampoo_state.roots))
        statistics = sum(leaf.shape[0] for leaf in fp.tree.tree_leaves(shampoo_state.statistics))
        assert roots == statistics  # a process keeps the statistics of the roots it keeps, no others
        return roots
    return None


COMPUTED: list[list[int]] = []
"""Per :meth:`DataParallel.share` call in this process, the items it computed itself (test bookkeeping)."""


class RecordingParallel(fpd.DataParallel):
    """:class:`DataParallel` that records which shared items this process computes."""

    def share(self, compute: Callable[[int], Any], templates: Any, prices: Any = None) -> list[Any]:
        mine: list[int] = []
        COMPUTED.append(mine)

        def recorded(index: int) -> Any:
            mine.append(index)
            return compute(index)

        return super().share(recorded, templates, prices)


def ekfac_statistics(state: Any) -> list[torch.Tensor]:
    """The running Kronecker factors and the EKFAC curvature (dense, so that the eigenvectors'
    signs do not matter) of an EKFAC recipe's state, chained or not."""
    recipe_state = state["recipe"] if isinstance(state, dict) else state
    estimator = recipe_state.inner_state["precondition"].estimator
    return fp.tree.tree_leaves(estimator.factors) + [block.dense() for block in estimator.curvature.blocks]


def train_with_state(name: str, communicator: fpd.Communicator | None) -> tuple[dict[str, torch.Tensor], Any]:
    """:func:`train`, and the final optimizer state (:data:`COMPUTED` records the shared work)."""
    model, params, batches = problem()
    make, mode = RECIPES[name]
    COMPUTED.clear()
    if communicator is None:
        optimizer = make(model)
    else:
        optimizer = fp.named_chain(("all_reduce", fpd.all_reduce_gradients(communicator)),
                                   ("recipe", make(model, RecordingParallel(communicator, mode))))
    state = optimizer.init(params)
    key = fp.random.key(SEED)
    for batch in batches:
        local = fpd.shard_batch(batch, communicator)
        _, grads = fp.loss_and_grads(model, params, local)
        updates, state = optimizer.update(grads, state, params, batch=local, key=key)
        params = fp.apply_updates(params, updates)
    fpd.check_in_sync(params, communicator, what="parameters")
    return params, state


REFRESHED: list[str] = []
"""Blocks refreshed by :class:`CountingCholesky` in this process (test bookkeeping)."""


class CountingCholesky(CholeskySolver):
    """A Cholesky solver that records the blocks it refreshes (to see the sharding)."""

    def refresh(self, curvature: Any, damping: Any) -> Any:
        REFRESHED.extend(block.names[0] for block in curvature.blocks)
        return super().refresh(curvature, damping)


def fisher_mc_curvature(communicator: fpd.Communicator | None) -> Any:
    """The running curvature after one ``fisher_mc`` K-FAC step (the first estimate as is)."""
    model, params, batches = problem()
    distributed = None if communicator is None else fpd.DataParallel(communicator)
    estimator = fp.curvature.estimator(model, kind="fisher_mc", structure="kron")
    transform = fp.precondition(estimator, "cholesky", distributed=distributed)
    state = transform.init(params)
    local = fpd.shard_batch(batches[0], communicator)
    _, grads = fp.loss_and_grads(model, params, local)
    _, state = transform.update(grads, state, params, batch=local, key=fp.random.key(SEED))
    return state.estimator.curvature


def fisher_mc_reference(world_size: int) -> Any:
    """What the distributed ``fisher_mc`` estimate should be: the mean over shards ``r`` of one
    process's estimate on shard ``r`` with key ``fold_in(fold_in(key, step 0), r)``."""
    model, params, batches = problem()
    inputs, targets = batches[0]
    size = GLOBAL_BATCH // world_size
    step_key = fp.random.fold_in(fp.random.key(SEED), 0)
    estimates = [estimate(model, params, (inputs[r * size:(r + 1) * size], targets[r * size:(r + 1) * size]),
                          kind="fisher_mc", structure="kron", key=fp.random.fold_in(step_key, r))
                 for r in range(world_size)]
    return fp.tree.tree_map(lambda *leaves: sum(leaves) / world_size, *estimates)


def sharded_refresh(communicator: fpd.Communicator) -> dict[str, Any]:
    """One sharded refresh of the K-FAC curvature: which blocks this rank computed, and the result."""
    model, params, batches = problem()
    curvature = estimate(model, params, batches[0], kind="fisher", structure="kron")
    solver = CountingCholesky()
    previous = solver.refresh(curvature, 1e-3).preconditioner
    REFRESHED.clear()
    refreshed = fpd.DataParallel(communicator).refresh(solver, curvature, torch.tensor(1e-3, dtype=torch.float64),
                                                       previous)
    return {"seen": list(REFRESHED), "preconditioner": fp.tree.tree_leaves(refreshed.preconditioner),
            "failures": refreshed.failures}


def collectives(communicator: fpd.Communicator) -> dict[str, Any]:
    """Bucketed all-reduces and broadcasts of a mixed tree, and the consistency check."""
    rank = communicator.rank
    tiny = fpd.Communicator(communicator.rank, communicator.world_size, communicator.group, communicator.store,
                            bucket_bytes=16)  # many buckets
    tree = {"a": torch.arange(5, dtype=torch.float64) + rank, "b": torch.full((2, 3), float(rank), dtype=torch.float32),
            "c": (torch.tensor(2.0 * rank, dtype=torch.float64), torch.ones(40, dtype=torch.float32) * rank)}
    out: dict[str, Any] = {"mean": fpd.all_reduce_mean(tree, tiny),
                           "sum": fpd.all_reduce_sum({"n": torch.tensor([rank, 1])}, tiny),
                           "broadcast": fpd.broadcast(tree, 1, tiny)}
    fpd.check_in_sync({"same": torch.ones(3)}, communicator)
    try:
        fpd.check_in_sync({"same": torch.ones(3), "different": torch.full((2,), float(rank == 1))}, communicator)
        out["check"] = "no error"
    except RuntimeError as error:
        out["check"] = str(error)
    return out


def data_parallel_suite(communicator: fpd.Communicator) -> dict[str, Any]:
    """Everything one 4-process launch checks: training with 4 ranks and with 2 (ranks
    {0, 1} and {2, 3} in two groups), ``fisher_mc``, sharded refreshes and collectives."""
    assert communicator.world_size == 4
    # As the test process (tests/conftest.py): constants such as the learning rate are
    # made in the default dtype, and float32 ones would differ from it by ~1e-9.
    torch.set_default_dtype(torch.float64)
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group
    pair = fpd.Communicator.from_group(pairs[communicator.rank // 2], store=communicator.store)
    result: dict[str, Any] = {}
    for name in RECIPES:
        for world, group in ((4, communicator), (2, pair)):
            params, state = train_with_state(name, group)
            result[f"{name}/{world}"], result[f"{name}/{world}/held"] = params, held_blocks(state)
            result[f"{name}/{world}/computed"] = [list(items) for items in COMPUTED]
            if name.startswith("ekfac"):
                result[f"{name}/{world}/statistics"] = ekfac_statistics(state)
    result["fisher_mc/4"] = fp.tree.tree_leaves(fisher_mc_curvature(communicator))
    result["refresh/4"] = sharded_refresh(communicator)
    result["collectives"] = collectives(communicator)
    return result


def fail_on_rank_one(communicator: fpd.Communicator) -> float:
    """Rank 1 raises after the first all-reduce; the others enter a second one and must stop."""
    fpd.all_reduce_mean({"x": torch.ones(3)}, communicator)
    if communicator.rank == 1:
        raise ValueError("boom on purpose")
    return _timed_second_all_reduce(communicator)


def hang_on_rank_one(communicator: fpd.Communicator, folder: str) -> float:
    """Rank 1 stops answering (sleeps in a loop, never raises) after the first all-reduce;
    the others enter a second one and must fail when the collective timeout runs out.
    Every rank leaves its process id in ``folder`` first."""
    Path(folder, f"pid-{communicator.rank}").write_text(str(os.getpid()))
    fpd.all_reduce_mean({"x": torch.ones(3)}, communicator)
    if communicator.rank == 1:
        while True:
            time.sleep(0.05)
    return _timed_second_all_reduce(communicator)


def _timed_second_all_reduce(communicator: fpd.Communicator) -> float:
    """An all-reduce the failed peer never joins: its PeerFailure, with the seconds waited added."""
    start = time.monotonic()
    try:
        fpd.all_reduce_mean({"x": torch.ones(3)}, communicator)
    except fpd.PeerFailure as error:
        raise fpd.PeerFailure(f"{error} (after {time.monotonic() - start:.2f} s)") from error
    return 0.0
