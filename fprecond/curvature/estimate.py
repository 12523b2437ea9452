"""Estimate a curvature matrix once (:func:`estimate`) or as a running average
inside a transform (:class:`CurvatureEstimator`).

Costs (``K`` backpropagated vectors per example, see :mod:`.vectors`):
``empirical_fisher`` and ``fisher_mc`` with one sample take one forward and one
backward pass in ``kron``/``unit``/``diag`` structure (plus one backward per
extra sample, vmapped); ``ggn``/``fisher`` take one backward per output entry of
a loss term, vmapped. ``full`` and ``layer`` form the per-example gradients
``(K, N, P)``. ``hessian`` in ``kron`` takes one Hessian-vector product per
output unit of each layer (``reduce``, or no weight sharing) or per position
and output unit (``expand`` with weight sharing), and in ``diag``/``unit`` one
per output unit for Linear layers without weight sharing; other layers, and
``full``/``layer``, take one Hessian-vector product per parameter of the block
(exact, for small models).

The Hessian in ``kron`` structure (an approximation, Botev et al. 2017): ``A`` from
the layer inputs as for the GGN and ``G = Σ_n ∂²L/∂z_n²``, the exact Hessian
w.r.t. the layer output ``z``, summed over examples. The layer's Hessian block
is ``Σ_n ∂²L/∂z_n² ⊗ ã_n ã_nᵀ``, so this is exact for one example without
weight sharing, and the K-FAC independence approximation otherwise. With
weight sharing, ``expand`` sums the position-diagonal blocks ``∂²L/∂z_np²`` and
``reduce`` sums over pairs of positions, as the GGN's factors do.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, cast

import torch

from fprecond._validation import check_choice, check_number
from fprecond.curvature.blocks import (
    CurvatureBlock,
    DenseBlock,
    DiagonalBlock,
    KroneckerBlock,
    UnitBlock,
    split_vector,
)
from fprecond.curvature.hessian import hessian_block, output_hessian_factors, output_hessians
from fprecond.curvature.lowrank import FactoredLowRankBlock, LowRankBlock, truncated_terms
from fprecond.curvature.matrix import Curvature
from fprecond.curvature.plan import BlockPlan, plan_blocks
from fprecond.curvature.vectors import cotangents, example_gradient_vectors
from fprecond.layers import MatrixLayout, contractions, flat_index_matrix, form_of, from_matrix
from fprecond.layers.contractions import KronApprox
from fprecond.modeling import Layer, Model, unpack_batch
from fprecond.taps import Taps, layer_taps, perturbed_forward
from fprecond.tree import pytree_dataclass, tree_map

__all__ = ["estimate", "estimator", "CurvatureEstimator", "EstimatorState", "running_average"]

Params = dict[str, torch.Tensor]


def check_options(kind: str, key: torch.Tensor | None, samples: int, per: str) -> None:
    """Raise for sampling options that do not fit ``kind`` (a missing key for ``fisher_mc``, ...)."""
    owner = "curvature"
    check_choice(owner, "per", per, ("example", "term"))
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"{owner}: samples must be a positive int, got {samples!r}")
    if kind == "fisher_mc" and key is None:
        raise ValueError(f"{owner}: kind 'fisher_mc' samples targets and needs an explicit key (fprecond.random.key)")
    if kind != "fisher_mc" and samples != 1:
        raise ValueError(f"{owner}: samples={samples} only applies to kind 'fisher_mc', not {kind!r}")


class BlockBuilder:
    """Computes each planned block, sharing one tap pass between the blocks."""

    def __init__(self, model: Model, params: Params, batch: Any, kind: str, approx: str,
                 key: torch.Tensor | None, samples: int, per: str, buffers: Params | None) -> None:
        self.model, self.params, self.batch, self.kind, self.approx = model, params, batch, kind, approx
        self.buffers = buffers
        self.inputs, targets = unpack_batch(batch)
        if kind != "hessian":
            self.cotangents = cotangents(kind, model.loss, targets, key=key, samples=samples, per=per)
        self._taps: Taps | None = None
        #: Low-rank blocks of layers: per-example gradients truncated to this rank (SENG).
        self.truncate: int | None = None
        self._output_shapes: Params | None = None

    # ---- shared passes ------------------------------------------------------------------------
    @property
    def taps(self) -> Taps:
        if self._taps is None:
            self._taps = layer_taps(self.model, self.params, self.inputs, self.cotangents, self.buffers)
        return self._taps

    def layer_statistics(self, layer: Layer) -> tuple[torch.Tensor, torch.Tensor]:
        form = form_of(layer)
        taps = self.taps
        return (form.inputs(layer, taps.features[layer.name]),
                form.output_grads(layer, taps.output_grads[layer.name]))

    def gradient_vectors(self, names: tuple[str, ...]) -> Params:
        """Per-example gradients ``{name: (K, N, *shape)}``: from taps where a layer owns the
        parameter, by per-example VJPs elsewhere."""
        out: Params = {}
        wanted = set(names)
        for layer in self.model.layers:
            if wanted & set(layer.param_names):
                inputs, grads = self.layer_statistics(layer)
                layout = form_of(layer).layout(layer)
                out.update(from_matrix(layout, contractions.per_example_matrix(inputs, grads)))
        others = tuple(name for name in names if name not in out)
        if others:
            outputs = self._taps.outputs if self._taps is not None else \
                self.model.apply(self.params, self.inputs, self.buffers).detach()
            vectors = self.cotangents(outputs)
            out.update(example_gradient_vectors(self.model, self.params, self.inputs, vectors, others, self.buffers))
        return {name: out[name] for name in names}

    def shared_positions(self, layer: Layer) -> bool:
        if self._output_shapes is None:
            self._output_shapes = perturbed_forward(self.model, self.params, self.inputs, self.buffers)[1]
        return layer.kind != "linear" or self._output_shapes[layer.name].dim() > 2

    # ---- blocks ---------------------------------------------------------------------------------
    def block(self, plan: BlockPlan) -> CurvatureBlock:
        if self.kind == "hessian":
            return self._hessian_block(plan)
        if plan.form == "lowrank":
            return self._low_rank_block(plan)
        if plan.form == "dense":
            flat = _rows(self.gradient_vectors(plan.names))
            return DenseBlock(flat.T @ flat, plan.names, plan.shapes)
        if plan.layer is None:  # diagonal of a parameter outside supported layers
            vectors = self.gradient_vectors(plan.names)
            return DiagonalBlock({name: v.square().sum(dim=(0, 1)) for name, v in vectors.items()}, plan.names)
        layer, layout = _owner(plan)
        if plan.form == "kron":
            taps = self.taps
            a, g = form_of(layer).kronecker_factors(layer, taps.features[layer.name], taps.output_grads[layer.name],
                                                    cast(KronApprox, self.approx))
            return KroneckerBlock(a, g, a.new_zeros(()), layout)
        inputs, grads = self.layer_statistics(layer)
        if plan.form == "diag":
            return DiagonalBlock(from_matrix(layout, contractions.diagonal(inputs, grads)), plan.names)
        blocks = contractions.unit_blocks(inputs, grads)
        return UnitBlock(blocks.reshape(layout.units, layout.inputs, layout.inputs), layout)

    def _low_rank_block(self, plan: BlockPlan) -> CurvatureBlock:
        if plan.layer is None:
            return LowRankBlock.from_vectors(_rows(self.gradient_vectors(plan.names)), plan.names, plan.shapes)
        layer, layout = _owner(plan)
        inputs, grads = self.layer_statistics(layer)
        count = grads.shape[0] * grads.shape[1]
        if self.truncate is not None or low_rank_factored(layout, inputs.shape[1]):
            expanded = inputs.expand(grads.shape[0], *inputs.shape)
            block = FactoredLowRankBlock.from_factors(grads.reshape(count, *grads.shape[2:]),
                                                      expanded.reshape(count, *inputs.shape[1:]), layout)
            return block if self.truncate is None else block.truncated(self.truncate)
        per_example = contractions.per_example_matrix(inputs, grads)
        return LowRankBlock.from_vectors(_rows(from_matrix(layout, per_example)), plan.names, plan.shapes)

    def _hessian_block(self, plan: BlockPlan) -> CurvatureBlock:
        if plan.form == "kron":
            layer, layout = _owner(plan)
            a, g = output_hessian_factors(self.model, self.params, self.batch, layer, cast(KronApprox, self.approx),
                                          self.buffers)
            return KroneckerBlock(a, g, g.new_zeros(()), layout)
        if plan.form in ("diag", "unit") and plan.layer is not None and not self.shared_positions(plan.layer):
            return self._hessian_unshared_linear(plan)
        matrix = hessian_block(self.model, self.params, self.batch, plan.names, self.buffers)
        if plan.form == "dense":
            return DenseBlock(matrix, plan.names, plan.shapes)
        if plan.form == "diag":
            return DiagonalBlock(split_vector(torch.diagonal(matrix), plan.names, plan.shapes), plan.names)
        return UnitBlock(_unit_blocks_of(matrix, _owner(plan)[1]), _owner(plan)[1])

    def _hessian_unshared_linear(self, plan: BlockPlan) -> CurvatureBlock:
        """Exact diagonal / unit blocks of a Linear layer without weight sharing, from its
        per-example output Hessians ``∂²L/∂z_n²`` (the block is ``Σ_n ∂²L/∂z_n² ⊗ ã_n ã_nᵀ``)."""
        layer, layout = _owner(plan)
        inputs, columns = output_hessians(self.model, self.params, self.batch, layer, self.buffers)
        x = inputs[:, 0, 0]  # (N, S)
        diagonal = torch.diagonal(columns[:, :, 0, 0, :], dim1=0, dim2=2)  # (N, O)
        if plan.form == "diag":
            values = torch.einsum("no,ns->os", diagonal, x.square()).unsqueeze(0)
            return DiagonalBlock(from_matrix(layout, values), plan.names)
        blocks = torch.einsum("no,ns,nt->ost", diagonal, x, x)
        return UnitBlock(blocks, layout)


def _rows(vectors: Params) -> torch.Tensor:
    """``{name: (K, N, *shape)}`` -> ``(K·N, P_b)``: one row per backpropagated vector."""
    return torch.cat([v.reshape(v.shape[0] * v.shape[1], -1) for v in vectors.values()], dim=1)


def low_rank_factored(layout: MatrixLayout, positions: int) -> bool:
    """Whether a layer's low-rank block keeps its vectors as ``positions`` outer products
    per group (cheaper than the ``(O, S)`` matrices when ``P (O + S) <= O S``)."""
    return positions * (layout.outputs + layout.inputs) <= layout.outputs * layout.inputs


def _owner(plan: BlockPlan) -> tuple[Layer, MatrixLayout]:
    """The layer and layout of a block planned for a supported layer."""
    if plan.layer is None or plan.layout is None:
        raise AssertionError(f"block over {plan.names} has no layer")  # plan_blocks never does this
    return plan.layer, plan.layout


def _unit_blocks_of(matrix: torch.Tensor, layout: MatrixLayout) -> torch.Tensor:
    """The ``(U, S, S)`` unit-wise blocks of a dense layer block."""
    index = flat_index_matrix(layout, device=matrix.device).reshape(layout.units, layout.inputs)
    return matrix[index[:, :, None], index[:, None, :]]


def estimate(model: Model, params: Params, batch: Any, *, kind: str, structure: str, approx: str = "expand",
             key: torch.Tensor | None = None, samples: int = 1, per: str = "example", fallback: str = "error",
             buffers: Params | None = None, truncate: int | None = None) -> Curvature:
    """One curvature estimate on ``batch = (inputs, targets)``.

    Args:
        model: from :func:`fprecond.model`.
        params: parameter values ``{name: tensor}``.
        batch: ``(inputs, targets)``.
        kind: ``"hessian"``, ``"ggn"``, ``"fisher"`` (exact, through the loss Hessian's
            square root), ``"fisher_mc"`` (``samples`` targets drawn with ``key``) or
            ``"empirical_fisher"`` (observed targets).
        structure: ``"full"``, ``"layer"``, ``"kron"``, ``"unit"`` or ``"diag"``
            (see :mod:`fprecond.curvature.plan`).
        approx: ``"expand"`` or ``"reduce"`` for Kronecker factors of layers that share
            weights over positions (Eschenhagen et al. 2023).
        key: a key from :mod:`fprecond.random`; required by ``fisher_mc``.
        samples: Monte-Carlo samples per example for ``fisher_mc``.
        per: ``"example"`` or ``"term"``: the empirical Fisher's outer products (see
            :func:`fprecond.empirical_fisher_vp`).
        fallback: ``"error"`` or ``"diag"`` for parameters outside supported layers in
            ``kron``/``unit`` structure.
        buffers: optional buffer values (default: the module's).
        truncate: ``lowrank`` only: keep each layer's per-example gradients as
            outer-product factors truncated to this rank (SENG's sketch of layers
            with weight sharing); exact for layers without sharing.

    Returns:
        A :class:`~fprecond.curvature.matrix.Curvature` scaled like the loss (a mean
        loss gives a mean curvature).
    """
    plans = plan_blocks(model, kind, structure, approx, fallback)
    check_options(kind, key, samples, per)
    model.check_params(params)
    builder = BlockBuilder(model, params, batch, kind, approx, key, samples, per, buffers)
    builder.truncate = truncate
    blocks = tuple(builder.block(plan) for plan in plans)
    shapes = tuple(tuple(params[name].shape) for name in model.param_names)
    return Curvature(blocks, kind, structure, model.param_names, shapes)


def running_average(old: Any, new: Any, restart: torch.Tensor, decay: float) -> Any:
    """``decay · old + (1 - decay) · new`` leaf-wise, or ``new`` where ``restart`` (a 0-dim
    bool: the first estimate, or one that must not mix with the old)."""
    weight = torch.where(restart, 1.0, 1.0 - decay)
    return tree_map(lambda a, b: a + weight.to(b.dtype) * (b - a), old, new)


@pytree_dataclass
class EstimatorState:
    """``count``: estimates taken so far (0-dim int64); ``curvature``: the running average."""

    count: torch.Tensor
    curvature: Curvature


def _zero_block(plan: BlockPlan, like: torch.Tensor, rank: int, positions: dict[str, int],
                truncate: int | None = None) -> CurvatureBlock:
    """A zero block of ``plan``'s form (``rank`` rows and layer ``positions``, possibly
    ``truncate``-d, for low-rank blocks)."""
    def zeros(*shape: int) -> torch.Tensor:
        return torch.zeros(shape, dtype=like.dtype, device=like.device)

    if plan.form == "lowrank" and plan.layer is not None and plan.layout is not None and \
            (truncate is not None or low_rank_factored(plan.layout, positions[plan.layer.name])):
        layout = plan.layout
        count = truncated_terms(positions[plan.layer.name], layout, truncate)
        return FactoredLowRankBlock.from_factors(zeros(rank, count, layout.groups, layout.outputs),
                                                 zeros(rank, count, layout.groups, layout.inputs), layout)
    if plan.form == "lowrank":
        return LowRankBlock.from_vectors(zeros(rank, plan.size), plan.names, plan.shapes)
    if plan.form == "dense":
        return DenseBlock(zeros(plan.size, plan.size), plan.names, plan.shapes)
    if plan.form == "diag":
        return DiagonalBlock({name: zeros(*shape) for name, shape in zip(plan.names, plan.shapes)}, plan.names)
    layout = _owner(plan)[1]
    if plan.form == "unit":
        return UnitBlock(zeros(layout.units, layout.inputs, layout.inputs), layout)
    return KroneckerBlock(zeros(layout.groups, layout.inputs, layout.inputs),
                          zeros(layout.groups, layout.outputs, layout.outputs), zeros(), layout)


@dataclasses.dataclass(frozen=True)
class CurvatureEstimator:
    """A curvature kind and structure bound to a model, with a running average.

    ``init(params)`` gives zero curvature; ``update(state, params, batch, key)``
    folds a fresh estimate in: the first update takes it as is, later ones
    ``decay · old + (1 - decay) · new`` (per factor for Kronecker blocks, as
    K-FAC). Pure and vmappable; the options are those of :func:`estimate`.

    The ``lowrank`` structure keeps the last estimate's vectors (``decay`` must be
    0: averaging vectors of different batches is not an average of matrices),
    and its state's shapes depend on the batch: pass ``example_inputs``, one
    batch of inputs of the size used for estimates (only its shape and dtype
    are read).
    """

    model: Model
    kind: str
    structure: str
    approx: str = "expand"
    samples: int = 1
    per: str = "example"
    fallback: str = "error"
    decay: float = 0.95
    example_inputs: torch.Tensor | None = dataclasses.field(default=None, compare=False, repr=False)
    truncate: int | None = None

    def __post_init__(self) -> None:
        owner = "curvature estimator"
        plan_blocks(self.model, self.kind, self.structure, self.approx, self.fallback)
        check_number(owner, "decay", self.decay, low=0.0, high=1.0, high_inclusive=False)
        if self.structure == "lowrank":
            if self.decay != 0.0:
                raise ValueError(f"{owner}: structure 'lowrank' keeps the last estimate's vectors; pass decay=0.0 "
                                 f"(got {self.decay})")
            if self.per != "example":
                raise ValueError(f"{owner}: structure 'lowrank' needs per='example' (one vector per example)")
            if self.truncate is not None and (isinstance(self.truncate, bool) or not isinstance(self.truncate, int)
                                              or self.truncate < 1):
                raise ValueError(f"{owner}: truncate must be a positive int or None, got {self.truncate!r}")
            if not isinstance(self.example_inputs, torch.Tensor):
                raise ValueError(f"{owner}: structure 'lowrank' needs example_inputs, one batch of inputs of the "
                                 "size used for estimates (its shape fixes the number of vectors)")
        dummy_key = torch.zeros(2, dtype=torch.int64) if self.kind == "fisher_mc" else None
        check_options(self.kind, dummy_key, self.samples, self.per)

    @property
    def plans(self) -> tuple[BlockPlan, ...]:
        return plan_blocks(self.model, self.kind, self.structure, self.approx, self.fallback)

    def estimate(self, params: Params, batch: Any, key: torch.Tensor | None = None,
                 buffers: Params | None = None) -> Curvature:
        """One estimate on ``batch`` (see :func:`estimate`)."""
        return estimate(self.model, params, batch, kind=self.kind, structure=self.structure, approx=self.approx,
                        key=key, samples=self.samples, per=self.per, fallback=self.fallback, buffers=buffers,
                        truncate=self.truncate)

    def _low_rank_sizes(self, params: Params) -> tuple[int, dict[str, int]]:
        """Rows ``R`` and per-layer positions ``P`` of low-rank blocks, probed on ``meta`` tensors."""
        if self.structure != "lowrank" or self.example_inputs is None:
            return 0, {}
        inputs = self.example_inputs.to("meta")
        meta_params = {name: value.to("meta") for name, value in params.items()}
        zeros = perturbed_forward(self.model, meta_params, inputs)[1]
        positions = {layer.name: form_of(layer).output_grads(layer, zeros[layer.name].unsqueeze(0)).shape[2]
                     for layer in self.model.layers}
        return self.samples * inputs.shape[0], positions

    def init(self, params: Params) -> EstimatorState:
        like = next(iter(params.values()))
        rank, positions = self._low_rank_sizes(params)
        blocks = tuple(_zero_block(plan, like, rank, positions, self.truncate) for plan in self.plans)
        shapes = tuple(tuple(params[name].shape) for name in self.model.param_names)
        curvature = Curvature(blocks, self.kind, self.structure, self.model.param_names, shapes)
        return EstimatorState(torch.zeros((), dtype=torch.int64, device=like.device), curvature)

    def update(self, state: EstimatorState, params: Params, batch: Any, key: torch.Tensor | None = None,
               buffers: Params | None = None,
               reduce: Callable[[Curvature], Curvature] | None = None) -> EstimatorState:
        """Fold a fresh estimate on ``batch`` into the running average; ``reduce``, if given,
        maps the fresh estimate first (data-parallel training averages it over processes
        there, so that the running average is the same in every process)."""
        fresh = self.estimate(params, batch, key, buffers)
        if reduce is not None:
            fresh = reduce(fresh)
        curvature = running_average(state.curvature, fresh, state.count == 0, self.decay)
        return EstimatorState(state.count + 1, curvature)


def estimator(model: Model, *, kind: str, structure: str, approx: str = "expand", samples: int = 1,
              per: str = "example", fallback: str = "error", decay: float = 0.95,
              example_inputs: torch.Tensor | None = None) -> CurvatureEstimator:
    """A :class:`CurvatureEstimator` (arguments as :func:`estimate`; ``decay`` of the running
    average; ``example_inputs`` for the ``lowrank`` structure)."""
    return CurvatureEstimator(model, kind, structure, approx, samples, per, fallback, decay, example_inputs)
