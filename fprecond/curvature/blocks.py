"""Immutable curvature blocks: the matrix layer.

A block covers a fixed set of parameters (static ``names``, in the params dict's
order) and represents a symmetric matrix over their flattened values (row-major,
concatenated in ``names`` order). Leaves are tensors only, so blocks pass
through ``torch.func.vmap`` (an ensemble of curvatures is a block with batched
leaves) and through :mod:`fprecond.tree` maps.

Every block offers the same vocabulary:

- ``mvp(vector)``: the block times a ``{name: tensor}`` vector;
- ``dense()``: the ``(P_b, P_b)`` matrix; ``trace()``;
- ``damped(damping, pi=False)``: ``+ λ I`` (Kronecker blocks also offer the
  π-adjusted factored damping of Martens & Grosse 2015, §6.3);
- ``scaled(factor)``: the matrix times a scalar;
- ``power(exponent)``: the matrix power through an eigendecomposition
  (``power(-1.0)`` is the inverse, ``power(-0.5)`` the inverse root); eigenvalues
  are clamped at zero first, so damp a singular or indefinite block before a
  negative power (undamped, zero eigenvalues are floored as in
  :func:`fprecond.spectral.damped_power`: large but finite).

Adding two blocks (``fprecond.tree.tree_add``) or averaging them adds their
leaves: exact for dense, unit-wise and diagonal blocks; for Kronecker blocks it
averages the factors separately, which is what K-FAC's running averages do
(and not the average of the Kronecker products).
"""

from __future__ import annotations

import abc
import math
from typing import Any

import torch

from fprecond.layers.layout import MatrixLayout, flat_index_matrix, from_matrix, to_matrix
from fprecond.spectral import damped_power, symmetric_eigh
from fprecond.tree import pytree_dataclass, static_field

__all__ = [
    "CurvatureBlock",
    "DenseBlock",
    "DiagonalBlock",
    "UnitBlock",
    "KroneckerBlock",
    "KroneckerEigenBlock",
]

Vector = dict[str, torch.Tensor]


def flatten_vector(vector: Vector, names: tuple[str, ...]) -> torch.Tensor:
    """Concatenate ``vector[name]`` flattened row-major, in ``names`` order."""
    return torch.cat([vector[name].reshape(-1) for name in names])


def split_vector(flat: torch.Tensor, names: tuple[str, ...], shapes: tuple[tuple[int, ...], ...]) -> Vector:
    """Inverse of :func:`flatten_vector`."""
    out, start = {}, 0
    for name, shape in zip(names, shapes):
        count = math.prod(shape)
        out[name] = flat[start:start + count].reshape(shape)
        start += count
    return out


def _symmetric_power(matrix: torch.Tensor, exponent: float) -> torch.Tensor:
    """``matrix^exponent`` for (batched) symmetric matrices; eigenvalues clamped at zero."""
    eigenvalues, eigenvectors = symmetric_eigh(matrix)
    powered = damped_power(eigenvalues, 0.0, exponent)
    return (eigenvectors * powered.unsqueeze(-2)) @ eigenvectors.transpose(-1, -2)


def _eye_like(matrix: torch.Tensor) -> torch.Tensor:
    return torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)


def _place(layout: MatrixLayout, grouped: torch.Tensor) -> torch.Tensor:
    """A ``(G·O·S, G·O·S)`` matrix in (group, output, input) order -> the parameters' flat order."""
    index = flat_index_matrix(layout, device=grouped.device).reshape(-1)
    size = index.numel()
    dense = torch.zeros(size, size, dtype=grouped.dtype, device=grouped.device)
    return dense.index_put((index[:, None], index[None, :]), grouped)


def _group_block_diagonal(per_group: torch.Tensor) -> torch.Tensor:
    """``(G, B, B)`` -> the ``(G·B, G·B)`` block-diagonal matrix (vmap-safe, no ``block_diag``)."""
    groups, size = per_group.shape[0], per_group.shape[-1]
    eye = torch.eye(groups, dtype=per_group.dtype, device=per_group.device)
    return torch.einsum("gab,gh->gahb", per_group, eye).reshape(groups * size, groups * size)


class CurvatureBlock(abc.ABC):
    """Interface shared by all blocks (see the module docstring)."""

    names: tuple[str, ...]

    @property
    @abc.abstractmethod
    def shapes(self) -> tuple[tuple[int, ...], ...]:
        """Shapes of the covered parameters, in ``names`` order."""

    @property
    def size(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes)

    @abc.abstractmethod
    def mvp(self, vector: Vector) -> Vector:
        """The block times ``vector`` (only the block's keys are read and returned)."""

    @abc.abstractmethod
    def dense(self) -> torch.Tensor:
        """The ``(P_b, P_b)`` matrix in ``names`` order."""

    @abc.abstractmethod
    def trace(self) -> torch.Tensor:
        """The trace (0-dim)."""

    @abc.abstractmethod
    def damped(self, damping: float | torch.Tensor, pi: bool = False) -> "CurvatureBlock":
        """The block plus ``damping · I`` (``pi`` only changes Kronecker blocks)."""

    @abc.abstractmethod
    def scaled(self, factor: float | torch.Tensor) -> "CurvatureBlock":
        """The block times a scalar."""

    @abc.abstractmethod
    def power(self, exponent: float) -> "CurvatureBlock":
        """The matrix power (eigenvalues clamped at zero first)."""

    def inverse(self) -> "CurvatureBlock":
        """``power(-1.0)``: damp first unless the block is positive definite."""
        return self.power(-1.0)


@pytree_dataclass
class DenseBlock(CurvatureBlock):
    """A full matrix over ``names``: ``matrix`` is ``(P_b, P_b)``."""

    matrix: torch.Tensor
    names: tuple[str, ...] = static_field()
    param_shapes: tuple[tuple[int, ...], ...] = static_field()

    @property
    def shapes(self) -> tuple[tuple[int, ...], ...]:
        return self.param_shapes

    def mvp(self, vector: Vector) -> Vector:
        product = self.matrix @ flatten_vector(vector, self.names)
        return split_vector(product, self.names, self.param_shapes)

    def dense(self) -> torch.Tensor:
        return self.matrix

    def trace(self) -> torch.Tensor:
        return torch.diagonal(self.matrix).sum()

    def damped(self, damping: float | torch.Tensor, pi: bool = False) -> "DenseBlock":
        return DenseBlock(self.matrix + damping * _eye_like(self.matrix), self.names, self.param_shapes)

    def scaled(self, factor: float | torch.Tensor) -> "DenseBlock":
        return DenseBlock(self.matrix * factor, self.names, self.param_shapes)

    def power(self, exponent: float) -> "DenseBlock":
        return DenseBlock(_symmetric_power(self.matrix, exponent), self.names, self.param_shapes)


@pytree_dataclass
class DiagonalBlock(CurvatureBlock):
    """A diagonal matrix: ``diagonal[name]`` is shaped like parameter ``name``."""

    diagonal: dict[str, torch.Tensor]
    names: tuple[str, ...] = static_field()

    @property
    def shapes(self) -> tuple[tuple[int, ...], ...]:
        return tuple(tuple(self.diagonal[name].shape) for name in self.names)

    def mvp(self, vector: Vector) -> Vector:
        return {name: self.diagonal[name] * vector[name] for name in self.names}

    def dense(self) -> torch.Tensor:
        return torch.diag_embed(flatten_vector(self.diagonal, self.names))

    def trace(self) -> torch.Tensor:
        return sum(d.sum() for d in self.diagonal.values())  # type: ignore[return-value]

    def damped(self, damping: float | torch.Tensor, pi: bool = False) -> "DiagonalBlock":
        return DiagonalBlock({name: d + damping for name, d in self.diagonal.items()}, self.names)

    def scaled(self, factor: float | torch.Tensor) -> "DiagonalBlock":
        return DiagonalBlock({name: d * factor for name, d in self.diagonal.items()}, self.names)

    def power(self, exponent: float) -> "DiagonalBlock":
        return DiagonalBlock({name: damped_power(d, 0.0, exponent, scale=d.abs().amax())
                              for name, d in self.diagonal.items()}, self.names)


class _LayerBlock(CurvatureBlock):
    """A block over one supported layer's parameters, described by its ``layout``."""

    layout: MatrixLayout

    @property
    def names(self) -> tuple[str, ...]:  # type: ignore[override]
        return self.layout.names

    @property
    def shapes(self) -> tuple[tuple[int, ...], ...]:
        return self.layout.shapes


@pytree_dataclass
class UnitBlock(_LayerBlock):
    """Unit-wise blocks (ASDL): for each output unit, the full matrix over its incoming
    weights and bias; ``blocks`` is ``(G·O, S, S)`` in the layer's layout."""

    blocks: torch.Tensor
    layout: MatrixLayout = static_field()

    def mvp(self, vector: Vector) -> Vector:
        units = to_matrix(self.layout, vector).reshape(self.layout.units, self.layout.inputs)
        product = torch.einsum("ust,ut->us", self.blocks, units)
        return from_matrix(self.layout, product.reshape(self.layout.groups, self.layout.outputs, -1))

    def dense(self) -> torch.Tensor:
        per_unit = self.blocks.shape[-1]
        eye = torch.eye(self.layout.units, dtype=self.blocks.dtype, device=self.blocks.device)
        grouped = torch.einsum("ust,uv->usvt", self.blocks, eye).reshape(self.layout.units * per_unit, -1)
        return _place(self.layout, grouped)

    def trace(self) -> torch.Tensor:
        return torch.diagonal(self.blocks, dim1=-2, dim2=-1).sum()

    def damped(self, damping: float | torch.Tensor, pi: bool = False) -> "UnitBlock":
        return UnitBlock(self.blocks + damping * _eye_like(self.blocks), self.layout)

    def scaled(self, factor: float | torch.Tensor) -> "UnitBlock":
        return UnitBlock(self.blocks * factor, self.layout)

    def power(self, exponent: float) -> "UnitBlock":
        return UnitBlock(_symmetric_power(self.blocks, exponent), self.layout)


@pytree_dataclass
class KroneckerBlock(_LayerBlock):
    """Kronecker-factored block: per group ``kron(G, A) + damping · I`` over the
    layer's ``(O, S)`` matrix (row-major), i.e. ``M ↦ G M A + damping · M``.

    ``input_factor`` (``A``) is ``(G, S, S)``, built from layer inputs with the
    homogeneous coordinate for the bias; ``output_factor`` (``G``) is ``(G, O, O)``
    from output gradients; ``damping`` is a 0-dim tensor (exact Tikhonov damping,
    kept apart because ``kron(G, A) + λI`` has no Kronecker form).
    """

    input_factor: torch.Tensor
    output_factor: torch.Tensor
    damping: torch.Tensor
    layout: MatrixLayout = static_field()

    def mvp(self, vector: Vector) -> Vector:
        matrix = to_matrix(self.layout, vector)
        product = self.output_factor @ matrix @ self.input_factor + self.damping * matrix
        return from_matrix(self.layout, product)

    def dense(self) -> torch.Tensor:
        groups, outputs, inputs = self.layout.groups, self.layout.outputs, self.layout.inputs
        kron = torch.einsum("gor,gst->gosrt", self.output_factor, self.input_factor)
        per_group = kron.reshape(groups, outputs * inputs, outputs * inputs)
        grouped = _group_block_diagonal(per_group)
        return _place(self.layout, grouped) + self.damping * torch.eye(grouped.shape[0], dtype=grouped.dtype,
                                                                        device=grouped.device)

    def trace(self) -> torch.Tensor:
        traces = torch.diagonal(self.output_factor, dim1=-2, dim2=-1).sum(-1) * \
            torch.diagonal(self.input_factor, dim1=-2, dim2=-1).sum(-1)
        return traces.sum() + self.damping * self.layout.size

    def damped(self, damping: float | torch.Tensor, pi: bool = False) -> "KroneckerBlock":
        if not pi:
            return KroneckerBlock(self.input_factor, self.output_factor, self.damping + damping, self.layout)
        return self.factor_damped(damping, pi=True)

    def factor_damped(self, damping: float | torch.Tensor, pi: bool = True) -> "KroneckerBlock":
        """Damping split between the factors, ``(A + π√λ I) ⊗ (G + √λ/π I)``, with
        ``π² = (tr A / S) / (tr G / O)`` (Martens & Grosse 2015, §6.3) or ``π = 1``."""
        root = torch.sqrt(torch.as_tensor(damping, dtype=self.input_factor.dtype, device=self.input_factor.device))
        if pi:
            mean_a = torch.diagonal(self.input_factor, dim1=-2, dim2=-1).mean(-1)
            mean_g = torch.diagonal(self.output_factor, dim1=-2, dim2=-1).mean(-1)
            usable = (mean_a > 0) & (mean_g > 0)
            pi_factor = torch.where(usable, torch.sqrt(mean_a / torch.where(usable, mean_g, 1.0)), 1.0)
        else:
            pi_factor = torch.ones_like(self.input_factor[:, 0, 0])
        a = self.input_factor + (pi_factor * root)[:, None, None] * _eye_like(self.input_factor)
        g = self.output_factor + (root / pi_factor)[:, None, None] * _eye_like(self.output_factor)
        return KroneckerBlock(a, g, self.damping, self.layout)

    def scaled(self, factor: float | torch.Tensor) -> "KroneckerBlock":
        return KroneckerBlock(self.input_factor, self.output_factor * factor, self.damping * factor, self.layout)

    def eigendecomposition(self) -> "KroneckerEigenBlock":
        """The same matrix held in the Kronecker eigenbasis (exact, damping included)."""
        values_a, vectors_a = symmetric_eigh(self.input_factor)
        values_g, vectors_g = symmetric_eigh(self.output_factor)
        scaling = values_g[:, :, None] * values_a[:, None, :] + self.damping
        return KroneckerEigenBlock(vectors_a, vectors_g, scaling, self.layout)

    def power(self, exponent: float) -> "KroneckerEigenBlock":
        return self.eigendecomposition().power(exponent)


@pytree_dataclass
class KroneckerEigenBlock(_LayerBlock):
    """A block diagonal in a Kronecker eigenbasis (as EKFAC, George et al. 2018):
    ``M ↦ Q_G [(Q_Gᵀ M Q_A) ⊙ scaling] Q_Aᵀ`` per group.

    ``input_basis`` is ``(G, S, S)``, ``output_basis`` ``(G, O, O)`` (orthonormal
    columns), ``scaling`` ``(G, O, S)`` the eigenvalues.
    """

    input_basis: torch.Tensor
    output_basis: torch.Tensor
    scaling: torch.Tensor
    layout: MatrixLayout = static_field()

    def _with_scaling(self, scaling: torch.Tensor) -> "KroneckerEigenBlock":
        return KroneckerEigenBlock(self.input_basis, self.output_basis, scaling, self.layout)

    def mvp(self, vector: Vector) -> Vector:
        matrix = to_matrix(self.layout, vector)
        rotated = self.output_basis.transpose(-1, -2) @ matrix @ self.input_basis
        product = self.output_basis @ (rotated * self.scaling) @ self.input_basis.transpose(-1, -2)
        return from_matrix(self.layout, product)

    def dense(self) -> torch.Tensor:
        groups, outputs, inputs = self.layout.groups, self.layout.outputs, self.layout.inputs
        basis = torch.einsum("gor,gst->gosrt", self.output_basis, self.input_basis)
        basis = basis.reshape(groups, outputs * inputs, outputs * inputs)
        per_group = (basis * self.scaling.reshape(groups, 1, -1)) @ basis.transpose(-1, -2)
        return _place(self.layout, _group_block_diagonal(per_group))

    def trace(self) -> torch.Tensor:
        return self.scaling.sum()

    def damped(self, damping: float | torch.Tensor, pi: bool = False) -> "KroneckerEigenBlock":
        return self._with_scaling(self.scaling + damping)

    def scaled(self, factor: float | torch.Tensor) -> "KroneckerEigenBlock":
        return self._with_scaling(self.scaling * factor)

    def power(self, exponent: float) -> "KroneckerEigenBlock":
        return self._with_scaling(damped_power(self.scaling, 0.0, exponent, scale=self.scaling.abs().amax()))


def block_summary(block: Any) -> str:
    """A short description for reprs: type and covered parameters."""
    return f"{type(block).__name__}({', '.join(block.names)})"
