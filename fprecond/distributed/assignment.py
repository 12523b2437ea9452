"""Which process refreshes which preconditioner block: a cost model and a greedy
longest-first assignment (pure Python, no processes needed).

The expensive part of a preconditioner refresh is one factorisation per square
matrix: a Cholesky inverse, an inverse root or an eigendecomposition of an
``n x n`` matrix costs ``Θ(n³)`` flops. A block (a K-FAC layer, a Shampoo
parameter) holds a few such matrices, possibly batched, and vectors whose cost
is linear in their size. :func:`matrix_cost` prices one tensor shape that way;
a block's cost is the sum over its tensors.

:func:`assign` then gives each block to one of ``world_size`` processes by the
LPT rule (longest processing time first; Graham 1969): blocks in decreasing
cost, each to the process with the least load so far. The busiest process's
load is at most ``(4/3 − 1/(3W))`` times the best possible assignment's
(Graham's bound, :data:`LPT_BOUND`), and at most the mean load plus the
smallest block on that process. Ties are broken by block index and rank, so
every process computes the same assignment from the same costs without
communicating.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

__all__ = ["Assignment", "assign", "matrix_cost", "lpt_bound"]


def lpt_bound(world_size: int) -> float:
    """Graham's bound on LPT's makespan relative to the optimum: ``4/3 − 1/(3W)``."""
    return 4.0 / 3.0 - 1.0 / (3.0 * world_size)


def matrix_cost(shape: Sequence[int]) -> float:
    """The refresh cost of a tensor of ``shape``: ``B · n³`` for a batch of ``B`` square
    ``n x n`` matrices (shape ``(..., n, n)``, ``B`` the product of the leading sizes),
    its number of entries otherwise (vectors, scalars: a cost linear in their size).
    """
    dims = [int(d) for d in shape]
    if len(dims) >= 2 and dims[-1] == dims[-2]:
        return float(math.prod(dims[:-2])) * float(dims[-1]) ** 3
    return float(math.prod(dims))


@dataclasses.dataclass(frozen=True)
class Assignment:
    """The owner of each block and the resulting loads.

    Attributes:
        owners: ``owners[i]`` is the rank that refreshes block ``i``.
        loads: the summed cost of each rank's blocks (length ``world_size``).
        costs: the costs the assignment was made from.
    """

    owners: tuple[int, ...]
    loads: tuple[float, ...]
    costs: tuple[float, ...]

    @property
    def world_size(self) -> int:
        return len(self.loads)

    def owned_by(self, rank: int) -> tuple[int, ...]:
        """The indices of the blocks ``rank`` refreshes, in increasing order."""
        return tuple(index for index, owner in enumerate(self.owners) if owner == rank)

    @property
    def imbalance(self) -> float:
        """The busiest rank's load over the mean load (1 is perfect; 1 when all costs are 0)."""
        total = sum(self.loads)
        return max(self.loads) * self.world_size / total if total > 0 else 1.0

    @property
    def lower_bound(self) -> float:
        """No assignment can do better than ``max(mean load, largest block)``."""
        return max(sum(self.costs) / self.world_size, max(self.costs, default=0.0))


def assign(costs: Sequence[float], world_size: int) -> Assignment:
    """Assign blocks of the given ``costs`` to ``world_size`` ranks, longest first.

    Args:
        costs: one non-negative finite cost per block (e.g. from :func:`matrix_cost`).
        world_size: the number of ranks, ``>= 1``.

    Returns:
        An :class:`Assignment` covering every block exactly once. The same costs give
        the same assignment in every process.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"assign: world_size must be an int >= 1, got {world_size!r}")
    values = tuple(float(c) for c in costs)
    for index, value in enumerate(values):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"assign: costs[{index}] must be finite and >= 0, got {value}")
    owners = [0] * len(values)
    loads = [0.0] * world_size
    for index in sorted(range(len(values)), key=lambda i: (-values[i], i)):
        # The least-loaded rank; the lowest rank among equals, so that every process agrees.
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owners[index] = rank
        loads[rank] += values[index]
    return Assignment(tuple(owners), tuple(loads), values)
