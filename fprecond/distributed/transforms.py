"""The communicating links of a data-parallel chain, and what each process feeds it.

A data-parallel step on ``W`` processes, each with its own ``N/W`` examples::

    optimizer = fp.named_chain(("all_reduce", all_reduce_gradients(comm)),      # gradients: mean over ranks
                               ("kfac", fp.kfac(model, distributed=DataParallel(comm))))
    batch = shard_batch(global_batch, comm)                                     # this rank's examples
    loss, grads = fp.loss_and_grads(model, params, batch)
    updates, state = optimizer.update(grads, state, params, batch=batch, key=fp.random.key(seed))

With a mean loss the mean of the ranks' gradients on equal-size shards is the
gradient on the whole batch, so every rank applies the update one process
would apply. Every rank passes the same ``key``: schedules and random choices
that depend on it stay in lockstep (recipes fold the step count into it
themselves; :func:`step_key` does the same for code of one's own), and
:class:`~fprecond.distributed.DataParallel` folds the rank in where ranks must
draw different samples.
"""

from __future__ import annotations

from typing import Any

import torch

from fprecond import random as random_keys
from fprecond.base import EmptyState, GradientTransformation, Params, Updates
from fprecond.distributed.collectives import Communicator, all_reduce_mean, broadcast

__all__ = ["all_reduce_gradients", "broadcast_parameters", "shard_batch", "step_key"]


def all_reduce_gradients(communicator: Communicator | None) -> GradientTransformation:
    """A transform averaging the gradient over the processes of ``communicator``.

    ``update`` returns the mean over ranks of ``updates`` (bucketed all-reduces, see
    :func:`~fprecond.distributed.all_reduce_mean`); the state is empty. Put it first in
    the chain, so that every later link sees the gradient of the whole batch and
    every rank's state stays the same. With ``None`` it is the identity. It cannot
    run under ``vmap`` (collectives raise there).

    Do not combine it with ``torch.nn.parallel.DistributedDataParallel``: fprecond
    takes gradients with ``torch.func``, which DDP's hooks do not see, so this link
    is the only all-reduce (and :func:`fprecond.model` rejects a DDP-wrapped module).
    """
    if communicator is not None and not isinstance(communicator, Communicator):
        raise TypeError(f"all_reduce_gradients: communicator must be a Communicator or None, got "
                        f"{type(communicator).__name__}")

    def init(params: Params) -> EmptyState:
        del params
        return EmptyState()

    def update(updates: Updates, state: EmptyState, params: Params | None = None, **extra: Any):
        del params, extra
        return all_reduce_mean(updates, communicator), state

    return GradientTransformation(init, update)


def broadcast_parameters(params: Params, communicator: Communicator | None, src: int = 0) -> Params:
    """Rank ``src``'s parameters on every rank (as DDP does at construction), so that all
    ranks start from the same point; the other ranks' values are only templates."""
    return broadcast(params, src, communicator)


def shard_batch(batch: Any, communicator: Communicator | None) -> Any:
    """This rank's equal share of ``batch`` (a tensor or a tuple/list of tensors sharing
    their first dimension): examples ``[r·n, (r+1)·n)`` with ``n = N / W``.

    The shards of ranks ``0 .. W-1``, concatenated in order, are ``batch``. Equal sizes
    are required: averaging per-rank means equals the mean over the whole batch only
    then. ``None``: ``batch`` itself.
    """
    if communicator is None:
        return batch
    parts = list(batch) if isinstance(batch, (tuple, list)) else [batch]
    if not parts or not all(isinstance(part, torch.Tensor) and part.dim() > 0 for part in parts):
        raise TypeError("shard_batch: batch must be a tensor or a tuple of tensors with a leading example dimension")
    total = parts[0].shape[0]
    if any(part.shape[0] != total for part in parts):
        raise ValueError(f"shard_batch: the parts of the batch have different numbers of examples "
                         f"{[part.shape[0] for part in parts]}")
    world = communicator.world_size
    if total % world:
        raise ValueError(f"shard_batch: {total} examples do not split into {world} equal shards; use a batch size "
                         "divisible by the world size (per-rank means average to the batch mean only for equal "
                         "shards)")
    size = total // world
    shards = [part[communicator.rank * size:(communicator.rank + 1) * size] for part in parts]
    if isinstance(batch, torch.Tensor):
        return shards[0]
    return type(batch)(shards) if isinstance(batch, tuple) else shards


def step_key(seed: int | torch.Tensor, step: int | torch.Tensor) -> torch.Tensor:
    """The key of step ``step`` of a run with seed ``seed``: ``fold_in(key(seed), step)``.

    Every rank computes the same key from the shared seed and step, without
    communicating, so random choices made with it (Monte-Carlo targets, random
    preconditioner schedules, Hessian probes) agree across ranks.
    """
    return random_keys.fold_in(random_keys.key(seed), step)
