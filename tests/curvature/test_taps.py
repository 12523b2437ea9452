"""Layer taps: per-example gradients rebuilt from taps equal ``per_example_grads`` for
every supported layer configuration; taps are pure (no hook left behind) and vmappable."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import grad, vmap

import fprecond as fp
from fprecond.curvature import estimate
from fprecond.layers import form_of, from_matrix
from fprecond.layers.contractions import per_example_matrix
from fprecond.taps import layer_taps

from tests.curvature.references import block_mask, unit_groups
from tests.helpers import assert_relative_close, dense_ggn, make_targets

TOL = 1e-10


class Reshape(nn.Module):
    def __init__(self, *shape: int) -> None:
        super().__init__()
        self.shape = shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], *self.shape)


def _conv1d_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2, padding_mode="circular"),
        nn.BatchNorm1d(6), nn.Tanh(), nn.Conv1d(6, 2, 2, bias=False), nn.Flatten(), nn.Linear(2 * 3, 3),
    )


def _conv2d_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding="same", padding_mode="reflect", groups=2), nn.BatchNorm2d(4), nn.Tanh(),
        nn.Conv2d(4, 3, (2, 3), stride=(2, 1), dilation=(1, 2)), nn.Flatten(), nn.Linear(3 * 2 * 1, 3),
    )


def _layernorm_model() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 6), Reshape(2, 3), nn.LayerNorm((2, 3)), nn.Tanh(), Reshape(6),
                         nn.LayerNorm(6, bias=False), nn.Linear(6, 3))


def _embedding_model() -> nn.Module:
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(6, 4, padding_idx=1)
            self.head = nn.Linear(4, 3, bias=False)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.head(torch.tanh(self.embed(tokens))).mean(dim=1)

    return Model()


EXTRA = {
    "conv1d": (_conv1d_model, lambda n, g: torch.randn(n, 4, 7, generator=g)),
    "conv2d": (_conv2d_model, lambda n, g: torch.randn(n, 2, 4, 5, generator=g)),
    "layernorm": (_layernorm_model, lambda n, g: torch.randn(n, 6, generator=g)),
    "embedding_padding": (_embedding_model, lambda n, g: torch.randint(0, 6, (n, 5), generator=g)),
}


def _extra_problem(name: str, n: int = 4, loss=None):
    build, make_inputs = EXTRA[name]
    torch.manual_seed(0)
    module = build().double()
    for sub in module.modules():
        if isinstance(sub, (nn.BatchNorm1d, nn.BatchNorm2d)):
            sub.running_mean.uniform_(-0.5, 0.5)
            sub.running_var.uniform_(0.5, 2.0)
            with torch.no_grad():
                sub.weight.uniform_(0.5, 1.5)
                sub.bias.uniform_(-0.5, 0.5)
    module.eval()
    loss = loss or fp.losses.cross_entropy()
    g = torch.Generator().manual_seed(1)
    inputs = make_inputs(n, g)
    md = fp.model(module, loss)
    return md, md.params(), (inputs, make_targets(loss, n, (3,), g))


def _taps_gradients(md, params, batch):
    inputs, targets = batch

    def residual(outputs):
        return grad(lambda f: md.loss(f, targets))(outputs).unsqueeze(0)

    taps = layer_taps(md, params, inputs, residual)
    rebuilt = {}
    for layer in md.layers:
        form = form_of(layer)
        matrix = per_example_matrix(form.inputs(layer, taps.features[layer.name]),
                                    form.output_grads(layer, taps.output_grads[layer.name]))
        rebuilt.update(from_matrix(form.layout(layer), matrix[0]))
    return rebuilt


@pytest.mark.parametrize("name", list(EXTRA))
def test_per_example_gradients_from_taps(name):
    md, params, batch = _extra_problem(name)
    assert not md.unsupported
    expected = fp.per_example_grads(md, params, batch)
    n = batch[1].shape[0]
    for key, value in _taps_gradients(md, params, batch).items():
        assert_relative_close(value * n, expected[key], TOL)  # mean loss: the batch share is ℓ_n / N


@pytest.mark.parametrize("name", list(EXTRA))
def test_structures_of_every_layer_type_equal_dense_ggn(name):
    md, params, batch = _extra_problem(name)
    dense = dense_ggn(md, params, batch)
    assert_relative_close(estimate(md, params, batch, kind="ggn", structure="full").to_dense(), dense, TOL)
    diag = estimate(md, params, batch, kind="ggn", structure="diag").to_dense()
    assert_relative_close(diag, torch.diag_embed(dense.diagonal()), TOL)
    unit = estimate(md, params, batch, kind="ggn", structure="unit").to_dense()
    assert_relative_close(unit, dense * block_mask(dense.shape[0], unit_groups(md)), TOL)


def test_grouped_conv_kron_is_exact_per_group_without_sharing():
    """A grouped convolution whose output is 1x1 has no weight sharing: with one example
    its kron block equals the GGN restricted to within-group blocks."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(4, 6, 3, groups=2), nn.Flatten()).double()
    md = fp.model(module, fp.losses.cross_entropy())
    params = md.params()
    batch = (torch.randn(1, 4, 3, 3), torch.tensor([2]))
    dense = dense_ggn(md, params, batch)
    # Group g owns output channels 3g..3g+2: their weights (18 each) and biases.
    weight = torch.arange(6 * 2 * 9).reshape(6, 18)
    bias = 6 * 18 + torch.arange(6)
    groups = [torch.cat([weight[3 * g:3 * g + 3].reshape(-1), bias[3 * g:3 * g + 3]]) for g in range(2)]
    expected = dense * block_mask(dense.shape[0], groups)
    assert_relative_close(estimate(md, params, batch, kind="ggn", structure="kron").to_dense(), expected, TOL)


def test_taps_per_example_under_vmap_equal_batch_taps():
    md, params, (inputs, targets) = _extra_problem("conv2d")

    def one(x, y):
        taps = layer_taps(md, params, x.unsqueeze(0),
                          lambda f: grad(lambda o: md.loss(o, y.unsqueeze(0)))(f).unsqueeze(0))
        return taps.output_grads

    per_example = vmap(one)(inputs, targets)
    batch = layer_taps(md, params, inputs, lambda f: grad(lambda o: md.loss(o, targets))(f).unsqueeze(0))
    n = targets.shape[0]
    for name, value in batch.output_grads.items():
        # Each example alone has loss ℓ_n (mean over one example); in the batch its share is ℓ_n / N.
        assert_relative_close(value[0] * n, per_example[name][:, 0, 0], TOL)


def test_no_hook_is_left_behind_when_the_model_raises():
    class Failing(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(3, 3)

        def forward(self, x):
            y = self.linear(x)
            if y.shape[0] > 0 and x.device.type != "meta":
                raise RuntimeError("model failure")
            return y

    module = Failing().double()
    md = fp.model(module, fp.losses.mse())
    with pytest.raises(RuntimeError, match="model failure"):
        layer_taps(md, md.params(), torch.randn(2, 3), lambda f: f.unsqueeze(0))
    assert not module.linear._forward_hooks
    md_ok, params, batch = _extra_problem("layernorm")
    estimate(md_ok, params, batch, kind="ggn", structure="kron")
    assert all(not sub._forward_hooks for sub in md_ok.module.modules())


def test_batchnorm_in_training_mode_is_rejected():
    md, params, batch = _extra_problem("conv2d")
    md.module.train()
    with pytest.raises(ValueError, match="batchnorm '1'.*eval"):
        estimate(md, params, batch, kind="ggn", structure="diag")


def test_layer_called_twice_is_rejected():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(3, 3)

        def forward(self, x):
            return self.linear(torch.tanh(self.linear(x)))

    md = fp.model(Twice().double(), fp.losses.mse())
    batch = (torch.randn(2, 3), torch.randn(2, 3))
    with pytest.raises(ValueError, match="'linear' ran more than once"):
        estimate(md, md.params(), batch, kind="ggn", structure="diag")
