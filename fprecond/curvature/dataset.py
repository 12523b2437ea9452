"""The curvature of the summed loss over a whole data set, accumulated batch by batch.

:func:`fprecond.curvature.estimate` follows the loss *as reduced*: with a
``"mean"`` loss over a batch of ``N`` examples it returns the curvature of
``(1/R) Σ_n ℓ_n`` (``R = N`` for cross-entropy, ``N·C`` for MSE; see
:mod:`fprecond.losses`). Laplace approximations (MacKay 1992; Ritter et al.
2018; Daxberger et al. 2021) and elastic weight consolidation (Kirkpatrick et
al. 2017) need the curvature of the negative log-likelihood of the whole data
set instead, i.e. of the **summed** loss

    ``C = Σ_b Σ_{n ∈ b} ∇²-type(ℓ_n)``,

whatever the model's reduction: each batch is estimated with the model's loss
switched to ``reduction="sum"`` (so a mean loss is rescaled by its ``R``), and
the batch estimates are added. ``ℓ_n`` is the loss's own term: ``-log softmax(f_n)[y_n]``
for cross-entropy, ``Σ_c (f_nc - y_nc)²`` for MSE (no factor ½: its GGN is
``2 Jᵀ J``).

Exact structures (``full``, ``layer``, ``unit``, ``diag``) are sums of blocks, so
the result is the exact summed curvature in that structure. Kronecker blocks
are not closed under addition (``Σ_b G_b ⊗ A_b`` is not a Kronecker product);
as in K-FAC's running averages and in laplace-torch/ASDL, the factors are
accumulated separately: the input factor is averaged over every example of the
data set, the output factor (which carries the loss scaling) is summed,

    ``A = (1/N) Σ_b N_b A_b``,  ``G = Σ_b G_b``,  block ``≈ G ⊗ A = N · E[g gᵀ] ⊗ E[ã ãᵀ]``,

with ``A_b`` the batch's own average (over its examples, and positions for
``approx="expand"``) and ``N_b`` its number of examples (positions per example
are assumed equal across batches). For one batch this is exactly the batch's
K-FAC estimate of the summed loss, and for one example without weight sharing
the exact block.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, NamedTuple

import torch

from fprecond import random as fprandom
from fprecond.curvature.blocks import CurvatureBlock, KroneckerBlock
from fprecond.curvature.estimate import estimate
from fprecond.curvature.matrix import Curvature
from fprecond.modeling import Model, unpack_batch
from fprecond.tree import tree_add

__all__ = ["DatasetCurvature", "dataset_curvature", "dataset_statistics", "summed_loss_model", "accumulate_batches"]

Params = dict[str, torch.Tensor]


class DatasetCurvature(NamedTuple):
    """What one pass over a data set gives.

    Attributes:
        curvature: the curvature of the summed loss ``Σ_n ℓ_n`` (see the module docstring).
        loss: the summed loss ``Σ_n ℓ_n`` at ``params`` (0-dim).
        examples: the number of examples ``N`` (0-dim int64).
    """

    curvature: Curvature
    loss: torch.Tensor
    examples: torch.Tensor


def summed_loss_model(model: Model) -> Model:
    """``model`` with its loss switched to ``reduction="sum"`` (the same module and layers)."""
    if model.loss.reduction == "sum":
        return model
    return dataclasses.replace(model, loss=dataclasses.replace(model.loss, reduction="sum"),
                               shape_memo=model.shape_memo)


def _examples_in(batch: Any, index: int, owner: str) -> int:
    _, targets = unpack_batch(batch)
    if not isinstance(targets, torch.Tensor) or targets.dim() == 0 or targets.shape[0] == 0:
        raise ValueError(f"{owner}: batch {index} must have targets with a leading example dimension "
                         f"of size >= 1, got {type(targets).__name__} "
                         f"{tuple(targets.shape) if isinstance(targets, torch.Tensor) else ''}")
    return int(targets.shape[0])


def _accumulate(total: Curvature, fresh: Curvature, examples: int) -> Curvature:
    """Add ``fresh`` (a batch of ``examples``) into ``total``: input factors weighted by the
    batch size (averaged at the end), every other leaf summed."""
    blocks: list[CurvatureBlock] = []
    for old, new in zip(total.blocks, fresh.blocks):
        if isinstance(old, KroneckerBlock) and isinstance(new, KroneckerBlock):
            blocks.append(KroneckerBlock(old.input_factor + examples * new.input_factor,
                                         old.output_factor + new.output_factor, old.damping + new.damping,
                                         old.layout))
        else:
            blocks.append(tree_add(old, new))
    return Curvature(tuple(blocks), total.kind, total.structure, total.names, total.shapes)


def _weighted(curvature: Curvature, factor: float) -> Curvature:
    """Input factors of Kronecker blocks times ``factor``; other blocks unchanged."""
    blocks = tuple(
        KroneckerBlock(block.input_factor * factor, block.output_factor, block.damping, block.layout)
        if isinstance(block, KroneckerBlock) else block
        for block in curvature.blocks)
    return Curvature(blocks, curvature.kind, curvature.structure, curvature.names, curvature.shapes)


def dataset_statistics(model: Model, params: Params, batches: Iterable[Any], *, kind: str, structure: str,
                       approx: str = "expand", key: torch.Tensor | None = None, samples: int = 1,
                       per: str = "example", fallback: str = "error",
                       buffers: Params | None = None) -> DatasetCurvature:
    """One pass over ``batches``: the summed-loss curvature, the summed loss and the example count.

    Args:
        model: from :func:`fprecond.model` (any reduction; see the module docstring).
        params: parameter values ``{name: tensor}``.
        batches: an iterable of ``(inputs, targets)`` pairs (a list, a generator, a
            ``DataLoader``), read once; the leading dimension of ``targets`` counts examples.
        kind, structure, approx, samples, per, fallback, buffers: as
            :func:`fprecond.curvature.estimate`; ``structure="lowrank"`` is not
            accumulated (it keeps one batch's vectors) and raises.
        key: required by ``kind="fisher_mc"``; batch ``b`` uses ``fold_in(key, b)``.

    Returns:
        A :class:`DatasetCurvature` ``(curvature, loss, examples)``.
    """
    owner = "dataset curvature"
    if structure == "lowrank":
        raise ValueError(f"{owner}: structure 'lowrank' keeps one batch's vectors and cannot be accumulated over a "
                         "data set; use 'full', 'layer', 'kron', 'unit' or 'diag'")
    if isinstance(batches, tuple) and len(batches) == 2 and isinstance(batches[1], torch.Tensor):
        raise TypeError(f"{owner}: batches must be an iterable of (inputs, targets) pairs, got one pair; "
                        "wrap it in a list: [(inputs, targets)]")
    summed = summed_loss_model(model)

    def estimate_batch(batch: Any, batch_key: torch.Tensor | None) -> Curvature:
        return estimate(summed, params, batch, kind=kind, structure=structure, approx=approx, key=batch_key,
                        samples=samples, per=per, fallback=fallback, buffers=buffers)

    return accumulate_batches(summed, params, batches, estimate_batch, key=key, buffers=buffers, owner=owner)


def accumulate_batches(summed: Model, params: Params, batches: Iterable[Any],
                       estimate_batch: Callable[[Any, torch.Tensor | None], Curvature], *,
                       key: torch.Tensor | None, buffers: Params | None, owner: str) -> DatasetCurvature:
    """The accumulation loop of :func:`dataset_statistics` for any per-batch estimate.

    ``summed`` is the model with a summed loss (:func:`summed_loss_model`);
    ``estimate_batch(batch, key)`` returns the curvature of one batch's summed loss (the
    key is ``fold_in(key, b)`` for batch ``b``, or None). Kronecker input factors are
    averaged over all examples and every other leaf summed; ``owner`` names the
    caller in errors.
    """
    total: Curvature | None = None
    loss: torch.Tensor | None = None
    examples = 0
    for index, batch in enumerate(batches):
        count = _examples_in(batch, index, owner)
        batch_key = None if key is None else fprandom.fold_in(key, index)
        fresh = estimate_batch(batch, batch_key)
        batch_loss = summed.batch_loss(params, batch, buffers).detach()
        if total is None or loss is None:
            total, loss = _weighted(fresh, float(count)), batch_loss
        else:
            total, loss = _accumulate(total, fresh, count), loss + batch_loss
        examples += count
    if total is None or loss is None:
        raise ValueError(f"{owner}: batches is empty")
    return DatasetCurvature(_weighted(total, 1.0 / examples), loss,
                            torch.tensor(examples, dtype=torch.int64, device=loss.device))


def dataset_curvature(model: Model, params: Params, batches: Iterable[Any], *, kind: str, structure: str,
                      approx: str = "expand", key: torch.Tensor | None = None, samples: int = 1,
                      per: str = "example", fallback: str = "error", buffers: Params | None = None) -> Curvature:
    """The curvature of the summed loss ``Σ_n ℓ_n`` over every example of ``batches``.

    Exact in ``full``/``layer``/``unit``/``diag`` structure; in ``kron``, each layer's
    block is ``G ⊗ A`` with ``A`` averaged over all examples and ``G`` summed (Ritter
    et al. 2018; laplace-torch's convention). See the module docstring for the
    scaling and :func:`dataset_statistics` for the arguments.

    Example::

        batches = [(x[i:i + 64], y[i:i + 64]) for i in range(0, len(y), 64)]
        curvature = dataset_curvature(model, params, batches, kind="ggn", structure="kron")
        # for a mean loss: curvature ≈ len(y) · (mean GGN over the data set)
    """
    return dataset_statistics(model, params, batches, kind=kind, structure=structure, approx=approx, key=key,
                              samples=samples, per=per, fallback=fallback, buffers=buffers).curvature
