"""Factorisations of the posterior precision, block by block: log-determinant,
whitening (for predictive variances) and colouring (for samples).

Each block of ``P = s · C + P₀`` gets a factor ``F`` with ``P_b = F Fᵀ``:

- dense (``full``, ``layer``) and unit-wise blocks: the Cholesky factor ``L``
  (``torch.linalg.cholesky_ex``; unit-wise blocks batched);
- Kronecker blocks ``s · G ⊗ A + δ I``: the eigenbases ``Q_G``, ``Q_A`` of the
  factors and the exact eigenvalues ``s · λ^G_i λ^A_j + δ`` of the block
  (Ritter et al. 2018; Immer et al. 2021 for the exact log-determinant);
- diagonal blocks: the square root of the diagonal.

With it, ``log det P_b`` is ``2 Σ log diag L`` (or the sum of log eigenvalues),
``whiten(v) = F⁻¹ v`` gives ``vᵀ P⁻¹ v = ||F⁻¹ v||²`` (so ``J P⁻¹ Jᵀ = W Wᵀ`` with
``W`` the whitened Jacobian rows) and ``color(z) = F⁻ᵀ z`` turns standard normal
``z`` into a sample of ``N(0, P⁻¹)``. For Kronecker blocks ``F⁻¹ = Λ^{-1/2} Qᵀ``
and ``F⁻ᵀ = Q Λ^{-1/2}`` in the Kronecker eigenbasis ``Q = Q_G ⊗ Q_A``.

Negative curvature (the Hessian away from an exact minimum) would make ``P``
indefinite. The likelihood curvature is projected onto the positive
semi-definite cone: Kronecker and diagonal eigenvalues ``s·λ`` are clamped at
zero, and a dense or unit-wise block whose Cholesky factorisation fails is
rebuilt from its eigendecomposition with eigenvalues clamped at its smallest
prior precision (the same projection when the block has one ``δ``); the
rebuild runs through :func:`fprecond.lazy.lazy_where`, so it costs nothing when
every factorisation succeeds. No NaN or Inf is produced for a positive prior.
"""

from __future__ import annotations

import math
from typing import Union, cast

import torch

from fprecond.curvature.blocks import DenseBlock, DiagonalBlock, KroneckerBlock, UnitBlock
from fprecond.laplace.posterior import LaplacePosterior, precision_block
from fprecond.layers.layout import MatrixLayout, from_matrix, to_matrix
from fprecond.lazy import lazy_where
from fprecond.spectral import singular_floor, symmetric_eigh
from fprecond.tree import pytree_dataclass, static_field

__all__ = ["PosteriorFactor", "DenseFactor", "UnitFactor", "KroneckerFactor", "DiagonalFactor", "factorize"]

Vector = dict[str, torch.Tensor]


def _repaired_cholesky(matrix: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factors of symmetric ``(..., n, n)`` matrices; a matrix that is not
    positive definite is replaced by ``V max(Λ, floor) Vᵀ`` first (``floor`` of shape ``(...)``,
    raised to :func:`~fprecond.spectral.singular_floor` so the rebuilt matrix factors in floating point)."""
    lower, info = torch.linalg.cholesky_ex(matrix)
    failed = (info != 0)[..., None, None]

    def repaired() -> torch.Tensor:
        values, vectors = symmetric_eigh(matrix)
        relative = singular_floor(values.abs().amax(dim=-1, keepdim=True), values.shape[-1])
        clamped = torch.maximum(values, torch.maximum(floor[..., None], relative))
        rebuilt = (vectors * clamped.unsqueeze(-2)) @ vectors.transpose(-1, -2)
        return torch.linalg.cholesky_ex((rebuilt + rebuilt.transpose(-1, -2)) / 2)[0]

    return lazy_where(failed, repaired, lower)


def _flat_rows(vectors: Vector, names: tuple[str, ...]) -> torch.Tensor:
    """``{name: (B, *shape)}`` -> ``(B, P_b)`` in ``names`` order."""
    return torch.cat([vectors[name].reshape(vectors[name].shape[0], -1) for name in names], dim=1)


def _split_rows(flat: torch.Tensor, names: tuple[str, ...], shapes: tuple[tuple[int, ...], ...]) -> Vector:
    """Inverse of :func:`_flat_rows`."""
    out, start = {}, 0
    for name, shape in zip(names, shapes):
        count = math.prod(shape)
        out[name] = flat[:, start:start + count].reshape(flat.shape[0], *shape)
        start += count
    return out


# Batches of vectors are solved as the columns of one right-hand side, never by vmapping a
# solve over them: vmap would copy the (shared) factor once per vector.


@pytree_dataclass
class DenseFactor:
    """``P_b = L Lᵀ`` over the flat vector of ``names`` (``lower`` is ``(P_b, P_b)``)."""

    lower: torch.Tensor
    names: tuple[str, ...] = static_field()
    shapes: tuple[tuple[int, ...], ...] = static_field()

    def logdet(self) -> torch.Tensor:
        return 2.0 * torch.log(torch.diagonal(self.lower)).sum()

    def whiten(self, vectors: Vector) -> torch.Tensor:
        columns = _flat_rows(vectors, self.names).transpose(0, 1)
        return torch.linalg.solve_triangular(self.lower, columns, upper=False).transpose(0, 1)

    def color(self, noise: Vector) -> Vector:
        columns = _flat_rows(noise, self.names).transpose(0, 1)
        solved = torch.linalg.solve_triangular(self.lower.transpose(0, 1), columns, upper=True)
        return _split_rows(solved.transpose(0, 1), self.names, self.shapes)


@pytree_dataclass
class UnitFactor:
    """Per output unit ``P_u = L_u L_uᵀ``; ``lower`` is ``(G·O, S, S)`` in the layer's layout."""

    lower: torch.Tensor
    layout: MatrixLayout = static_field()

    @property
    def names(self) -> tuple[str, ...]:
        return self.layout.names

    def logdet(self) -> torch.Tensor:
        return 2.0 * torch.log(torch.diagonal(self.lower, dim1=-2, dim2=-1)).sum()

    def _columns(self, vectors: Vector) -> torch.Tensor:
        """``{name: (B, *shape)}`` -> ``(U, S, B)``."""
        matrix = to_matrix(self.layout, vectors, lead=1)
        return matrix.reshape(matrix.shape[0], self.layout.units, self.layout.inputs).permute(1, 2, 0)

    def whiten(self, vectors: Vector) -> torch.Tensor:
        solved = torch.linalg.solve_triangular(self.lower, self._columns(vectors), upper=False)
        return solved.permute(2, 0, 1).reshape(solved.shape[-1], -1)

    def color(self, noise: Vector) -> Vector:
        solved = torch.linalg.solve_triangular(self.lower.transpose(-1, -2), self._columns(noise), upper=True)
        layout = self.layout
        return from_matrix(layout, solved.permute(2, 0, 1).reshape(-1, layout.groups, layout.outputs, layout.inputs))


@pytree_dataclass
class KroneckerFactor:
    """``P_b = Q diag(eigenvalues) Qᵀ`` with ``Q = Q_G ⊗ Q_A`` per group: ``input_basis``
    ``(G, S, S)``, ``output_basis`` ``(G, O, O)``, ``eigenvalues`` ``(G, O, S)``."""

    input_basis: torch.Tensor
    output_basis: torch.Tensor
    eigenvalues: torch.Tensor
    layout: MatrixLayout = static_field()

    @property
    def names(self) -> tuple[str, ...]:
        return self.layout.names

    def logdet(self) -> torch.Tensor:
        return torch.log(self.eigenvalues).sum()

    def whiten(self, vectors: Vector) -> torch.Tensor:
        matrix = to_matrix(self.layout, vectors, lead=1)  # (B, G, O, S)
        rotated = self.output_basis.transpose(-1, -2) @ matrix @ self.input_basis
        return (rotated * torch.rsqrt(self.eigenvalues)).reshape(matrix.shape[0], -1)

    def color(self, noise: Vector) -> Vector:
        scaled = to_matrix(self.layout, noise, lead=1) * torch.rsqrt(self.eigenvalues)
        return from_matrix(self.layout, self.output_basis @ scaled @ self.input_basis.transpose(-1, -2))


@pytree_dataclass
class DiagonalFactor:
    """``P_b = diag(precision)``; ``precision[name]`` is shaped like the parameter."""

    precision: dict[str, torch.Tensor]
    names: tuple[str, ...] = static_field()

    def logdet(self) -> torch.Tensor:
        return torch.stack([torch.log(d).sum() for d in self.precision.values()]).sum()

    def whiten(self, vectors: Vector) -> torch.Tensor:
        return _flat_rows({name: vectors[name] * torch.rsqrt(self.precision[name]) for name in self.names},
                          self.names)

    def color(self, noise: Vector) -> Vector:
        return {name: noise[name] * torch.rsqrt(self.precision[name]) for name in self.names}


BlockFactor = Union[DenseFactor, UnitFactor, KroneckerFactor, DiagonalFactor]


@pytree_dataclass
class PosteriorFactor:
    """The factors of every block of the posterior precision (see the module docstring)."""

    blocks: tuple[BlockFactor, ...]
    names: tuple[str, ...] = static_field()
    shapes: tuple[tuple[int, ...], ...] = static_field()

    @property
    def size(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes)

    def logdet(self) -> torch.Tensor:
        """``log det P`` (0-dim)."""
        return torch.stack([block.logdet() for block in self.blocks]).sum()

    def whiten(self, vectors: Vector) -> torch.Tensor:
        """``F⁻¹ v`` for a batch of vectors ``{name: (B, *shape)}``, as ``(B, P)`` (block by
        block): ``vᵀ P⁻¹ v = ||F⁻¹ v||²``, so ``V P⁻¹ Vᵀ = W Wᵀ`` for the whitened rows ``W``."""
        return torch.cat([block.whiten(vectors) for block in self.blocks], dim=1)

    def color(self, noise: Vector) -> Vector:
        """``F⁻ᵀ z`` for a batch ``{name: (B, *shape)}``: standard normal ``z`` becomes ``N(0, P⁻¹)``."""
        out: Vector = {}
        for block in self.blocks:
            out.update(block.color(noise))
        return {name: out[name] for name in self.names}


def _kronecker_factor(block: KroneckerBlock, scale: torch.Tensor, delta: torch.Tensor) -> KroneckerFactor:
    values_a, basis_a = symmetric_eigh(block.input_factor)
    values_g, basis_g = symmetric_eigh(block.output_factor)
    products = scale * values_g[:, :, None] * values_a[:, None, :] + scale * block.damping
    return KroneckerFactor(basis_a, basis_g, products.clamp(min=0.0) + delta, block.layout)


def factorize(posterior: LaplacePosterior, prior_precision: torch.Tensor | None = None) -> PosteriorFactor:
    """Factor every block of the posterior precision (``prior_precision`` overrides the
    posterior's). Pure and vmappable over an ensemble of posteriors."""
    prior = posterior.prior_per_parameter(prior_precision)
    scale = posterior.likelihood_scale
    factors: list[BlockFactor] = []
    for block in posterior.curvature.blocks:
        if isinstance(block, KroneckerBlock):
            factors.append(_kronecker_factor(block, scale, prior[block.names[0]]))
        elif isinstance(block, DiagonalBlock):
            factors.append(DiagonalFactor({name: (scale * d).clamp(min=0.0) + prior[name]
                                           for name, d in block.diagonal.items()}, block.names))
        elif isinstance(block, UnitBlock):
            precision = cast(UnitBlock, precision_block(block, scale, prior))
            floor = prior[block.names[0]].expand(precision.blocks.shape[0])
            factors.append(UnitFactor(_repaired_cholesky(precision.blocks, floor), block.layout))
        elif isinstance(block, DenseBlock):
            dense = cast(DenseBlock, precision_block(block, scale, prior))
            floor = torch.stack([prior[name] for name in block.names]).amin()
            factors.append(DenseFactor(_repaired_cholesky(dense.matrix, floor), block.names, block.param_shapes))
        else:
            raise TypeError(f"laplace: no factorisation for a {type(block).__name__}")
    curvature = posterior.curvature
    return PosteriorFactor(tuple(factors), curvature.names, curvature.shapes)
