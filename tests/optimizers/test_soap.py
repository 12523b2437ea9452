"""SOAP: the reference algorithm written out in float64, the eigenbasis refresh,
1-D parameters as Adam, numerics, an ensemble under vmap, training on digits, and
``block_size`` as the reference algorithm run on each block."""

from __future__ import annotations

import itertools

import pytest
import torch

import fprecond as fp
from fprecond.optimizers.soap import scale_by_soap, soap

from tests.helpers import assert_gradient_ensemble_matches_loop, assert_relative_close, train_digits


def project(x: torch.Tensor, bases: list[torch.Tensor | None], back: bool) -> torch.Tensor:
    """The reference's projection: contract dimension 0 with each basis in turn (a
    ``None`` basis only rotates the dimensions), as its ``tensordot`` loop does."""
    for q in bases:
        if q is None:
            x = x.permute(*range(1, x.ndim), 0)
        else:
            x = torch.tensordot(x, q, dims=([0], [1 if back else 0]))
    return x


def outer(x: torch.Tensor, mode: int) -> torch.Tensor:
    others = [d for d in range(x.ndim) if d != mode]
    return torch.tensordot(x, x, dims=(others, others))


class ReferenceSOAP:
    """One parameter under the reference optimizer's ``step`` (github.com/nikhilvyas/SOAP),
    written out: first call initialises the basis and does not move the parameter;
    moments live in the eigenbasis; the decay multiplies the updated parameter."""

    def __init__(self, param, lr, betas, shampoo_beta, eps, weight_decay, frequency, precondition_1d=False,
                 normalize_grads=False, correct_bias=True, max_precond_dim=10000):
        self.p = param.clone()
        self.lr, (self.b1, self.b2), self.sb, self.eps, self.wd = lr, betas, shampoo_beta, eps, weight_decay
        self.frequency, self.normalize, self.correct_bias = frequency, normalize_grads, correct_bias
        use = param.ndim > 1 or precondition_1d
        self.GG = [torch.zeros(n, n) if use and n <= max_precond_dim else None for n in param.shape]
        self.Q = None
        self.step_count = 0
        self.m = torch.zeros_like(param)
        self.v = torch.zeros_like(param)

    def update_preconditioner(self, g):
        if self.Q is not None:
            self.m = project(self.m, self.Q, back=True)
        for i, s in enumerate(self.GG):
            if s is not None:
                self.GG[i] = self.sb * s + (1 - self.sb) * outer(g, i)
        if self.Q is None:
            self.Q = [None if s is None else torch.linalg.eigh(s + 1e-30 * torch.eye(len(s)))[1].flip(1)
                      for s in self.GG]
        if self.step_count > 0 and self.step_count % self.frequency == 0:
            new = []
            for i, (s, q) in enumerate(zip(self.GG, self.Q)):
                if s is None:
                    new.append(None)
                    continue
                estimated = torch.diag(q.T @ s @ q)
                order = torch.argsort(estimated, descending=True)
                self.v = self.v.index_select(i, order)
                new.append(torch.linalg.qr(s @ q[:, order])[0])
            self.Q = new
        if self.step_count > 0:
            self.m = project(self.m, self.Q, back=False)

    def step(self, g):
        if self.Q is None:
            self.update_preconditioner(g)
            return self.p.clone()
        projected = project(g, self.Q, back=False)
        self.step_count += 1
        self.m = self.b1 * self.m + (1 - self.b1) * projected
        self.v = self.b2 * self.v + (1 - self.b2) * projected ** 2
        size = self.lr
        if self.correct_bias:
            size = size * (1 - self.b2 ** self.step_count) ** 0.5 / (1 - self.b1 ** self.step_count)
        direction = project(self.m / (self.v.sqrt() + self.eps), self.Q, back=True)
        if self.normalize:
            direction = direction / (1e-30 + direction.square().mean() ** 0.5)
        self.p = self.p - size * direction
        self.p = self.p - self.lr * self.wd * self.p
        self.update_preconditioner(g)
        return self.p.clone()


def make_params(seed: int = 0) -> dict[str, torch.Tensor]:
    # Shapes whose first-step statistics have null spaces of dimension <= 1, so that
    # every eigenbasis is unique up to signs (which do not change SOAP's update).
    g = torch.Generator().manual_seed(seed)
    return {"weight": torch.randn(4, 3, generator=g), "kernel": torch.randn(3, 4, 2, generator=g),
            "bias": torch.randn(2, generator=g)}


def make_grads(params, steps: int, seed: int = 10) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{k: torch.randn(v.shape, generator=g) for k, v in params.items()} for _ in range(steps)]


@pytest.mark.parametrize("options", [
    dict(),
    dict(precondition_1d=True, normalize_grads=True),
    dict(correct_bias=False, max_precond_dim=3),
])
def test_matches_the_reference_algorithm(options):
    """Eight steps, basis refreshes at steps 3 and 6 (count), weight decay on."""
    lr, betas, shampoo_beta, eps, weight_decay, frequency = 0.1, (0.9, 0.95), 0.9, 1e-8, 0.01, 3
    params = make_params()
    opt = soap(lr, betas, shampoo_beta, eps, weight_decay, precondition_frequency=frequency, **options)
    state = opt.init(params)
    references = {k: ReferenceSOAP(p, lr, betas, shampoo_beta, eps, weight_decay, frequency, **options)
                  for k, p in params.items()}
    start = {k: p.clone() for k, p in params.items()}
    for grads in make_grads(params, 8):
        updates, state = opt.update(grads, state, params)
        params = fp.apply_updates(params, updates)
        for key, reference in references.items():
            expected = reference.step(grads[key])
            assert_relative_close(params[key] - start[key], expected - start[key], 1e-10)
    assert int(state.skipped) == 0


def test_refreshed_basis_is_orthogonal_and_nearly_diagonalises_the_statistics():
    """After each refresh ``Q`` is orthogonal, its estimated eigenvalues ``diag(Qᵀ L Q)``
    are sorted, and one power-iteration step makes ``Qᵀ L Q`` more diagonal than the old
    basis did; with refreshes every step on a stationary gradient distribution the
    basis tracks the eigenvectors of ``L`` to power-iteration accuracy."""
    torch.manual_seed(0)
    mixing_l = torch.diag(torch.tensor([4.0, 2.0, 1.0, 0.5, 0.25]))
    mixing_r = torch.diag(torch.tensor([3.0, 1.0, 0.3, 0.1]))
    opt = scale_by_soap(0.9, 0.95, 0.95, precondition_frequency=1)
    params = {"w": torch.zeros(5, 4)}
    state = opt.init(params)

    def off_diagonal(basis, statistic):
        rotated = basis.T @ statistic @ basis
        return (rotated - torch.diag(torch.diagonal(rotated))).norm() / rotated.norm()

    for step in range(60):
        grads = {"w": mixing_l @ torch.randn(5, 4) @ mixing_r}
        old_basis = state.basis["w"]
        _, state = opt.update(grads, state, params)
        for old, new, statistic in zip(old_basis, state.basis["w"], state.statistics["w"]):
            torch.testing.assert_close(new.T @ new, torch.eye(len(new)), rtol=0, atol=1e-12)
            if step >= 1:
                estimated = torch.diagonal(new.T @ statistic @ new)
                assert off_diagonal(new, statistic) <= off_diagonal(old, statistic) + 1e-12
                assert (estimated[:-1] >= estimated[1:] * 0.5).all()  # sorted up to one power step
    for basis, statistic in zip(state.basis["w"], state.statistics["w"]):
        assert off_diagonal(basis, statistic) < 0.02  # ~0.6 without the refreshes


def test_one_dimensional_parameters_get_adam():
    """Without ``precondition_1d`` a vector gets Adam in the reference's form: the first
    step only initialises, then ``lr · sqrt(1-β2^t)/(1-β1^t) · m / (sqrt(v) + eps)``
    on the gradients from the second on; with eps = 0 that is ``fp.scale_by_adam``
    (and torch.optim.Adam) exactly, started one step later."""
    lr, b1, b2 = 0.1, 0.9, 0.95
    grads = [torch.randn(6) for _ in range(6)]
    opt = soap(lr, (b1, b2), eps=0.0, weight_decay=0.0)
    params = {"b": torch.randn(6)}
    state = opt.init(params)
    adam = fp.chain(fp.scale_by_adam(b1, b2, eps=0.0), fp.scale_by_learning_rate(lr))
    adam_state = adam.init(params)
    torch_param = params["b"].clone().requires_grad_(True)
    torch_adam = torch.optim.Adam([torch_param], lr=lr, betas=(b1, b2), eps=0.0)
    for step, g in enumerate(grads):
        updates, state = opt.update({"b": g}, state, params)
        if step == 0:
            assert torch.equal(updates["b"], torch.zeros(6))
            continue
        expected, adam_state = adam.update({"b": g}, adam_state, params)
        torch.testing.assert_close(updates["b"], expected["b"], rtol=1e-12, atol=0)
        before = torch_param.detach().clone()
        torch_param.grad = g.clone()
        torch_adam.step()
        torch.testing.assert_close(updates["b"], torch_param.detach() - before, rtol=1e-12, atol=1e-15)
        params = fp.apply_updates(params, updates)


@pytest.mark.parametrize("case", ["zero", "rank_one", "tiny", "huge"])
def test_updates_stay_finite(case):
    params = make_params()
    opt = soap(1e-2, precondition_frequency=2)
    state = opt.init(params)
    fixed = {k: torch.randn(v.shape) for k, v in params.items()}
    for step, grads in enumerate(make_grads(params, 5)):
        if case == "zero":
            grads = {k: torch.zeros_like(v) for k, v in grads.items()}
        elif case == "rank_one":
            grads = {k: (step + 1.0) * v for k, v in fixed.items()}
        else:
            grads = {k: v * (1e-30 if case == "tiny" else 1e30) for k, v in grads.items()}
        updates, state = opt.update(grads, state, params)
        assert all(torch.isfinite(u).all() for u in updates.values())
        assert int(state.skipped) == 0
        params = fp.apply_updates(params, updates)
    if case == "huge":  # Adam's normalisation: lr-sized steps
        assert all(1e-3 < u.abs().max() < 1.0 for u in updates.values())


def test_non_finite_statistics_keep_the_basis():
    opt = scale_by_soap(precondition_frequency=1)
    params = {"w": torch.randn(4, 3)}
    state = opt.init(params)
    for g in make_grads(params, 2):
        _, state = opt.update(g, state, params)
    _, bad = opt.update({"w": torch.full((4, 3), float("nan"))}, state, params)
    for old, new in zip(state.basis["w"], bad.basis["w"]):
        assert torch.equal(old, new)


def test_ensemble_under_vmap_equals_loop():
    """Three members over five steps: the initial eigh and refreshes at steps 2 and 4."""
    opt = soap(1e-2, precondition_frequency=2, precondition_1d=True)
    members = [make_params(seed) for seed in range(3)]
    member_grads = [make_grads(members[0], 5, seed=20 + i) for i in range(3)]
    assert_gradient_ensemble_matches_loop(opt, members, member_grads)


def test_trains_digits_below_sgd():
    sgd_loss = train_digits(lambda md, inputs: fp.sgd(0.1, momentum=0.9))
    # The reference's lr 3e-3 is tuned for long language-model runs and barely moves
    # this MLP in 40 steps; 3e-2 fits the task (other defaults are the reference's).
    loss = train_digits(lambda md, inputs: soap(3e-2))
    assert loss < sgd_loss


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(learning_rate=-1.0), ValueError, "learning_rate"),
    (dict(betas=(1.0, 0.9)), ValueError, "b1"),
    (dict(betas=(0.9, 1.0)), ValueError, "b2"),
    (dict(betas=0.9), TypeError, "betas"),
    (dict(shampoo_beta=1.5), ValueError, "shampoo_beta"),
    (dict(eps=-1.0), ValueError, "eps"),
    (dict(weight_decay=-0.1), ValueError, "weight_decay"),
    (dict(precondition_frequency=0), ValueError, "precondition_frequency"),
    (dict(max_precond_dim=0), ValueError, "max_precond_dim"),
    (dict(statistics_every=True), ValueError, "statistics_every"),
])
def test_bad_arguments_raise_early(kwargs, error, match):
    with pytest.raises(error, match=match):
        soap(**kwargs)


def test_weight_decay_needs_params():
    opt = soap()
    params = {"w": torch.randn(2, 2)}
    with pytest.raises(TypeError, match="parameters"):
        opt.update(params, opt.init(params))


# --------------------------------------------------------------------------- block_size


def block_slices(shape: tuple[int, ...], size: int) -> list[tuple[slice, ...]]:
    """Every block of a tensor cut into at most ``size`` per dimension (ragged last block),
    by plain slicing: independent of the library's ``BlockPlan``."""
    per_dim = [[slice(start, min(start + size, n)) for start in range(0, n, size)] for n in shape]
    return list(itertools.product(*per_dim))


# Shapes with ragged blocks along every dimension whose first-step block statistics
# have null spaces of dimension <= 1 (bases unique up to signs), as make_params.
BLOCK_CASES = {
    "b3": (3, {"weight": (5, 8), "kernel": (4, 5, 2), "bias": (7,)}, dict()),
    # a ragged block of width 1 (7 = 2 + 2 + 2 + 1) and a 1 x 1 x 2 block
    "b2": (2, {"weight": (4, 7), "kernel": (3, 5, 2), "bias": (5,)}, dict(precondition_1d=True)),
    # blocks larger than max_precond_dim: dimensions of 3 stay unpreconditioned
    "b3-max2": (3, {"weight": (5, 8), "kernel": (4, 5, 2), "bias": (7,)},
                dict(max_precond_dim=2, precondition_1d=True, normalize_grads=True)),
}


@pytest.mark.parametrize("case", list(BLOCK_CASES))
def test_block_size_runs_the_reference_on_each_block(case):
    """Eight steps (refreshes at counts 3 and 6): each block of each tensor moves as the
    reference optimizer run on that block alone (1-D tensors are blocked only with
    precondition_1d, normalize_grads takes each block's RMS)."""
    block_size, shapes, options = BLOCK_CASES[case]
    lr, betas, shampoo_beta, eps, weight_decay, frequency = 0.1, (0.9, 0.95), 0.9, 1e-8, 0.01, 3
    g = torch.Generator().manual_seed(1)
    params = {k: torch.randn(shape, generator=g) for k, shape in shapes.items()}
    opt = soap(lr, betas, shampoo_beta, eps, weight_decay, precondition_frequency=frequency, block_size=block_size,
               **options)
    state = opt.init(params)
    blocked = {k: p.ndim > 1 or options.get("precondition_1d", False) for k, p in params.items()}
    references = {k: [(index, ReferenceSOAP(p[index], lr, betas, shampoo_beta, eps, weight_decay, frequency,
                                            **options))
                      for index in (block_slices(p.shape, block_size) if blocked[k] else [(slice(None),)])]
                  for k, p in params.items()}
    start = {k: p.clone() for k, p in params.items()}
    for grads in make_grads(params, 8):
        updates, state = opt.update(grads, state, params)
        params = fp.apply_updates(params, updates)
        for key, blocks in references.items():
            expected = torch.empty_like(params[key])
            for index, reference in blocks:
                expected[index] = reference.step(grads[key][index])
            assert_relative_close(params[key] - start[key], expected - start[key], 1e-12)
    assert int(state.skipped) == 0


def test_block_size_merges_first_then_splits():
    """With merge_dims, (2, 4, 7) merges (max_precond_dim 8) into (8, 7), which
    block_size 4 cuts into two (4, 4) and two (4, 3) blocks: the reference on each block
    of the merged tensor."""
    lr, betas, frequency = 0.1, (0.9, 0.95), 2
    params = {"kernel": torch.randn(2, 4, 7, generator=torch.Generator().manual_seed(2))}
    opt = soap(lr, betas, 0.9, 1e-8, 0.0, precondition_frequency=frequency, max_precond_dim=8, merge_dims=True,
               block_size=4)
    state = opt.init(params)
    assert [tuple(s.shape) for group in state.inner_state["soap"].statistics["kernel"] for s in group] == [
        (2, 4, 4), (2, 4, 4), (2, 4, 4), (2, 3, 3)]
    merged = params["kernel"].reshape(8, 7)
    references = [(index, ReferenceSOAP(merged[index], lr, betas, 0.9, 1e-8, 0.0, frequency))
                  for index in block_slices((8, 7), 4)]
    start = params["kernel"].clone()
    for grads in make_grads(params, 6):
        updates, state = opt.update(grads, state, params)
        params = fp.apply_updates(params, updates)
        expected = torch.empty(8, 7)
        for index, reference in references:
            expected[index] = reference.step(grads["kernel"].reshape(8, 7)[index])
        assert_relative_close(params["kernel"] - start, (expected - start.reshape(8, 7)).reshape(2, 4, 7), 1e-12)


def test_block_size_state_is_batched_per_group():
    """A (5, 8) weight with block_size 3: groups (3, 3) x 2, (3, 2) x 1, (2, 3) x 2, (2, 2) x 1,
    one (B, d, d) factor per mode, identity bases at init; a tensor within one block has
    the same factors as without blocking (with a leading B = 1)."""
    params = {"weight": torch.randn(5, 8), "small": torch.randn(3, 2)}
    state = scale_by_soap(block_size=3).init(params)
    shapes = [[tuple(s.shape) for s in group] for group in state.statistics["weight"]]
    assert shapes == [[(2, 3, 3), (2, 3, 3)], [(1, 3, 3), (1, 2, 2)], [(2, 2, 2), (2, 3, 3)], [(1, 2, 2), (1, 2, 2)]]
    for group in state.basis["weight"]:
        for q in group:
            assert torch.equal(q, torch.eye(q.shape[-1]).expand_as(q))
    whole = scale_by_soap().init(params)
    assert [tuple(s.shape) for s in whole.statistics["small"]] == [(3, 3), (2, 2)]
    assert [tuple(s.shape) for s in state.statistics["small"][0]] == [(1, 3, 3), (1, 2, 2)]


def test_block_size_covering_the_tensor_equals_no_blocking():
    """Blocks at least as large as every dimension: exactly the unblocked update."""
    params = make_params()
    blocked, whole = soap(1e-2, precondition_frequency=2, block_size=4), soap(1e-2, precondition_frequency=2)
    state_b, state_w = blocked.init(params), whole.init(params)
    for grads in make_grads(params, 5):
        updates_b, state_b = blocked.update(grads, state_b, params)
        updates_w, state_w = whole.update(grads, state_w, params)
        for key in params:
            torch.testing.assert_close(updates_b[key], updates_w[key], rtol=1e-13, atol=0)
        params = fp.apply_updates(params, updates_w)


@pytest.mark.parametrize("case", ["zero", "huge"])
def test_block_size_updates_stay_finite(case):
    params = {"weight": torch.randn(5, 8), "kernel": torch.randn(4, 5, 2)}
    opt = soap(1e-2, precondition_frequency=2, block_size=3)
    state = opt.init(params)
    for grads in make_grads(params, 5):
        grads = {k: torch.zeros_like(v) if case == "zero" else 1e30 * v for k, v in grads.items()}
        updates, state = opt.update(grads, state, params)
        assert all(torch.isfinite(u).all() for u in updates.values())
        assert int(state.skipped) == 0
        params = fp.apply_updates(params, updates)


def test_block_size_non_finite_statistics_keep_each_block_basis():
    """A NaN in one block leaves that block's basis and keeps refreshing the others."""
    opt = scale_by_soap(precondition_frequency=1, block_size=2)
    params = {"w": torch.randn(4, 3)}
    state = opt.init(params)
    for g in make_grads(params, 2):
        _, state = opt.update(g, state, params)
    g = make_grads(params, 1, seed=5)[0]["w"]
    g[0, 0] = float("nan")  # only block (0, 0) (of the group of (2, 2) blocks) sees it
    _, bad = opt.update({"w": g}, state, params)
    for old, new in zip(state.basis["w"][0], bad.basis["w"][0]):  # the (2, 2) group: blocks (0, 0), (1, 0)
        assert torch.equal(old[0], new[0])
        assert torch.isfinite(new).all() and not torch.equal(old[1], new[1])


def test_block_size_ensemble_under_vmap_equals_loop():
    """Three members over five steps with block_size 3: the initial eigh and refreshes at
    steps 2 and 4 run batched over blocks and members."""
    opt = soap(1e-2, precondition_frequency=2, precondition_1d=True, block_size=3)
    members = [{"weight": torch.randn(5, 8, generator=torch.Generator().manual_seed(seed)),
                "kernel": torch.randn(4, 5, 2, generator=torch.Generator().manual_seed(seed + 10)),
                "bias": torch.randn(7, generator=torch.Generator().manual_seed(seed + 20))} for seed in range(3)]
    member_grads = [make_grads(members[0], 5, seed=20 + i) for i in range(3)]
    assert_gradient_ensemble_matches_loop(opt, members, member_grads)


def test_block_size_trains_digits_below_sgd():
    """Block-diagonal SOAP (the (16, 64) weight in 2 x 8 blocks of 8 x 8, the (10, 16) one
    in 2 x 2 blocks) with the learning rate of the unblocked test."""
    sgd_loss = train_digits(lambda md, inputs: fp.sgd(0.1, momentum=0.9))
    loss = train_digits(lambda md, inputs: soap(3e-2, block_size=8))
    assert loss < sgd_loss


@pytest.mark.parametrize("block_size", [0, -1, 2.5, True, "3"])
def test_bad_block_size_raises(block_size):
    for make in (soap, scale_by_soap):
        with pytest.raises(ValueError, match="block_size"):
            make(block_size=block_size)
