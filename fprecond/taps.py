"""Layer taps: one functional pass that exposes, for every supported layer, what
went into it and the gradient of the outputs' pairing with given cotangents
w.r.t. what came out of it.

The trick (zero perturbation): a forward hook records the layer's input features
and returns ``output + e_l`` with ``e_l = 0``. Differentiating w.r.t. ``e_l``
under ``torch.func`` gives the exact gradient w.r.t. the layer output, with no
module state touched. Perturbation shapes are probed on the ``meta`` device
(no compute). Hooks are removed in ``finally``, also when the model raises.

Everything here is pure and works per batch, per example (under ``vmap`` over
examples) and inside an outer ``vmap`` over stacked ensemble parameters.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, NamedTuple

import torch
from torch import nn
from torch.func import vjp, vmap

from fprecond.layers import form_of
from fprecond.modeling import Layer, Model
from fprecond.tree import tree_leaves, tree_map

__all__ = ["Taps", "layer_taps", "perturbed_forward"]

Params = dict[str, torch.Tensor]


class Taps(NamedTuple):
    """What :func:`layer_taps` returns.

    Attributes:
        outputs: the model's outputs ``f`` (detached), e.g. ``(N, C)``.
        features: per layer name, what its hook kept from its input (see
            :meth:`fprecond.layers.base.LayerForm.features`), leading dim ``N``.
        output_grads: per layer name, ``(K, *layer_output.shape)``: the gradient of
            ``<f, c_k>`` w.r.t. the layer's output for each cotangent ``c_k``.
    """

    outputs: torch.Tensor
    features: dict[str, torch.Tensor]
    output_grads: dict[str, torch.Tensor]


@contextlib.contextmanager
def _hooks(layers: tuple[Layer, ...], perturbations: Params | None, features: dict[str, torch.Tensor],
           shapes: dict[str, tuple[torch.Size, torch.dtype]] | None = None) -> Iterator[None]:
    handles = []

    def make_hook(layer: Layer):
        form = form_of(layer)

        def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
            if layer.name in features:
                raise ValueError(
                    f"layer {layer.name!r} ran more than once in one forward pass; layers reused "
                    "within a forward pass are not supported by the curvature code"
                )
            if shapes is not None:
                shapes[layer.name] = (output.shape, output.dtype)
                features[layer.name] = output
                return output
            features[layer.name] = form.features(module, args[0]).detach()
            assert perturbations is not None
            return output + perturbations[layer.name]

        return hook

    try:
        for layer in layers:
            handles.append(layer.module.register_forward_hook(make_hook(layer)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _to_meta(tree: Any) -> Any:
    return tree_map(lambda t: torch.empty(t.shape, dtype=t.dtype, device="meta") if isinstance(t, torch.Tensor) else t,
                    tree)


def _signature(tree: Any) -> tuple[Any, ...]:
    return tuple((tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else t for t in tree_leaves(tree))


_MEMO_SIZE = 64


def _output_shapes(model: Model, params: Params, inputs: Any,
                   buffers: Params | None) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """Each layer's output shape and dtype, from a forward pass on ``meta`` tensors.

    The probe costs Python time comparable to a small model's forward pass, so its
    result is memoised on the model description, keyed by the shapes and dtypes of
    parameters, inputs and buffers.
    """
    key = ("layer_output_shapes", _signature(params), _signature(inputs), _signature(buffers))
    memo = model.shape_memo
    if key not in memo:
        if len(memo) >= _MEMO_SIZE:
            memo.pop(next(iter(memo)))
        memo[key] = _probe_output_shapes(model, params, inputs, buffers)
    return memo[key]


def _probe_output_shapes(model: Model, params: Params, inputs: Any,
                         buffers: Params | None) -> dict[str, tuple[torch.Size, torch.dtype]]:
    shapes: dict[str, tuple[torch.Size, torch.dtype]] = {}
    seen: dict[str, torch.Tensor] = {}
    meta_buffers = _to_meta(buffers if buffers is not None else model.buffers())
    try:
        with _hooks(model.layers, None, seen, shapes):
            model.apply(_to_meta(params), _to_meta(inputs), meta_buffers)
    except (NotImplementedError, RuntimeError):
        # An operation without a meta kernel: probe with a real forward pass instead.
        shapes.clear()
        seen.clear()
        with torch.no_grad(), _hooks(model.layers, None, seen, shapes):
            model.apply(tree_map(torch.Tensor.detach, params), inputs, buffers)
    missing = [layer.name for layer in model.layers if layer.name not in shapes]
    if missing:
        raise ValueError(
            f"layers {missing} did not run in the forward pass (unused, or called through another module's "
            "weights); the curvature code needs every supported layer to run exactly once"
        )
    return shapes


def perturbed_forward(model: Model, params: Params, inputs: Any, buffers: Params | None = None
                      ) -> tuple[Callable[[Params], tuple[torch.Tensor, dict[str, torch.Tensor]]], Params]:
    """``(fn, zeros)``: ``fn(perturbations) -> (outputs, features)`` adds ``perturbations[l]``
    to layer ``l``'s output; ``zeros`` are the matching zero perturbations.

    Differentiate ``fn`` w.r.t. its argument at ``zeros`` to get gradients (or
    Hessians) w.r.t. layer outputs.
    """
    for layer in model.layers:
        form_of(layer).validate(layer)
    shapes = _output_shapes(model, params, inputs, buffers)
    device = next(iter(params.values())).device
    zeros = {name: torch.zeros(shape, dtype=dtype, device=device) for name, (shape, dtype) in shapes.items()}

    def fn(perturbations: Params) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        features: dict[str, torch.Tensor] = {}
        with _hooks(model.layers, perturbations, features):
            outputs = model.apply(params, inputs, buffers)
        return outputs, features

    return fn, zeros


def layer_taps(model: Model, params: Params, inputs: Any,
               cotangents: Callable[[torch.Tensor], torch.Tensor], buffers: Params | None = None) -> Taps:
    """One forward pass and ``K`` backward passes (vmapped) through the taps.

    Args:
        model: the model description.
        params: parameter values (``{name: tensor}``).
        inputs: the batch's inputs.
        cotangents: ``outputs -> (K, *outputs.shape)``, evaluated on the detached
            outputs: e.g. the columns of the loss Hessian's square root, or the
            gradient of the loss w.r.t. the outputs for observed or sampled targets.
        buffers: optional buffer values (default: the module's).

    Returns:
        :class:`Taps`. Because a layer's output for example ``n`` depends on example
        ``n`` only, ``output_grads[l][k, n]`` is example ``n``'s own gradient.
    """
    fn, zeros = perturbed_forward(model, params, inputs, buffers)
    outputs, pullback, features = vjp(fn, zeros, has_aux=True)  # type: ignore[misc]
    vectors = cotangents(outputs.detach())
    if vectors.shape[0] == 1:
        grads = tree_map(lambda g: g.unsqueeze(0), pullback(vectors[0])[0])
    else:
        grads = vmap(pullback)(vectors)[0]
    return Taps(outputs.detach(), features, grads)
