"""Shampoo's data-parallel ``mode="gradient"``: each process keeps the statistics and roots
of the tensors it owns, preconditions them, and broadcasts the outputs.

Ownership comes from :class:`fprecond.distributed.DataParallel` (``owned`` and ``share``
hooks), priced by the shapes of each tensor's roots; every process computes the same
assignment from static shapes. See :func:`fprecond.optimizers.shampoo.scale_by_shampoo`.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from fprecond.lazy import concrete, lazy_where
from fprecond.optimizers._blocking import BlockPlan
from fprecond.precondition import DataParallelism

__all__ = ["Blocks", "prices", "owned_names", "owners_exchange"]

Blocks = tuple[tuple[torch.Tensor, ...], ...]
"""Per block group, per mode: a ``(B, d, d)`` tensor."""


def prices(plans: list[BlockPlan], like: torch.Tensor) -> list[Blocks]:
    """The roots' shapes on the ``meta`` device: what a tensor's share of the work costs."""
    return [tuple(tuple(torch.empty(group.num_blocks, group.block_shape[m], group.block_shape[m],
                                    dtype=like.dtype, device="meta") for m in group.modes)
                  for group in plan.groups) for plan in plans]


def owned_names(distributed: DataParallelism, names: list[str], plans: list[BlockPlan],
                like: torch.Tensor) -> list[str]:
    """The preconditioned tensors this process owns."""
    shared = [(name, plan) for name, plan in zip(names, plans) if plan.preconditioned]
    flags = distributed.owned(prices([plan for _, plan in shared], like))  # type: ignore[attr-defined]
    return [name for (name, _), own in zip(shared, flags) if own]


def owners_exchange(distributed: DataParallelism, step: torch.Tensor, start: int, names: list[str],
                    plans: list[BlockPlan], directions: list[torch.Tensor], accepted: dict[str, Any],
                    new_roots: Callable[[str | None], tuple[dict[str, Blocks], torch.Tensor]],
                    apply_roots: Callable[[int, Blocks], torch.Tensor], old_roots: dict[str, Blocks],
                    root_due: torch.Tensor) -> tuple[dict[str, Blocks], list[torch.Tensor], torch.Tensor]:
    """Refresh the own roots (when ``root_due``), apply them, and exchange the outputs.

    ``new_roots(name)`` refreshes one tensor's roots (a no-op for others' tensors, whose
    statistics are ``()``); ``apply_roots(index, roots)`` preconditions tensor ``index``;
    before ``start`` the output is the (filtered) gradient itself. Returns the roots (own
    ones; ``()`` for the others'), every tensor's output, and the number of statistics and
    roots rejected on all processes together.
    """
    zero = torch.zeros_like(step)
    like = directions[0]

    def own_roots() -> tuple[dict[str, Blocks], dict[str, torch.Tensor]]:
        fresh: dict[str, Blocks] = {}
        counts: dict[str, torch.Tensor] = {}
        for name in names:  # others' tensors have () statistics: nothing is computed for them
            roots_of, counts[name] = new_roots(name)
            fresh[name] = roots_of[name]
        return fresh, counts

    roots, root_rejected = lazy_where(root_due, own_roots, (old_roots, {name: zero for name in names}))
    # Unpreconditioned tensors have no statistics and no roots: their output is Ĝ everywhere.
    shared = [index for index, plan in enumerate(plans) if plan.preconditioned]

    def rejected_of(index: int) -> torch.Tensor:
        """What the owner rejected for this tensor (statistics and roots); it travels with the output."""
        flags = [ok for group in accepted[names[index]] for ok in group]
        statistics_count = sum(((~ok).sum().to(zero.dtype) for ok in flags), zero)
        return statistics_count + root_rejected[names[index]]

    pricing = prices([plans[index] for index in shared], like)
    started = concrete(step >= start)
    outputs = list(directions)
    share = distributed.share  # type: ignore[attr-defined]
    if started is not None and not bool(started.any()):
        # Before the start the output is Ĝ, known everywhere: only the counts travel.
        counts = share(lambda item: rejected_of(shared[item]), [zero] * len(shared), pricing)
    else:
        def output_of(item: int) -> tuple[torch.Tensor, torch.Tensor]:
            index = shared[item]
            output = lazy_where(step >= start, lambda: apply_roots(index, roots[names[index]]), directions[index])
            return output, rejected_of(index)

        results = share(output_of, [(directions[index], zero) for index in shared], pricing)
        for index, (output, _) in zip(shared, results):
            outputs[index] = output
        counts = [count for _, count in results]
    return roots, outputs, sum(counts, zero)
