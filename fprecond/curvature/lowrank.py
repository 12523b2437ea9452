"""Low-rank-plus-identity blocks: ``C = scale · I + Vᵀ K V`` with ``R`` vectors as rows of ``V``.

A curvature estimated from ``R`` backpropagated vectors (per-example empirical
Fisher gradients, Monte-Carlo Fisher samples) has rank at most ``R``; when ``R``
is smaller than the layer, storing the vectors is cheaper than the matrix and
every function of the matrix (inverse, powers) keeps the same form, computed in
the ``R x R`` Gram space ``V Vᵀ`` (Sherman-Morrison-Woodbury). An estimate has
``K = I`` and ``scale = 0``; its damped inverse has ``scale = 1/λ`` and a
negative-definite ``K``.

Two representations of ``V``:

- :class:`LowRankBlock`: the vectors as rows, ``(R, P_b)`` in ``names`` order;
- :class:`FactoredLowRankBlock`: for a supported layer, each vector is a sum of
  ``Q`` outer products per group, ``v_r = Σ_q out[r,q] ⊗ in[r,q]`` over the
  layer's ``(G, O, S)`` matrix (``Q = 1`` for a Linear layer without weight
  sharing: the per-example gradient ``g ãᵀ``; ``Q`` positions with sharing, or a
  truncated rank). Products with ``V`` never form the vectors, and the Gram
  matrix costs ``R² Q² (O + S)`` instead of ``R² O S``.
"""

from __future__ import annotations

import abc

import torch

from fprecond.curvature.blocks import CurvatureBlock, _LayerBlock, flatten_vector, split_vector
from fprecond.layers.layout import MatrixLayout, from_matrix, to_matrix
from fprecond.spectral import damped_power, symmetric_eigh
from fprecond.tree import pytree_dataclass, static_field

__all__ = ["LowRankBlock", "FactoredLowRankBlock", "low_rank_power", "truncated_terms"]

Vector = dict[str, torch.Tensor]


def _identity_core(rows: int, like: torch.Tensor) -> torch.Tensor:
    return torch.eye(rows, dtype=like.dtype, device=like.device)


def truncated_terms(positions: int, layout: MatrixLayout, rank: int | None) -> int:
    """Outer products per vector after truncation to ``rank``: ``Q`` when ``Q`` is no more
    than ``min(rank, O, S)`` (nothing to gain), else ``min(rank, O, S)``."""
    if rank is None:
        return positions
    useful = min(rank, layout.outputs, layout.inputs)
    return positions if positions <= useful else useful


def low_rank_power(gram: torch.Tensor, core: torch.Tensor, scale: torch.Tensor, exponent: float,
                   eigenvalues: str = "clamp") -> tuple[torch.Tensor, torch.Tensor]:
    """``(core', scale')`` with ``scale' I + Vᵀ core' V = (scale I + Vᵀ core V)^exponent``.

    ``gram = V Vᵀ`` (``(R, R)``). With ``V Vᵀ = W Λ Wᵀ``, ``Q = Vᵀ W Λ^{-1/2}`` is an
    orthonormal basis of the vectors' span and the matrix is
    ``scale (I - Q Qᵀ) + Q Z (scale + Σ) Zᵀ Qᵀ`` with ``Λ^{1/2} Wᵀ core W Λ^{1/2} = Z Σ Zᵀ``.
    Eigenvalues are clamped at zero (``"clamp"``) or taken in absolute value
    (``"abs"``) before the power. Directions with ``Λ`` below round-off are dropped
    (the vectors have no component there).
    """
    values, basis = symmetric_eigh(gram)
    floor = values.abs().amax(dim=-1, keepdim=True) * gram.shape[-1] * torch.finfo(gram.dtype).eps
    kept = values > floor
    root = torch.where(kept, values.clamp(min=0.0).sqrt(), 0.0)
    inverse_root = torch.where(kept, 1.0 / torch.where(kept, root, 1.0), 0.0)
    inner = root.unsqueeze(-1) * (basis.transpose(-1, -2) @ core @ basis) * root.unsqueeze(-2)
    sigma, rotation = symmetric_eigh(inner)

    # The matrix's largest eigenvalue is at most scale + max Σ: one floor for both parts.
    top = scale.abs() + sigma.abs().amax(dim=-1)
    size = gram.shape[-1]
    new_scale = damped_power(scale, 0.0, exponent, eigenvalues, scale=top, size=size)
    middle = damped_power(scale + sigma, 0.0, exponent, eigenvalues, scale=top.unsqueeze(-1), size=size) - new_scale
    mapped = basis * inverse_root.unsqueeze(-2) @ rotation  # W Λ^{-1/2} Z
    new_core = (mapped * middle.unsqueeze(-2)) @ mapped.transpose(-1, -2)
    return new_core, new_scale


class _LowRankBase(CurvatureBlock):
    """``scale · I + Vᵀ core V``; subclasses define products with ``V``."""

    core: torch.Tensor
    scale: torch.Tensor

    @abc.abstractmethod
    def project(self, vector: Vector) -> torch.Tensor:
        """``V v``: ``(R,)``."""

    @abc.abstractmethod
    def expand(self, coefficients: torch.Tensor) -> Vector:
        """``Vᵀ c`` for ``c`` of shape ``(R,)``."""

    @abc.abstractmethod
    def gram(self) -> torch.Tensor:
        """``V Vᵀ``: ``(R, R)``."""

    @abc.abstractmethod
    def rows(self) -> torch.Tensor:
        """``V`` as a dense ``(R, P_b)`` matrix (for :meth:`dense` and tests)."""

    @abc.abstractmethod
    def _replace(self, core: torch.Tensor, scale: torch.Tensor) -> "_LowRankBase":
        """The same vectors with a new core and scale."""

    @property
    def rank(self) -> int:
        """Number of vectors ``R``."""
        return self.core.shape[-1]

    def mvp(self, vector: Vector) -> Vector:
        projected = self.core @ self.project(vector)
        back = self.expand(projected)
        return {name: self.scale * vector[name] + back[name] for name in self.names}

    def dense(self) -> torch.Tensor:
        rows = self.rows()
        eye = torch.eye(rows.shape[-1], dtype=rows.dtype, device=rows.device)
        return self.scale * eye + rows.transpose(-1, -2) @ self.core @ rows

    def trace(self) -> torch.Tensor:
        return self.scale * self.size + (self.core * self.gram()).sum()

    def damped(self, damping: float | torch.Tensor, pi: bool = False) -> "_LowRankBase":
        return self._replace(self.core, self.scale + damping)

    def scaled(self, factor: float | torch.Tensor) -> "_LowRankBase":
        return self._replace(self.core * factor, self.scale * factor)

    def power(self, exponent: float, eigenvalues: str = "clamp") -> "_LowRankBase":
        core, scale = low_rank_power(self.gram(), self.core, self.scale, exponent, eigenvalues)
        return self._replace(core, scale)


@pytree_dataclass
class LowRankBlock(_LowRankBase):
    """``scale · I + Vᵀ core V`` with ``vectors`` ``V`` of shape ``(R, P_b)`` (names order),
    ``core`` ``(R, R)`` and a 0-dim ``scale``."""

    vectors: torch.Tensor
    core: torch.Tensor
    scale: torch.Tensor
    names: tuple[str, ...] = static_field()
    param_shapes: tuple[tuple[int, ...], ...] = static_field()

    @classmethod
    def from_vectors(cls, vectors: torch.Tensor, names: tuple[str, ...],
                     shapes: tuple[tuple[int, ...], ...]) -> "LowRankBlock":
        """The matrix ``Vᵀ V``."""
        return cls(vectors, _identity_core(vectors.shape[0], vectors), vectors.new_zeros(()), names, shapes)

    @property
    def shapes(self) -> tuple[tuple[int, ...], ...]:
        return self.param_shapes

    def project(self, vector: Vector) -> torch.Tensor:
        return self.vectors @ flatten_vector(vector, self.names)

    def expand(self, coefficients: torch.Tensor) -> Vector:
        return split_vector(coefficients @ self.vectors, self.names, self.param_shapes)

    def gram(self) -> torch.Tensor:
        return self.vectors @ self.vectors.transpose(-1, -2)

    def rows(self) -> torch.Tensor:
        return self.vectors

    def _replace(self, core: torch.Tensor, scale: torch.Tensor) -> "LowRankBlock":
        return LowRankBlock(self.vectors, core, scale, self.names, self.param_shapes)


@pytree_dataclass
class FactoredLowRankBlock(_LayerBlock, _LowRankBase):
    """``scale · I + Vᵀ core V`` over one layer, with ``v_r = Σ_q outputs[r,q] ⊗ inputs[r,q]``
    per group: ``outputs`` is ``(R, Q, G, O)``, ``inputs`` ``(R, Q, G, S)``."""

    outputs: torch.Tensor
    inputs: torch.Tensor
    core: torch.Tensor
    scale: torch.Tensor
    layout: MatrixLayout = static_field()

    @classmethod
    def from_factors(cls, outputs: torch.Tensor, inputs: torch.Tensor, layout: MatrixLayout) -> "FactoredLowRankBlock":
        """The matrix ``Vᵀ V``."""
        return cls(outputs, inputs, _identity_core(outputs.shape[0], outputs), outputs.new_zeros(()), layout)

    def project(self, vector: Vector) -> torch.Tensor:
        matrix = to_matrix(self.layout, vector)  # (G, O, S)
        return torch.einsum("rqgo,gos,rqgs->r", self.outputs, matrix, self.inputs)

    def expand(self, coefficients: torch.Tensor) -> Vector:
        weighted = self.outputs * coefficients[:, None, None, None]
        return from_matrix(self.layout, torch.einsum("rqgo,rqgs->gos", weighted, self.inputs))

    def gram(self) -> torch.Tensor:
        output_products = torch.einsum("rqgo,tpgo->rqtpg", self.outputs, self.outputs)
        input_products = torch.einsum("rqgs,tpgs->rqtpg", self.inputs, self.inputs)
        return (output_products * input_products).sum(dim=(1, 3, 4))

    def rows(self) -> torch.Tensor:
        per_vector = torch.einsum("rqgo,rqgs->rgos", self.outputs, self.inputs)
        parts = from_matrix(self.layout, per_vector)
        return torch.cat([parts[name].reshape(per_vector.shape[0], -1) for name in self.names], dim=1)

    def _replace(self, core: torch.Tensor, scale: torch.Tensor) -> "FactoredLowRankBlock":
        return FactoredLowRankBlock(self.outputs, self.inputs, core, scale, self.layout)

    def truncated(self, rank: int) -> "FactoredLowRankBlock":
        """Each vector's ``(O, S)`` matrix per group replaced by its best rank-``rank``
        approximation (truncated SVD), as SENG compresses per-example gradients of
        layers with weight sharing; :func:`truncated_terms` outer products remain.
        Exact when ``rank >= min(Q, O, S)``."""
        kept = truncated_terms(self.outputs.shape[1], self.layout, rank)
        if kept == self.outputs.shape[1]:
            return self
        rank = kept
        matrices = torch.einsum("rqgo,rqgs->rgos", self.outputs, self.inputs)
        left, singular, right_t = torch.linalg.svd(matrices, full_matrices=False)
        root = singular[..., :rank].sqrt()
        outputs = (left[..., :rank] * root.unsqueeze(-2)).permute(0, 3, 1, 2)  # (R, rank, G, O)
        inputs = (right_t[..., :rank, :] * root.unsqueeze(-1)).permute(0, 2, 1, 3)  # (R, rank, G, S)
        return FactoredLowRankBlock(outputs, inputs, self.core, self.scale, self.layout)
