"""Checkpoints: a reload in the middle of training continues bit for bit; mismatches and bad files raise."""

from __future__ import annotations

import typing

import pytest
import torch
from torch import nn

import fprecond as fp
from fprecond.checkpoint import FORMAT_VERSION, load_state, save_state
from fprecond.ensemble import ensemble_step, init_ensemble
from fprecond.training import train_step
from fprecond.tree import tree_leaves, tree_structure

from tests.helpers import make_problem

RECIPES = {
    # Short schedules so that the steps after the reload include refreshes.
    "kfac": lambda md: fp.kfac(md, inverse_every=2, warmup=1),
    "shampoo": lambda md: fp.shampoo(1e-2, precondition_frequency=2, start_preconditioning_step=1),
    "adam": lambda md: fp.adam(1e-2, weight_decay=1e-3),
}


def assert_identical(a, b) -> None:
    assert tree_structure(a) == tree_structure(b)
    for x, y in zip(tree_leaves(a), tree_leaves(b)):
        assert x.dtype == y.dtype and torch.equal(x, y)


def run(step, params, state, batch, key, steps: int):
    for _ in range(steps):
        params, state, _ = step(params, state, batch, key)
    return params, state


@pytest.mark.parametrize("name", list(RECIPES))
def test_reload_mid_training_continues_bit_for_bit(name, tmp_path):
    md, params, batch = make_problem("cnn", ("cross_entropy", "mean"), n=6)
    transform, key = RECIPES[name](md), fp.random.key(2)
    step = train_step(md, transform)
    params, state = run(step, params, transform.init(params), batch, key, 2)
    path = tmp_path / f"{name}.pt"
    save_state(path, {"params": params, "state": state})

    template = {"params": md.params(), "state": transform.init(md.params())}
    restored = load_state(path, template)
    assert_identical(restored, {"params": params, "state": state})
    expected = run(step, params, state, batch, key, 3)
    resumed = run(step, restored["params"], restored["state"], batch, key, 3)
    assert_identical(resumed, expected)


def test_reload_of_an_ensemble_state_continues_bit_for_bit(tmp_path):
    module = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    md = fp.model(module, fp.losses.cross_entropy())
    transform = fp.kfac(md, inverse_every=2, warmup=1)
    step = ensemble_step(train_step(md, transform))
    params = init_ensemble(module, (0, 1, 2))
    keys = torch.stack([fp.random.key(k) for k in range(3)])
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(10, 4, generator=g), torch.randint(0, 3, (10,), generator=g))
    params, state = run(step, params, torch.func.vmap(transform.init)(params), batch, keys, 2)
    save_state(tmp_path / "ensemble.pt", (params, state))

    template_params = init_ensemble(module, (5, 6, 7))
    restored = load_state(tmp_path / "ensemble.pt", (template_params, torch.func.vmap(transform.init)(template_params)))
    assert_identical(run(step, *restored, batch, keys, 3), run(step, params, state, batch, keys, 3))


def test_file_is_plain_data_for_weights_only(tmp_path):
    md, params, _ = make_problem("mlp", ("cross_entropy", "mean"))
    state = fp.kfac(md).init(params)
    save_state(tmp_path / "state.pt", state)
    payload = torch.load(tmp_path / "state.pt", weights_only=True)
    assert payload["format"] == "fprecond.checkpoint" and payload["version"] == FORMAT_VERSION
    assert payload["paths"][0] == ".skipped"
    assert ".inner_state['momentum'].trace['0.weight']" in payload["paths"]
    assert payload["dtypes"][payload["paths"].index(".last_finite")] == "bool"
    assert list(payload["tensors"]) == payload["paths"]
    leaves = tree_leaves(state)
    assert [list(leaf.shape) for leaf in leaves] == payload["shapes"]
    assert all(torch.equal(payload["tensors"][p], leaf) for p, leaf in zip(payload["paths"], leaves))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]  # no temporary file left behind


class WithNone(typing.NamedTuple):
    weight: torch.Tensor
    extra: typing.Any


def test_none_entries_are_structure_and_other_leaves_are_rejected(tmp_path):
    tree = {"a": WithNone(torch.arange(3.0), None), "b": [torch.ones(2, 2), None]}
    save_state(tmp_path / "none.pt", tree)
    restored = load_state(tmp_path / "none.pt", {"a": WithNone(torch.zeros(3), None), "b": [torch.zeros(2, 2), None]})
    assert restored["a"].extra is None and restored["b"][1] is None
    assert torch.equal(restored["a"].weight, tree["a"].weight)
    with pytest.raises(TypeError, match=r"\['count'\] is a int"):
        save_state(tmp_path / "int.pt", {"count": 3})
    with pytest.raises(TypeError, match="tensors only"):
        load_state(tmp_path / "none.pt", {"a": WithNone(torch.zeros(3), 1.5), "b": [torch.zeros(2, 2), None]})


@pytest.fixture
def kfac_file(tmp_path):
    md, params, _ = make_problem("mlp", ("cross_entropy", "mean"))
    path = tmp_path / "kfac.pt"
    save_state(path, fp.kfac(md).init(params))
    return md, params, path


def test_mismatched_templates_name_the_first_leaf(kfac_file):
    md, params, path = kfac_file
    with pytest.raises(ValueError, match=r"does not fit the template: leaf \S*\[1\]\.count is missing"):
        load_state(path, fp.adam().init(params))  # another recipe
    with pytest.raises(ValueError, match=r"does not fit the template: leaf \S+ is missing"):
        load_state(path, fp.shampoo().init(params))
    with pytest.raises(ValueError, match=r"unexpected leaf \.inner_state\['momentum'\]\.trace\['0\.weight'\]"):
        load_state(path, fp.kfac(md, momentum=0.0).init(params))  # a subset of the leaves

    torch.manual_seed(0)
    wider = fp.model(nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)), fp.losses.cross_entropy())
    with pytest.raises(ValueError, match=r"leaf \.inner_state\['precondition'\]\.estimator\.curvature\.blocks\[0\]"
                                         r"\.output_factor has shape \(1, 5, 5\) in the checkpoint, the template has "
                                         r"\(1, 6, 6\)"):
        load_state(path, fp.kfac(wider).init(wider.params()))

    state = fp.kfac(md).init(params)
    with pytest.raises(ValueError, match=r"leaf \.skipped has dtype int64 in the checkpoint, the template has int32"):
        load_state(path, state._replace(skipped=state.skipped.to(torch.int32)))
    float32 = {name: value.float() for name, value in params.items()}
    with pytest.raises(ValueError, match=r"dtype float64 in the checkpoint, the template has float32"):
        load_state(path, fp.kfac(md).init(float32))


def test_unreadable_files(tmp_path, kfac_file):
    md, params, path = kfac_file
    data = path.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    noise = tmp_path / "noise.pt"
    noise.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                    dtype=torch.uint8).numpy().tobytes())
    foreign = tmp_path / "foreign.pt"
    torch.save({"weight": torch.zeros(2)}, foreign)
    template = fp.kfac(md).init(params)
    for bad in (truncated, noise, foreign):
        with pytest.raises(ValueError, match="cannot read checkpoint"):
            load_state(bad, template)
    with pytest.raises(FileNotFoundError):
        load_state(tmp_path / "absent.pt", template)


def test_damaged_tensor_data_is_detected_by_the_checksums(tmp_path, kfac_file):
    md, params, path = kfac_file
    template = fp.kfac(md).init(params)
    state = load_state(path, template)
    factor = state.inner_state["precondition"].estimator.curvature.blocks[0].input_factor
    data = bytearray(path.read_bytes())
    # Write a known value into the factor, save, then flip one bit of that tensor's bytes in the file.
    marked = torch.full_like(factor, 0.123456789)
    blocks = state.inner_state["precondition"].estimator.curvature.blocks
    save_state(path, tree_replace_leaf(state, factor, marked))
    data = bytearray(path.read_bytes())
    offset = bytes(data).find(marked.numpy().tobytes()[:16])
    assert offset > 0 and blocks
    data[offset + 3] ^= 0x01
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"cannot read checkpoint .*input_factor is corrupted \(its checksum does "
                                         r"not match\)"):
        load_state(damaged, template)


def tree_replace_leaf(tree, old: torch.Tensor, new: torch.Tensor):
    """``tree`` with the leaf that is ``old`` (by identity) replaced by ``new``."""
    return fp.tree.tree_map(lambda leaf: new if leaf is old else leaf, tree)


def test_every_single_byte_flip_is_rejected_or_harmless(tmp_path):
    """Flip each of 400 byte positions spread over the file: the load either raises the
    checkpoint's ValueError or returns exactly the saved values (bytes of zip metadata
    that torch does not read), never different values."""
    torch.manual_seed(0)
    tree = {"w": torch.randn(6, 5, dtype=torch.float64), "b": torch.randn(5).to(torch.bfloat16),
            "count": torch.tensor(7)}
    path = tmp_path / "small.pt"
    save_state(path, tree)
    data = path.read_bytes()
    rejected = harmless = 0
    for position in torch.linspace(0, len(data) - 1, 400).long().unique().tolist():
        damaged = bytearray(data)
        damaged[position] ^= 0x04
        bad = tmp_path / "flip.pt"
        bad.write_bytes(bytes(damaged))
        try:
            loaded = load_state(bad, tree)
        except ValueError as error:
            assert "cannot read checkpoint" in str(error) or "does not fit the template" in str(error)
            rejected += 1
            continue
        assert_identical(loaded, tree)
        harmless += 1
    assert rejected > 100 and rejected + harmless >= 390


def test_version_1_files_without_checksums_still_load(tmp_path):
    tree = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    payload = {"format": "fprecond.checkpoint", "version": 1, "paths": ["['w']"], "shapes": [[2, 3]],
               "dtypes": ["float32"], "tensors": {"['w']": tree["w"].clone()}}
    path = tmp_path / "v1.pt"
    torch.save(payload, path)
    assert_identical(load_state(path, tree), tree)
    payload["version"] = 2  # a version-2 file must carry checksums
    torch.save(payload, path)
    with pytest.raises(ValueError, match="checksums are missing"):
        load_state(path, tree)
    payload["version"] = 3
    torch.save(payload, path)
    with pytest.raises(ValueError, match=r"format version 3, this fprecond reads versions 1, 2"):
        load_state(path, tree)
