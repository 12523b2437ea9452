"""The model description: apply, layers found, unsupported parameters."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fprecond as fp

from tests.helpers import EmbeddingLayerNorm


class _Scaled(nn.Module):
    """A custom module owning a parameter fprecond has no layer math for."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return x * self.gain


class _Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 3)
        self.bn = nn.BatchNorm1d(3)
        self.attention = nn.MultiheadAttention(3, 1, batch_first=True)
        self.norm = nn.LayerNorm(3, elementwise_affine=False)
        self.scaled = _Scaled()
        self.head = nn.Linear(3, 2, bias=False)

    def forward(self, x):
        h = self.bn(self.conv(x)).transpose(1, 2)
        h, _ = self.attention(h, h, h)
        return self.head(self.scaled(self.norm(h)))


def test_layers_and_unsupported_parameters_are_listed():
    module = _Mixed()
    md = fp.model(module, fp.losses.cross_entropy())
    found = {(layer.name, layer.kind, layer.weight, layer.bias) for layer in md.layers}
    assert found == {
        ("conv", "conv1d", "conv.weight", "conv.bias"),
        ("bn", "batchnorm", "bn.weight", "bn.bias"),
        ("head", "linear", "head.weight", None),
    }
    # Attention projections are used through their weights (hooks never fire), so they are unsupported.
    assert set(md.unsupported) == {"attention.in_proj_weight", "attention.in_proj_bias",
                                   "attention.out_proj.weight", "attention.out_proj.bias", "scaled.gain"}
    assert md.param_names == tuple(name for name, _ in module.named_parameters())
    assert md.layer("conv").module is module.conv
    with pytest.raises(KeyError, match="supported layers: conv, bn, head"):
        md.layer("attention")


def test_apply_equals_module_forward_and_uses_given_params():
    torch.manual_seed(0)
    module = EmbeddingLayerNorm()
    md = fp.model(module, fp.losses.cross_entropy())
    tokens = torch.randint(0, 7, (4, 5))
    params = md.params()
    assert torch.equal(md.apply(params, tokens), module(tokens))
    shifted = {k: v + 1.0 for k, v in params.items()}
    assert not torch.allclose(md.apply(shifted, tokens), module(tokens))
    assert torch.equal(next(module.parameters()), params["embed.weight"])  # module untouched


def test_buffers_come_from_module_unless_given():
    module = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).eval()
    with torch.no_grad():
        module[1].running_mean.fill_(0.5)
    md = fp.model(module, fp.losses.mse())
    x = torch.randn(5, 3)
    assert torch.allclose(md.apply(md.params(), x), module(x))
    buffers = md.buffers()
    buffers["1.running_mean"] = torch.zeros(4)
    assert not torch.allclose(md.apply(md.params(), x, buffers), module(x))


def test_tied_parameters_appear_once():
    embed = nn.Embedding(5, 3)
    head = nn.Linear(3, 5, bias=False)
    head.weight = embed.weight
    module = nn.Sequential(embed, head)
    md = fp.model(module, fp.losses.cross_entropy())
    assert md.param_names == ("0.weight",)
    assert {layer.weight for layer in md.layers} == {"0.weight"}


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        fp.model("not a module", fp.losses.mse())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="fprecond loss"):
        fp.model(nn.Linear(2, 2), nn.MSELoss())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no parameters"):
        fp.model(nn.Tanh(), fp.losses.mse())
    md = fp.model(nn.Linear(2, 2), fp.losses.mse())
    with pytest.raises(ValueError, match="missing \\['bias'\\]"):
        md.check_params({"weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="'weight' has shape"):
        md.check_params({"weight": torch.zeros(3, 2), "bias": torch.zeros(2)})
    with pytest.raises(TypeError, match="pair"):
        md.batch_loss(md.params(), torch.zeros(3))
