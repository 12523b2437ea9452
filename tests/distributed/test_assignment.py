"""The refresh cost model and the longest-first assignment (pure Python, no processes)."""

from __future__ import annotations

import itertools

import pytest

from fprecond.distributed.assignment import assign, lpt_bound, matrix_cost


def optimum(costs: list[float], world_size: int) -> float:
    """The least possible busiest-rank load, by trying every assignment."""
    best = float("inf")
    for owners in itertools.product(range(world_size), repeat=len(costs)):
        loads = [0.0] * world_size
        for cost, owner in zip(costs, owners):
            loads[owner] += cost
        best = min(best, max(loads))
    return best


def kfac_layer_cost(fan_in: int, fan_out: int) -> float:
    """A Linear layer's K-FAC refresh: inverses of A ((S+1) x (S+1)) and G (O x O)."""
    return matrix_cost((1, fan_in + 1, fan_in + 1)) + matrix_cost((1, fan_out, fan_out)) + matrix_cost(())


def test_matrix_cost_is_cubic_for_square_matrices_and_linear_otherwise():
    assert matrix_cost((10, 10)) == 1000.0
    assert matrix_cost((3, 4, 5, 5)) == 12 * 125.0  # a batch of 12 matrices
    assert matrix_cost((7, 5)) == 35.0  # not square: linear in its size
    assert matrix_cost((6,)) == 6.0
    assert matrix_cost(()) == 1.0


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 7])
def test_every_block_is_assigned_exactly_once_and_loads_add_up(world_size):
    costs = [kfac_layer_cost(i, o) for i, o in [(784, 512), (512, 512), (512, 10), (64, 64), (3, 3), (1024, 1024)]]
    result = assign(costs, world_size)
    assert len(result.owners) == len(costs)
    assert all(0 <= owner < world_size for owner in result.owners)
    owned = sorted(index for rank in range(world_size) for index in result.owned_by(rank))
    assert owned == list(range(len(costs)))  # a partition: each block once
    for rank in range(world_size):
        assert result.loads[rank] == pytest.approx(sum(costs[i] for i in result.owned_by(rank)), rel=1e-12)
    assert result.imbalance >= 1.0


def test_the_assignment_is_deterministic_and_longest_first():
    costs = [1.0, 5.0, 5.0, 3.0, 2.0, 2.0]
    first = assign(costs, 3)
    assert first == assign(list(costs), 3)  # what every process computes without talking
    # Longest first: 5 -> rank 0, 5 -> rank 1, 3 -> rank 2, 2 -> rank 2, 2 -> rank 0, 1 -> rank 1.
    assert first.owners == (1, 0, 1, 2, 2, 0)
    assert first.loads == (7.0, 6.0, 5.0)


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_skewed_sizes_are_balanced_within_grahams_bound_of_the_optimum(world_size):
    # Layer widths spanning two orders of magnitude: costs spanning six.
    widths = [(2048, 2048), (1024, 1024), (1024, 512), (512, 512), (512, 256), (256, 10), (128, 128), (64, 10)]
    costs = [kfac_layer_cost(i, o) for i, o in widths]
    result = assign(costs, world_size)
    best = optimum(costs, world_size)
    assert max(result.loads) <= lpt_bound(world_size) * best * (1 + 1e-12)
    # The one 2048-wide layer dominates: nothing can beat it, and LPT reaches it.
    assert max(result.loads) == pytest.approx(result.lower_bound, rel=1e-12)


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_many_blocks_are_balanced_to_within_ten_percent_of_the_mean_or_the_largest_block(world_size):
    # Shampoo-like: many blocks of sizes 32..1024, several of each (2 ranks: 2.4% above the
    # mean; 3 and 4 ranks: the two 1024-blocks set the load, which LPT then matches).
    costs = [matrix_cost((d, d)) for d in (1024, 1024, 512, 512, 512, 256, 256, 256, 256, 128, 128, 64, 32, 32)]
    result = assign(costs, world_size)
    mean = sum(costs) / world_size
    assert max(result.loads) <= max(1.1 * mean, max(costs)) * (1 + 1e-12)


def test_more_ranks_than_blocks_leaves_some_ranks_idle():
    result = assign([8.0, 1.0], 4)
    assert result.owners == (0, 1)
    assert result.loads == (8.0, 1.0, 0.0, 0.0)
    assert assign([], 3).owners == ()


@pytest.mark.parametrize("world_size", [0, -1, 1.5, True])
def test_bad_world_sizes_are_rejected(world_size):
    with pytest.raises(ValueError, match="world_size"):
        assign([1.0], world_size)


@pytest.mark.parametrize("cost", [-1.0, float("nan"), float("inf")])
def test_bad_costs_are_rejected_naming_the_block(cost):
    with pytest.raises(ValueError, match=r"costs\[1\]"):
        assign([1.0, cost], 2)
