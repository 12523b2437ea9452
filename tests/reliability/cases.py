"""Every recipe of :mod:`fprecond.optimizers` as a test case: how to build it for a tiny
model, which extras its ``update`` needs, whether it draws random numbers, settings
that make a well-posed small problem, and hyper-parameter ranges for property tests.

One registry (:data:`RECIPES`) shared by the reliability tests (properties, fault
injection) and the bad-input tests. A case builds its transform with
``case.build(model, example_inputs, **settings)``; ``settings`` override
``case.defaults`` (learning rates and intervals chosen so that 20 full-batch steps
on the tiny models below lower the loss) and are drawn from ``case.ranges``.

Tiny problems (:func:`tiny_problem`): a tanh MLP ``d_in -> hidden -> classes`` or a
CNN ``Conv2d(c_in, c_out, 3, padding=1) -> tanh -> flatten -> Linear`` on ``s x s``
inputs, with cross-entropy or MSE (``reduction="mean"``), parameters in float64,
float32 or bfloat16, inputs and targets fixed by a seed.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Literal

import torch
from torch import nn

import fprecond as fp
from fprecond.base import GradientTransformation
from fprecond.modeling import Model
from fprecond.tree import PyTree

__all__ = ["Range", "RecipeCase", "RECIPES", "Problem", "tiny_problem", "counters", "total", "assert_finite_like",
           "loss_bound", "DTYPES"]

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}


# --------------------------------------------------------------------------- ranges


@dataclasses.dataclass(frozen=True)
class Range:
    """A hyper-parameter range: ``low``..``high`` (inclusive), sampled uniformly on a log
    scale (``"log"``), linearly (``"linear"``), as an int (``"int"``), or one of
    ``choices`` (``"choice"``)."""

    kind: Literal["log", "linear", "int", "choice"]
    low: float = 0.0
    high: float = 0.0
    choices: tuple[Any, ...] = ()

    def __post_init__(self) -> None:
        if self.kind == "choice" and not self.choices:
            raise ValueError("Range: a choice range needs choices")
        if self.kind != "choice" and not self.low <= self.high:
            raise ValueError(f"Range: low {self.low} > high {self.high}")
        if self.kind == "log" and self.low <= 0:
            raise ValueError("Range: a log range needs low > 0")

    def contains(self, value: Any) -> bool:
        if self.kind == "choice":
            return value in self.choices
        return self.low <= value <= self.high


def log(low: float, high: float) -> Range:
    return Range("log", low, high)


def linear(low: float, high: float) -> Range:
    return Range("linear", low, high)


def integer(low: int, high: int) -> Range:
    return Range("int", low, high)


def choice(*choices: Any) -> Range:
    return Range("choice", choices=tuple(choices))


# --------------------------------------------------------------------------- cases


Builder = Callable[..., GradientTransformation]


@dataclasses.dataclass(frozen=True)
class RecipeCase:
    """One recipe as a test case.

    Attributes:
        name: the recipe's name in :mod:`fprecond.optimizers`.
        build: ``(model, example_inputs, **settings) -> transform``; ``settings``
            are merged over ``defaults`` by :meth:`make`.
        extras: the keyword extras ``update`` needs (``"batch"``, ``"key"``).
        random: whether the recipe draws random numbers (from ``key``).
        defaults: settings for a well-posed tiny problem (20 steps lower the loss).
        ranges: hyper-parameter name -> :class:`Range` for property tests.
        dtypes: parameter dtypes the recipe runs on natively; in the others (bfloat16 for
            the recipes whose factors need LAPACK) it runs through
            :func:`fprecond.transforms.precision.with_precision` (float32 factors).
        curvature: where its own failure counters live, for the fault tests:
            ``"precondition"`` (:class:`fprecond.precondition.PreconditionState`:
            ``failures``, ``rejected``), ``"shampoo"`` (``rejected`` statistics and
            roots), ``"soap"`` (``rejected`` statistics), ``"kbfgs"`` (``failures``,
            ``rejected`` estimates of ``A``, ``skipped`` pairs) or ``None``.
        every_step: settings that make it estimate its curvature (statistics, Hessian
            probes) and refresh its preconditioner on every step.
        no_weight_decay: settings that turn its weight decay off.
    """

    name: str
    build: Builder
    extras: tuple[str, ...] = ()
    random: bool = False
    defaults: dict[str, Any] = dataclasses.field(default_factory=dict)
    ranges: dict[str, Range] = dataclasses.field(default_factory=dict)
    dtypes: tuple[str, ...] = ("float64", "float32")
    curvature: str | None = None
    every_step: dict[str, Any] = dataclasses.field(default_factory=dict)
    no_weight_decay: dict[str, Any] = dataclasses.field(default_factory=dict)

    def make(self, model: Model, example_inputs: torch.Tensor, **settings: Any) -> GradientTransformation:
        """The transform with ``defaults`` updated by ``settings``."""
        return self.build(model, example_inputs, **{**self.defaults, **settings})


def _model_free(recipe: Callable[..., GradientTransformation]) -> Builder:
    def build(model: Model, example_inputs: torch.Tensor, **settings: Any) -> GradientTransformation:
        del model, example_inputs
        return recipe(**settings)

    return build


def _with_model(recipe: Callable[..., GradientTransformation]) -> Builder:
    def build(model: Model, example_inputs: torch.Tensor, **settings: Any) -> GradientTransformation:
        del example_inputs
        return recipe(model, **settings)

    return build


def _with_inputs(recipe: Callable[..., GradientTransformation]) -> Builder:
    def build(model: Model, example_inputs: torch.Tensor, **settings: Any) -> GradientTransformation:
        return recipe(model, example_inputs=example_inputs, **settings)

    return build


_FIRST_ORDER_DTYPES = ("float64", "float32", "bfloat16")
_CURVATURE_RANGES = {"learning_rate": log(0.02, 0.3), "damping": log(1e-2, 1.0), "momentum": linear(0.0, 0.9),
                     "curvature_every": integer(1, 3), "inverse_every": integer(1, 3)}
_EVERY_STEP = {"curvature_every": 1, "inverse_every": 1}
_BATCH = ("batch",)
_BATCH_KEY = ("batch", "key")


def _hessian_free(model: Model, learning_rate: float = 0.5, **settings: Any) -> GradientTransformation:
    """:func:`fprecond.hessian_free` as it is meant to be used: guarded, with the learning rate."""
    return fp.apply_if_finite(fp.named_chain(
        ("precondition", fp.hessian_free(model, learning_rate=learning_rate, **settings)),
        ("learning_rate", fp.scale_by_learning_rate(learning_rate))))


_CASES = [
    RecipeCase("sgd", _model_free(fp.sgd), defaults={"learning_rate": 0.1, "momentum": 0.9},
               ranges={"learning_rate": log(1e-3, 0.3), "momentum": linear(0.0, 0.95),
                       "weight_decay": log(1e-5, 1e-2)},
               dtypes=_FIRST_ORDER_DTYPES),
    RecipeCase("adam", _model_free(fp.adam), defaults={"learning_rate": 1e-2},
               ranges={"learning_rate": log(1e-4, 3e-2), "b1": linear(0.0, 0.95), "b2": linear(0.9, 0.9999),
                       "eps": log(1e-10, 1e-6), "amsgrad": choice(False, True)},
               dtypes=_FIRST_ORDER_DTYPES),
    RecipeCase("adamw", _model_free(fp.adamw), defaults={"learning_rate": 1e-2},
               ranges={"learning_rate": log(1e-4, 3e-2), "weight_decay": log(1e-4, 0.1),
                       "amsgrad": choice(False, True)},
               dtypes=_FIRST_ORDER_DTYPES, no_weight_decay={"weight_decay": 0.0}),
    RecipeCase("kfac", _with_model(fp.kfac), _BATCH_KEY, random=True,
               defaults={"learning_rate": 0.1, "damping": 1e-2, "inverse_every": 2, "warmup": 1},
               ranges={**_CURVATURE_RANGES, "warmup": integer(0, 2), "kind": choice("fisher_mc", "empirical_fisher"),
                       "kl_clip": log(1e-3, 1e-1)},
               curvature="precondition", every_step=_EVERY_STEP),
    RecipeCase("ekfac", _with_model(fp.ekfac), _BATCH_KEY, random=True,
               defaults={"learning_rate": 0.1, "damping": 1e-2, "basis_every": 2},
               ranges={"learning_rate": log(0.02, 0.3), "damping": log(1e-2, 1.0), "momentum": linear(0.0, 0.9),
                       "scale_every": integer(1, 2), "basis_every": integer(1, 3)},
               curvature="precondition", every_step={"scale_every": 1, "basis_every": 1}),
    RecipeCase("natural_gradient", _with_model(fp.natural_gradient), _BATCH,
               defaults={"learning_rate": 0.1, "damping": 1e-2},
               ranges={**_CURVATURE_RANGES, "structure": choice("kron", "layer", "diag", "unit", "full"),
                       "kind": choice("fisher", "ggn", "empirical_fisher")},
               curvature="precondition", every_step=_EVERY_STEP),
    RecipeCase("unit_wise_ng", _with_model(fp.unit_wise_ng), _BATCH_KEY, random=True,
               defaults={"learning_rate": 0.1},
               ranges=_CURVATURE_RANGES, curvature="precondition", every_step=_EVERY_STEP),
    RecipeCase("diag_ng", _with_model(fp.diag_ng), _BATCH_KEY, random=True,
               defaults={"learning_rate": 0.1},
               ranges={k: v for k, v in _CURVATURE_RANGES.items() if k != "inverse_every"},
               curvature="precondition", every_step={"curvature_every": 1}),
    RecipeCase("smw_ng", _with_inputs(fp.smw_ng), _BATCH,
               defaults={"learning_rate": 0.1},
               ranges={**_CURVATURE_RANGES, "damping": log(0.05, 1.0)}, curvature="precondition",
               every_step=_EVERY_STEP),
    RecipeCase("seng", _with_inputs(fp.seng), _BATCH,
               defaults={"learning_rate": 0.1, "subsample": 4, "rank": 2},
               ranges={**_CURVATURE_RANGES, "damping": log(0.05, 1.0), "subsample": integer(2, 8),
                       "rank": integer(1, 3)},
               curvature="precondition", every_step=_EVERY_STEP),
    RecipeCase("newton", _with_model(fp.newton), _BATCH,
               defaults={"learning_rate": 0.5, "damping": 1.0},
               ranges={"learning_rate": log(0.1, 1.0), "damping": log(0.3, 3.0),
                       "structure": choice("full", "layer"), "eigenvalues": choice("clamp", "abs"),
                       "curvature_every": integer(1, 3)},
               curvature="precondition", every_step={"curvature_every": 1}),
    RecipeCase("newton_cg", _with_model(fp.newton_cg), _BATCH,
               defaults={"learning_rate": 0.5, "iterations": 5},
               ranges={"learning_rate": log(0.1, 1.0), "damping": log(0.3, 3.0), "iterations": integer(2, 8),
                       "adapt_damping": choice(True, False), "diagonal_preconditioner": choice(False, True)}),
    RecipeCase("hessian_free", _with_model(_hessian_free), _BATCH,
               defaults={"learning_rate": 0.5, "iterations": 5},
               ranges={"learning_rate": log(0.1, 1.0), "damping": log(0.3, 3.0), "iterations": integer(2, 8),
                       "max_damping": log(10.0, 1e6), "warm_start": linear(0.0, 1.0)}),
    RecipeCase("shampoo", _model_free(fp.shampoo),
               defaults={"learning_rate": 1e-2, "precondition_frequency": 2},
               ranges={"learning_rate": log(1e-3, 3e-2), "precondition_frequency": integer(1, 4),
                       "statistics_every": integer(1, 2), "grafting": choice("adam", "adagrad", "rmsprop", "sgd"),
                       "max_preconditioner_dim": integer(2, 8), "method": choice("eigh", "newton"),
                       "epsilon": log(1e-12, 1e-6)},
               curvature="shampoo", every_step={"precondition_frequency": 1, "start_preconditioning_step": 1}),
    RecipeCase("soap", _model_free(fp.soap),
               defaults={"learning_rate": 1e-2, "precondition_frequency": 2},
               ranges={"learning_rate": log(1e-3, 3e-2), "precondition_frequency": integer(1, 4),
                       "weight_decay": log(1e-4, 1e-2), "block_size": choice(None, 2, 3),
                       "normalize_grads": choice(False, True)},
               curvature="soap", every_step={"precondition_frequency": 1}, no_weight_decay={"weight_decay": 0.0}),
    RecipeCase("psgd", _with_model(fp.psgd), _BATCH_KEY, random=True,
               defaults={"learning_rate": 0.05},
               ranges={"learning_rate": log(1e-2, 0.1), "variant": choice("kron", "dense"),
                       "curvature": choice("hvp", "whitening"), "update_interval": integer(1, 3),
                       "momentum": linear(0.0, 0.9)},
               every_step={"update_interval": 1}),
    RecipeCase("kbfgs", _with_model(fp.kbfgs), _BATCH,
               defaults={"learning_rate": 0.03, "inverse_every": 2},
               ranges={"learning_rate": log(3e-3, 0.05), "damping": log(0.1, 1.0), "inverse_every": integer(1, 4),
                       "fallback": choice("sgd", "adam")},
               curvature="kbfgs", every_step={"inverse_every": 1}),
    RecipeCase("muon", _with_model(fp.muon), defaults={"learning_rate": 0.02, "adamw_learning_rate": 1e-2},
               ranges={"learning_rate": log(3e-3, 0.05), "adamw_learning_rate": log(1e-3, 3e-2),
                       "momentum": linear(0.5, 0.95), "nesterov": choice(True, False),
                       "scale": choice("jordan", "moonlight", "none")},
               dtypes=_FIRST_ORDER_DTYPES),
    RecipeCase("sophia", _with_model(fp.sophia), _BATCH_KEY, random=True,
               defaults={"learning_rate": 1e-2, "update_interval": 2},
               ranges={"learning_rate": log(1e-3, 3e-2), "estimator": choice("gnb", "hutchinson"),
                       "update_interval": integer(1, 4), "rho": log(0.01, 0.1)},
               every_step={"update_interval": 1}, no_weight_decay={"weight_decay": 0.0}),
    RecipeCase("adahessian", _with_model(fp.adahessian), _BATCH_KEY, random=True,
               defaults={"learning_rate": 0.05},
               ranges={"learning_rate": log(1e-2, 0.1), "update_each": integer(1, 3),
                       "hessian_power": linear(0.5, 1.0)},
               every_step={"update_each": 1}),
]

RECIPES: dict[str, RecipeCase] = {case.name: case for case in _CASES}


# --------------------------------------------------------------------------- problems


@dataclasses.dataclass(frozen=True)
class Problem:
    """A tiny model with one fixed batch: ``model``, initial ``params`` and ``batch``."""

    model: Model
    params: dict[str, torch.Tensor]
    batch: tuple[torch.Tensor, torch.Tensor]

    def loss(self, params: PyTree) -> torch.Tensor:
        return self.model.batch_loss(params, self.batch)


class _TinyCNN(nn.Sequential):
    def __init__(self, channels: int, out_channels: int, size: int, classes: int) -> None:
        super().__init__(nn.Conv2d(channels, out_channels, 3, padding=1), nn.Tanh(), nn.Flatten(),
                         nn.Linear(out_channels * size * size, classes))


def tiny_problem(architecture: str = "mlp", *, width: int = 4, classes: int = 3, batch_size: int = 8,
                 loss: str = "cross_entropy", dtype: str = "float64", seed: int = 0) -> Problem:
    """A tiny problem: ``"mlp"`` (``width`` inputs and hidden units) or ``"cnn"``
    (``width`` is the image side; 2 input and 2 output channels), ``classes`` outputs,
    ``batch_size`` examples, ``"cross_entropy"`` or ``"mse"`` (mean reduction)."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # module initialisation only; the library never reads the global generator
    module: nn.Module
    if architecture == "mlp":
        module = nn.Sequential(nn.Linear(width, width + 1), nn.Tanh(), nn.Linear(width + 1, classes))
        inputs = torch.randn(batch_size, width, generator=generator, dtype=torch.float64)
    elif architecture == "cnn":
        module = _TinyCNN(2, 2, width, classes)
        inputs = torch.randn(batch_size, 2, width, width, generator=generator, dtype=torch.float64)
    else:
        raise ValueError(f"tiny_problem: architecture must be 'mlp' or 'cnn', got {architecture!r}")
    torch_dtype = DTYPES[dtype]
    module = module.to(torch_dtype)
    if loss == "cross_entropy":
        targets = torch.randint(0, classes, (batch_size,), generator=generator)
        description = fp.model(module, fp.losses.cross_entropy())
    else:
        targets = torch.randn(batch_size, classes, generator=generator, dtype=torch.float64).to(torch_dtype)
        description = fp.model(module, fp.losses.mse())
    return Problem(description, description.params(), (inputs.to(torch_dtype), targets))


# --------------------------------------------------------------------------- counters


_COUNTER_FIELDS = ("skipped", "failures", "rejected")


def counters(state: Any) -> dict[str, int]:
    """Every counter of skipped steps, failed factorisations and rejected estimates in a
    recipe's state, by path (``"skipped"`` is the outer ``apply_if_finite`` guard's;
    e.g. ``"inner_state.precondition.failures"``)."""
    found: dict[str, int] = {}

    def walk(node: Any, path: str) -> None:
        if isinstance(node, torch.Tensor):
            return
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{path}.{key}" if path else str(key))
            return
        fields = getattr(node, "_fields", None) or (
            [f.name for f in dataclasses.fields(node)] if dataclasses.is_dataclass(node) else None)
        if fields is not None:
            for name in fields:
                value = getattr(node, name)
                where = f"{path}.{name}" if path else name
                if name in _COUNTER_FIELDS and isinstance(value, torch.Tensor) and value.dim() == 0:
                    found[where] = int(value)
                else:
                    walk(value, where)
            return
        if isinstance(node, (tuple, list)):
            for index, value in enumerate(node):
                walk(value, f"{path}.{index}" if path else str(index))

    walk(state, "")
    return found


def total(found: dict[str, int], field: str) -> int:
    """The sum of the counters named ``field`` (last path component) in ``counters(state)``."""
    return sum(value for path, value in found.items() if path.rsplit(".", 1)[-1] == field and path != "skipped")


def assert_finite_like(updates: PyTree, params: PyTree) -> None:
    """``updates`` has the structure, shapes and dtypes of ``params`` and only finite entries."""
    assert isinstance(updates, dict) and list(updates) == list(params), (list(updates), list(params))
    for name, value in params.items():
        update = updates[name]
        assert update.shape == value.shape, (name, update.shape, value.shape)
        assert update.dtype == value.dtype, (name, update.dtype, value.dtype)
        assert bool(torch.isfinite(update).all()), f"{name}: non-finite update"


def loss_bound(initial: float) -> float:
    """How far a reasonable run may let the loss rise over 20 steps on a tiny problem."""
    return 1.5 * initial + math.log(2.0)
