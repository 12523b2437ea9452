"""Bad input is rejected early, with a ``ValueError``/``TypeError`` whose message names
the argument, parameter or layer at fault, for every recipe.

Early means at construction or ``init`` for settings and parameters, and at the
first ``update`` for gradients and batches: before any linear algebra, so that the
error is never a shape mismatch deep inside a solver. Each test asserts the type
and the name in the message; the recipe list comes from :mod:`tests.reliability.cases`.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import pytest
import torch

import fprecond as fp
from tests.reliability.cases import RECIPES, RecipeCase, tiny_problem

NAMES = tuple(RECIPES)
BATCH_RECIPES = tuple(name for name, case in RECIPES.items() if "batch" in case.extras)
KEY_RECIPES = tuple(name for name, case in RECIPES.items() if "key" in case.extras)


def _setup(case: RecipeCase, **settings: Any):
    problem = tiny_problem("mlp")
    transform = case.make(problem.model, problem.batch[0], **settings)
    grads = torch.func.grad(problem.loss)(problem.params)
    return problem, transform, grads


def _update(case: RecipeCase, transform, grads, state, params, batch, **extras: Any):
    return transform.update(grads, state, params, **{"batch": batch, "key": fp.random.key(0), **extras})


# ---------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("name", NAMES)
def test_gradients_with_a_missing_leaf_are_rejected(name: str) -> None:
    case = RECIPES[name]
    problem, transform, grads = _setup(case)
    state = transform.init(problem.params)
    del grads["2.bias"]
    with pytest.raises(ValueError, match=r"structure of the parameters.*missing \['2.bias'\]"):
        _update(case, transform, grads, state, problem.params, problem.batch)


@pytest.mark.parametrize("name", NAMES)
def test_gradients_with_a_wrong_shape_are_rejected(name: str) -> None:
    case = RECIPES[name]
    problem, transform, grads = _setup(case)
    state = transform.init(problem.params)
    grads["0.weight"] = grads["0.weight"].T.contiguous()
    with pytest.raises(ValueError, match=r"gradient '0.weight' has shape \(4, 5\), the parameter has shape \(5, 4\)"):
        _update(case, transform, grads, state, problem.params, problem.batch)


@pytest.mark.parametrize("name", NAMES)
def test_gradients_with_a_wrong_dtype_are_rejected(name: str) -> None:
    case = RECIPES[name]
    problem, transform, grads = _setup(case)
    state = transform.init(problem.params)
    grads["2.weight"] = grads["2.weight"].float()
    with pytest.raises(TypeError, match=r"gradient '2.weight' has dtype torch.float32, the parameter has dtype "
                                        r"torch.float64"):
        _update(case, transform, grads, state, problem.params, problem.batch)


# ---------------------------------------------------------------------------------- parameters


@pytest.mark.parametrize("dtype", [torch.int64, torch.complex128, torch.bool])
@pytest.mark.parametrize("name", NAMES)
def test_non_real_floating_parameters_are_rejected_at_init(name: str, dtype: torch.dtype) -> None:
    case = RECIPES[name]
    problem, transform, _ = _setup(case)
    params = {**problem.params, "2.weight": problem.params["2.weight"].to(dtype)}
    with pytest.raises(TypeError, match=rf"parameter '2.weight' has dtype {dtype}; parameters must be real floating"):
        transform.init(params)


@pytest.mark.parametrize("name", NAMES)
def test_parameters_on_different_devices_are_rejected_at_init(name: str) -> None:
    case = RECIPES[name]
    problem, transform, _ = _setup(case)
    # The meta device stands in for a second accelerator: the check compares devices only.
    params = {**problem.params, "2.bias": problem.params["2.bias"].to("meta")}
    with pytest.raises(ValueError, match=r"parameter '2.bias' is on meta but '0.weight' is on cpu"):
        transform.init(params)


# ---------------------------------------------------------------------------------- extras


@pytest.mark.parametrize("name", BATCH_RECIPES)
def test_a_missing_batch_is_named(name: str) -> None:
    case = RECIPES[name]
    problem, transform, grads = _setup(case)
    state = transform.init(problem.params)
    with pytest.raises(TypeError, match="'batch'"):
        transform.update(grads, state, problem.params, key=fp.random.key(0))


@pytest.mark.parametrize("name", KEY_RECIPES)
def test_a_missing_key_is_named(name: str) -> None:
    case = RECIPES[name]
    problem, transform, grads = _setup(case)
    state = transform.init(problem.params)
    with pytest.raises(TypeError, match="'key'"):
        transform.update(grads, state, problem.params, batch=problem.batch)


# ---------------------------------------------------------------------------------- batches


@pytest.mark.parametrize("name", BATCH_RECIPES)
def test_class_indices_out_of_range_are_rejected(name: str) -> None:
    case = RECIPES[name]
    problem, transform, grads = _setup(case)
    state = transform.init(problem.params)
    inputs, targets = problem.batch
    bad = targets.clone()
    bad[3] = 3  # three classes: 0, 1, 2
    with pytest.raises(ValueError, match=r"class index 3 is out of range for outputs with 3 classes"):
        _update(case, transform, grads, state, problem.params, (inputs, bad))
    bad[3] = -1
    with pytest.raises(ValueError, match=r"class index -1 is out of range"):
        _update(case, transform, grads, state, problem.params, (inputs, bad))


@pytest.mark.parametrize("name", BATCH_RECIPES)
def test_targets_of_the_wrong_shape_are_rejected(name: str) -> None:
    case = RECIPES[name]
    problem, transform, grads = _setup(case)
    state = transform.init(problem.params)
    inputs, targets = problem.batch
    with pytest.raises(ValueError, match=r"inputs of shape \(8, 4\) and targets of shape \(4,\)"):
        _update(case, transform, grads, state, problem.params, (inputs, targets[:4]))
    with pytest.raises(ValueError, match=r"targets must have shape \(\d+,\) \(class indices\)"):
        _update(case, transform, grads, state, problem.params, (inputs, targets[:, None].expand(8, 2)))
    with pytest.raises(ValueError, match="targets must be integer class indices"):
        _update(case, transform, grads, state, problem.params, (inputs, targets.double()))


def test_mse_targets_of_the_wrong_shape_are_rejected() -> None:
    problem = tiny_problem("mlp", loss="mse")
    transform = fp.kfac(problem.model)
    grads = torch.func.grad(problem.loss)(problem.params)
    inputs, targets = problem.batch
    with pytest.raises(ValueError, match=r"mse: targets must have the outputs' shape \(8, 3\), got \(8, 2\)"):
        transform.update(grads, transform.init(problem.params), problem.params, batch=(inputs, targets[:, :2]),
                         key=fp.random.key(0))


# ---------------------------------------------------------------------------------- settings


def _settings_of(case: RecipeCase) -> dict[str, inspect.Parameter]:
    recipe = getattr(fp, case.name)
    return dict(inspect.signature(recipe).parameters)


_INTERVALS = ("curvature_every", "inverse_every", "scale_every", "basis_every", "precondition_frequency",
              "statistics_every", "update_interval", "update_each", "iterations")


def _bad_settings() -> list[tuple[str, str, Any]]:
    cases = []
    for name, case in RECIPES.items():
        settings = _settings_of(case)
        for argument in ("learning_rate",):
            if argument in settings:
                cases += [(name, argument, 0.0), (name, argument, -0.1), (name, argument, math.nan)]
        if "damping" in settings:
            cases += [(name, "damping", 0.0), (name, "damping", -1.0)]
        for argument in _INTERVALS:
            if argument in settings:
                cases += [(name, argument, 0), (name, argument, 1.5)]
        if "momentum" in settings:
            cases += [(name, "momentum", 1.0), (name, "momentum", -0.1)]
        if "weight_decay" in settings:
            cases += [(name, "weight_decay", -1e-3)]
    return cases


@pytest.mark.parametrize("name, argument, value", _bad_settings())
def test_bad_settings_are_rejected_at_construction(name: str, argument: str, value: Any) -> None:
    problem = tiny_problem("mlp")
    with pytest.raises(ValueError, match=argument):
        RECIPES[name].make(problem.model, problem.batch[0], **{argument: value})


def _bad_names() -> list[tuple[str, str, str]]:
    cases = []
    for name, case in RECIPES.items():
        settings = _settings_of(case)
        for argument in ("kind", "structure", "solver", "variant", "curvature", "estimator", "grafting", "method",
                         "eigenvalues", "fallback", "scale"):
            if argument in settings and isinstance(settings[argument].default, str):
                cases.append((name, argument, "no_such_" + argument))
    return cases


@pytest.mark.parametrize("name, argument, value", _bad_names())
def test_unknown_names_are_rejected_with_the_choices(name: str, argument: str, value: str) -> None:
    problem = tiny_problem("mlp")
    with pytest.raises(ValueError, match=rf"{argument}.*{value}|{value}.*{argument}"):
        RECIPES[name].make(problem.model, problem.batch[0], **{argument: value})


# ---------------------------------------------------------------------------------- models


class _Opaque(torch.nn.Module):
    """A custom module with raw parameters: no layer fprecond has a Kronecker form for."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w


@pytest.mark.parametrize("name", ["kfac", "ekfac", "natural_gradient", "unit_wise_ng", "kbfgs"])
def test_a_model_without_a_supported_layer_is_rejected_for_layer_structures(name: str) -> None:
    model = fp.model(_Opaque(), fp.losses.cross_entropy())
    with pytest.raises(ValueError, match=r"no.*(supported|nn.Linear) layer|supported layer.*\['w'\]"):
        RECIPES[name].make(model, torch.zeros(8, 4, dtype=torch.float64))


def test_the_curvature_estimator_names_an_unsupported_parameter() -> None:
    class Mixed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(4, 3).double()
            self.scale = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(x) * self.scale

    model = fp.model(Mixed(), fp.losses.cross_entropy())
    with pytest.raises(ValueError, match=r"parameter 'scale'.*not in a supported layer"):
        fp.curvature.estimator(model, kind="ggn", structure="kron")
