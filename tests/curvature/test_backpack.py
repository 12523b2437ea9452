"""Diagonals and Kronecker factors against BackPACK, a second independent implementation."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fprecond.curvature import estimate

from tests.helpers import assert_relative_close, make_problem, require_peer

TOL = 1e-9
# BackPACK's hooks warn when the inputs do not require gradients; that is expected here.
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


def _backpack_quantities(md, batch, extension_name: str):
    """Run BackPACK's ``extension_name`` on a deep copy (its hooks break torch.func on a module)."""
    backpack = require_peer("backpack")
    extensions = require_peer("backpack.extensions")
    inputs, targets = batch
    module = backpack.extend(copy.deepcopy(md.module))
    is_ce = type(md.loss).__name__ == "CrossEntropyLoss"
    loss_function = backpack.extend((nn.CrossEntropyLoss if is_ce else nn.MSELoss)(reduction=md.loss.reduction))
    loss = loss_function(module(inputs), targets)
    with backpack.backpack(getattr(extensions, extension_name)()):
        loss.backward()
    attribute = {"DiagGGNExact": "diag_ggn_exact", "DiagHessian": "diag_h", "KFLR": "kflr"}[extension_name]
    return {name: getattr(p, attribute) for name, p in module.named_parameters()}


@pytest.mark.parametrize("case", ["mlp", "cnn"])
@pytest.mark.parametrize(("kind", "extension"), [("ggn", "DiagGGNExact"), ("hessian", "DiagHessian")])
def test_diagonal_matches_backpack(case, loss_key, kind, extension):
    md, params, batch = make_problem(case, loss_key, n=5)
    expected = _backpack_quantities(md, batch, extension)
    diagonal = estimate(md, params, batch, kind=kind, structure="diag")
    ours = {}
    for block in diagonal.blocks:
        ours.update(block.diagonal)
    for name in md.param_names:
        assert_relative_close(ours[name], expected[name], TOL)


def test_kron_weight_block_matches_backpack_kflr(loss_key):
    """KFLR is K-FAC with the exact GGN's output factor; BackPACK keeps the bias apart, so
    compare the weight-weight part ``kron(G, A_ww)`` of each layer."""
    md, params, batch = make_problem("mlp", loss_key, n=5)
    expected = _backpack_quantities(md, batch, "KFLR")
    curvature = estimate(md, params, batch, kind="ggn", structure="kron")
    for layer, block in zip(md.layers, curvature.blocks):
        g_factor, a_factor = expected[layer.weight]
        inputs = a_factor.shape[0]
        ours = torch.kron(block.output_factor[0], block.input_factor[0, :inputs, :inputs])
        assert_relative_close(ours, torch.kron(g_factor, a_factor), TOL)
