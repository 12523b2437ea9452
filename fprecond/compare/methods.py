"""The methods ``fprecond compare`` can train with, their settings, and parsing of
``--set method.name=value``.

A method is a recipe of :mod:`fprecond.optimizers` with the comparison's default
settings (learning rates chosen for the embedded workloads, listed in
:data:`METHODS`). Any keyword argument of the recipe can be set; its type is taken
from the recipe's own default, so ``--set kfac.damping=1e-2`` is a float and
``--set kfac.kl_clip=none`` turns the clipping off.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable

import torch

import fprecond as fp
from fprecond.base import GradientTransformation
from fprecond.modeling import Model

__all__ = ["METHODS", "DEFAULT_METHODS", "Method", "MethodError", "parse_settings", "method_settings",
           "build_transform", "interval_settings"]

DEFAULT_METHODS: tuple[str, ...] = ("sgd", "adam", "kfac", "shampoo", "soap", "ekfac")


class MethodError(ValueError):
    """An unknown method or setting, or a value of the wrong type."""


@dataclasses.dataclass(frozen=True)
class Method:
    """``recipe``: the fprecond factory; ``defaults``: the comparison's settings for it;
    ``takes_model``: whether the recipe's first argument is the model; ``takes_inputs``:
    whether it needs ``example_inputs``; ``intervals``: the recipe's names for the
    curvature and inverse intervals (``None`` where it has no such schedule)."""

    name: str
    recipe: Callable[..., GradientTransformation]
    defaults: dict[str, Any]
    takes_model: bool = True
    takes_inputs: bool = False
    intervals: tuple[str | None, str | None] = (None, None)
    summary: str = ""

    def parameters(self) -> dict[str, inspect.Parameter]:
        """The recipe's settable keyword arguments (everything but the model and the inputs)."""
        skip = {"model", "example_inputs"}
        return {name: parameter for name, parameter in inspect.signature(self.recipe).parameters.items()
                if name not in skip and parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)}


def _optional(name: str) -> Callable[..., GradientTransformation] | None:
    return getattr(fp, name, None)


_CURVATURE_INTERVALS = ("curvature_every", "inverse_every")

# The comparison's defaults: learning rates (and a few schedules) chosen for the digits
# and sequence workloads at batch 64; everything else is the recipe's own default.
_TABLE: list[tuple[str, str, dict[str, Any], dict[str, Any]]] = [
    ("sgd", "SGD with heavy-ball momentum", {"learning_rate": 0.1, "momentum": 0.9}, {"takes_model": False}),
    ("adam", "Adam (Kingma & Ba 2015)", {"learning_rate": 3e-3}, {"takes_model": False}),
    ("adamw", "AdamW (Loshchilov & Hutter 2019)", {"learning_rate": 3e-3, "weight_decay": 1e-2},
     {"takes_model": False}),
    ("kfac", "K-FAC, Monte-Carlo Fisher, Kronecker factors, Cholesky", {},
     {"intervals": _CURVATURE_INTERVALS}),
    ("ekfac", "EKFAC: K-FAC with eigenbasis rescaling", {}, {"intervals": ("scale_every", "basis_every")}),
    ("natural_gradient", "natural gradient, exact Fisher, Kronecker factors", {},
     {"intervals": _CURVATURE_INTERVALS}),
    ("unit_wise_ng", "unit-wise natural gradient", {}, {"intervals": _CURVATURE_INTERVALS}),
    ("diag_ng", "diagonal natural gradient", {}, {"intervals": ("curvature_every", None)}),
    ("smw_ng", "empirical natural gradient by Sherman-Morrison-Woodbury", {}, {"takes_inputs": True}),
    ("seng", "SENG: sketched empirical natural gradient", {}, {"takes_inputs": True}),
    ("newton_cg", "Newton-CG / Hessian-free on the GGN", {}, {}),
    ("shampoo", "Shampoo with Adam grafting", {"learning_rate": 1e-2, "precondition_frequency": 10},
     {"takes_model": False, "intervals": ("statistics_every", "precondition_frequency")}),
    ("soap", "SOAP: Adam in Shampoo's eigenbasis", {"learning_rate": 1e-2},
     {"takes_model": False, "intervals": ("statistics_every", "precondition_frequency")}),
    ("psgd", "PSGD Kron, Hessian-vector products", {"learning_rate": 0.03, "momentum": 0.9},
     {"intervals": (None, "update_interval")}),
    ("kbfgs", "K-BFGS: Kronecker-factored damped BFGS", {"learning_rate": 0.1},
     {"intervals": (None, "inverse_every")}),
    ("muon", "Muon (Newton-Schulz orthogonalised momentum) + AdamW", {"learning_rate": 0.05,
                                                                      "adamw_learning_rate": 1e-2}, {}),
    ("sophia", "Sophia-G (Gauss-Newton-Bartlett diagonal, clipped)", {"learning_rate": 1e-2},
     {"intervals": ("update_interval", None)}),
    ("adahessian", "AdaHessian (Hutchinson diagonal)", {}, {"intervals": ("update_each", None)}),
]


def _methods() -> dict[str, Method]:
    methods: dict[str, Method] = {}
    for name, summary, defaults, options in _TABLE:
        recipe = _optional(name)
        if recipe is None:  # a recipe this version does not have
            continue
        methods[name] = Method(name=name, recipe=recipe, defaults=defaults, summary=summary, **options)
    return methods


METHODS: dict[str, Method] = _methods()


def _convert(method: str, name: str, text: str, default: Any) -> Any:
    """``text`` as the type of the recipe's default ``default``."""
    where = f"{method}.{name}"
    lowered = text.strip().lower()
    if lowered in ("none", "null"):
        return None
    if isinstance(default, bool):
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise MethodError(f"--set {where}: expected true or false, got {text!r}")
    if isinstance(default, int):
        try:
            return int(text)
        except ValueError:
            raise MethodError(f"--set {where}: expected an integer, got {text!r}") from None
    if isinstance(default, str):
        return text.strip()
    if isinstance(default, tuple):
        try:
            return tuple(float(part) for part in text.split("/"))
        except ValueError:
            raise MethodError(f"--set {where}: expected numbers separated by '/', got {text!r}") from None
    try:  # floats, and settings whose default is None or a schedule
        return float(text)
    except ValueError:
        if default is None or callable(default):
            return text.strip()
        raise MethodError(f"--set {where}: expected a number, got {text!r}") from None


def parse_settings(assignments: list[str], methods: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """``["kfac.damping=1e-3", ...]`` -> ``{"kfac": {"damping": 0.001}}``.

    Raises:
        MethodError: malformed text, a method not being compared, or a setting the
            recipe does not have (the message lists the ones it has).
    """
    settings: dict[str, dict[str, Any]] = {name: {} for name in methods}
    for assignment in assignments:
        for item in (part.strip() for part in assignment.split(",")):
            if not item:
                continue
            target, sep, value = item.partition("=")
            method, dot, name = target.strip().partition(".")
            if not sep or not dot or not method or not name:
                raise MethodError(f"--set: expected method.setting=value, got {item!r}")
            if method not in METHODS:
                raise MethodError(f"--set {target}: unknown method {method!r}; known: {', '.join(METHODS)}")
            if method not in methods:
                raise MethodError(f"--set {target}: method {method!r} is not among --methods ({', '.join(methods)})")
            parameters = METHODS[method].parameters()
            if name not in parameters:
                raise MethodError(f"--set {target}: {method} has no setting {name!r}; it has "
                                  f"{', '.join(parameters)}")
            default = METHODS[method].defaults.get(name, parameters[name].default)
            settings[method][name] = _convert(method, name, value, default)
    return settings


def interval_settings(method: str, curvature_every: int | None, inverse_every: int | None) -> dict[str, int]:
    """The recipe's own names for ``--curvature-every`` / ``--inverse-every``, where it has them."""
    curvature_name, inverse_name = METHODS[method].intervals
    settings: dict[str, int] = {}
    if curvature_every is not None and curvature_name is not None:
        settings[curvature_name] = curvature_every
    if inverse_every is not None and inverse_name is not None:
        settings[inverse_name] = inverse_every
    return settings


def method_settings(method: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The comparison's defaults for ``method`` updated with ``overrides``."""
    return {**METHODS[method].defaults, **overrides}


def build_transform(method: str, model: Model, example_inputs: torch.Tensor, settings: dict[str, Any]
                    ) -> GradientTransformation:
    """The transform of ``method`` with ``settings`` (validated by the recipe itself).

    Raises:
        MethodError: the recipe rejected a setting (its message is kept).
    """
    spec = METHODS[method]
    arguments = dict(settings)
    if spec.takes_inputs:
        arguments["example_inputs"] = example_inputs
    try:
        if spec.takes_model:
            return spec.recipe(model, **arguments)
        return spec.recipe(**arguments)
    except (TypeError, ValueError) as error:
        raise MethodError(f"{method}: {error}") from None
