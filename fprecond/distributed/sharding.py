"""Data-parallel preconditioning: averaged statistics and refreshes shared among ranks.

:class:`DataParallel` is what :func:`fprecond.precondition` (and so ``kfac``,
``natural_gradient``, ``ekfac``, ...) and :func:`fprecond.shampoo` take as their
``distributed=`` argument. Each process trains on its own equal-size part of
the batch, after an :func:`~fprecond.distributed.all_reduce_gradients` link has
averaged the gradients; then, on the steps the preconditioner's schedule names:

- **statistics** (``precondition``): each fresh curvature estimate (Kronecker
  factors, diagonals, dense or unit-wise blocks) is averaged over ranks leaf by
  leaf (:func:`~fprecond.distributed.all_reduce_mean`) *before* the NaN check and
  the running average. Estimates follow the loss's mean reduction (``A`` a mean
  over examples, ``G`` carrying the ``1/N`` of the loss), so the mean of the
  ranks' estimates on equal-size batches is the estimate on their concatenation:
  every rank holds the preconditioner one process would hold. EKFAC averages
  its fresh factors, then its fresh moments in the eigenbasis (a mean over
  examples too), each before its running average. Shampoo's statistics come
  from the averaged gradient and need no communication.
- **refreshes** (inverses, roots, eigendecompositions): the blocks (a layer of
  K-FAC, a parameter tensor of Shampoo) are assigned to ranks by
  :func:`~fprecond.distributed.assignment.assign` (``Θ(n³)`` per ``n x n``
  matrix, longest first), so each rank's refresh work falls as about ``1/W``.
  The assignment is computed from static shapes, identically in every process.
  EKFAC's eigendecompositions (in its estimator, every ``basis_every``
  estimates) are shared the same way, their eigenbases broadcast. Blocks
  already diagonal in a known basis (diagonals, EKFAC's eigenbasis blocks)
  are refreshed elementwise on every rank: cheaper than receiving them.

``mode`` says what happens to a refreshed block:

- ``"inverse"`` (default): its owner broadcasts it (one bucketed broadcast per
  owner, all posted at once); every rank holds the whole preconditioner and
  multiplies its gradient locally. Communication: the preconditioner's size per
  refresh. Broadcasts are used rather than an all-reduce of a zero-padded sum:
  a ring all-reduce moves about twice the data, and a broadcast hands every rank
  the owner's bits unchanged.
- ``"gradient"``: the owner keeps it; every step each owner multiplies its own
  blocks with the (identical) gradient and broadcasts the preconditioned part.
  Each rank holds only its blocks' preconditioner (about ``1/W`` of the memory),
  at the price of a gradient-sized broadcast every step. Needs a solver whose
  ``apply`` works block by block (all but conjugate gradient). Shampoo keeps
  each tensor's statistics and roots on its owner only and broadcasts its
  output ``Ĝ ×_i P_i`` (grafting then runs on every rank, on identical inputs).
  Not offered for EKFAC: every rank needs every eigenbasis for its moments.
- ``"replicate"``: every rank refreshes every block (no refresh traffic; for
  cheap refreshes such as diagonals).

Monte-Carlo estimates (``fisher_mc``) draw rank ``r``'s targets with
``fold_in(fold_in(key, step), r)`` from the key every rank passes: ranks never
draw the same samples, and a rank's draws are those one process would make for
that rank's examples with that key. The distributed estimate is therefore the
mean of those per-shard estimates: an unbiased Monte-Carlo estimate of the
same Fisher as one process on the concatenated batch, but not sample for sample
the same, since counter-based draws depend on the batch's layout.

With ``communicator=None``, or a world of size 1, every method reduces to the
single-process code path and gives the same bits. Nothing here runs under
``vmap``: collectives raise there (see :mod:`~fprecond.distributed.collectives`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence, TypeVar

import optree
import torch

from fprecond import random as random_keys
from fprecond._validation import check_choice
from fprecond.curvature.blocks import CurvatureBlock, DiagonalBlock, KroneckerEigenBlock
from fprecond.curvature.matrix import Curvature
from fprecond.distributed.assignment import Assignment, assign, matrix_cost
from fprecond.distributed.collectives import Communicator, all_reduce_mean, all_reduce_sum, broadcast_many
from fprecond.solvers.base import Refreshed, Solver
from fprecond.tree import NAMESPACE, PyTree, pytree_dataclass, static_field, tree_leaves

__all__ = ["DataParallel", "RemoteBlock", "MODES", "tree_cost"]

T = TypeVar("T")
Vector = dict[str, torch.Tensor]
MODES = ("inverse", "gradient", "replicate")


def tree_cost(tree: PyTree) -> float:
    """The refresh cost of a block: :func:`~fprecond.distributed.assignment.matrix_cost`
    summed over its tensor leaves."""
    return sum(matrix_cost(tuple(leaf.shape)) for leaf in tree_leaves(tree) if isinstance(leaf, torch.Tensor))


@pytree_dataclass
class RemoteBlock(CurvatureBlock):
    """A placeholder for a preconditioner block that rank ``owner`` keeps
    (``DataParallel(mode="gradient")``): no tensors, only the covered parameters."""

    names: tuple[str, ...] = static_field()
    param_shapes: tuple[tuple[int, ...], ...] = static_field()
    owner: int = static_field()

    @property
    def shapes(self) -> tuple[tuple[int, ...], ...]:
        return self.param_shapes

    def _elsewhere(self) -> RuntimeError:
        return RuntimeError(f"the preconditioner of {', '.join(self.names)} is kept on rank {self.owner} "
                            "(DataParallel(mode='gradient')); only DataParallel.apply multiplies with it")

    def mvp(self, vector: Vector) -> Vector:
        raise self._elsewhere()

    def dense(self) -> torch.Tensor:
        raise self._elsewhere()

    def trace(self) -> torch.Tensor:
        raise self._elsewhere()

    def damped(self, damping: float | torch.Tensor, pi: bool = False) -> CurvatureBlock:
        raise self._elsewhere()

    def scaled(self, factor: float | torch.Tensor) -> CurvatureBlock:
        raise self._elsewhere()

    def power(self, exponent: float) -> CurvatureBlock:
        raise self._elsewhere()


def _single(curvature: Curvature, index: int) -> Curvature:
    """The curvature restricted to its block ``index``."""
    block = curvature.blocks[index]
    return Curvature((block,), curvature.kind, curvature.structure, block.names, block.shapes)


def _same_layout(a: PyTree, b: PyTree) -> bool:
    leaves_a, spec_a = optree.tree_flatten(a, namespace=NAMESPACE)
    leaves_b, spec_b = optree.tree_flatten(b, namespace=NAMESPACE)
    return spec_a == spec_b and all(x.shape == y.shape and x.dtype == y.dtype for x, y in zip(leaves_a, leaves_b))


@dataclasses.dataclass(frozen=True)
class DataParallel:
    """Statistics averaged and refreshes shared over the ranks of ``communicator``
    (see the module docstring).

    Attributes:
        communicator: the process group's :class:`~fprecond.distributed.Communicator`,
            or None (one process: the single-process code path).
        mode: ``"inverse"``, ``"gradient"`` or ``"replicate"``.

    Example (under ``torchrun``)::

        comm = fprecond.distributed.init_from_env()
        parallel = fprecond.distributed.DataParallel(comm)
        optimizer = fp.named_chain(("all_reduce", fprecond.distributed.all_reduce_gradients(comm)),
                                   ("kfac", fp.kfac(model, distributed=parallel)))
    """

    communicator: Communicator | None
    mode: str = "inverse"

    def __post_init__(self) -> None:
        if self.communicator is not None and not isinstance(self.communicator, Communicator):
            raise TypeError(f"DataParallel: communicator must be a fprecond.distributed.Communicator or None, got "
                            f"{type(self.communicator).__name__}")
        check_choice("DataParallel", "mode", self.mode, MODES)

    @property
    def rank(self) -> int:
        return 0 if self.communicator is None else self.communicator.rank

    @property
    def world_size(self) -> int:
        return 1 if self.communicator is None else self.communicator.world_size

    def assignment(self, blocks: Sequence[PyTree]) -> Assignment:
        """Who refreshes which of ``blocks`` (by :func:`tree_cost`)."""
        return assign([tree_cost(block) for block in blocks], self.world_size)

    # ---- statistics -----------------------------------------------------------------------------
    def reduce(self, curvature: Curvature) -> Curvature:
        """A fresh curvature estimate averaged over ranks (leaf-wise: factor by factor)."""
        return all_reduce_mean(curvature, self.communicator)

    def sampling_key(self, key: torch.Tensor) -> torch.Tensor:
        """This rank's key for Monte-Carlo draws: ``fold_in(key, rank)`` (``key`` itself in one process)."""
        return key if self.world_size == 1 else random_keys.fold_in(key, self.rank)

    # ---- refreshes ------------------------------------------------------------------------------
    def owned(self, prices: Sequence[PyTree]) -> list[bool]:
        """Whether this rank computes item ``i`` of a :meth:`share` with the same ``prices``
        (all True in one process or ``mode="replicate"``)."""
        if self.mode == "replicate" or self.world_size == 1:
            return [True] * len(prices)
        return [owner == self.rank for owner in self.assignment(prices).owners]

    def share(self, compute: Callable[[int], T], templates: Sequence[T], prices: Sequence[PyTree] | None = None
              ) -> list[T]:
        """``[compute(i) for i in range(len(templates))]``, each computed by one rank and
        broadcast to the others (``mode="replicate"`` or one process: computed everywhere).

        ``templates[i]`` has the structure, shapes and dtypes of ``compute(i)`` (e.g. the
        previous refresh's result) and receives item ``i`` on the ranks that do not compute
        it. Item ``i`` is priced by :func:`tree_cost` of ``prices[i]`` (default
        ``templates[i]``; only the shapes are read, so ``meta`` tensors will do): Shampoo
        in ``mode="gradient"`` shares a tensor's preconditioned gradient priced by its
        roots, so that it is computed where those roots are kept. Every rank must call this
        with the same layout of templates and prices, at the same point of the program.
        """
        count = len(templates)
        if prices is not None and len(prices) != count:
            raise ValueError(f"DataParallel.share: {len(prices)} prices for {count} templates")
        if self.mode == "replicate" or self.world_size == 1:
            return [compute(index) for index in range(count)]
        owners = self.assignment(templates if prices is None else prices).owners
        computed: dict[int, Any] = {}
        for index in range(count):
            if owners[index] == self.rank:
                computed[index] = compute(index)
                if not _same_layout(computed[index], templates[index]):
                    raise ValueError(f"DataParallel.share: item {index} came out with another structure, shape or "
                                     "dtype than its template; the others could not receive it")
        per_owner = [(rank, [i for i in range(count) if owners[i] == rank]) for rank in range(self.world_size)]
        per_owner = [(rank, items) for rank, items in per_owner if items]
        pairs = [([computed[i] if rank == self.rank else templates[i] for i in items], rank)
                 for rank, items in per_owner]
        received = broadcast_many(pairs, self.communicator)
        out: list[Any] = [None] * count
        for (_, items), values in zip(per_owner, received):
            for index, value in zip(items, values):
                out[index] = value
        return out

    def keep(self, solver: Solver, preconditioner: Curvature) -> Curvature:
        """What this rank keeps of a preconditioner every rank computed (at ``init``): all of
        it, or in ``mode="gradient"`` its own blocks, the others as :class:`RemoteBlock`."""
        if self.mode == "gradient" and type(solver).apply is not Solver.apply:
            raise ValueError(f"DataParallel(mode='gradient'): {type(solver).__name__} applies its preconditioner to "
                             "all blocks at once, so owners cannot apply their blocks alone; use mode='inverse'")
        if self.mode != "gradient" or self.world_size == 1:
            return preconditioner
        owners = self.assignment(preconditioner.blocks).owners
        blocks = tuple(block if owner == self.rank else RemoteBlock(block.names, block.shapes, owner)
                       for block, owner in zip(preconditioner.blocks, owners))
        return Curvature(blocks, preconditioner.kind, preconditioner.structure, preconditioner.names,
                         preconditioner.shapes)

    def refresh(self, solver: Solver, curvature: Curvature, damping: torch.Tensor | float,
                previous: Curvature) -> Refreshed:
        """``solver.refresh(curvature, damping)``, block by block on the blocks' owners.

        ``previous`` is the last preconditioner (the templates of the blocks received;
        in ``mode="gradient"`` it says who owns what). ``failures`` is the total over
        all ranks, the same everywhere.
        """
        if self.mode == "replicate" or self.world_size == 1:
            return solver.refresh(curvature, damping)
        zero = torch.zeros((), dtype=torch.int64, device=_device(curvature))

        def refresh_block(index: int) -> tuple[CurvatureBlock, torch.Tensor]:
            refreshed = solver.refresh(_single(curvature, index), damping)
            return refreshed.preconditioner.blocks[0], refreshed.failures.to(torch.int64).reshape(())

        if self.mode == "inverse":
            # Blocks whose eigenvalues are at hand (diagonals, EKFAC's eigenbasis blocks) are
            # refreshed elementwise: cheaper everywhere than sending them.
            local = [index for index, block in enumerate(curvature.blocks) if _refreshed_in_place(block)]
            sent = [index for index in range(len(curvature.blocks)) if index not in local]
            results: dict[int, tuple[CurvatureBlock, torch.Tensor]] = {index: refresh_block(index) for index in local}
            if sent:
                shared = self.share(lambda item: refresh_block(sent[item]),
                                    [(previous.blocks[index], zero) for index in sent])
                results.update(zip(sent, shared))
            blocks = tuple(results[index][0] for index in range(len(curvature.blocks)))
            failures = torch.stack([results[index][1] for index in range(len(curvature.blocks))]).sum()
        else:
            kept: list[CurvatureBlock] = []
            own_failures = zero
            for index, block in enumerate(previous.blocks):
                if isinstance(block, RemoteBlock):
                    kept.append(block)
                else:
                    fresh, failed = refresh_block(index)
                    kept.append(fresh)
                    own_failures = own_failures + failed
            blocks = tuple(kept)
            failures = all_reduce_sum(own_failures, self.communicator)
        return Refreshed(Curvature(blocks, curvature.kind, curvature.structure, curvature.names, curvature.shapes),
                         failures)

    def apply(self, solver: Solver, preconditioner: Curvature, vector: Vector) -> Vector:
        """``solver.apply(preconditioner, vector)``; in ``mode="gradient"`` each owner applies
        its blocks and broadcasts the result."""
        if self.mode != "gradient" or self.world_size == 1:
            return solver.apply(preconditioner, vector)
        mine = [block for block in preconditioner.blocks if not isinstance(block, RemoteBlock)]
        products: Vector = {}
        if mine:
            names = tuple(name for block in mine for name in block.names)
            shapes = tuple(shape for block in mine for shape in block.shapes)
            own = Curvature(tuple(mine), preconditioner.kind, preconditioner.structure, names, shapes)
            products = solver.apply(own, {name: vector[name] for name in names})
        owned_names: dict[int, list[str]] = {}
        for block in preconditioner.blocks:
            owner = block.owner if isinstance(block, RemoteBlock) else self.rank
            owned_names.setdefault(owner, []).extend(block.names)
        pairs = [({name: products[name] if owner == self.rank else vector[name] for name in names}, owner)
                 for owner, names in sorted(owned_names.items())]
        out: Vector = {}
        for part in broadcast_many(pairs, self.communicator):
            out.update(part)
        return {name: out[name] for name in preconditioner.names}


def _refreshed_in_place(block: CurvatureBlock) -> bool:
    """Whether refreshing ``block`` is elementwise work on its eigenvalues (no factorisation)."""
    return isinstance(block, (DiagonalBlock, KroneckerEigenBlock))


def _device(curvature: Curvature) -> torch.device:
    leaves = tree_leaves(curvature)
    return leaves[0].device if leaves else torch.device("cpu")
