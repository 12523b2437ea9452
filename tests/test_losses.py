"""Losses: values, output Hessians and their square roots, sampled targets."""

from __future__ import annotations

import math

import pytest
import torch

import fprecond as fp

from tests.helpers import LOSSES, assert_relative_close, make_targets, reference_loss


def _outputs(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


SHAPES = [(5, 3), (4, 6, 3)]


@pytest.fixture(params=list(LOSSES), ids=[f"{a}-{b}" for a, b in LOSSES])
def loss(request) -> fp.losses.Loss:
    return LOSSES[request.param]()


@pytest.mark.parametrize("shape", SHAPES)
def test_value_matches_torch_functional(loss, shape):
    outputs = _outputs(shape)
    targets = make_targets(loss, shape[0], shape[1:], torch.Generator().manual_seed(1))
    assert_relative_close(loss(outputs, targets), reference_loss(loss, outputs, targets), 1e-14)
    if isinstance(loss, fp.losses.MSELoss):
        torch_value = torch.nn.functional.mse_loss(outputs, targets, reduction=loss.reduction)
    else:
        torch_value = torch.nn.functional.cross_entropy(outputs.reshape(-1, 3), targets.reshape(-1),
                                                        reduction=loss.reduction)
    assert_relative_close(loss(outputs, targets), torch_value, 1e-14)


@pytest.mark.parametrize("shape", SHAPES)
def test_per_example_losses_are_each_example_alone(loss, shape):
    outputs = _outputs(shape)
    targets = make_targets(loss, shape[0], shape[1:], torch.Generator().manual_seed(1))
    per_example = loss.per_example(outputs, targets)
    alone = torch.stack([loss(outputs[n:n + 1], targets[n:n + 1]) for n in range(shape[0])])
    assert_relative_close(per_example, alone, 1e-14)
    combine = per_example.mean() if loss.reduction == "mean" else per_example.sum()
    assert_relative_close(combine, loss(outputs, targets), 1e-14)


@pytest.mark.parametrize("shape", SHAPES)
def test_output_hessian_blocks_and_square_root_match_autograd(loss, shape):
    outputs = _outputs(shape)
    targets = make_targets(loss, shape[0], shape[1:], torch.Generator().manual_seed(1))
    dense = torch.autograd.functional.hessian(lambda f: reference_loss(loss, f.reshape(shape), targets),
                                              outputs.reshape(-1))
    classes = shape[-1]
    blocks = loss.hessian(outputs).reshape(-1, classes, classes)
    expected = torch.block_diag(*blocks)
    assert_relative_close(expected, dense, 1e-12)  # block-diagonal structure and values
    sqrt = loss.hessian_sqrt(outputs).reshape(-1, classes, classes)
    assert_relative_close(sqrt @ sqrt.transpose(-1, -2), blocks, 1e-12)
    vector = _outputs(shape, seed=4)
    assert_relative_close(loss.hessian_vp(outputs, vector).reshape(-1), dense @ vector.reshape(-1), 1e-12)


def test_cross_entropy_samples_follow_softmax():
    loss = fp.losses.cross_entropy()
    logits = torch.tensor([[2.0, 0.0, -1.0, 0.5]])
    draws = loss.sample_targets(logits, fp.random.key(0), samples=40_000)
    assert draws.shape == (40_000, 1)
    frequencies = torch.bincount(draws.reshape(-1), minlength=4) / draws.numel()
    probabilities = torch.softmax(logits[0], -1)
    # 4.5 standard errors: a wrong distribution (e.g. uniform, or unnormalised) fails by far.
    standard_error = torch.sqrt(probabilities * (1 - probabilities) / draws.numel())
    assert torch.all((frequencies - probabilities).abs() < 4.5 * standard_error)


def test_mse_samples_have_mean_outputs_and_variance_one_half():
    loss = fp.losses.mse()
    outputs = torch.tensor([[1.0, -2.0, 0.5]])
    draws = loss.sample_targets(outputs, fp.random.key(1), samples=50_000)
    assert draws.shape == (50_000, 1, 3)
    mean, variance = draws.mean(0)[0], draws.var(0)[0]
    assert torch.all((mean - outputs[0]).abs() < 4.5 * math.sqrt(0.5 / 50_000))
    assert torch.all((variance - 0.5).abs() < 4.5 * 0.5 * math.sqrt(2 / 50_000))


@pytest.mark.parametrize("loss_name", ["cross_entropy", "mse"])
def test_sampled_gradient_outer_products_average_to_output_hessian(loss_name):
    """E[∇ℓ ∇ℓᵀ] under the predictive equals the output Hessian: the basis of the MC Fisher."""
    loss = getattr(fp.losses, loss_name)("sum")
    outputs = torch.tensor([[0.3, -1.0, 0.8]])
    samples = 40_000
    targets = loss.sample_targets(outputs, fp.random.key(2), samples=samples)
    gradients = torch.stack([torch.func.grad(lambda f: loss(f, t))(outputs)[0] for t in targets[:2000]])
    # Use the analytic gradient for the bulk (the loop above checks its form on a subset).
    if loss_name == "cross_entropy":
        analytic = torch.softmax(outputs, -1) - torch.nn.functional.one_hot(targets[:, 0], 3)
    else:
        analytic = 2 * (outputs - targets[:, 0])
    assert_relative_close(analytic[:2000], gradients, 1e-12)
    second_moment = analytic.T @ analytic / samples
    assert_relative_close(second_moment, loss.hessian(outputs)[0], 0.04)


def test_cross_entropy_accepts_any_integer_target_dtype():
    outputs = _outputs((5, 3))
    targets = torch.tensor([0, 2, 1, 1, 0])
    for dtype in (torch.int32, torch.int16, torch.uint8):
        assert_relative_close(fp.losses.cross_entropy()(outputs, targets.to(dtype)),
                              fp.losses.cross_entropy()(outputs, targets), 1e-15)


def test_targets_are_checked_against_outputs():
    with pytest.raises(ValueError, match="targets must have shape"):
        fp.losses.cross_entropy()(torch.zeros(4, 3), torch.zeros(4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="class indices"):
        fp.losses.cross_entropy()(torch.zeros(4, 3), torch.zeros(4))
    with pytest.raises(ValueError, match="outputs' shape"):
        fp.losses.mse()(torch.zeros(4, 3), torch.zeros(4))
    with pytest.raises(ValueError, match="reduction"):
        fp.losses.mse("average")


@pytest.mark.parametrize("loss_key", list(LOSSES))
def test_output_gradient_matches_autograd(loss_key):
    loss = LOSSES[loss_key]()
    g = torch.Generator().manual_seed(4)
    for shape in ((4, 3), (4, 5, 3)):
        outputs = torch.randn(*shape, generator=g)
        targets = make_targets(loss, shape[0], shape[1:], g)
        expected = torch.func.grad(lambda f: reference_loss(loss, f, targets))(outputs)
        assert torch.allclose(loss.output_gradient(outputs, targets), expected, atol=1e-12)
        # Extra leading target dimensions (samples) broadcast.
        stacked = torch.stack([targets, targets])
        assert torch.allclose(loss.output_gradient(outputs, stacked)[1], expected, atol=1e-12)
