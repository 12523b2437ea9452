"""Shampoo: Kronecker-factored full-matrix AdaGrad per parameter tensor (blocked, grafted).

Gupta, Koren & Singer (2018), "Shampoo: Preconditioned stochastic tensor
optimization"; Anil, Gupta, Koren, Regan & Singer (2020), "Scalable second order
optimization for deep learning" (distributed Shampoo: blocking, grafting, delayed
roots); Shi et al. (2023), "A distributed data-parallel PyTorch implementation of
the distributed Shampoo optimizer" (Meta's ``distributed_shampoo``, whose
defaults and order of operations are followed here unless stated).

For a block ``G`` of order ``k`` (its modes, see :mod:`fprecond.optimizers._blocking`)
with mode-``i`` unfolding ``G_(i)``::

    L_i ← β2 L_i + (1-β2) G_(i) G_(i)ᵀ        (β2 = 1: L_i ← L_i + G_(i) G_(i)ᵀ)
    P_i = (L_i / (1-β2^n) + ε I)^(-1/(2k))      (refreshed every ``precondition_frequency`` steps)
    D   = Ĝ ×_1 P_1 ×_2 P_2 ... ×_k P_k           (for a matrix: P_L Ĝ P_R)

where ``Ĝ`` is the filtered gradient (an EMA with ``β1``) and ``n`` the number of
statistics updates so far.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from fprecond._validation import check_choice, check_number, check_positive_int
from fprecond.base import GradientTransformation, Params, ScalarOrSchedule, Updates, named_chain
from fprecond.lazy import lazy_where
from fprecond.optimizers._blocking import (BlockPlan, accumulate_statistics, finite_matrices, mode_product,
                                          plan_blocks)
from fprecond.optimizers._recipe import guarded
from fprecond.optimizers._shampoo_sharing import Blocks, owned_names, owners_exchange
from fprecond.precondition import DataParallelism, is_due
from fprecond.solvers.linalg import eigh_power, inverse_root_newton
from fprecond.transforms import add_decayed_weights, scale_by_learning_rate, trace
from fprecond.transforms.adam import bias_correction
from fprecond.transforms.grafting import GRAFT_TYPES, counter, filtered_gradient, graft, scale_by_grafting
from fprecond.transforms.partition import partition
from fprecond.tree import (PyTree, tree_flatten_ordered, tree_flatten_with_names, tree_map, tree_unflatten_ordered,
                           tree_zeros_like)

__all__ = ["scale_by_shampoo", "ScaleByShampooState", "shampoo"]

class ScaleByShampooState(NamedTuple):
    """State of :func:`scale_by_shampoo` (tensor leaves only).

    Attributes:
        count: steps taken (0-dim int64).
        statistics_count: statistics updates taken (for the bias correction).
        mu: the filtered gradient, shaped like the parameters (``{}`` when ``b1 = 0``).
        statistics: leaf name -> per block group -> per mode, the ``(B, d, d)`` factors ``L_i``.
        roots: the cached inverse roots ``P_i``, shaped as ``statistics``.
        rejected: per block and mode, statistics updates and roots rejected so far because they
            were not finite (the previous factor or root is kept).
    """

    count: torch.Tensor  # type: ignore[assignment]  # optax's name, shadows tuple.count
    statistics_count: torch.Tensor
    mu: PyTree
    statistics: dict[str, Blocks]
    roots: dict[str, Blocks]
    rejected: torch.Tensor


def _largest_eigenvalue(matrix: torch.Tensor, iterations: int = 16) -> torch.Tensor:
    """A power-iteration estimate of ``λ_max`` of PSD ``(B, d, d)`` matrices, ``(B,)``.

    Starts from the column with the largest diagonal entry, whose Rayleigh quotient
    is already ``>= max_j L_jj >= λ_max / d``; a zero matrix gives 0.
    """
    tiny = torch.finfo(matrix.dtype).tiny
    column = torch.diagonal(matrix, dim1=-2, dim2=-1).argmax(-1)
    vector = torch.take_along_dim(matrix, column[..., None, None].expand(*matrix.shape[:-1], 1), dim=-1)
    for _ in range(iterations):
        vector = vector / torch.linalg.vector_norm(vector, dim=-2, keepdim=True).clamp_min(tiny)
        vector = matrix @ vector
    vector = vector / torch.linalg.vector_norm(vector, dim=-2, keepdim=True).clamp_min(tiny)
    return (vector.mT @ matrix @ vector)[..., 0, 0].clamp_min(0.0)


def scale_by_shampoo(b1: float = 0.9, b2: float = 0.999, epsilon: float = 1e-12, *,
                     max_preconditioner_dim: int = 1024, merge_dims: bool = True,
                     precondition_frequency: int = 100, start_preconditioning_step: int | None = None,
                     statistics_every: int = 1, method: str = "eigh", exponent_multiplier: float = 1.0,
                     root_override: int | None = None, matrix_eps: float = 0.0, use_bias_correction: bool = True,
                     nesterov: bool = False, newton_iterations: int = 50,
                     distributed: DataParallelism | None = None) -> GradientTransformation:
    """Precondition each block of each tensor by the inverse roots of its Shampoo factors.

    Step ``t`` (1-based, as Meta's ``step``):

    1. Filtered gradient ``Ĝ`` (:func:`fprecond.transforms.grafting.filtered_gradient`,
       ``b1``, bias-corrected, ``nesterov`` look-ahead).
    2. When ``t % statistics_every == 0``: ``L_i ← b2 L_i + (1-b2) G_(i) G_(i)ᵀ`` from the
       *raw* gradient ``G`` of each block (``b2 = 1``: plain sum, AdaGrad style). An update
       that is not finite (a NaN gradient, or ``G G^T`` overflowing) is not stored: the
       old factor and its root are kept, counted in ``state.rejected``.
    3. When ``t == start`` or (``t % precondition_frequency == 0`` and ``t > start``), the
       roots are refreshed: ``P_i = (L̂_i + λ_i I)^(-exponent)`` with
       ``L̂_i = L_i / (1 - b2^n)`` (``n`` statistics updates; no correction when
       ``b2 = 1`` or ``use_bias_correction=False``), damping
       ``λ_i = epsilon + matrix_eps · λ_max(L̂_i)``: ``epsilon`` is Meta's absolute
       ``ε I`` (default 1e-12), ``matrix_eps`` the relative ridge of Anil et al.
       (``λ_max`` by power iteration; default 0, off). ``exponent = exponent_multiplier
       / (2k)`` for a block of order ``k``, or ``1 / root_override``. A block whose
       statistics or new root are not finite keeps its previous root (counted in
       ``state.rejected``). Off these steps no root work is done.
    4. From step ``start`` on the output is ``Ĝ ×_1 P_1 ... ×_k P_k`` per block;
       before, it is ``Ĝ`` (a grafted recipe shows the grafting method there).

    Blocks (:func:`fprecond.optimizers._blocking.plan_blocks`): dimensions are merged
    (``merge_dims``, Meta's ``merge_small_dims``) and split into blocks of at most
    ``max_preconditioner_dim``; equal-shaped blocks are batched. Size-1 dimensions
    get no factor, and a leaf with no factor at all (a scalar) is returned as ``Ĝ``.

    Args:
        b1: EMA of the gradient (Meta's ``betas[0]``).
        b2: EMA of the statistics, in ``(0, 1]`` (Meta's ``betas[1]``; 1 = AdaGrad sum).
        epsilon: absolute damping added to the statistics before the root (Meta: 1e-12).
        max_preconditioner_dim: largest factor (Meta: 1024).
        merge_dims: merge small dimensions (Meta: True).
        precondition_frequency: refresh the roots every this many steps.
        start_preconditioning_step: first (1-based) step preconditioned; ``None`` uses
            ``precondition_frequency`` (Meta's ``-1``).
        statistics_every: update the statistics every this many steps (1 in Meta).
        method: ``"eigh"`` (:func:`fprecond.solvers.linalg.eigh_power`, Meta's default)
            or ``"newton"`` (:func:`fprecond.solvers.linalg.inverse_root_newton`,
            ``newton_iterations`` fixed iterations; needs an integer root).
        exponent_multiplier: Meta's ``η`` in ``-η/(2k)``.
        root_override: an int ``p`` for ``-1/p`` on every block (Meta's int
            ``inv_root_override``; per-order lists are not offered).
        matrix_eps: relative ridge (Anil et al.), see step 3.
        use_bias_correction: bias-correct ``Ĝ`` and ``L̂`` (Meta: True).
        nesterov: look-ahead filtered gradient (Meta's ``beta3 = b1²``).
        newton_iterations: iterations of the Newton method.
        distributed: data-parallel hooks (:class:`fprecond.distributed.DataParallel`). The
            gradient must already be averaged over the processes (put
            :func:`fprecond.distributed.all_reduce_gradients` first in the chain). Each
            preconditioned tensor has an owner (LPT on the cost ``Σ B d³`` of its roots).
            ``mode="inverse"``: every process keeps all statistics (from the averaged
            gradient, no traffic); the roots are refreshed on their tensors' owners and
            broadcast. ``mode="gradient"``: a process keeps the statistics and roots of its
            own tensors only (about ``1/W`` of that memory; other tensors' entries are
            ``()``), and every step each owner broadcasts its tensors' output ``Ĝ ×_i P_i``
            (before ``start``: ``Ĝ``) together with its count of rejected updates, so that
            ``state.rejected`` is the same total everywhere.

    Shapes: the statistics of a group of ``B`` blocks of shape ``(n_1, ..., n_k)`` are
    ``(B, n_i, n_i)`` per mode; ``state.statistics[name][group][mode]``.
    """
    owner = "scale_by_shampoo"
    check_number(owner, "b1", b1, low=0.0, high=1.0, high_inclusive=False)
    check_number(owner, "b2", b2, low=0.0, high=1.0, low_inclusive=False)
    check_number(owner, "epsilon", epsilon, low=0.0)
    check_number(owner, "matrix_eps", matrix_eps, low=0.0)
    check_number(owner, "exponent_multiplier", exponent_multiplier, low=0.0, low_inclusive=False)
    check_choice(owner, "method", method, ("eigh", "newton"))
    for name, value in (("max_preconditioner_dim", max_preconditioner_dim),
                        ("precondition_frequency", precondition_frequency),
                        ("statistics_every", statistics_every), ("newton_iterations", newton_iterations)):
        check_positive_int(owner, name, value)
    check_positive_int(owner, "start_preconditioning_step", start_preconditioning_step, allow_none=True)
    start = precondition_frequency if start_preconditioning_step is None else start_preconditioning_step
    check_positive_int(owner, "root_override", root_override, allow_none=True)
    if method == "newton" and exponent_multiplier != 1.0 and root_override is None:
        raise ValueError(f"{owner}: method='newton' needs an integer root: exponent_multiplier must be 1.0 "
                         f"(got {exponent_multiplier}) or root_override set")
    if nesterov and b1 == 0.0:
        raise ValueError(f"{owner}: nesterov=True needs b1 > 0")
    if epsilon == 0.0 and matrix_eps == 0.0 and method == "newton":
        raise ValueError(f"{owner}: method='newton' needs epsilon > 0 or matrix_eps > 0 (singular statistics)")
    corrected = use_bias_correction and b2 < 1.0
    gradient_mode = distributed is not None and getattr(distributed, "mode", None) == "gradient"
    if gradient_mode and not all(callable(getattr(distributed, hook, None)) for hook in ("owned", "share")):
        raise TypeError(f"{owner}: distributed mode 'gradient' needs owned() and share() hooks "
                        f"(fprecond.distributed.DataParallel), got {type(distributed).__name__}")

    def plan_of(leaf: torch.Tensor) -> BlockPlan:
        return plan_blocks(leaf.shape, max_preconditioner_dim, merge_dims=merge_dims)

    def inverse_root(statistic: torch.Tensor, order: int, correction: torch.Tensor | None) -> torch.Tensor:
        """The damped inverse root of ``(B, d, d)`` statistics (identity where not finite)."""
        eye = torch.eye(statistic.shape[-1], dtype=statistic.dtype, device=statistic.device)
        finite = torch.isfinite(statistic).all(-1).all(-1)
        # Non-finite statistics would make LAPACK fail for the whole batch: factor a
        # harmless identity there; the result is rejected below anyway.
        matrix = torch.where(finite[:, None, None], statistic, eye)
        if correction is not None:
            matrix = matrix / correction
        damping: float | torch.Tensor = epsilon
        if matrix_eps:
            damping = epsilon + matrix_eps * _largest_eigenvalue(matrix)
        if method == "eigh":
            exponent = -1.0 / root_override if root_override else -exponent_multiplier / (2 * order)
            return eigh_power(matrix, exponent, damping)
        return inverse_root_newton(matrix, root_override or 2 * order, damping, iterations=newton_iterations)

    def init(params: Params) -> ScaleByShampooState:
        names, leaves, _ = tree_flatten_with_names(params)
        statistics: dict[str, Blocks] = {}
        roots: dict[str, Blocks] = {}
        for name, leaf in zip(names, leaves):
            plan = plan_of(leaf)
            statistics[name] = tuple(
                tuple(leaf.new_zeros(group.num_blocks, group.block_shape[m], group.block_shape[m])
                      for m in group.modes) for group in plan.groups)
            roots[name] = tuple(
                tuple(torch.eye(group.block_shape[m], dtype=leaf.dtype, device=leaf.device)
                      .expand(group.num_blocks, -1, -1).clone() for m in group.modes) for group in plan.groups)
        if gradient_mode and leaves:
            # Others' tensors hold no statistics and no roots here: ``()``, which the loops
            # below pass over (zip with an empty tuple), so only the owner updates them.
            assert distributed is not None
            mine = set(owned_names(distributed, names, [plan_of(leaf) for leaf in leaves], leaves[0]))
            for name, leaf in zip(names, leaves):
                if plan_of(leaf).preconditioned and name not in mine:
                    statistics[name], roots[name] = (), ()
        zero = counter(params)
        return ScaleByShampooState(count=zero, statistics_count=zero.clone(),
                                   mu=tree_zeros_like(params) if b1 else {}, statistics=statistics, roots=roots,
                                   rejected=zero.clone())

    def update(updates: Updates, state: ScaleByShampooState, params: Params | None = None, **extra: Any):
        del params, extra
        step = state.count + 1
        if b1:
            pairs = tree_map(lambda m, g: filtered_gradient(m, g, b1, step, nesterov=nesterov,
                                                            bias_correction_on=use_bias_correction),
                             state.mu, updates)
            mu = tree_map(lambda _, pair: pair[0], updates, pairs)
            filtered = tree_map(lambda _, pair: pair[1], updates, pairs)
        else:
            mu, filtered = state.mu, updates
        names, gradients, _ = tree_flatten_with_names(updates)
        directions, treedef = tree_flatten_ordered(filtered)
        plans = [plan_of(g) for g in gradients]

        def new_statistics() -> tuple[dict[str, Blocks], dict[str, tuple[tuple[torch.Tensor, ...], ...]],
                                      torch.Tensor]:
            # A statistics update that is not finite is not stored (see accumulate_statistics):
            # the old factor is kept, its root too, and it is counted.
            def combine(previous: torch.Tensor, outer: torch.Tensor) -> torch.Tensor:
                return previous + outer if b2 == 1.0 else b2 * previous + (1.0 - b2) * outer

            fresh, flags, rejected = accumulate_statistics(plans, gradients, [state.statistics[name] for name in names],
                                                           combine)
            return dict(zip(names, fresh)), dict(zip(names, flags)), rejected.to(step.dtype)

        statistics_due = is_due(step, statistics_every)
        all_accepted = {name: tuple(tuple(torch.ones(s.shape[0], 1, 1, dtype=torch.bool, device=s.device)
                                          for s in group) for group in state.statistics[name]) for name in names}
        statistics, accepted, statistics_rejected = lazy_where(
            statistics_due, new_statistics, (state.statistics, all_accepted, torch.zeros_like(step)))
        statistics_count = state.statistics_count + statistics_due.to(step.dtype)

        def new_roots(only: str | None = None) -> tuple[dict[str, Blocks], torch.Tensor]:
            fresh: dict[str, Blocks] = {}
            rejected = torch.zeros_like(step)
            for name, gradient, plan in zip(names, gradients, plans):
                if only is not None and name != only:
                    continue
                # Clamped: a root due before any statistics update sees zeros, not 0/0.
                correction = (bias_correction(b2, statistics_count.clamp_min(1), gradient) if corrected
                              else None)
                per_group = []
                for group, stats, flags, old_roots in zip(plan.groups, statistics[name], accepted[name],
                                                          state.roots[name]):
                    kept = []
                    for statistic, ok, old in zip(stats, flags, old_roots):
                        root = inverse_root(statistic, group.order, correction)
                        good = finite_matrices(statistic) & finite_matrices(root)
                        kept.append(torch.where(good & ok, root, old))
                        # A rejected statistics update was counted once, in new_statistics.
                        rejected = rejected + (ok & ~good).sum().to(rejected.dtype)
                    per_group.append(tuple(kept))
                fresh[name] = tuple(per_group)
            return fresh, rejected

        root_due = ((step % precondition_frequency == 0) & (step > start)) | (step == start)

        def shared_roots() -> tuple[dict[str, Blocks], torch.Tensor]:
            # Tensor by tensor, each on its owner, broadcast to the others.
            assert distributed is not None

            def one(index: int) -> tuple[Blocks, torch.Tensor]:
                fresh, rejected = new_roots(only=names[index])
                return fresh[names[index]], rejected

            results = distributed.share(one, [(state.roots[name], torch.zeros_like(step)) for name in names])
            return ({name: roots for name, (roots, _) in zip(names, results)},
                    sum((rejected for _, rejected in results), torch.zeros_like(step)))

        def apply_roots(index: int, tensor_roots: Blocks) -> torch.Tensor:
            plan = plans[index]
            if not plan.preconditioned:
                return directions[index]
            blocks = []
            for group, block, group_roots in zip(plan.groups, plan.split(directions[index]), tensor_roots):
                for mode, root in zip(group.modes, group_roots):
                    block = mode_product(block, root, mode)
                blocks.append(block)
            return plan.merge(blocks)

        if gradient_mode:
            # statistics_rejected is not added: each owner counts its own tensors' rejections.
            assert distributed is not None
            roots, outputs, rejected = owners_exchange(distributed, step, start, names, plans, directions, accepted,
                                                       new_roots, apply_roots, state.roots, root_due)
            new_state = ScaleByShampooState(count=step, statistics_count=statistics_count, mu=mu,
                                            statistics=statistics, roots=roots, rejected=state.rejected + rejected)
            return tree_unflatten_ordered(treedef, outputs), new_state

        roots, rejected = lazy_where(root_due, new_roots if distributed is None else shared_roots,
                                     (state.roots, torch.zeros_like(step)))

        def preconditioned() -> list[torch.Tensor]:
            return [apply_roots(index, roots[name]) for index, name in enumerate(names)]

        outputs = lazy_where(step >= start, preconditioned, directions)
        new_state = ScaleByShampooState(count=step, statistics_count=statistics_count, mu=mu, statistics=statistics,
                                        roots=roots, rejected=state.rejected + statistics_rejected + rejected)
        return tree_unflatten_ordered(treedef, outputs), new_state

    return GradientTransformation(init, update)


def shampoo(learning_rate: ScalarOrSchedule = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
            epsilon: float = 1e-12, *, momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0,
            decoupled_weight_decay: bool = True, max_preconditioner_dim: int = 1024, merge_dims: bool = True,
            precondition_frequency: int = 100, start_preconditioning_step: int | None = None,
            statistics_every: int = 1, grafting: str = "adam", grafting_epsilon: float | None = None,
            grafting_beta2: float | None = None, method: str = "eigh", exponent_multiplier: float = 1.0,
            root_override: int | None = None, matrix_eps: float = 0.0,
            use_bias_correction: bool = True,
            distributed: DataParallelism | None = None) -> GradientTransformation:
    """Distributed Shampoo with layer-wise grafting, as Meta's ``DistributedShampoo`` (Shi et al., 2023).

    The update of step ``t``, in Meta's order::

        g ← g + wd·θ                               (only if decoupled_weight_decay=False: L2)
        d = graft(magnitude=grafting method, direction=Shampoo)(g)     per tensor
        d ← d + wd·θ                               (decoupled, AdamW style: the default)
        m ← μ m + d;  d ← m   (or d + μ m with nesterov)          (only if momentum > 0)
        θ ← θ − lr · d

    Shampoo and the grafting method both use the filtered gradient ``Ĝ`` (EMA of
    ``g`` with ``betas[0]``, bias-corrected; ``nesterov`` also makes it the NAdam
    look-ahead, Meta's ``beta3 = β1²``) and keep their statistics of the raw ``g``
    (see :func:`scale_by_shampoo`, :func:`fprecond.transforms.grafting.scale_by_grafting`).
    Grafting is per parameter tensor (Agarwal et al., 2020), where Meta grafts per block:
    the norm of the grafting method's step is given to the whole tensor's Shampoo step.
    Before ``start_preconditioning_step`` (default: ``precondition_frequency``) the
    grafting method alone is applied. With ``grafting="none"`` the Shampoo step is
    used as is (and ``Ĝ`` before the start, where Meta would apply zero).

    Parameters Shampoo cannot precondition (scalars, tensors whose dimensions are
    all 1) are routed with :func:`fprecond.transforms.partition.partition` to the
    grafting method alone (to ``Ĝ`` for ``"sgd"``/``"none"``).

    A step whose gradient or update is not finite is skipped (``apply_if_finite``).

    Defaults: Meta's ``DistributedShampoo`` (``epsilon=1e-12``,
    ``max_preconditioner_dim=1024``, ``merge_dims``, bias correction, decoupled weight
    decay, ``start_preconditioning_step = precondition_frequency``) with the AdamW
    example of its README (``lr=1e-3``, ``betas=(0.9, 0.999)``,
    ``precondition_frequency=100``, Adam grafting with ``grafting_beta2 = betas[1]``
    and ``grafting_epsilon=1e-8``); Meta's constructor has ``lr=1e-2``,
    ``betas=(0.9, 1.0)``, ``precondition_frequency=1`` and no grafting. A
    ``grafting_epsilon`` of None takes Meta's per-type default (AdaGrad 1e-10,
    RMSProp/Adam 1e-8).

    Data-parallel training: ``distributed=fprecond.distributed.DataParallel(comm)`` shares the
    root refreshes among processes (see :func:`scale_by_shampoo`); put
    :func:`fprecond.distributed.all_reduce_gradients` first in the chain.

    State for notebooks: ``state.inner_state["shampoo"]["shampoo"]`` is the
    :class:`~fprecond.transforms.grafting.GraftState` (its ``direction_state`` the
    :class:`ScaleByShampooState`; without grafting, the latter directly) and
    ``state.inner_state["shampoo"]["grafting_only"]`` the fallback's state.

    Example::

        opt = shampoo(1e-3, precondition_frequency=10)
        state = opt.init(params)
        updates, state = opt.update(grads, state, params)
    """
    owner = "shampoo"
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"{owner}: betas must be a pair (b1, b2), got {betas!r}")
    b1, b2 = betas
    check_number(owner, "betas[0]", b1, low=0.0, high=1.0, high_inclusive=False)
    check_number(owner, "betas[1]", b2, low=0.0, high=1.0, low_inclusive=False)
    check_number(owner, "learning_rate", learning_rate, low=0.0, low_inclusive=False, allow_schedule=True)
    check_number(owner, "momentum", momentum, low=0.0, high=1.0, high_inclusive=False)
    check_number(owner, "weight_decay", weight_decay, low=0.0)
    check_choice(owner, "grafting", grafting, GRAFT_TYPES)
    if grafting_epsilon is not None:
        check_number(owner, "grafting_epsilon", grafting_epsilon, low=0.0)
    if grafting_beta2 is not None:
        check_number(owner, "grafting_beta2", grafting_beta2, low=0.0, high=1.0, low_inclusive=False)
    if nesterov and b1 == 0.0 and momentum == 0.0:
        raise ValueError(f"{owner}: nesterov=True needs betas[0] > 0 or momentum > 0")
    filter_nesterov = nesterov and b1 > 0.0
    direction = scale_by_shampoo(b1, b2, epsilon, max_preconditioner_dim=max_preconditioner_dim,
                                 merge_dims=merge_dims, precondition_frequency=precondition_frequency,
                                 start_preconditioning_step=start_preconditioning_step,
                                 statistics_every=statistics_every, method=method,
                                 exponent_multiplier=exponent_multiplier, root_override=root_override,
                                 matrix_eps=matrix_eps, use_bias_correction=use_bias_correction,
                                 nesterov=filter_nesterov, distributed=distributed)
    start = precondition_frequency if start_preconditioning_step is None else start_preconditioning_step

    def grafting_method() -> GradientTransformation:
        return scale_by_grafting(grafting, b1=b1, b2=b2 if grafting_beta2 is None else grafting_beta2,
                                 eps=grafting_epsilon, nesterov=filter_nesterov,
                                 bias_correction_on=use_bias_correction)

    preconditioned = direction if grafting == "none" else graft(grafting_method(), direction, warmup=start - 1)

    def labels(params: Params) -> PyTree:
        return tree_map(lambda p: "shampoo" if plan_blocks(p.shape, max_preconditioner_dim,
                                                           merge_dims=merge_dims).preconditioned
                        else "grafting_only", params)

    links: list[tuple[str, GradientTransformation]] = []
    if weight_decay and not decoupled_weight_decay:
        links.append(("weight_decay", add_decayed_weights(weight_decay)))
    links.append(("shampoo", partition({"shampoo": preconditioned, "grafting_only": grafting_method()}, labels)))
    if weight_decay and decoupled_weight_decay:
        links.append(("weight_decay", add_decayed_weights(weight_decay)))
    if momentum:
        links.append(("momentum", trace(momentum, nesterov)))
    links.append(("learning_rate", scale_by_learning_rate(learning_rate)))
    return guarded("shampoo", named_chain(*links))

