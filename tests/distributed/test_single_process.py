"""Data-parallel code in one process: ``None`` or a world of size 1 is the single-process code
bit for bit; what cannot work (vmap, DDP, lowrank, EKFAC in gradient mode, ...) is refused clearly."""

from __future__ import annotations

import os
import types

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.func import vmap

import fprecond as fp
import fprecond.distributed as fpd
import fprecond.distributed.processes as processes
from fprecond.curvature.eigenbasis import EigenbasisEstimator
from fprecond.distributed.collectives import plan_buckets
from tests.distributed import workers
from tests.helpers import assert_ensemble_matches_loop


@pytest.fixture(scope="module")
def world_of_one(tmp_path_factory):
    """A gloo group of this process alone, and its communicator."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    store = dist.FileStore(str(tmp_path_factory.mktemp("store") / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield fpd.Communicator.from_group(store=store)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("name", list(workers.RECIPES))
def test_none_and_a_world_of_one_give_the_single_process_results_bit_for_bit(world_of_one, name):
    plain = workers.train(name, None)
    chained = workers.train(name, world_of_one)  # all_reduce_gradients + DataParallel(comm, mode)
    model, params, batches = workers.problem()
    make, mode = workers.RECIPES[name]
    optimizer = make(model, fpd.DataParallel(None, mode))
    state = optimizer.init(params)
    for batch in batches:
        _, grads = fp.loss_and_grads(model, params, batch)
        updates, state = optimizer.update(grads, state, params, batch=batch, key=fp.random.key(workers.SEED))
        params = fp.apply_updates(params, updates)
    for key in plain:
        assert torch.equal(chained[key], plain[key]) and torch.equal(params[key], plain[key])


def test_collectives_of_one_process_return_their_input(world_of_one):
    tree = {"w": torch.randn(3, 2), "b": torch.arange(4.0)}
    for comm in (None, world_of_one):
        assert fpd.all_reduce_mean(tree, comm) is tree
        assert fpd.all_reduce_sum(tree, comm) is tree
        assert fpd.broadcast(tree, 0, comm) is tree
        fpd.check_in_sync(tree, comm)
    with pytest.raises(TypeError, match="floating point"):
        fpd.all_reduce_mean({"count": torch.tensor(3)}, world_of_one)
    with pytest.raises(ValueError, match="src"):
        fpd.broadcast(tree, 1, world_of_one)


def test_collectives_refuse_to_run_under_vmap(world_of_one):
    model, params, batches = workers.problem()
    members = workers.problem()[1], {k: v + 0.01 for k, v in params.items()}
    optimizer = fp.named_chain(("all_reduce", fpd.all_reduce_gradients(world_of_one)),
                               ("kfac", workers.kfac(model)))
    stacked = {k: torch.stack([m[k] for m in members]) for k in params}
    state = vmap(optimizer.init)(stacked)
    grads = vmap(lambda p: fp.loss_and_grads(model, p, batches[0])[1])(stacked)
    with pytest.raises(RuntimeError, match="cannot run under torch.func transforms"):
        vmap(lambda g, s, p: optimizer.update(g, s, p, batch=batches[0]))(grads, state, stacked)
    recipe = workers.kfac(model, fpd.DataParallel(world_of_one))
    with pytest.raises(RuntimeError, match="cannot run under torch.func transforms"):
        vmap(lambda g, s, p: recipe.update(g, s, p, batch=batches[0]))(grads, vmap(recipe.init)(stacked), stacked)


@pytest.mark.parametrize("method", ["kfac", "shampoo"])
def test_without_a_communicator_the_hooks_keep_vmap_equal_to_a_loop(method):
    model, params, batches = workers.problem()
    members = [params, {k: v * 1.1 for k, v in params.items()}, {k: v * 0.9 for k, v in params.items()}]
    parallel = fpd.DataParallel(None, "gradient")
    # Shampoo: step 1 before the start, step 2 its first roots; epsilon 1e-3 rather than the
    # workers' 1e-8, whose roots of singular statistics would differ by ~1e-7 under vmap as
    # they do without distributed= (conditioning, not the hooks).
    optimizer = workers.kfac(model, parallel) if method == "kfac" else \
        fp.shampoo(learning_rate=0.05, epsilon=1e-3, precondition_frequency=2, start_preconditioning_step=2,
                   distributed=parallel)
    assert_ensemble_matches_loop(model, optimizer, members, batches[0], steps=2)


def test_ddp_and_data_parallel_wrappers_are_refused_with_what_to_do(world_of_one):
    module = nn.Sequential(nn.Linear(3, 2))
    for wrapped in (nn.parallel.DistributedDataParallel(module), nn.DataParallel(module)):
        with pytest.raises(TypeError, match=r"pass the plain module .*fprecond.model\(wrapped.module, loss\).*"
                                            r"all_reduce_gradients"):
            fp.model(wrapped, fp.losses.cross_entropy())
    assert fp.model(module, fp.losses.cross_entropy()).param_names == ("0.weight", "0.bias")


def test_what_cannot_be_shared_is_refused_at_construction():
    model, _, _ = workers.problem()
    with pytest.raises(TypeError, match="Communicator or None"):
        fpd.DataParallel("world")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mode must be one of 'inverse', 'gradient', 'replicate'"):
        fpd.DataParallel(None, "shards")
    parallel = fpd.DataParallel(None)
    with pytest.raises(TypeError, match="needs a CurvatureEstimator or an EigenbasisEstimator"):
        lookalike = types.SimpleNamespace(init=lambda params: None, update=lambda *args: None, kind="ggn")
        fp.precondition(lookalike, distributed=parallel)  # type: ignore[arg-type]
    fp.precondition(EigenbasisEstimator(model), distributed=parallel)  # shared in mode "inverse"
    with pytest.raises(ValueError, match="mode 'gradient' is not offered for EKFAC: every process needs every "
                                         "layer's eigenbasis"):
        fp.ekfac(model, distributed=fpd.DataParallel(None, "gradient"))
    lowrank = fp.curvature.estimator(model, kind="empirical_fisher", structure="lowrank", decay=0.0,
                                     example_inputs=torch.zeros(4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="cannot average 'lowrank' estimates"):
        fp.precondition(lowrank, distributed=parallel)
    with pytest.raises(TypeError, match="must offer reduce"):
        fp.precondition(fp.curvature.estimator(model, kind="ggn", structure="kron"), distributed=object())
    with pytest.raises(TypeError, match="mode 'gradient' needs owned"):
        fp.shampoo(distributed=types.SimpleNamespace(mode="gradient"))
    with pytest.raises(ValueError, match="1 prices for 2 templates"):
        parallel.share(lambda index: index, [0, 0], prices=[0])
    cg = fp.precondition(fp.curvature.estimator(model, kind="ggn", structure="kron"), "cg",
                         distributed=fpd.DataParallel(None, "gradient"))
    with pytest.raises(ValueError, match="ConjugateGradientSolver applies its preconditioner to all blocks"):
        cg.init(model.params())


def test_shard_batch_splits_into_equal_shards_in_rank_order():
    inputs, targets = torch.arange(12.0).reshape(6, 2), torch.arange(6)
    shards = [fpd.shard_batch((inputs, targets), fpd.Communicator(rank, 3)) for rank in range(3)]
    assert all(isinstance(shard, tuple) for shard in shards)
    assert torch.equal(torch.cat([s[0] for s in shards]), inputs) and torch.equal(torch.cat([s[1] for s in shards]),
                                                                                  targets)
    assert torch.equal(fpd.shard_batch(inputs, fpd.Communicator(1, 2)), inputs[3:])
    batch = (inputs, targets)
    assert fpd.shard_batch(batch, None) is batch
    with pytest.raises(ValueError, match="6 examples do not split into 4 equal shards"):
        fpd.shard_batch(batch, fpd.Communicator(0, 4))
    with pytest.raises(ValueError, match="different numbers of examples"):
        fpd.shard_batch((inputs, targets[:5]), fpd.Communicator(0, 2))


def test_step_keys_depend_on_seed_and_step_only():
    assert torch.equal(fpd.step_key(3, 7), fp.random.fold_in(fp.random.key(3), 7))
    assert not torch.equal(fpd.step_key(3, 7), fpd.step_key(3, 8))
    assert torch.equal(fpd.DataParallel(None).sampling_key(fpd.step_key(3, 7)), fpd.step_key(3, 7))
    assert torch.equal(fpd.DataParallel(fpd.Communicator(2, 4)).sampling_key(fpd.step_key(3, 7)),
                       fp.random.fold_in(fpd.step_key(3, 7), 2))


def test_communicator_arguments_are_checked():
    with pytest.raises(ValueError, match="rank 2 of 2"):
        fpd.Communicator(2, 2)
    with pytest.raises(TypeError, match="world_size must be an int"):
        fpd.Communicator(0, 2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bucket_bytes"):
        fpd.Communicator(0, 1, bucket_bytes=0)


def test_buckets_pack_leaves_of_one_kind_up_to_the_byte_limit():
    # float32 leaves of 2, 2, 5 entries and a float64 leaf between them; 16-byte buckets.
    buckets = plan_buckets([2, 1, 2, 5, 1], ["f32", "f64", "f32", "f32", "f64"], 16, [4, 8, 4, 4, 8])
    assert buckets == [[0, 2], [1, 4], [3]]  # 8+8 bytes together; the 20-byte leaf alone
    assert plan_buckets([], [], 16, []) == []


def test_a_failure_left_in_the_store_names_its_rank(tmp_path):
    store = dist.FileStore(str(tmp_path / "store"), 1)
    failing = fpd.Communicator(0, 2, store=store)
    with pytest.raises(ValueError, match="boom"):
        with fpd.propagate_failures(failing):
            raise ValueError("boom\nsecond line")
    peer = fpd.Communicator(1, 2, store=store)
    assert peer.reported_failures() == {0: "ValueError: boom"}
    message = str(peer.peer_failure("broadcast", RuntimeError("Connection closed by peer")))
    assert message == "broadcast on rank 1 of 2 stopped: rank 0 failed with ValueError: boom"
    silent = fpd.Communicator(1, 2)  # no store: the transport's message
    assert "no rank reported an error" in str(silent.peer_failure("broadcast", RuntimeError("Timed out")))


def test_init_from_env_explains_how_to_launch(monkeypatch, world_of_one):
    assert fpd.init_from_env().world_size == 1  # an initialised group is used as it is
    monkeypatch.setattr(processes.dist, "is_initialized", lambda: False)
    for name in processes.TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RuntimeError, match="torchrun --nproc-per-node"):
        fpd.init_from_env()
    assert "RANK" not in os.environ
