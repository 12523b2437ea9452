"""SOAP: Adam in the eigenbasis of Shampoo's preconditioner.

Vyas, Morwani, Zhao, Kwun, Shapira, Brandfonbrener, Janson & Kakade (2024),
"SOAP: Improving and stabilizing Shampoo using Adam". Order of operations,
defaults and first-step handling follow the reference implementation
(github.com/nikhilvyas/SOAP, ``soap.py``). For a matrix gradient ``G`` with
Shampoo statistics ``L, R`` and their eigenbases ``Q_L, Q_R``::

    G' = Q_Lᵀ G Q_R                                     (project)
    m ← β1 m + (1-β1) G';  v ← β2 v + (1-β2) G'²         (Adam moments, kept in the eigenbasis; v as sqrt(v))
    D = Q_L (m / (sqrt(v) + eps)) Q_Rᵀ · sqrt(1-β2^t)/(1-β1^t)     (project back)
    L ← s L + (1-s) G Gᵀ;  R ← s R + (1-s) Gᵀ G            (s = shampoo_beta, after the step)

and for tensors of any order one factor and basis per mode (``G ×_i Q_iᵀ``). With
``block_size`` (an extension) the same runs independently on each block of a
Shampoo-style blocking of the tensor.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import optree
import torch

from fprecond._validation import check_number, check_positive_int
from fprecond.base import GradientTransformation, Params, ScalarOrSchedule, Updates, named_chain
from fprecond.lazy import lazy_where
from fprecond.optimizers._blocking import (BlockPlan, accumulate_statistics, finite_matrices, merge_small_dims,
                                          mode_product, plan_blocks)
from fprecond.optimizers._recipe import guarded
from fprecond.precondition import is_due
from fprecond.schedules import evaluate
from fprecond.spectral import symmetric_eigh
from fprecond.transforms import scale_by_learning_rate
from fprecond.transforms.adam import bias_correction, root_mean_square
from fprecond.transforms.grafting import counter
from fprecond.tree import NAMESPACE, PyTree, tree_flatten_with_names, tree_unflatten_ordered, tree_zeros_like

__all__ = ["scale_by_soap", "ScaleBySoapState", "soap"]


Factors = tuple[Any, ...]
"""A leaf's factors: per mode a ``(d, d)`` matrix (``block_size=None``), or per block
group a tuple with, per mode, a ``(B, d, d)`` batch (``block_size`` set)."""


class ScaleBySoapState(NamedTuple):
    """State of :func:`scale_by_soap` (tensor leaves only).

    Attributes:
        count: steps taken (0-dim int64); the first step only initialises the basis.
        exp_avg: Adam's first moment, shaped like the parameters, *in the eigenbasis* (with
            ``block_size``: each block in its own block's eigenbasis).
        exp_avg_sq_sqrt: the square root of Adam's second moment, shaped like the parameters,
            in the eigenbasis (a root, updated by ``hypot``, so that ``G'²`` is never formed:
            a float32 gradient of ``1e30`` would overflow it and zero the step for good).
        statistics: leaf name -> the factors ``L, R, ...``: ``statistics[name][mode]`` a
            ``(d, d)`` matrix; with ``block_size``, ``statistics[name][group][mode]`` a
            ``(B, d, d)`` batch for the ``B`` equal-shaped blocks of a group (as Shampoo's).
        basis: the orthogonal eigenbases ``Q``, laid out as ``statistics`` (columns sorted by
            decreasing estimated eigenvalue).
        rejected: statistics updates rejected so far, per block and mode, because the new
            factor was not finite (a finite gradient whose outer product overflows); the
            previous factor is kept.
    """

    count: torch.Tensor  # type: ignore[assignment]  # optax's name, shadows tuple.count
    exp_avg: PyTree
    exp_avg_sq_sqrt: PyTree
    statistics: dict[str, Factors]
    basis: dict[str, Factors]
    rejected: torch.Tensor


Groups = tuple[tuple[torch.Tensor, ...], ...]
"""Per block group, per mode: a ``(B, d, d)`` batch (the internal layout)."""


def _project(x: torch.Tensor, modes: tuple[int, ...], basis: tuple[torch.Tensor, ...], back: bool) -> torch.Tensor:
    """``x ×_i Q_iᵀ`` over the modes (``back``: ``x ×_i Q_i``), for ``(B, *block)`` blocks
    and ``(B, d, d)`` bases."""
    for mode, q in zip(modes, basis):
        x = mode_product(x, q if back else q.mT, mode)
    return x


def _eye_like(matrices: torch.Tensor) -> torch.Tensor:
    return torch.eye(matrices.shape[-1], dtype=matrices.dtype, device=matrices.device)


def scale_by_soap(b1: float = 0.95, b2: float = 0.95, shampoo_beta: float | None = None, eps: float = 1e-8, *,
                  precondition_frequency: int = 10, max_precond_dim: int = 10000, merge_dims: bool = False,
                  precondition_1d: bool = False, normalize_grads: bool = False, correct_bias: bool = True,
                  statistics_every: int = 1, block_size: int | None = None) -> GradientTransformation:
    """SOAP's direction (Vyas et al., 2024), step by step as the reference ``soap.py``.

    Step ``c`` (0-based count):

    * ``c = 0``: the statistics take the first gradient (``L = (1-s) G Gᵀ``), the basis
      is their ``eigh`` with eigenvalues in decreasing order, and the output is **zero**
      (the reference skips the first step "so that we never use the current
      gradients in the projection"); the moments stay zero.
    * ``c >= 1``: Adam in the current basis (see the module docstring) with step
      ``t = c``, ``eps`` added to ``sqrt(v)`` (reference order), the bias correction as a
      factor ``sqrt(1-β2^t)/(1-β1^t)`` (``correct_bias``); with ``normalize_grads`` the
      projected-back direction is divided by ``1e-30 + its RMS`` first. Then the
      statistics are updated with the raw gradient (every ``statistics_every`` steps;
      the reference: every step) and, when ``c % precondition_frequency == 0``, the
      basis is refreshed by one power-iteration step and QR: per mode, columns of ``Q``
      are re-sorted by ``diag(Qᵀ L Q)`` (decreasing), the second moment ``v`` is
      permuted along that mode the same way, and ``Q ← qr(L Q).Q``; the first moment is
      rotated into the new basis (the reference projects it back and forth every
      step, which is the same). Off these steps no ``eigh``/QR runs.

    Preconditioned modes: after ``merge_dims`` (the reference's rule, as
    :func:`fprecond.optimizers._blocking.merge_small_dims` with ``max_precond_dim``),
    every dimension with ``1 < d <= max_precond_dim`` of a tensor of order ``>= 2``; a
    1-D tensor only with ``precondition_1d``; other dimensions (and scalars) keep the
    identity, so a 1-D parameter gets plain Adam (with the reference's skipped first
    step and ``eps`` placement). Size-1 dimensions get the identity (the reference's
    ``1 × 1`` basis is ``±1``, which does not change the update).

    Blocking (``block_size``, an extension: the reference preconditions each tensor
    whole): with ``block_size = b`` every (merged) dimension ``d > b`` of a tensor that
    has a factor is split into ``d // b`` blocks of ``b`` and, if ``d % b``, one ragged
    block of the rest, as distributed Shampoo's blocking (Anil et al., 2020; Shi et
    al., 2023; :func:`fprecond.optimizers._blocking.plan_blocks`), and SOAP runs on each
    block ``G_j`` independently: own factors ``L_{j,i}``, own eigenbases ``Q_{j,i}``
    (``eigh`` at the first step, power-iteration + QR refreshes with the re-sort of
    ``v``), Adam on ``G_j ×_i Q_{j,i}ᵀ``, and with ``normalize_grads`` the RMS of the
    block's direction. This is block-diagonal SOAP: ``L`` of a ``(m, n)`` weight
    becomes ``ceil(m/b)·ceil(n/b)`` ``b × b`` blocks per side instead of one ``m × m``.
    ``max_precond_dim`` still applies to the block sizes (with ``b <= max_precond_dim``
    every block dimension of size ``> 1`` gets a factor). Equal-shaped blocks are
    batched, so each step is a few batched matmuls and a refresh a batched ``eigh``/QR.
    Cost of a ``(m, n)`` weight: per step (projections and statistics)
    ``O(m n (m + n))`` whole, ``O(m n b)`` blocked; per refresh (``L Q``, QR, the first
    ``eigh``) ``O(m n (m + n))`` plus ``O(m³ + n³)`` whole, ``O(m n b)`` blocked
    (``ceil(m/b)·ceil(n/b)`` blocks of ``O(b³)``). Memory: the factors and bases hold
    ``m² + n²`` numbers each whole, ``2 m n`` blocked when ``b`` divides ``m`` and ``n``
    (each of the ``m n / b²`` blocks keeps two ``b × b`` matrices). ``None`` (the
    default): no splitting, the reference's behaviour.

    A statistics update that is not finite (a NaN gradient, or a finite one whose outer
    product overflows) is not stored: the previous factor, basis and order of the second
    moment are kept, per block and mode, and counted in ``state.rejected``.

    Defaults: the reference (``betas=(0.95, 0.95)``, ``shampoo_beta = b2`` when None,
    ``eps=1e-8``, ``precondition_frequency=10``, ``max_precond_dim=10000``); ``block_size``
    None (no blocking, as the reference).
    """
    owner = "scale_by_soap"
    shampoo_beta = b2 if shampoo_beta is None else shampoo_beta
    check_number(owner, "b1", b1, low=0.0, high=1.0, high_inclusive=False)
    check_number(owner, "b2", b2, low=0.0, high=1.0, high_inclusive=False)
    check_number(owner, "shampoo_beta", shampoo_beta, low=0.0, high=1.0, high_inclusive=False)
    check_number(owner, "eps", eps, low=0.0)
    for name, value in (("precondition_frequency", precondition_frequency), ("max_precond_dim", max_precond_dim),
                        ("statistics_every", statistics_every)):
        check_positive_int(owner, name, value)
    check_positive_int(owner, "block_size", block_size, allow_none=True)
    blocked = block_size is not None
    plans: dict[tuple[int, ...], BlockPlan] = {}

    def plan_of(leaf: torch.Tensor) -> BlockPlan:
        """The leaf's blocks (one, whole, without ``block_size``), each group's ``modes``
        the dimensions SOAP preconditions (static: built from the shape, cached)."""
        shape = tuple(leaf.shape)
        if shape not in plans:
            factored = leaf.ndim >= 2 or precondition_1d
            merged = merge_small_dims(shape, max_precond_dim) if merge_dims and leaf.ndim > 1 else shape
            if block_size is not None and factored:
                plan = plan_blocks(merged, block_size, merge_dims=False, split_large=True)
            else:
                plan = plan_blocks(merged, max_precond_dim, merge_dims=False, split_large=False)
            # The modes are SOAP's own: no 1 x 1 factor for one-element blocks (Shampoo
            # keeps one), and the max_precond_dim limit whatever the block size.
            groups = tuple(dataclasses.replace(group, modes=tuple(
                d for d, size in enumerate(group.block_shape) if factored and 1 < size <= max_precond_dim))
                for group in plan.groups)
            plans[shape] = dataclasses.replace(plan, shape=shape, groups=groups)
        return plans[shape]

    # Internally every leaf's factors are ``Groups``; without blocking the state keeps the
    # reference's layout (one (d, d) matrix per mode), read and written as one group of B = 1.
    def unpack(factors: Factors) -> Groups:
        return factors if blocked else (tuple(f[None] for f in factors),)

    def pack(groups: Groups) -> Factors:
        return groups if blocked else tuple(f[0] for f in groups[0])

    def init(params: Params) -> ScaleBySoapState:
        names, leaves, _ = tree_flatten_with_names(params)
        statistics, basis = {}, {}
        for name, leaf in zip(names, leaves):
            plan = plan_of(leaf)
            sizes = [[(group.num_blocks, group.block_shape[m]) for m in group.modes] for group in plan.groups]
            statistics[name] = pack(tuple(tuple(leaf.new_zeros(b, d, d) for b, d in group) for group in sizes))
            basis[name] = pack(tuple(tuple(torch.eye(d, dtype=leaf.dtype, device=leaf.device).expand(b, d, d).clone()
                                           for b, d in group) for group in sizes))
        zero = counter(params)
        return ScaleBySoapState(count=zero, exp_avg=tree_zeros_like(params),
                                exp_avg_sq_sqrt=tree_zeros_like(params), statistics=statistics, basis=basis,
                                rejected=zero.clone())

    def update(updates: Updates, state: ScaleBySoapState, params: Params | None = None, **extra: Any):
        del params, extra
        count = state.count
        names, gradients, treedef = tree_flatten_with_names(updates)
        exp_avg = tree_flatten_with_names(state.exp_avg)[1]
        exp_avg_sq = tree_flatten_with_names(state.exp_avg_sq_sqrt)[1]
        leaf_plans = [plan_of(g) for g in gradients]
        old_statistics = {name: unpack(state.statistics[name]) for name in names}
        old_basis = {name: unpack(state.basis[name]) for name in names}

        def adam_step() -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
            step = count.clamp_min(1)  # the first step's result is discarded
            directions, firsts, seconds = [], [], []
            for name, g, m, v, plan in zip(names, gradients, exp_avg, exp_avg_sq, leaf_plans):
                out: list[list[torch.Tensor]] = [[], [], []]
                for group, g_block, m_block, v_block, basis in zip(plan.groups, plan.split(g), plan.split(m),
                                                                   plan.split(v), old_basis[name]):
                    projected = _project(g_block, group.modes, basis, back=False)
                    m_block = torch.lerp(projected, m_block, b1)  # b1 m + (1-b1) g' in one pass
                    v_block = root_mean_square(v_block, projected, b2)  # sqrt(b2 v² + (1-b2) G'²)
                    ratio = m_block / (v_block + eps).clamp_min(torch.finfo(v_block.dtype).tiny)
                    direction = _project(ratio, group.modes, basis, back=True)
                    if normalize_grads and direction.numel():  # per block (the whole tensor without blocking)
                        rms = torch.sqrt(direction.square().flatten(1).mean(1))
                        direction = direction / (1e-30 + rms.reshape(-1, *[1] * (direction.ndim - 1)))
                    for part, value in zip(out, (direction, m_block, v_block)):
                        part.append(value)
                direction, m, v = (plan.merge(part) for part in out)
                if correct_bias:
                    direction = direction * (torch.sqrt(bias_correction(b2, step, direction))
                                             / bias_correction(b1, step, direction))
                directions.append(direction)
                firsts.append(m)
                seconds.append(v)
            return directions, firsts, seconds

        first = count == 0
        # The Adam step runs on every step (also the first, whose result is discarded), so
        # that the zeros of the first step are built only when needed.
        skipped = (exp_avg, exp_avg_sq)
        directions, exp_avg, exp_avg_sq = lazy_where(
            first, lambda: ([torch.zeros_like(g) for g in gradients], *skipped), adam_step())

        def new_statistics() -> tuple[dict[str, Groups], dict[str, Groups], torch.Tensor]:
            # A finite gradient can still overflow G Gᵀ (float32, |G| ~ 1e20): such a factor is
            # not stored (it would stay infinite for good); the old one is kept and counted.
            def combine(previous: torch.Tensor, outer: torch.Tensor) -> torch.Tensor:
                return shampoo_beta * previous + (1.0 - shampoo_beta) * outer

            fresh, flags, rejected = accumulate_statistics(leaf_plans, gradients,
                                                           [old_statistics[name] for name in names], combine)
            return dict(zip(names, fresh)), dict(zip(names, flags)), rejected.to(count.dtype)

        all_accepted = {name: tuple(tuple(torch.ones(s.shape[0], 1, 1, dtype=torch.bool, device=s.device)
                                          for s in stats) for stats in old_statistics[name]) for name in names}
        statistics, accepted, rejected = lazy_where(is_due(count, statistics_every), new_statistics,
                                                    (old_statistics, all_accepted, torch.zeros_like(count)))

        def initial_basis() -> dict[str, Groups]:
            fresh = {}
            for name in names:
                per_group = []
                for stats, flags, olds in zip(statistics[name], accepted[name], old_basis[name]):
                    qs = []
                    for s, ok, old in zip(stats, flags, olds):
                        good = ok & finite_matrices(s)
                        vectors = torch.flip(symmetric_eigh(torch.where(good, s, _eye_like(s)))[1], [-1])
                        qs.append(torch.where(good, vectors, old))
                    per_group.append(tuple(qs))
                fresh[name] = tuple(per_group)
            return fresh

        basis = lazy_where(first, initial_basis, old_basis)

        def refresh() -> tuple[dict[str, Groups], list[torch.Tensor], list[torch.Tensor]]:
            fresh, firsts, seconds = {}, [], []
            for name, m, v, plan in zip(names, exp_avg, exp_avg_sq, leaf_plans):
                per_group, m_blocks, v_blocks = [], [], []
                for group, m_block, v_block, stats, flags, olds in zip(plan.groups, plan.split(m), plan.split(v),
                                                                       statistics[name], accepted[name], basis[name]):
                    original = _project(m_block, group.modes, olds, back=True)
                    qs = []
                    for mode, s, ok, q in zip(group.modes, stats, flags, olds):
                        # A rejected statistics update keeps the basis (and the order of v) as it was.
                        good = ok & finite_matrices(s)
                        s = torch.where(good, s, _eye_like(s))
                        power = s @ q  # one power-iteration step, also giving diag(Qᵀ L Q)
                        estimated = (q * power).sum(-2)  # (B, d)
                        order = torch.where(good[..., 0], torch.argsort(estimated, dim=-1, descending=True),
                                            torch.arange(s.shape[-1], device=s.device))
                        # L Q[:, order] = (L Q)[:, order]. gather with an expanded index, not
                        # take_along_dim, which wraps (remainder) the broadcast index first.
                        power = torch.gather(power, -1, order[:, None, :].expand_as(power))
                        shape = [order.shape[0]] + [1] * (v_block.ndim - 1)
                        shape[mode + 1] = -1
                        index = order.reshape(shape).expand_as(v_block)
                        v_block = torch.gather(v_block, mode + 1, index)
                        qs.append(torch.where(good, torch.linalg.qr(power).Q, q))
                    per_group.append(tuple(qs))
                    m_blocks.append(_project(original, group.modes, per_group[-1], back=False))
                    v_blocks.append(v_block)
                fresh[name] = tuple(per_group)
                firsts.append(plan.merge(m_blocks))
                seconds.append(plan.merge(v_blocks))
            return fresh, firsts, seconds

        refresh_due = (count > 0) & (count % precondition_frequency == 0)
        basis, exp_avg, exp_avg_sq = lazy_where(refresh_due, refresh, (basis, exp_avg, exp_avg_sq))

        new_state = ScaleBySoapState(count=count + 1, exp_avg=tree_unflatten_ordered(treedef, exp_avg),
                                     exp_avg_sq_sqrt=tree_unflatten_ordered(treedef, exp_avg_sq),
                                     statistics={name: pack(statistics[name]) for name in names},
                                     basis={name: pack(basis[name]) for name in names},
                                     rejected=state.rejected + rejected)
        return tree_unflatten_ordered(treedef, directions), new_state

    return GradientTransformation(init, update)


class _DecayAfterStepState(NamedTuple):
    count: torch.Tensor  # type: ignore[assignment]  # shadows tuple.count


def _decay_after_step(weight_decay: float, learning_rate: ScalarOrSchedule) -> GradientTransformation:
    """The reference's decoupled weight decay, applied to the parameters *after* the step:
    ``θ ← (θ + u)(1 - lr·wd)``, i.e. ``u ← u - lr·wd·(θ + u)``; skipped on the first step
    (which the reference skips entirely)."""

    def init(params: Params) -> _DecayAfterStepState:
        return _DecayAfterStepState(count=counter(params))

    def update(updates: Updates, state: _DecayAfterStepState, params: Params | None = None, **extra: Any):
        del extra
        if params is None:
            raise TypeError("soap.update() needs the current parameters (for weight decay): "
                            "call update(grads, state, params)")
        rate = evaluate(learning_rate, state.count)
        active = (state.count > 0).to(rate.dtype) * rate * weight_decay
        decayed = optree.tree_map(lambda u, p: u - active.to(u.dtype) * (p + u), updates, params, namespace=NAMESPACE)
        return decayed, _DecayAfterStepState(count=state.count + 1)

    return GradientTransformation(init, update)


def soap(learning_rate: ScalarOrSchedule = 3e-3, betas: tuple[float, float] = (0.95, 0.95),
         shampoo_beta: float | None = None, eps: float = 1e-8, weight_decay: float = 0.01, *,
         precondition_frequency: int = 10, max_precond_dim: int = 10000, merge_dims: bool = False,
         precondition_1d: bool = False, normalize_grads: bool = False, correct_bias: bool = True,
         statistics_every: int = 1, block_size: int | None = None) -> GradientTransformation:
    """SOAP (Vyas et al., 2024) as the reference ``SOAP`` optimizer: :func:`scale_by_soap`,
    the learning rate, and decoupled weight decay applied after the step.

    ``θ ← θ − lr · D`` then ``θ ← θ − lr · wd · θ`` (the reference's order: the decay
    multiplies the already updated parameters), the first step leaving ``θ``
    unchanged. A step whose gradient or update is not finite is skipped
    (``apply_if_finite``). Defaults are the reference's (``lr=3e-3``,
    ``betas=(0.95, 0.95)``, ``shampoo_beta = betas[1]``, ``eps=1e-8``,
    ``weight_decay=0.01``, ``precondition_frequency=10``, ``max_precond_dim=10000``,
    ``merge_dims=False``, ``precondition_1d=False``, ``normalize_grads=False``,
    ``correct_bias=True``); ``statistics_every`` (default 1, the reference) thins the
    statistics updates for speed.

    ``block_size`` (default None: whole tensors, the reference) is an extension, not in
    the reference implementation: every (merged) dimension larger than ``block_size``
    is split into blocks of at most ``block_size`` (the last one ragged), as
    distributed Shampoo's blocking (:func:`fprecond.optimizers._blocking.plan_blocks`),
    and each block gets its own SOAP (own ``L_i``, eigenbases and Adam moments in its
    rotated basis, i.e. block-diagonal factors). It trades the full-size rotations
    (``O(m n (m + n))`` per step and ``O(m³ + n³)`` per refresh for an ``(m, n)``
    weight) for ``O(m n · block_size)`` per step and batched ``block_size``-sized
    ``eigh``/QR; see :func:`scale_by_soap`.

    State for notebooks: ``state.inner_state["soap"]`` is the :class:`ScaleBySoapState`.
    """
    owner = "soap"
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"{owner}: betas must be a pair (b1, b2), got {betas!r}")
    check_number(owner, "learning_rate", learning_rate, low=0.0, low_inclusive=False, allow_schedule=True)
    check_number(owner, "weight_decay", weight_decay, low=0.0)
    links: list[tuple[str, GradientTransformation]] = [
        ("soap", scale_by_soap(betas[0], betas[1], shampoo_beta, eps, precondition_frequency=precondition_frequency,
                               max_precond_dim=max_precond_dim, merge_dims=merge_dims,
                               precondition_1d=precondition_1d, normalize_grads=normalize_grads,
                               correct_bias=correct_bias, statistics_every=statistics_every,
                               block_size=block_size)),
        ("learning_rate", scale_by_learning_rate(learning_rate)),
    ]
    if weight_decay:
        links.append(("weight_decay", _decay_after_step(weight_decay, learning_rate)))
    return guarded("soap", named_chain(*links))
