"""Data-parallel training with 2 and 4 gloo processes equals one process on the concatenated
batch (float64), from one launch of 4 processes (see ``workers.data_parallel_suite``)."""

from __future__ import annotations

import pytest
import torch

import fprecond.distributed as fpd
from fprecond.curvature.eigenbasis import eigenbasis_moments
from fprecond.curvature.estimate import BlockBuilder, estimate
from fprecond.solvers import cholesky
from fprecond.tree import tree_leaves
from tests.distributed import workers

WORLD = 4


@pytest.fixture(scope="module")
def suite():
    return fpd.launch(workers.data_parallel_suite, WORLD, timeout=300.0, collective_timeout=120.0)


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("name", list(workers.RECIPES))
def test_training_matches_one_process_on_the_concatenated_batch(suite, name, world_size):
    reference = workers.train(name, None)  # 4 steps on the whole batches of 8
    for rank in range(WORLD):
        params = suite[rank][f"{name}/{world_size}"]
        assert set(params) == set(reference)
        for key in reference:
            error = float((params[key] - reference[key]).abs().max())
            assert error <= 1e-6, f"{name}, {world_size} ranks, rank {rank}, {key}: {error:.2e}"
            # Every rank applied the same update, bit for bit (the two pairs of a 2-rank run too).
            assert torch.equal(params[key], suite[0][f"{name}/{world_size}"][key])
    moved = max(float((suite[0][f"{name}/{world_size}"][k] - p).abs().max())
                for k, p in workers.problem()[1].items())
    assert moved > 1e-2  # the comparison is not between untrained parameters


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("method, blocks", [("kfac", 2), ("shampoo", 4)])
def test_gradient_mode_keeps_each_block_on_its_owner_only(suite, world_size, method, blocks):
    # K-FAC: the two Linear layers' inverses. Shampoo: one root per tensor (its dimensions are
    # merged, 6 x 4 -> 24), counted with the statistics, which a rank keeps only for its roots.
    held = [suite[rank][f"{method}_gradient/{world_size}/held"] for rank in range(WORLD)]
    members = range(world_size) if world_size == WORLD else range(2)  # one pair is enough
    assert sum(held[rank] for rank in members) == blocks  # each block on exactly one rank
    assert all(held[rank] < blocks for rank in range(WORLD))
    assert all(suite[rank][f"{method}_inverse/{world_size}/held"] == blocks for rank in range(WORLD))


@pytest.mark.parametrize("world_size", [2, 4])
def test_ekfac_shares_each_eigendecomposition_and_averages_factors_and_moments(suite, world_size):
    members = range(world_size) if world_size == WORLD else range(2)
    # basis_every=2 over 4 estimates: new eigenbases at estimates 0 and 2, one call each,
    # in which each of the two layers is decomposed by exactly one rank.
    calls = [suite[rank][f"ekfac_inverse/{world_size}/computed"] for rank in members]
    assert all(len(rank_calls) == 2 for rank_calls in calls)
    for call in range(2):
        assert sorted(item for rank_calls in calls for item in rank_calls[call]) == [0, 1]
    # The running factors and the EKFAC curvature (moments in the eigenbasis) are those of
    # one process on the concatenated batches.
    _, state = workers.train_with_state("ekfac_inverse", None)
    expected = workers.ekfac_statistics(state)
    for rank in range(WORLD):
        got = suite[rank][f"ekfac_inverse/{world_size}/statistics"]
        assert len(got) == len(expected) == 8  # A, G, damping per layer, then one dense block per layer
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_shampoo_shares_each_root_refresh_and_in_gradient_mode_each_product(suite):
    # Roots refreshed at steps 2 and 4: each tensor's on one rank. In gradient mode every
    # step has one exchange of the outputs (with the rejection counts), each tensor's from its owner.
    calls = [suite[rank]["shampoo_inverse/4/computed"] for rank in range(WORLD)]
    assert all(len(rank_calls) == 2 for rank_calls in calls)
    for call in range(2):
        assert sorted(item for rank_calls in calls for item in rank_calls[call]) == [0, 1, 2, 3]
    calls = [suite[rank]["shampoo_gradient/4/computed"] for rank in range(WORLD)]
    assert all(len(rank_calls) == workers.STEPS for rank_calls in calls)
    for call in range(workers.STEPS):
        assert sorted(item for rank_calls in calls for item in rank_calls[call]) == [0, 1, 2, 3]


def test_fisher_mc_averages_the_shards_own_samples(suite):
    # Rank r draws with fold_in(fold_in(key, step), r): the distributed estimate is the mean
    # of one process's estimates on the shards with those keys.
    expected = tree_leaves(workers.fisher_mc_reference(WORLD))
    for rank in range(WORLD):
        got = suite[rank]["fisher_mc/4"]
        assert len(got) == len(expected)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
        assert all(torch.equal(a, b) for a, b in zip(got, suite[0]["fisher_mc/4"]))  # same on every rank


def test_a_sharded_refresh_computes_each_block_once_and_gives_every_rank_the_single_process_result(suite):
    model, params, batches = workers.problem()
    curvature = estimate(model, params, batches[0], kind="fisher", structure="kron")
    single = cholesky().refresh(curvature, torch.tensor(1e-3, dtype=torch.float64))
    refreshed = [suite[rank]["refresh/4"] for rank in range(WORLD)]
    seen = [name for result in refreshed for name in result["seen"]]
    assert sorted(seen) == sorted(block.names[0] for block in curvature.blocks)  # each block on one rank only
    assert sum(1 for result in refreshed if result["seen"]) == min(WORLD, len(curvature.blocks))
    for result in refreshed:
        leaves = result["preconditioner"]
        assert len(leaves) == len(tree_leaves(single.preconditioner))
        # The owners' bits, broadcast: exactly what one process computes.
        assert all(torch.equal(a, b) for a, b in zip(leaves, tree_leaves(single.preconditioner)))
        assert int(result["failures"]) == int(single.failures)


def test_bucketed_collectives_and_the_consistency_check(suite):
    for rank in range(WORLD):
        out = suite[rank]["collectives"]
        mean = out["mean"]  # ranks 0..3 contributed rank-shifted values: their mean is 1.5
        torch.testing.assert_close(mean["a"], torch.arange(5, dtype=torch.float64) + 1.5, rtol=0, atol=0)
        assert mean["b"].dtype == torch.float32 and torch.equal(mean["b"], torch.full((2, 3), 1.5, dtype=torch.float32))
        assert float(mean["c"][0]) == 3.0 and torch.equal(mean["c"][1], torch.full((40,), 1.5, dtype=torch.float32))
        assert torch.equal(out["sum"]["n"], torch.tensor([6, 4]))
        sent = out["broadcast"]  # rank 1's tree
        assert torch.equal(sent["a"], torch.arange(5, dtype=torch.float64) + 1)
        assert torch.equal(sent["b"], torch.ones(2, 3, dtype=torch.float32)) and float(sent["c"][0]) == 2.0
        assert "differs between ranks" in out["check"] and "'different'" in out["check"]


@pytest.mark.parametrize("kind", ["fisher", "ggn", "empirical_fisher"])
def test_eigenbasis_moments_of_the_shards_average_to_those_of_the_concatenated_batch(kind):
    # Why averaging EKFAC's moments over ranks is exact: the output gradients carry the mean
    # loss's 1/sqrt(N), so the moments s = sum_n (Q_G^T g_n a_n^T Q_A)^2 are a mean over examples.
    model, params, batches = workers.problem()
    inputs, targets = batches[0]
    generator = torch.Generator().manual_seed(3)

    def orthonormal(size: int) -> torch.Tensor:
        return torch.linalg.qr(torch.randn(1, size, size, generator=generator, dtype=torch.float64))[0]

    bases = {layer.name: None for layer in model.layers}

    def moments(batch):
        builder = BlockBuilder(model, params, batch, kind, "expand", None, 1, "example", None)
        out = []
        for layer in model.layers:
            layer_inputs, grads = builder.layer_statistics(layer)
            if bases[layer.name] is None:
                bases[layer.name] = (orthonormal(layer_inputs.shape[-1]), orthonormal(grads.shape[-1]))
            out.append(eigenbasis_moments(layer_inputs, grads, *bases[layer.name]))
        return out

    whole = moments((inputs, targets))
    size = workers.GLOBAL_BATCH // WORLD
    shards = [moments((inputs[r * size:(r + 1) * size], targets[r * size:(r + 1) * size])) for r in range(WORLD)]
    for layer, expected in enumerate(whole):
        mean = sum(shard[layer] for shard in shards) / WORLD
        torch.testing.assert_close(mean, expected, rtol=1e-12, atol=1e-15)
        assert float(expected.abs().max()) > 1e-2
