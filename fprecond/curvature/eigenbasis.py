"""Curvature in the Kronecker eigenbasis with re-estimated eigenvalues (EKFAC,
George et al. 2018).

K-FAC's layer block ``G ⊗ A`` has eigenvectors ``Q_G ⊗ Q_A`` and eigenvalues
``λ_G λ_A``. EKFAC keeps the eigenvectors and replaces the eigenvalues by the
second moments of the per-example gradients in that basis,

    s[o, i] = Σ_{k,n} ((Q_Gᵀ γ_kn Q_A)[o, i])²,

which is the diagonal of the exact (Fisher or GGN) layer block in the basis, so it
is never a worse approximation than K-FAC's in Frobenius norm. The bases are
refreshed from running Kronecker factors every ``basis_every`` estimates; the
moments are a running average, restarted from the fresh batch whenever the
basis changes (moments in different bases do not mix).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from fprecond._validation import check_number
from fprecond.curvature.blocks import CurvatureBlock, KroneckerBlock, KroneckerEigenBlock
from fprecond.curvature.estimate import BlockBuilder, CurvatureEstimator, _owner, running_average
from fprecond.curvature.matrix import Curvature
from fprecond.lazy import lazy_where
from fprecond.modeling import Model
from fprecond.tree import pytree_dataclass

__all__ = ["EigenbasisEstimator", "EigenbasisState", "eigenbasis_moments"]

Params = dict[str, torch.Tensor]


def eigenbasis_moments(inputs: torch.Tensor, grads: torch.Tensor, input_basis: torch.Tensor,
                       output_basis: torch.Tensor) -> torch.Tensor:
    """``Σ_{k,n} (Q_Gᵀ γ_kn Q_A)²`` of shape ``(G, O, S)`` from layer inputs ``(N, P, G, S)``
    and output gradients ``(K, N, P, G, O)`` (per-example gradients formed only with
    weight sharing, ``P > 1``)."""
    rotated_inputs = torch.einsum("npgs,gst->npgt", inputs, input_basis)
    rotated_grads = torch.einsum("knpgo,gor->knpgr", grads, output_basis)
    if inputs.shape[1] == 1:
        return torch.einsum("kngr,ngt->grt", rotated_grads[:, :, 0].square(), rotated_inputs[:, 0].square())
    per_example = torch.einsum("knpgr,npgt->kngrt", rotated_grads, rotated_inputs)
    return per_example.square().sum(dim=(0, 1))


@pytree_dataclass
class EigenbasisState:
    """``count``: estimates so far; ``factors``: running Kronecker factors (the K-FAC
    curvature); ``curvature``: the EKFAC curvature, with
    :class:`~fprecond.curvature.blocks.KroneckerEigenBlock` blocks whose ``scaling``
    holds the running moments (other blocks as in ``factors``)."""

    count: torch.Tensor
    factors: Curvature
    curvature: Curvature


@dataclasses.dataclass(frozen=True)
class EigenbasisEstimator:
    """The EKFAC curvature as a running estimate (same interface as
    :class:`~fprecond.curvature.CurvatureEstimator`: ``init``, ``update``, ``kind``).

    Attributes:
        model, kind, approx, samples, fallback: as :func:`fprecond.curvature.estimate`
            with ``structure="kron"``.
        decay: running-average decay of the factors and the moments.
        basis_every: refresh the eigenbases every this many estimates.
    """

    model: Model
    kind: str = "fisher_mc"
    approx: str = "expand"
    samples: int = 1
    fallback: str = "diag"
    decay: float = 0.95
    basis_every: int = 10

    def __post_init__(self) -> None:
        check_number("ekfac", "decay", self.decay, low=0.0, high=1.0, high_inclusive=False)
        if isinstance(self.basis_every, bool) or not isinstance(self.basis_every, int) or self.basis_every < 1:
            raise ValueError(f"ekfac: basis_every must be a positive int, got {self.basis_every!r}")
        self.kron  # checks kind, approx, samples and the model's layers at construction, not at the first step

    @property
    def kron(self) -> CurvatureEstimator:
        """The estimator of the running Kronecker factors."""
        return CurvatureEstimator(self.model, self.kind, "kron", self.approx, self.samples, "example",
                                  self.fallback, self.decay)

    @property
    def structure(self) -> str:
        return "ekfac"

    def init(self, params: Params) -> EigenbasisState:
        factors = self.kron.init(params)
        return EigenbasisState(factors.count, factors.curvature, _eigen_curvature(factors.curvature, None))

    def update(self, state: EigenbasisState, params: Params, batch: Any, key: torch.Tensor | None = None,
               buffers: Params | None = None) -> EigenbasisState:
        builder = BlockBuilder(self.model, params, batch, self.kind, self.approx, key, self.samples, "example", buffers)
        plans = self.kron.plans
        fresh = tuple(builder.block(plan) for plan in plans)
        first = state.count == 0

        def average(old: Any, new: Any) -> Any:
            return running_average(old, new, first, self.decay)

        factors = state.factors._replace_blocks(tuple(average(old, new) for old, new in
                                                      zip(state.factors.blocks, fresh)))
        new_basis = state.count % self.basis_every == 0
        eigen = lazy_where(new_basis, lambda: _eigen_curvature(factors, state.curvature), state.curvature)

        blocks: list[CurvatureBlock] = []
        for plan, old, fresh_block, basis_block in zip(plans, state.curvature.blocks, fresh, eigen.blocks):
            if not isinstance(basis_block, KroneckerEigenBlock):
                blocks.append(average(old, fresh_block))
                continue
            layer = _owner(plan)[0]
            inputs, grads = builder.layer_statistics(layer)
            moments = eigenbasis_moments(inputs, grads, basis_block.input_basis, basis_block.output_basis)
            scaling = running_average(old.scaling, moments, first | new_basis, self.decay)  # type: ignore[attr-defined]
            blocks.append(KroneckerEigenBlock(basis_block.input_basis, basis_block.output_basis, scaling,
                                              basis_block.layout))
        curvature = state.curvature._replace_blocks(tuple(blocks))
        return EigenbasisState(state.count + 1, factors, curvature)


def _eigen_curvature(factors: Curvature, previous: Curvature | None) -> Curvature:
    """Kronecker blocks of ``factors`` in their eigenbasis (scaling ``λ_G λ_A``); other
    blocks from ``previous`` (or ``factors``)."""
    blocks: list[CurvatureBlock] = []
    for index, block in enumerate(factors.blocks):
        if isinstance(block, KroneckerBlock):
            blocks.append(block.eigendecomposition())
        else:
            blocks.append(block if previous is None else previous.blocks[index])
    return factors._replace_blocks(tuple(blocks))

