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

Data-parallel training (:meth:`EigenbasisEstimator.update` with ``reduce`` and
``share``, as :func:`fprecond.precondition` passes them from
:class:`fprecond.distributed.DataParallel`): the fresh Kronecker factors and the
fresh moments are each averaged over processes before their running averages.
Both follow the loss's mean reduction (the output gradients carry ``1/√N``, so
``s`` is a mean over examples, like ``A`` and ``G``): the mean of per-process
values on equal-size shards is the value on the concatenated batch. The
eigendecompositions of the averaged factors (the expensive part, ``Θ(S³ + O³)``
per layer) are each computed by one process and its eigenbases sent to the others.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

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
Share = Callable[[Callable[[int], Any], Sequence[Any]], list[Any]]
"""``share(compute, templates)``: the data-parallel hook that spreads items over processes."""


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
               buffers: Params | None = None, reduce: Callable[[Any], Any] | None = None,
               share: Share | None = None) -> EigenbasisState:
        """Fold a fresh estimate on ``batch`` in; a new eigenbasis every ``basis_every`` estimates.

        Data-parallel hooks (both None in one process; see the module docstring):
        ``reduce`` maps a pytree of fresh statistics to its mean over processes (applied to
        the fresh factors, then to the fresh moments); ``share(compute, templates)``
        returns ``[compute(i) for i in range(len(templates))]`` with each item computed by
        one process (the eigenbases of the Kronecker blocks, templates the current ones).
        """
        builder = BlockBuilder(self.model, params, batch, self.kind, self.approx, key, self.samples, "example", buffers)
        plans = self.kron.plans
        fresh = tuple(builder.block(plan) for plan in plans)
        if reduce is not None:
            fresh = reduce(state.factors._replace_blocks(fresh)).blocks
        first = state.count == 0

        def average(old: Any, new: Any) -> Any:
            return running_average(old, new, first, self.decay)

        factors = state.factors._replace_blocks(tuple(average(old, new) for old, new in
                                                      zip(state.factors.blocks, fresh)))
        new_basis = state.count % self.basis_every == 0
        if share is None:
            eigen = lazy_where(new_basis, lambda: _eigen_curvature(factors, state.curvature), state.curvature)
        else:
            eigen = lazy_where(new_basis, lambda: _shared_eigenbases(factors, state.curvature, share),
                               state.curvature)

        # The moments of every layer first, so that one (bucketed) reduce averages them all.
        moments: dict[int, torch.Tensor] = {}
        for index, (plan, basis_block) in enumerate(zip(plans, eigen.blocks)):
            if isinstance(basis_block, KroneckerEigenBlock):
                inputs, grads = builder.layer_statistics(_owner(plan)[0])
                moments[index] = eigenbasis_moments(inputs, grads, basis_block.input_basis, basis_block.output_basis)
        if reduce is not None:
            moments = reduce(moments)

        blocks: list[CurvatureBlock] = []
        for index, (old, fresh_block, basis_block) in enumerate(zip(state.curvature.blocks, fresh, eigen.blocks)):
            if not isinstance(basis_block, KroneckerEigenBlock):
                blocks.append(average(old, fresh_block))
                continue
            scaling = running_average(old.scaling, moments[index], first | new_basis,  # type: ignore[attr-defined]
                                      self.decay)
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


def _shared_eigenbases(factors: Curvature, previous: Curvature, share: Share) -> Curvature:
    """:func:`_eigen_curvature` with each Kronecker block's eigendecomposition computed by
    one process (``share``) and its bases ``(Q_A, Q_G)`` sent to the others.

    The eigenvalues are not sent: ``update`` replaces them at once by the moments in the
    new basis, so the blocks carry ``previous``'s scaling until then.
    """
    indices = [index for index, block in enumerate(factors.blocks) if isinstance(block, KroneckerBlock)]

    def bases(item: int) -> tuple[torch.Tensor, torch.Tensor]:
        eigen = factors.blocks[indices[item]].eigendecomposition()  # type: ignore[attr-defined]
        return eigen.input_basis, eigen.output_basis

    templates = []
    for index in indices:
        old = previous.blocks[index]
        if not isinstance(old, KroneckerEigenBlock):
            raise TypeError(f"ekfac: block {index} of the previous curvature is a {type(old).__name__}, not an "
                            "eigenbasis block; the state does not come from EigenbasisEstimator.init")
        templates.append((old.input_basis, old.output_basis))
    received = dict(zip(indices, share(bases, templates)))
    blocks: list[CurvatureBlock] = []
    for index, block in enumerate(previous.blocks):
        if index in received and isinstance(block, KroneckerEigenBlock):
            input_basis, output_basis = received[index]
            blocks.append(KroneckerEigenBlock(input_basis, output_basis, block.scaling, block.layout))
        else:
            blocks.append(block)
    return factors._replace_blocks(tuple(blocks))
