"""A static description of a model and its loss, bound once.

``fprecond.model(module, loss)`` turns a ``torch.nn.Module`` into a pure function
``apply(params, inputs)`` (``torch.func.functional_call``), records the loss, and
lists the layers whose parameters fprecond's curvature code understands. The
module is only used as a template: parameter values always come from the
``params`` dict, which is ``{name: tensor}`` in ``module.named_parameters()``
order (tied parameters appear once, under their first name).

Buffers (e.g. BatchNorm running statistics) come from the module unless passed
explicitly. A BatchNorm layer in training mode updates its running statistics
in place, which ``torch.func.vmap`` rejects: put such models in ``eval()`` mode,
or use ``torch.func.replace_all_batch_norm_modules_``, before per-example or
ensemble transforms.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
from torch import nn
from torch.func import functional_call

from fprecond.losses import Loss
from fprecond.tree import PyTree

__all__ = ["Model", "Layer", "LayerKind", "model", "SUPPORTED_LAYERS"]

LayerKind = Literal["linear", "conv1d", "conv2d", "embedding", "layernorm", "batchnorm"]

# Exact types, not isinstance: a subclass may override forward with other math.
SUPPORTED_LAYERS: dict[type[nn.Module], LayerKind] = {
    nn.Linear: "linear",
    nn.Conv1d: "conv1d",
    nn.Conv2d: "conv2d",
    nn.Embedding: "embedding",
    nn.LayerNorm: "layernorm",
    nn.BatchNorm1d: "batchnorm",
    nn.BatchNorm2d: "batchnorm",
}

# Containers whose child layers are used through their weights, not their forward
# (nn.MultiheadAttention calls F.linear on out_proj.weight): hooks there never fire.
_OPAQUE_CONTAINERS: tuple[type[nn.Module], ...] = (nn.MultiheadAttention,)


@dataclasses.dataclass(frozen=True)
class Layer:
    """A supported layer found in the module.

    Attributes:
        name: the module's path (``""`` for the root module).
        kind: the layer type, e.g. ``"linear"``.
        weight: the key of its weight in the params dict, or None.
        bias: the key of its bias in the params dict, or None.
        module: the layer module itself (static configuration: stride, eps, ...).
    """

    name: str
    kind: LayerKind
    weight: str | None
    bias: str | None
    module: nn.Module = dataclasses.field(compare=False, repr=False)

    @property
    def param_names(self) -> tuple[str, ...]:
        """Keys of this layer's parameters in the params dict (weight first)."""
        return tuple(name for name in (self.weight, self.bias) if name is not None)


@dataclasses.dataclass(frozen=True)
class Model:
    """An immutable model description: see :func:`model`."""

    module: nn.Module = dataclasses.field(repr=False)
    loss: Loss
    layers: tuple[Layer, ...]
    unsupported: tuple[str, ...]
    param_names: tuple[str, ...]
    # Memo of static shape information derived from input shapes (e.g. layer output
    # shapes probed by the taps); it never changes a result, only skips a probe.
    shape_memo: dict[Any, Any] = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def params(self) -> dict[str, torch.Tensor]:
        """A copy of the module's current parameters, detached, in ``named_parameters`` order."""
        return {name: p.detach().clone() for name, p in self.module.named_parameters()}

    def buffers(self) -> dict[str, torch.Tensor]:
        """A copy of the module's current buffers."""
        return {name: b.detach().clone() for name, b in self.module.named_buffers()}

    def apply(self, params: dict[str, torch.Tensor], inputs: Any,
              buffers: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The module's output for ``inputs`` with parameter values ``params``.

        ``inputs`` is passed as the single positional argument of ``forward``.
        """
        tensors = params if buffers is None else {**buffers, **params}
        return functional_call(self.module, tensors, (inputs,))

    def batch_loss(self, params: dict[str, torch.Tensor], batch: tuple[Any, torch.Tensor],
                   buffers: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The loss ``L`` of ``batch = (inputs, targets)`` as the loss reduces it."""
        inputs, targets = unpack_batch(batch)
        return self.loss(self.apply(params, inputs, buffers), targets)

    def layer(self, name: str) -> Layer:
        """The supported layer with module path ``name``."""
        for layer in self.layers:
            if layer.name == name:
                return layer
        known = ", ".join(layer.name for layer in self.layers) or "none"
        raise KeyError(f"no supported layer named {name!r}; supported layers: {known}")

    def check_params(self, params: PyTree) -> None:
        """Raise ``ValueError`` unless ``params`` has exactly this model's keys and shapes."""
        if not isinstance(params, dict):
            raise TypeError(f"params must be a dict name -> tensor, got {type(params).__name__}")
        expected = dict(self.module.named_parameters())
        missing = [name for name in expected if name not in params]
        extra = [name for name in params if name not in expected]
        if missing or extra:
            raise ValueError(f"params do not match the model: missing {missing}, unexpected {extra}")
        for name, reference in expected.items():
            if tuple(params[name].shape) != tuple(reference.shape):
                raise ValueError(
                    f"parameter {name!r} has shape {tuple(params[name].shape)}, the model needs {tuple(reference.shape)}"
                )


def unpack_batch(batch: Any) -> tuple[Any, torch.Tensor]:
    """Split ``batch`` into ``(inputs, targets)`` with a clear error otherwise."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError(f"batch must be a pair (inputs, targets), got {type(batch).__name__}")
    inputs, targets = batch
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"batch: targets must be a tensor, got {type(targets).__name__}")
    if isinstance(inputs, torch.Tensor) and (inputs.dim() == 0 or targets.dim() == 0
                                             or inputs.shape[0] != targets.shape[0]):
        raise ValueError(f"batch: inputs of shape {tuple(inputs.shape)} and targets of shape {tuple(targets.shape)} "
                         "must have the same number of examples along their first dimension")
    return inputs, targets


def _reject_parallel_wrappers(module: nn.Module) -> None:
    """Refuse DDP, DataParallel and FSDP wrappers: their gradient hooks never see the
    gradients ``torch.func`` takes, so their all-reduce would silently not happen."""
    names = {cls.__name__ for cls in type(module).__mro__}
    if isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        raise TypeError(f"model: got a module wrapped in {type(module).__name__}; pass the plain module "
                        "(fprecond.model(wrapped.module, loss)) and average gradients with the transform "
                        "fprecond.distributed.all_reduce_gradients(comm): fprecond differentiates with torch.func, "
                        "which the wrapper's all-reduce hooks never see")
    if names & {"FullyShardedDataParallel", "FSDPModule"}:
        raise TypeError("model: FSDP-sharded modules are not supported (each process would see only its shard of "
                        "the parameters); use the plain module with data-parallel training "
                        "(fprecond.distributed)")


def model(module: nn.Module, loss: Loss) -> Model:
    """Describe ``module`` trained with ``loss``.

    Finds the supported layers (:data:`SUPPORTED_LAYERS`, matched by exact type) and
    lists in ``Model.unsupported`` every parameter that belongs to none of them
    (custom modules, attention projections, ...), so curvature code can route
    those parameters elsewhere instead of dropping them.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"model: module must be a torch.nn.Module, got {type(module).__name__}")
    _reject_parallel_wrappers(module)
    if not isinstance(loss, Loss):
        raise TypeError(
            f"model: loss must be an fprecond loss (fprecond.losses.cross_entropy() or mse()), got {type(loss).__name__}"
        )
    canonical = {id(p): name for name, p in module.named_parameters()}
    if not canonical:
        raise ValueError("model: the module has no parameters")

    opaque = {id(child) for container in module.modules() if isinstance(container, _OPAQUE_CONTAINERS)
              for child in container.modules() if child is not container}
    layers: list[Layer] = []
    covered: set[str] = set()
    for path, sub in module.named_modules():
        kind = SUPPORTED_LAYERS.get(type(sub))
        if kind is None or id(sub) in opaque:
            continue
        own = dict(sub.named_parameters(recurse=False))
        weight = canonical.get(id(own["weight"])) if own.get("weight") is not None else None
        bias = canonical.get(id(own["bias"])) if own.get("bias") is not None else None
        if weight is None and bias is None:
            continue  # e.g. LayerNorm(elementwise_affine=False)
        layer = Layer(name=path, kind=kind, weight=weight, bias=bias, module=sub)
        layers.append(layer)
        covered.update(layer.param_names)
    unsupported = tuple(name for name in canonical.values() if name not in covered)
    return Model(
        module=module,
        loss=loss,
        layers=tuple(layers),
        unsupported=unsupported,
        param_names=tuple(canonical.values()),
    )

