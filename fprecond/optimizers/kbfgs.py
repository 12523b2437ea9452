"""K-BFGS (Goldfarb, Ren & Bahamou 2020): Kronecker-factored, damped BFGS for the linear layers.

"Practical Quasi-Newton Methods for Training Deep Neural Networks" (NeurIPS 2020),
reference code ``renyiryry/kbfgs_neurips2020_public`` (``kbfgs_utils.py``,
``training_function.py``). Per ``nn.Linear`` layer ``l`` with weight ``W`` ``(O, D)`` and
bias ``b`` folded in as a homogeneous input coordinate (``W̃ = [W | b]``, ``S = D + 1``),
the layer's block of the inverse Hessian is approximated by ``H_g ⊗ H_a`` and::

    ΔW̃ = H_g ∇W̃ H_a                       (O, S) = (O, O)(O, S)(S, S)

- ``H_a = (A + √λ I)⁻¹`` with ``A`` a running average (``ema_decay``) of
  ``mean_{n,p} ã ãᵀ`` over the layer inputs ``ã`` (examples ``n``, positions ``p`` of a
  sequence), refreshed every ``inverse_every`` steps.
- ``H_g ≈ G⁻¹``, the inverse of the curvature w.r.t. the pre-activations ``z = W̃ ã``,
  kept by damped BFGS updates from one pair ``(s, y)`` per step, measured on one
  minibatch at two parameter values::

      s = mean_{n,p} z_np(θ') - mean_{n,p} z_np(θ)          (O,)
      y = Σ_{n,p} ∂L/∂z_np(θ') - Σ_{n,p} ∂L/∂z_np(θ)        (O,)

  with ``L`` the loss as reduced. For a mean-reduced loss over ``N`` examples without
  positions ``y`` is ``mean_n`` of the per-example gradients ``∂ℓ_n/∂z_n``, the scaling of
  the reference (``N · a.grad``); in general ``y`` is the gradient of ``L`` for a common
  shift of every ``z_np``, the shift ``s`` measures, so ``sᵀy`` is ``L``'s curvature along it.
  The pairs pass through an exponential average (``pair_decay``, the reference's 0.9 for
  minibatches), then double damping (:func:`double_damping`), then the BFGS update of the
  inverse (:func:`bfgs_inverse_update`)::

      H ← (I - ρ s yᵀ) H (I - ρ y sᵀ) + ρ s sᵀ,   ρ = 1 / sᵀy.

  A degenerate pair (``s = 0``, non-finite values, ``sᵀy <= 0`` after rounding) keeps ``H``
  and is counted in ``state.skipped``.

When the pair is measured. The reference takes its step ``θ_k → θ_{k+1}``, then runs an
extra forward and backward pass at ``θ_{k+1}`` on batch ``k`` and uses that pair from
step ``k+1`` on. A pure transform cannot see ``θ_{k+1}``, so step ``k`` here runs the
extra pass at the previous step's parameters ``θ_{k-1}`` (kept in the state) on the
current batch ``k``: the pair of the step ``θ_{k-1} → θ_k`` enters ``H_g`` before step ``k``'s
direction, as in the reference; only the minibatch on which it is measured moves from
``k - 1`` to ``k``. Both are the standard stochastic quasi-Newton construction (Schraudolph
et al. 2007; Byrd et al. 2016): both ends of a pair on the same minibatch, so ``y`` is a
difference of gradients of one sampled function. Step 0 has no pair: ``H_g = I`` (the
reference's ``Kron_LBFGS_Hg_initial = 1``). Cost per step: two forward and backward
passes through layer taps (:mod:`fprecond.taps`) besides the caller's gradient, as the
reference.

Defaults from the reference's ``train_model``: ``λ = 0.3`` (``lambda_damping``), both
``√λ`` damping terms (``Kron_BFGS_A_LM_epsilon``, ``Kron_BFGS_H_epsilon``), Powell's
``μ1 = 0.2``, ``A`` decay 0.9 (``Kron_BFGS_A_decay``), ``A`` inverse every 20 steps
(``Kron_BFGS_A_inv_freq``), pair average 0.9, gradient momentum 0.9 and learning rate
0.3 (see :func:`kbfgs` for the conversion to this library's momentum). Deviations:
the reference keeps ``H_a`` itself by BFGS updates with the exact action of
``A + √λ I`` ("Hessian-action BFGS", started from its inverse); this module uses that
inverse, refreshed on a schedule as K-FAC does; and ``A`` starts from the first batch
instead of a pass over the training set.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import torch

from fprecond._validation import check_choice, check_number, check_positive_int, step_counter
from fprecond.base import (
    GradientTransformation,
    Params,
    ScalarOrSchedule,
    Updates,
    identity,
    named_chain,
    require_extras,
    require_params,
)
from fprecond.curvature.estimate import running_average
from fprecond.lazy import lazy_where
from fprecond.modeling import Layer, Model, unpack_batch
from fprecond.optimizers._recipe import recipe
from fprecond.precondition import is_due
from fprecond.solvers.bfgs import POWELL, DampedPair, bfgs_inverse_update, double_damping
from fprecond.solvers.linalg import damped_cholesky_inverse
from fprecond.taps import layer_taps
from fprecond.transforms.adam import scale_by_adam
from fprecond.transforms.partition import partition
from fprecond.tree import tree_all_finite, tree_map

__all__ = [
    "kbfgs",
    "scale_by_kbfgs",
    "ScaleByKbfgsState",
    "LayerStatistics",
    "layer_statistics",
]

_FALLBACKS = ("sgd", "adam")


# --------------------------------------------------------------------------- layer statistics


class LayerStatistics(NamedTuple):
    """Per linear layer (keyed by module path), from one tap pass on a batch.

    Attributes:
        mean_inputs: ``mean_{n,p} ã`` ``(S,)`` (with the homogeneous coordinate for a bias).
        output_gradients: ``Σ_{n,p} ∂L/∂z_np`` ``(O,)``.
        input_factors: ``mean_{n,p} ã ãᵀ`` ``(S, S)``.
    """

    mean_inputs: dict[str, torch.Tensor]
    output_gradients: dict[str, torch.Tensor]
    input_factors: dict[str, torch.Tensor]


def _linear_layers(owner: str, model: Model) -> tuple[Layer, ...]:
    if not isinstance(model, Model):
        raise TypeError(f"{owner}: model must be an fprecond Model (fprecond.model(module, loss)), "
                        f"got {type(model).__name__}")
    layers = tuple(layer for layer in model.layers if layer.kind == "linear" and layer.weight is not None)
    if not layers:
        raise ValueError(f"{owner}: the model has no nn.Linear layer to precondition (K-BFGS handles linear "
                         f"layers only; found {[layer.kind for layer in model.layers] or 'no supported layers'})")
    seen: dict[str, str] = {}
    for layer in layers:
        for name in layer.param_names:
            if name in seen:
                raise ValueError(f"{owner}: parameter {name!r} is shared by layers {seen[name]!r} and "
                                 f"{layer.name!r}; tied weights are not supported")
            seen[name] = layer.name
    return layers


def _weight(layer: Layer) -> str:
    assert layer.weight is not None  # _linear_layers keeps layers with a weight only
    return layer.weight


def _augmented(layer: Layer, params: Params) -> torch.Tensor:
    """``W̃ = [W | b]`` ``(O, S)``."""
    weight = params[_weight(layer)]
    if layer.bias is None:
        return weight
    return torch.cat([weight, params[layer.bias].unsqueeze(-1)], dim=-1)


def _tapped(model: Model, layers: tuple[Layer, ...]) -> Model:
    # Tap the linear layers only (no features of convolutions or norms). A memo of its
    # own: the probed output shapes depend on which layers are tapped.
    return dataclasses.replace(model, layers=layers, shape_memo={})


def layer_statistics(model: Model, params: Params, batch: Any, buffers: Params | None = None) -> LayerStatistics:
    """:class:`LayerStatistics` of ``model``'s linear layers on ``batch = (inputs, targets)``.

    One forward and one backward pass through layer taps, with the gradient of the loss
    (as reduced) w.r.t. the outputs for the observed targets as the cotangent. Inputs of
    any leading shape ``(N, *positions, D)`` are averaged over examples and positions.
    """
    layers = _linear_layers("layer_statistics", model)
    return _statistics(_tapped(model, layers), params, batch, buffers)


def _statistics(tapped: Model, params: Params, batch: Any, buffers: Params | None) -> LayerStatistics:
    inputs, targets = unpack_batch(batch)

    def cotangents(outputs: torch.Tensor) -> torch.Tensor:
        tapped.loss.check(outputs, targets)  # output_gradient itself accepts extra leading sample dimensions
        return tapped.loss.output_gradient(outputs, targets)[None]

    taps = layer_taps(tapped, params, inputs, cotangents, buffers)
    means, gradients, factors = {}, {}, {}
    for layer in tapped.layers:
        features = taps.features[layer.name]
        x = features.reshape(-1, features.shape[-1])  # (N·P, D)
        if layer.bias is not None:
            x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        means[layer.name] = x.mean(0)
        factors[layer.name] = x.T @ x / x.shape[0]
        grads = taps.output_grads[layer.name]
        gradients[layer.name] = grads.reshape(-1, grads.shape[-1]).sum(0)
    return LayerStatistics(means, gradients, factors)


# --------------------------------------------------------------------------- the transform


class ScaleByKbfgsState(NamedTuple):
    """State of :func:`scale_by_kbfgs` (per-layer dicts keyed by module path).

    Attributes:
        count: steps taken (0-dim int64).
        a: running average of ``mean ã ãᵀ`` ``(S, S)``.
        h_a: ``(A + √λ I)⁻¹`` of the last refresh ``(S, S)``.
        h_g: the BFGS inverse ``H_g`` ``(O, O)``.
        s: running average of the steps ``s`` ``(O,)`` (undamped).
        y: running average of the gradient changes ``y`` ``(O,)`` (undamped).
        previous: the parameters of the previous step (all of them: the layer inputs
            depend on every parameter upstream).
        skipped: pairs not applied to ``H_g`` (degenerate or non-finite), over all layers.
        failures: failed Cholesky attempts of the ``H_a`` refreshes (see
            :func:`~fprecond.solvers.linalg.damped_cholesky_inverse`).
        rejected: estimates of ``A`` rejected for NaN/Inf entries (a bad batch), one per
            layer; the running average is kept.
    """

    count: torch.Tensor  # type: ignore[assignment]  # optax's name, shadows tuple.count
    a: dict[str, torch.Tensor]
    h_a: dict[str, torch.Tensor]
    h_g: dict[str, torch.Tensor]
    s: dict[str, torch.Tensor]
    y: dict[str, torch.Tensor]
    previous: Params
    skipped: torch.Tensor
    failures: torch.Tensor
    rejected: torch.Tensor


def scale_by_kbfgs(model: Model, *, damping: float = 0.3, ema_decay: float = 0.9, pair_decay: float = 0.9,
                   inverse_every: int = 20) -> GradientTransformation:
    """Precondition each linear layer's gradient ``∇W̃`` into ``H_g ∇W̃ H_a`` (see the module docstring).

    Args:
        model: from :func:`fprecond.model`; must have at least one ``nn.Linear`` layer.
        damping: ``λ > 0``; ``√λ`` damps ``A`` and is ``μ2`` of :func:`double_damping`.
        ema_decay: decay of the running average of ``A`` (first batch taken as is).
        pair_decay: decay of the running averages of ``s`` and ``y`` (0: the latest pair).
        inverse_every: refresh ``H_a`` every this many steps (steps ``0, k, 2k, ...``).

    Parameters outside linear layers pass through unchanged (route them to a fallback,
    as :func:`kbfgs` does). ``update(grads, state, params, batch=(inputs, targets),
    buffers=None)`` needs ``params`` (the current ones: the step since the previous call
    is measured from them) and ``batch``. Pure and vmappable; a scheduled refresh runs
    through :func:`~fprecond.lazy.lazy_where`.
    """
    owner = "scale_by_kbfgs"
    layers = _linear_layers(owner, model)
    check_number(owner, "damping", damping, low=0.0, low_inclusive=False)
    check_number(owner, "ema_decay", ema_decay, low=0.0, high=1.0, high_inclusive=False)
    check_number(owner, "pair_decay", pair_decay, low=0.0, high=1.0, high_inclusive=False)
    check_positive_int(owner, "inverse_every", inverse_every)
    tapped = _tapped(model, layers)
    root = math.sqrt(damping)

    def init(params: Params) -> ScaleByKbfgsState:
        model.check_params(params)
        count = step_counter(owner, params)
        a, h_a, h_g, s, y = {}, {}, {}, {}, {}
        for layer in layers:
            weight = params[_weight(layer)]
            outputs, width = weight.shape[0], weight.shape[1] + int(layer.bias is not None)
            eye = torch.eye(max(outputs, width), dtype=weight.dtype, device=weight.device)
            a[layer.name] = weight.new_zeros(width, width)
            h_a[layer.name] = eye[:width, :width] / root
            h_g[layer.name] = eye[:outputs, :outputs].clone()
            s[layer.name] = weight.new_zeros(outputs)
            y[layer.name] = weight.new_zeros(outputs)
        previous = tree_map(torch.clone, params)
        zero = torch.zeros_like(count)
        return ScaleByKbfgsState(count, a, h_a, h_g, s, y, previous, zero, zero.clone(), zero.clone())

    @require_extras(owner, "batch")
    def update(updates: Updates, state: ScaleByKbfgsState, params: Params | None = None, **extra: Any):
        params = require_params(owner, params)
        batch, buffers = extra["batch"], extra.get("buffers")
        count = state.count
        current = _statistics(tapped, params, batch, buffers)
        # Step 0 has no previous step: skip the extra pass (lazy_where) and the pair.
        has_pair = count > 0
        previous = lazy_where(has_pair, lambda: _statistics(tapped, state.previous, batch, buffers), current)

        a, rejected = {}, state.rejected
        for layer in layers:
            fresh = current.input_factors[layer.name]
            averaged = running_average(state.a[layer.name], fresh, count == 0, ema_decay)
            # A non-finite batch (bad inputs) must not poison the running average for good.
            finite = tree_all_finite(fresh)
            a[layer.name] = torch.where(finite, averaged, state.a[layer.name])
            rejected = rejected + (~finite).to(rejected.dtype)

        def refresh() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
            failures = torch.zeros_like(count)
            inverses = {}
            for name, factor in a.items():
                inverses[name], failed = damped_cholesky_inverse(factor, root)
                failures = failures + failed
            return inverses, failures

        h_a, failures = lazy_where(is_due(count, inverse_every), refresh, (state.h_a, torch.zeros_like(count)))

        h_g, s_average, y_average, skipped = {}, {}, {}, state.skipped
        for layer in layers:
            name = layer.name
            s = _augmented(layer, params) @ current.mean_inputs[name] - \
                _augmented(layer, state.previous) @ previous.mean_inputs[name]
            y = current.output_gradients[name] - previous.output_gradients[name]
            fresh = has_pair & torch.isfinite(s).all() & torch.isfinite(y).all()
            s_average[name] = torch.where(fresh, pair_decay * state.s[name] + (1.0 - pair_decay) * s, state.s[name])
            y_average[name] = torch.where(fresh, pair_decay * state.y[name] + (1.0 - pair_decay) * y, state.y[name])
            damped = double_damping(state.h_g[name], s_average[name], y_average[name], root)
            updated, applied = bfgs_inverse_update(state.h_g[name], damped.s, damped.y)
            applied = applied & fresh
            h_g[name] = torch.where(applied, updated, state.h_g[name])
            skipped = skipped + (has_pair & ~applied).to(skipped.dtype)

        directions = dict(updates)
        for layer in layers:
            gradient = _augmented(layer, updates)
            direction = h_g[layer.name].to(gradient.dtype) @ gradient @ h_a[layer.name].to(gradient.dtype)
            if layer.bias is None:
                directions[_weight(layer)] = direction
            else:
                directions[_weight(layer)] = direction[..., :-1]
                directions[layer.bias] = direction[..., -1]
        new_state = ScaleByKbfgsState(count + 1, a, h_a, h_g, s_average, y_average, tree_map(torch.clone, params),
                                      skipped, state.failures + failures, rejected)
        return directions, new_state

    return GradientTransformation(init, update)


# --------------------------------------------------------------------------- the recipe


def kbfgs(model: Model, learning_rate: ScalarOrSchedule = 0.03, *, damping: float = 0.3, ema_decay: float = 0.9,
          pair_decay: float = 0.9, inverse_every: int = 20, momentum: float = 0.9, weight_decay: float = 0.0,
          fallback: str | GradientTransformation = "sgd") -> GradientTransformation:
    """K-BFGS (Goldfarb, Ren & Bahamou 2020): ``ΔW̃ = H_g ∇W̃ H_a`` per linear layer, then momentum
    and the learning rate (see :mod:`fprecond.optimizers.kbfgs` for the math and the pairs).

    The chain is ``apply_if_finite(weight_decay → precondition → momentum → learning_rate)``
    (:func:`~fprecond.optimizers._recipe.recipe`); ``precondition`` is a
    :func:`~fprecond.base.named_chain` of ``"kbfgs"`` (:func:`scale_by_kbfgs`) and, when the
    model has parameters outside linear layers, ``"fallback"``: a
    :func:`~fprecond.transforms.partition.partition` that sends those parameters to

    - ``"sgd"`` (default): their gradient unchanged, so they follow SGD with this recipe's
      momentum and learning rate. The paper only treats fully connected networks and
      compares with SGD-momentum; this fallback adds no state and no hyper-parameters;
    - ``"adam"``: Adam's normalised direction (:func:`~fprecond.transforms.scale_by_adam`),
      for parameters whose gradients are badly scaled (norms, embeddings); note that the
      recipe's learning rate then multiplies a direction of unit size per entry;
    - any :class:`~fprecond.base.GradientTransformation` mapping their gradient to a direction.

    Defaults (reference ``train_model``): ``damping`` ``λ = 0.3``, ``ema_decay`` 0.9,
    ``pair_decay`` 0.9, ``inverse_every`` 20, ``momentum`` 0.9. The reference's learning rate
    0.3 multiplies an exponential average of the gradient, ``m ← ρ m + (1 - ρ) g`` with
    ``ρ = 0.9``; here momentum is heavy-ball on the direction (``m ← μ m + d``, as every
    recipe of this library), which is larger by ``1/(1 - μ)``, so the same steps take
    ``0.3 · (1 - 0.9) = 0.03``. The reference's ``τ = 1e-5`` is an L2 term of its objective,
    not of the method: ``weight_decay`` defaults to 0.

    ``update(grads, state, params, batch=(inputs, targets))``; the preconditioner's state
    is ``state.inner_state["precondition"]["kbfgs"]``.
    """
    owner = "kbfgs"
    layers = _linear_layers(owner, model)
    fallback_transform: GradientTransformation
    if isinstance(fallback, GradientTransformation):
        fallback_transform = fallback
    else:
        check_choice(owner, "fallback", fallback, _FALLBACKS)
        fallback_transform = identity() if fallback == "sgd" else scale_by_adam()
    preconditioner = scale_by_kbfgs(model, damping=damping, ema_decay=ema_decay, pair_decay=pair_decay,
                                    inverse_every=inverse_every)
    covered = {name for layer in layers for name in layer.param_names}
    links: list[tuple[str, GradientTransformation]] = [("kbfgs", preconditioner)]
    if any(name not in covered for name in model.param_names):
        def labels(params: Params) -> dict[str, str]:
            return {name: "kbfgs" if name in covered else "fallback" for name in params}

        links.append(("fallback", partition({"kbfgs": identity(), "fallback": fallback_transform}, labels)))
    return recipe(owner, named_chain(*links), learning_rate=learning_rate, momentum=momentum,
                  weight_decay=weight_decay)
