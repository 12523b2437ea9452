"""Data-parallel training on ``torch.distributed`` (gloo on CPU, NCCL on GPU).

- :mod:`~fprecond.distributed.collectives`: a :class:`Communicator` passed
  explicitly, bucketed all-reduces and broadcasts of pytrees, failure
  propagation (:class:`PeerFailure`), a cross-rank consistency check;
- :mod:`~fprecond.distributed.transforms`: :func:`all_reduce_gradients` (the
  first link of a data-parallel chain), :func:`shard_batch`, :func:`step_key`;
- :mod:`~fprecond.distributed.sharding`: :class:`DataParallel`, the
  ``distributed=`` argument of ``precondition``/``kfac``/``natural_gradient``
  and ``shampoo``: statistics averaged, refreshes shared among ranks;
- :mod:`~fprecond.distributed.assignment`: the cost model and the greedy
  longest-first assignment of refresh work (pure Python);
- :mod:`~fprecond.distributed.processes`: :func:`init_from_env` under ``torchrun``,
  :func:`launch` for local multi-process runs (tests, benchmarks).
"""

from fprecond.distributed.assignment import Assignment, assign, lpt_bound, matrix_cost
from fprecond.distributed.collectives import (
    DEFAULT_BUCKET_BYTES,
    Communicator,
    PeerFailure,
    all_reduce_mean,
    all_reduce_sum,
    broadcast,
    check_in_sync,
    propagate_failures,
)
from fprecond.distributed.processes import LaunchError, init_from_env, launch
from fprecond.distributed.sharding import MODES, DataParallel, RemoteBlock, tree_cost
from fprecond.distributed.transforms import all_reduce_gradients, broadcast_parameters, shard_batch, step_key

__all__ = [
    "Assignment",
    "Communicator",
    "DEFAULT_BUCKET_BYTES",
    "DataParallel",
    "LaunchError",
    "MODES",
    "PeerFailure",
    "RemoteBlock",
    "all_reduce_gradients",
    "all_reduce_mean",
    "all_reduce_sum",
    "assign",
    "broadcast",
    "broadcast_parameters",
    "check_in_sync",
    "init_from_env",
    "launch",
    "lpt_bound",
    "matrix_cost",
    "propagate_failures",
    "shard_batch",
    "step_key",
    "tree_cost",
]
