"""Parameter importance from curvature, and pruning by it.

Optimal Brain Damage (LeCun, Denker & Solla 1990) ranks weights by the loss
increase their removal causes, to second order around the current point. Setting
``θ_i`` to zero is the step ``δ = −θ_i e_i``, so with ``g = ∇L`` and curvature
``C ≈ ∇²L``

    ΔL_i ≈ gᵀδ + ½ δᵀ C δ = −g_i θ_i + ½ C_ii θ_i²          (the saliency s_i).

At a trained point ``g ≈ 0`` and OBD keeps only ``½ C_ii θ_i²``; pass ``grads`` to
add the first-order term. Only the diagonal of ``C`` enters, so any structure
works: ``diag`` gives it exactly; ``kron`` gives ``diag(G ⊗ A)``, the outer
product of the factors' diagonals, without forming the Kronecker product (the
K-FAC view of OBD; Wang et al. 2019, "EigenDamage", use the same factors).
:func:`block_saliency` removes a whole block (a layer) at once and so uses the
full block, ``½ θ_bᵀ C_b θ_b − g_bᵀ θ_b``: for a Kronecker block ``½ tr(G M A Mᵀ)``
with ``M`` the layer's ``(O, S)`` matrix (weight and bias).

Scaling follows the curvature: a curvature of the mean loss (what
:func:`fprecond.curvature.estimate` returns for ``reduction="mean"``) gives the
increase of the mean loss; a dataset curvature in the summed convention gives
the increase of the summed loss. The Hessian's diagonal may be negative; so may
the saliency then (removing such a weight lowers the loss to second order).

Pruning (:func:`prune_mask`) removes the entries of lowest saliency, over all
chosen tensors at once (``scope="global"``) or the same fraction of each tensor
(``scope="layer"``); :func:`magnitude_saliency` (``|θ|``) is the usual baseline
(Han et al. 2015). Everything works leaf-wise on any pytree of tensors (a
``Curvature`` needs the flat ``{name: tensor}`` parameter dict it was estimated
for), is pure and goes through ``torch.func.vmap`` over an ensemble.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping

import torch

from fprecond._validation import check_choice, check_number
from fprecond.curvature.blocks import (
    CurvatureBlock,
    DenseBlock,
    DiagonalBlock,
    KroneckerBlock,
    KroneckerEigenBlock,
    UnitBlock,
    flatten_vector,
    split_vector,
)
from fprecond.curvature.lowrank import LowRankBlock, FactoredLowRankBlock
from fprecond.curvature.matrix import Curvature
from fprecond.layers.layout import from_matrix
from fprecond.modeling import Model
from fprecond.tree import PyTree, tree_flatten_with_names, tree_map, tree_unflatten_ordered

__all__ = [
    "curvature_diagonal",
    "saliency",
    "magnitude_saliency",
    "layer_saliency",
    "block_saliency",
    "prune_mask",
    "apply_mask",
    "mask_sparsity",
]

Params = dict[str, torch.Tensor]


# --------------------------------------------------------------------------- diagonals


def _block_diagonal(block: CurvatureBlock) -> Params:
    """The diagonal of one block, ``{name: tensor shaped like the parameter}``, without
    forming the block where its structure allows."""
    if isinstance(block, DiagonalBlock):
        return {name: block.diagonal[name] for name in block.names}
    if isinstance(block, DenseBlock):
        return split_vector(torch.diagonal(block.matrix), block.names, block.param_shapes)
    if isinstance(block, UnitBlock):
        layout = block.layout
        per_unit = torch.diagonal(block.blocks, dim1=-2, dim2=-1)  # (G·O, S)
        return from_matrix(layout, per_unit.reshape(layout.groups, layout.outputs, layout.inputs))
    if isinstance(block, KroneckerBlock):
        # diag(G ⊗ A) over the row-major (O, S) matrix: entry (o, s) is G_oo · A_ss.
        output_diagonal = torch.diagonal(block.output_factor, dim1=-2, dim2=-1)  # (G, O)
        input_diagonal = torch.diagonal(block.input_factor, dim1=-2, dim2=-1)  # (G, S)
        matrix = output_diagonal[:, :, None] * input_diagonal[:, None, :] + block.damping
        return from_matrix(block.layout, matrix)
    if isinstance(block, KroneckerEigenBlock):
        # M ↦ Q_G [(Q_Gᵀ M Q_A) ⊙ Λ] Q_Aᵀ has diagonal (Q_G ⊙ Q_G) Λ (Q_A ⊙ Q_A)ᵀ.
        matrix = torch.einsum("goi,gij,gsj->gos", block.output_basis.square(), block.scaling,
                              block.input_basis.square())
        return from_matrix(block.layout, matrix)
    if isinstance(block, (LowRankBlock, FactoredLowRankBlock)):
        rows = block.rows()  # (R, P_b): diag(scale I + Vᵀ K V)_p = scale + Σ_rt V_rp K_rt V_tp
        flat = block.scale + torch.einsum("rp,rt,tp->p", rows, block.core, rows)
        return split_vector(flat, block.names, block.shapes)
    return split_vector(torch.diagonal(block.dense()), block.names, block.shapes)


def curvature_diagonal(curvature: Curvature) -> Params:
    """The diagonal of ``curvature`` as ``{name: tensor}`` shaped like the parameters,
    in ``named_parameters`` order, computed block by block from the stored form
    (for a Kronecker block ``diag(G)[o] · diag(A)[s]``, plus its damping)."""
    if not isinstance(curvature, Curvature):
        raise TypeError(f"curvature_diagonal: curvature must be a fprecond Curvature, got {type(curvature).__name__}")
    out: Params = {}
    for block in curvature.blocks:
        out.update(_block_diagonal(block))
    return {name: out[name] for name in curvature.names}


# --------------------------------------------------------------------------- saliency


def _check_tree(owner: str, name: str, tree: PyTree) -> list[str]:
    names, leaves, _ = tree_flatten_with_names(tree)
    if not leaves:
        raise ValueError(f"{owner}: {name} has no tensors")
    for leaf_name, leaf in zip(names, leaves):
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(f"{owner}: {name}[{leaf_name!r}] is a {type(leaf).__name__}, expected a tensor")
    return names


def _check_like(owner: str, name: str, tree: PyTree, params: PyTree) -> None:
    """Raise unless ``tree`` has the leaves (names and shapes) of ``params``."""
    names, leaves, _ = tree_flatten_with_names(tree)
    param_names, param_leaves, _ = tree_flatten_with_names(params)
    if sorted(names) != sorted(param_names):
        raise ValueError(f"{owner}: {name} must have the parameters' entries {param_names}, got {names}")
    shapes = dict(zip(names, (tuple(leaf.shape) for leaf in leaves)))
    for leaf_name, leaf in zip(param_names, param_leaves):
        if shapes[leaf_name] != tuple(leaf.shape):
            raise ValueError(f"{owner}: {name}[{leaf_name!r}] has shape {shapes[leaf_name]}, "
                             f"the parameter has shape {tuple(leaf.shape)}")


def saliency(curvature: Curvature | PyTree, params: PyTree, grads: PyTree | None = None) -> PyTree:
    """Optimal Brain Damage saliency of every entry: ``s_i = ½ C_ii θ_i² − g_i θ_i``.

    The second-order estimate of the loss change when ``θ_i`` alone is set to zero
    (LeCun et al. 1990; the ``−g_i θ_i`` term only with ``grads``, for points that
    are not minima).

    Args:
        curvature: a :class:`~fprecond.curvature.Curvature` of any structure (its
            diagonal is taken with :func:`curvature_diagonal`; ``kron`` blocks give
            ``diag(G ⊗ A)``), or a pytree of diagonals shaped like ``params``.
        params: the parameters ``θ`` (the flat dict the curvature was estimated for
            when ``curvature`` is a ``Curvature``; any pytree otherwise).
        grads: optional gradient ``g`` shaped like ``params``, in the same loss
            convention as the curvature.

    Returns:
        A pytree shaped like ``params`` (same dtype), in the loss units of the
        curvature (mean or summed loss).
    """
    owner = "saliency"
    _check_tree(owner, "params", params)
    if isinstance(curvature, Curvature):
        if not isinstance(params, Mapping) or set(params) != set(curvature.names):
            keys = sorted(params) if isinstance(params, Mapping) else type(params).__name__
            raise ValueError(f"{owner}: params must be a dict with the curvature's entries "
                             f"{list(curvature.names)}, got {keys}")
        diagonal_dict = curvature_diagonal(curvature)
        diagonal: PyTree = {name: diagonal_dict[name] for name in params}
    else:
        diagonal = curvature
    _check_like(owner, "the curvature diagonal", diagonal, params)
    second = tree_map(lambda h, p: 0.5 * h.to(p.dtype) * p.square(), diagonal, params)
    if grads is None:
        return second
    _check_like(owner, "grads", grads, params)
    return tree_map(lambda s, g, p: s - g.to(p.dtype) * p, second, grads, params)


def magnitude_saliency(params: PyTree) -> PyTree:
    """``|θ_i|``: magnitude pruning's ranking (Han et al. 2015), shaped like ``params``.

    It equals the OBD saliency's ranking when the curvature diagonal is constant.
    """
    _check_tree("magnitude_saliency", "params", params)
    return tree_map(torch.abs, params)


def layer_saliency(saliency: PyTree, model: Model | None = None) -> dict[str, torch.Tensor]:
    """Sum of a per-entry saliency per tensor, or per layer.

    Args:
        saliency: a pytree of per-entry saliencies (:func:`saliency`).
        model: when given, ``saliency`` must be the model's ``{name: tensor}`` dict and
            the sums are per supported layer (weight and bias together, keyed by the
            layer's module path) and per other parameter (keyed by its name).

    Returns:
        ``{name: 0-dim tensor}``: the sum of independent removals. It is not the loss
        change of removing the layer as a whole, which also has the cross terms
        between its weights: see :func:`block_saliency`.
    """
    names, leaves, _ = tree_flatten_with_names(saliency)
    _check_tree("layer_saliency", "saliency", saliency)
    totals = {name: leaf.sum() for name, leaf in zip(names, leaves)}
    if model is None:
        return totals
    if not isinstance(model, Model):
        raise TypeError(f"layer_saliency: model must be a fprecond Model, got {type(model).__name__}")
    if set(totals) != set(model.param_names):
        raise ValueError(f"layer_saliency: saliency must have the model's parameters {list(model.param_names)}, "
                         f"got {names}")
    out: dict[str, torch.Tensor] = {}
    for layer in model.layers:
        out[layer.name] = torch.stack([totals[name] for name in layer.param_names]).sum()
    for name in model.unsupported:
        out[name] = totals[name]
    return out


def _block_key(names: tuple[str, ...]) -> str:
    """A block's key: the module path its parameters share, else the names joined by ``+``."""
    prefixes = {name.rpartition(".")[0] for name in names}
    if len(prefixes) == 1 and len(names) > 1:
        return prefixes.pop()
    return names[0] if len(names) == 1 else "+".join(names)


def block_saliency(curvature: Curvature, params: Params, grads: Params | None = None) -> dict[str, torch.Tensor]:
    """The second-order loss change of removing each curvature block as a whole:
    ``½ θ_bᵀ C_b θ_b − g_bᵀ θ_b``.

    With ``structure="layer"`` or ``"kron"`` a block is a layer (weight and bias), so
    this is the saliency of removing the layer, with the cross terms between its
    weights that :func:`layer_saliency` leaves out; a Kronecker block gives
    ``½ Σ_g tr(G_g M_g A_g M_gᵀ)`` through its product, never the ``(P_b, P_b)``
    matrix. With ``"diag"`` (one diagonal block per layer) it equals :func:`layer_saliency`
    per layer.

    Returns:
        ``{key: 0-dim tensor}`` in block order; the key is the module path when the
        block's parameters belong to one module (``"0"`` for ``"0.weight"`` and
        ``"0.bias"``), the parameter's name for a one-tensor block, and the names
        joined by ``"+"`` otherwise (the ``full`` structure).
    """
    owner = "block_saliency"
    if not isinstance(curvature, Curvature):
        raise TypeError(f"{owner}: curvature must be a fprecond Curvature, got {type(curvature).__name__}")
    curvature.check_vector(params)
    if grads is not None:
        curvature.check_vector(grads)
    out: dict[str, torch.Tensor] = {}
    for block in curvature.blocks:
        theta = flatten_vector(params, block.names)
        product = flatten_vector(block.mvp({name: params[name] for name in block.names}), block.names)
        value = 0.5 * torch.dot(theta, product.to(theta.dtype))
        if grads is not None:
            value = value - torch.dot(flatten_vector(grads, block.names).to(theta.dtype), theta)
        out[_block_key(block.names)] = value
    return out


# --------------------------------------------------------------------------- masks


def _pruned_count(fraction: float, size: int) -> int:
    """Entries to remove: ``fraction · size`` rounded to the nearest int, as
    ``torch.nn.utils.prune`` does for a fractional amount."""
    return min(size, int(round(fraction * size)))


def _keep_mask(values: torch.Tensor, pruned: int) -> torch.Tensor:
    """Boolean mask, False on the ``pruned`` smallest entries of the flat ``values``.

    Ranks come from a stable sort (ties go to the earlier entry; NaN sorts last, so it
    is kept); the count is static, so the mask is pure and vmappable.
    """
    ranks = torch.argsort(torch.argsort(values, stable=True), stable=True)
    return ranks >= pruned


def prune_mask(saliency: PyTree, fraction: float, *, scope: str = "global",
               names: Iterable[str] | None = None, previous: PyTree | None = None) -> PyTree:
    """Masks that remove the least important entries: ``True`` keeps an entry.

    Args:
        saliency: a pytree of per-entry importances (:func:`saliency`,
            :func:`magnitude_saliency`, or anything ranked higher-is-more-important).
        fraction: the fraction of the chosen entries to remove, in ``[0, 1]``; the
            count is ``round(fraction · n)``, and exactly that many are removed.
        scope: ``"global"`` ranks all chosen entries together (a layer of
            unimportant weights may lose most of them); ``"layer"`` removes the same
            fraction of every chosen tensor.
        names: the leaves to prune (their names as in
            :func:`fprecond.tree.tree_flatten_with_names`, the keys for a flat dict),
            e.g. only the weights; default all. Other leaves get all-True masks.
        previous: an earlier mask shaped like ``saliency``: its removed entries stay
            removed and, in the chosen leaves, count towards ``fraction``. For
            iterative pruning: remove a few, re-estimate the curvature at the pruned
            point, remove more (LeCun et al. 1990 retrain in between).

    Returns:
        A pytree of boolean tensors shaped like ``saliency``. Pure and vmappable
        (under ``vmap`` each member is ranked on its own).
    """
    owner = "prune_mask"
    check_number(owner, "fraction", fraction, low=0.0, high=1.0)
    check_choice(owner, "scope", scope, ("global", "layer"))
    if isinstance(names, str):
        raise TypeError(f"{owner}: names must be an iterable of leaf names, not a single string {names!r}")
    leaf_names = _check_tree(owner, "saliency", saliency)
    _, leaves, spec = tree_flatten_with_names(saliency)
    chosen = list(leaf_names) if names is None else list(names)
    unknown = [name for name in chosen if name not in leaf_names]
    if unknown:
        raise ValueError(f"{owner}: names {unknown} are not leaves of the saliency tree; leaves: {leaf_names}")
    wanted = set(chosen)
    if previous is not None:
        # Entries removed before rank below everything else, so they are removed again first.
        _check_like(owner, "previous", previous, saliency)
        previous_names, previous_leaves, _ = tree_flatten_with_names(previous)
        by_name = dict(zip(previous_names, previous_leaves))
        kept_before = [by_name[name].to(torch.bool) for name in leaf_names]
        leaves = [torch.where(kept, leaf, torch.full((), -torch.inf, dtype=leaf.dtype, device=leaf.device))
                  for leaf, kept in zip(leaves, kept_before)]
    masks = [torch.ones_like(leaf, dtype=torch.bool) for leaf in leaves]
    selected = [index for index, name in enumerate(leaf_names) if name in wanted]
    if scope == "layer":
        for index in selected:
            flat = leaves[index].reshape(-1)
            masks[index] = _keep_mask(flat, _pruned_count(fraction, flat.numel())).reshape(leaves[index].shape)
    elif selected:
        flat = torch.cat([leaves[index].reshape(-1) for index in selected])
        keep = _keep_mask(flat, _pruned_count(fraction, flat.numel()))
        start = 0
        for index in selected:
            count = math.prod(leaves[index].shape)
            masks[index] = keep[start:start + count].reshape(leaves[index].shape)
            start += count
    if previous is not None:
        masks = [mask & kept for mask, kept in zip(masks, kept_before)]
    return tree_unflatten_ordered(spec, masks)


def apply_mask(params: PyTree, masks: PyTree) -> PyTree:
    """``θ ⊙ mask`` leaf-wise (out of place, in each parameter's dtype): removed entries are 0.

    ``masks`` holds booleans (``True`` keeps) or 0/1 numbers shaped like ``params``. Use it
    on updates as well to keep removed weights at zero while fine-tuning.
    """
    _check_like("apply_mask", "masks", masks, params)
    return tree_map(lambda p, m: torch.where(m.to(torch.bool), p, torch.zeros((), dtype=p.dtype, device=p.device)),
                    params, masks)


def mask_sparsity(masks: PyTree) -> torch.Tensor:
    """The fraction of entries removed (``False``) over all leaves of ``masks`` (0-dim float)."""
    _, leaves, _ = tree_flatten_with_names(masks)
    if not leaves:
        raise ValueError("mask_sparsity: masks has no tensors")
    removed = torch.stack([(~leaf.to(torch.bool)).sum() for leaf in leaves]).sum()
    total = sum(leaf.numel() for leaf in leaves)
    return removed.to(torch.float64) / total
