"""Curvature matrices as matrix-free linear operators, and their flat-vector form.

The spectral tools of :mod:`fprecond.analysis` see a symmetric matrix ``C`` only
through its product ``v ↦ C v`` (an "mvp"). An mvp acts on **parameter pytrees**:
it takes a tree shaped like the parameters (a ``{name: tensor}`` dict) and
returns a tree of the same structure. A plain tensor is a one-leaf pytree, so a
function on flat vectors (``lambda v: A @ v``) is an mvp too.

Inside, the tools work on the flat vector of :func:`fprecond.tree.ravel`
(``named_parameters`` order, each leaf row-major), which is the order of every
dense curvature matrix in fprecond and in the tests' dense references.
"""

from __future__ import annotations

from typing import Any, Callable, Literal

import torch
from torch.func import vmap

from fprecond._validation import check_choice
from fprecond.func import empirical_fisher_vp, fisher_vp, ggn_vp, hvp
from fprecond.modeling import Model
from fprecond.tree import PyTree, ravel, tree_leaves

__all__ = ["CURVATURE_KINDS", "CurvatureKind", "Mvp", "curvature_mvp", "flatten_mvp", "unravel_rows"]

CurvatureKind = Literal["hessian", "ggn", "fisher", "empirical_fisher"]
CURVATURE_KINDS: tuple[str, ...] = ("hessian", "ggn", "fisher", "empirical_fisher")
Mvp = Callable[[PyTree], PyTree]
Params = dict[str, torch.Tensor]


def curvature_mvp(model: Model, params: Params, batch: Any, kind: CurvatureKind = "hessian", *,
                  per: str = "example") -> Mvp:
    """``v ↦ C v`` for a curvature ``C`` of the batch loss at ``params``, on parameter pytrees.

    The kinds and their scaling are those of :mod:`fprecond.func` (the loss as
    reduced, as in ``curvlinops-for-pytorch``):

    - ``"hessian"``: ``H = ∇²_θ L`` (:func:`~fprecond.func.hvp`, forward-over-reverse);
    - ``"ggn"``: ``G = Jᵀ (∂²L/∂f²) J`` (:func:`~fprecond.func.ggn_vp`, one JVP + one VJP);
    - ``"fisher"``: the exact (type-2) Fisher ``Jᵀ S Sᵀ J`` (equal to the GGN for
      the losses in :mod:`fprecond.losses`);
    - ``"empirical_fisher"``: ``R Σ_n ∇L_n ∇L_nᵀ``, per example or per loss term (``per``).

    The Monte-Carlo Fisher (``fisher_mc`` in :mod:`fprecond.curvature`) is left
    out: with a fresh key per product it is not one fixed matrix, and a Krylov
    method needs one.

    Each product re-runs the model (no linearisation is cached, since
    ``torch.func.linearize`` fails under ``vmap``), so the operator is a pure
    function and the tools may ``vmap`` it over probe vectors.

    Args:
        model: from :func:`fprecond.model`.
        params: the parameters ``{name: tensor}`` at which ``C`` is taken.
        batch: ``(inputs, targets)``.
        kind: one of :data:`CURVATURE_KINDS`.
        per: ``"example"`` or ``"term"``, for ``"empirical_fisher"`` only.

    Returns:
        ``mvp(vector) -> C vector`` with ``vector`` and the result shaped like ``params``.
    """
    owner = "curvature_mvp"
    check_choice(owner, "kind", kind, CURVATURE_KINDS)
    check_choice(owner, "per", per, ("example", "term"))
    model.check_params(params)

    def product(vector: Params) -> Params:
        if kind == "hessian":
            return hvp(model, params, batch, vector)
        if kind == "ggn":
            return ggn_vp(model, params, batch, vector)
        if kind == "fisher":
            return fisher_vp(model, params, batch, vector)
        return empirical_fisher_vp(model, params, batch, vector, per=per)  # type: ignore[arg-type]

    return product


def flatten_mvp(mvp: Mvp, like: PyTree) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor,
                                                  Callable[[torch.Tensor], PyTree]]:
    """The flat form of an operator on pytrees shaped like ``like``.

    Returns:
        ``(flat_mvp, flat_like, unravel)``: ``flat_mvp`` maps a ``(P,)`` vector to
        ``ravel(mvp(unravel(vector)))``; ``flat_like = ravel(like)``; ``unravel``
        rebuilds a tree from a ``(P,)`` vector.

    Raises:
        ValueError: ``like`` has no leaves or leaves of several dtypes.
    """
    leaves = tree_leaves(like)
    if not leaves:
        raise ValueError("the vector tree (like / v0) has no leaves")
    if any(not isinstance(leaf, torch.Tensor) for leaf in leaves):
        raise TypeError("the vector tree (like / v0) must hold tensors only")
    dtypes = {leaf.dtype for leaf in leaves}
    if len(dtypes) > 1:
        raise ValueError(f"the vector tree (like / v0) mixes dtypes {sorted(map(str, dtypes))}; use one dtype")
    flat_like, unravel = ravel(like)

    def flat_mvp(vector: torch.Tensor) -> torch.Tensor:
        return ravel(mvp(unravel(vector)))[0]

    return flat_mvp, flat_like, unravel


def unravel_rows(rows: torch.Tensor, unravel: Callable[[torch.Tensor], PyTree]) -> PyTree:
    """``(K, P)`` flat vectors -> one tree whose leaves carry a leading dimension ``K``."""
    return vmap(unravel)(rows)
