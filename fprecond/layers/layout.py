"""How a layer's parameter tensors map onto a grouped matrix ``(G, O, S)``.

Every supported layer is, per example and per weight-sharing position, a
grouped linear map ``z[g] = W[g] ã[g]``: ``G`` groups, ``O`` outputs per group and
``S`` inputs per group, the last input being the homogeneous coordinate ``1``
that folds the bias in when the layer has one.

- ``"rows"`` (Linear, Conv1d, Conv2d): output unit ``g·O + o`` owns row ``o`` of
  group ``g``: the weight flattened per output unit, then the bias.
- ``"columns"`` (Embedding): the weight ``(V, D)`` is the transposed matrix: one
  group, ``O = D`` outputs, ``S = V`` one-hot inputs, no bias.
- ``"elementwise"`` (LayerNorm, BatchNorm): feature ``d`` is a group of its own
  with one output and inputs ``(x̂_d, 1)``: ``z_d = γ_d x̂_d + β_d``.

The conversions work on any number of leading dimensions, so the same code
turns per-example gradients ``(K, N, *param)`` into ``(K, N, G, O, S)`` and back.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch

__all__ = ["MatrixLayout", "to_matrix", "from_matrix", "flat_index_matrix"]

LayoutKind = Literal["rows", "columns", "elementwise"]


@dataclasses.dataclass(frozen=True)
class MatrixLayout:
    """Static description of a layer's ``(G, O, S)`` view (hashable: it lives in pytree metadata).

    Attributes:
        kind: ``"rows"``, ``"columns"`` or ``"elementwise"`` (see module docstring).
        weight: the weight's key in the params dict, or None.
        bias: the bias's key, or None.
        weight_shape: the weight's shape (or the bias's for a weight-less layer).
        groups: ``G``; outputs: ``O`` per group; inputs: ``S`` per group including the
            homogeneous coordinate when there is a bias.
    """

    kind: LayoutKind
    weight: str | None
    bias: str | None
    weight_shape: tuple[int, ...]
    groups: int
    outputs: int
    inputs: int

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name in (self.weight, self.bias) if name is not None)

    @property
    def shapes(self) -> tuple[tuple[int, ...], ...]:
        """Shapes of the parameters in :attr:`names` order."""
        out = []
        if self.weight is not None:
            out.append(self.weight_shape)
        if self.bias is not None:
            out.append(self.bias_shape)
        return tuple(out)

    @property
    def bias_shape(self) -> tuple[int, ...]:
        if self.kind == "elementwise":
            return self.weight_shape
        return (self.groups * self.outputs,)

    @property
    def units(self) -> int:
        """Number of output units ``G·O``."""
        return self.groups * self.outputs

    @property
    def size(self) -> int:
        """Number of parameters ``G·O·S`` covered."""
        return self.groups * self.outputs * self.inputs


def to_matrix(layout: MatrixLayout, tensors: dict[str, torch.Tensor], lead: int = 0) -> torch.Tensor:
    """``{weight, bias}`` with ``lead`` leading dims -> ``(*lead, G, O, S)``."""
    first = tensors[layout.names[0]]
    lead_shape = tuple(first.shape[:lead])
    g, o = layout.groups, layout.outputs
    parts = []
    if layout.kind == "rows":
        if layout.weight is not None:
            parts.append(tensors[layout.weight].reshape(*lead_shape, g, o, -1))
        if layout.bias is not None:
            parts.append(tensors[layout.bias].reshape(*lead_shape, g, o, 1))
    elif layout.kind == "columns":
        weight = tensors[layout.names[0]]
        parts.append(weight.transpose(-1, -2).reshape(*lead_shape, 1, o, -1))
    else:
        for name in layout.names:
            parts.append(tensors[name].reshape(*lead_shape, g, 1, 1))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def from_matrix(layout: MatrixLayout, matrix: torch.Tensor) -> dict[str, torch.Tensor]:
    """Inverse of :func:`to_matrix`: ``(*lead, G, O, S)`` -> ``{weight, bias}`` with the leading dims."""
    lead_shape = tuple(matrix.shape[:-3])
    out: dict[str, torch.Tensor] = {}
    if layout.kind == "rows":
        if layout.weight is not None:
            weight_part = matrix[..., :-1] if layout.bias is not None else matrix
            out[layout.weight] = weight_part.reshape(*lead_shape, *layout.weight_shape)
        if layout.bias is not None:
            out[layout.bias] = matrix[..., -1].reshape(*lead_shape, *layout.bias_shape)
    elif layout.kind == "columns":
        transposed = matrix.reshape(*lead_shape, layout.outputs, layout.inputs)
        out[layout.names[0]] = transposed.transpose(-1, -2)
    else:
        for column, name in enumerate(layout.names):
            out[name] = matrix[..., column].reshape(*lead_shape, *layout.weight_shape)
    return out


def flat_index_matrix(layout: MatrixLayout, offset: int = 0, device: torch.device | None = None) -> torch.Tensor:
    """``(G, O, S)`` int64: the position of each matrix entry in the layer's flat parameter vector.

    The flat vector is the layer's parameters in :attr:`MatrixLayout.names` order,
    each flattened row-major, starting at ``offset``.
    """
    tensors: dict[str, torch.Tensor] = {}
    start = offset
    for name, shape in zip(layout.names, layout.shapes):
        count = math.prod(shape)
        tensors[name] = torch.arange(start, start + count, device=device).reshape(shape)
        start += count
    return to_matrix(layout, tensors)
