"""Elastic weight consolidation: a curvature-weighted pull towards earlier tasks' parameters.

After a task with data ``D_t`` is learned at ``θ*_t``, a Laplace approximation of
its log-likelihood around ``θ*_t`` is the quadratic ``−½ (θ − θ*_t)ᵀ C_t (θ − θ*_t)``
with ``C_t`` the curvature (Fisher, GGN or Hessian) of the **summed** loss over
``D_t`` (:func:`fprecond.curvature.dataset.dataset_curvature`). Training on a later
task then minimises its own loss plus the penalty

    ``P(θ) = (λ/2) Σ_k (θ − a_k)ᵀ C_k (θ − a_k)``,   ``∇P(θ) = λ Σ_k C_k (θ − a_k)``.

A :class:`TaskMemory` holds the anchors ``a_k`` and precisions ``C_k``; it is an
immutable pytree of tensors, built by :func:`consolidate` (or :func:`add_task`)
after each task. Two ways to combine tasks (``mode``):

- ``"online"`` (default; Ritter et al. 2018's online Laplace, Huszár 2018, and
  with ``decay < 1`` the online EWC of Schwarz et al. 2018): one anchor, the
  parameters after the latest task, and the precision of all tasks so far,
  ``C ← decay · C + C_t``. This is the recursive Bayesian update: the posterior
  after task ``t`` is the prior of task ``t + 1``. Blocks closed under addition
  (``diag``, ``full``, ``layer``, ``unit``) are summed in place, so the memory
  stays one curvature; Kronecker blocks are not (``G_1 ⊗ A_1 + G_2 ⊗ A_2`` has no
  Kronecker form), so each task's factors are kept and their products summed:
  exact, at one set of factors per task.
- ``"separate"`` (Kirkpatrick et al. 2017): one anchor and one precision per task,
  each task pulling towards its own parameters.

The strength ``λ`` is the weight of the penalty against the new task's loss.
With ``C_t`` of the summed loss (the default of :func:`consolidate`) and a new task
trained on the summed loss, ``λ = 1`` is the Laplace posterior; trained on a mean
loss over ``N`` examples, ``λ = 1/N``. Kirkpatrick et al. treat ``λ`` as a tuned
hyperparameter, usually larger.

:func:`ewc` is the gradient transformation that adds ``∇P`` to the gradient (put it
first in a chain, so preconditioners see the whole gradient); :func:`ewc_penalty`
is ``P`` itself, to add to a loss. Both are pure and vmappable: an ensemble keeps
one memory per member, stacked (``vmap(consolidate)`` or stacked members).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from fprecond._validation import check_choice, check_number
from fprecond.base import EmptyState, GradientTransformation, Params, Updates, require_params
from fprecond.curvature.blocks import DenseBlock, DiagonalBlock, UnitBlock
from fprecond.curvature.dataset import dataset_curvature
from fprecond.curvature.matrix import Curvature
from fprecond.modeling import Model
from fprecond.tree import pytree_dataclass, static_field, tree_map, tree_structure

__all__ = ["TaskMemory", "task_memory", "add_task", "consolidate", "ewc_penalty", "ewc_gradient", "ewc",
           "MODES"]

MODES: tuple[str, ...] = ("online", "separate")
# Blocks whose sum is again such a block with summed leaves: an online memory merges them.
_ADDITIVE_BLOCKS = (DenseBlock, DiagonalBlock, UnitBlock)


@pytree_dataclass
class TaskMemory:
    """What EWC remembers of the tasks learned so far (an immutable pytree).

    Attributes:
        anchors: the parameters to pull towards, ``{name: tensor}`` each: one (the
            latest task's) in ``"online"`` mode, one per task in ``"separate"`` mode.
        precisions: curvatures ``C_k`` of the summed loss, already weighted: in
            ``"online"`` mode all refer to ``anchors[0]`` and are summed (one merged
            curvature for additive structures, one per task for Kronecker ones); in
            ``"separate"`` mode ``precisions[k]`` belongs to ``anchors[k]``.
        mode: ``"online"`` or ``"separate"`` (static).
        decay: the factor applied to earlier precisions when a task is added (static).
        tasks: the number of tasks consolidated (static).
    """

    anchors: tuple[Params, ...]
    precisions: tuple[Curvature, ...]
    mode: str = static_field(default="online")
    decay: float = static_field(default=1.0)
    tasks: int = static_field(default=0)

    def terms(self) -> list[tuple[Params, Curvature]]:
        """``(anchor, precision)`` pairs, one per quadratic term of the penalty."""
        if self.mode == "online":
            return [(self.anchors[0], precision) for precision in self.precisions]
        return list(zip(self.anchors, self.precisions))


def task_memory(*, mode: str = "online", decay: float = 1.0) -> TaskMemory:
    """An empty memory (no task yet: the penalty is zero).

    Args:
        mode: ``"online"`` (one anchor, precisions summed; Ritter et al. 2018) or
            ``"separate"`` (an anchor and a precision per task; Kirkpatrick et al. 2017).
        decay: factor in ``[0, 1]`` on the earlier precisions when a task is added
            (Schwarz et al. 2018's γ; 1 keeps them all).
    """
    check_choice("task_memory", "mode", mode, MODES)
    check_number("task_memory", "decay", decay, low=0.0, high=1.0)
    return TaskMemory((), (), mode=mode, decay=float(decay), tasks=0)


def _check_memory(owner: str, memory: Any) -> TaskMemory:
    if not isinstance(memory, TaskMemory):
        raise TypeError(f"{owner}: memory must be a TaskMemory (fprecond.continual.task_memory), "
                        f"got {type(memory).__name__}")
    return memory


def _check_params(owner: str, params: Any, curvature: Curvature) -> None:
    if not isinstance(params, dict):
        raise TypeError(f"{owner}: params must be a dict name -> tensor, got {type(params).__name__}")
    curvature.check_vector(params)


def _additive(curvature: Curvature) -> bool:
    return all(isinstance(block, _ADDITIVE_BLOCKS) for block in curvature.blocks)


def add_task(memory: TaskMemory, params: Params, curvature: Curvature, *, weight: float = 1.0) -> TaskMemory:
    """The memory after a task learned at ``params`` with (summed-loss) curvature ``curvature``.

    The task's precision is ``weight · curvature``; earlier precisions are multiplied
    by ``memory.decay``. In ``"online"`` mode the anchor becomes ``params`` and the
    precision is added to the earlier ones (merged leaf-wise when both are of an
    additive structure with the same blocks, kept as a separate term otherwise); in
    ``"separate"`` mode ``(params, weight · curvature)`` is appended.

    Pure: ``params`` and ``curvature`` are stored detached, never copied in place.
    """
    owner = "add_task"
    memory = _check_memory(owner, memory)
    if not isinstance(curvature, Curvature):
        raise TypeError(f"{owner}: curvature must be a fprecond Curvature, got {type(curvature).__name__}")
    _check_params(owner, params, curvature)
    check_number(owner, "weight", weight, low=0.0)
    anchor = {name: params[name].detach() for name in curvature.names}
    fresh = tree_map(torch.Tensor.detach, curvature)
    fresh = fresh if weight == 1.0 else fresh.scaled(weight)
    earlier = tuple(p if memory.decay == 1.0 else p.scaled(memory.decay) for p in memory.precisions)
    for old_anchor in memory.anchors:
        if list(old_anchor) != list(anchor):
            raise ValueError(f"{owner}: params have entries {list(anchor)}, the memory's anchors {list(old_anchor)}")
    if memory.mode == "separate":
        return TaskMemory(memory.anchors + (anchor,), earlier + (fresh,), memory.mode, memory.decay,
                          memory.tasks + 1)
    merged: tuple[Curvature, ...]
    if len(earlier) == 1 and _additive(fresh) and _additive(earlier[0]) and \
            tree_structure(earlier[0]) == tree_structure(fresh):
        merged = (tree_map(torch.add, earlier[0], fresh),)
    else:
        merged = earlier + (fresh,)
    return TaskMemory((anchor,), merged, memory.mode, memory.decay, memory.tasks + 1)


def consolidate(memory: TaskMemory, model: Model, params: Params, batches: Iterable[Any], *, kind: str = "fisher",
                structure: str = "diag", weight: float = 1.0, key: torch.Tensor | None = None,
                **options: Any) -> TaskMemory:
    """Add a finished task: its curvature over ``batches`` at ``params``, then :func:`add_task`.

    Args:
        memory: the memory so far (:func:`task_memory` before the first task).
        model: from :func:`fprecond.model`.
        params: the parameters reached on the task (the anchor).
        batches: the task's data as ``(inputs, targets)`` batches, read once.
        kind: the curvature kind (``"fisher"``, Kirkpatrick's choice and equal to the
            GGN for cross-entropy and MSE; ``"fisher_mc"`` with ``key``;
            ``"empirical_fisher"``; ``"ggn"``; ``"hessian"``).
        structure: ``"diag"`` (EWC), ``"kron"`` (Ritter et al. 2018), or ``"full"``,
            ``"layer"``, ``"unit"`` for small models.
        weight: the task's weight on its curvature (e.g. ``1/N`` for a mean-loss
            convention); the transform's ``strength`` multiplies all tasks.
        key: for ``kind="fisher_mc"``.
        options: passed to :func:`fprecond.curvature.dataset.dataset_curvature`
            (``approx``, ``samples``, ``per``, ``fallback``, ``buffers``).

    Returns:
        The new memory. Pure; ``vmap`` over ``(memory, params)`` of an ensemble works.
    """
    memory = _check_memory("consolidate", memory)
    curvature = dataset_curvature(model, params, batches, kind=kind, structure=structure, key=key, **options)
    return add_task(memory, params, curvature, weight=weight)


def _difference(params: Params, anchor: Params) -> Params:
    return {name: params[name] - anchor[name].to(params[name].dtype) for name in anchor}


def ewc_gradient(memory: TaskMemory, params: Params, strength: float = 1.0) -> Params:
    """``∇P(θ) = λ Σ_k C_k (θ − a_k)``, shaped like ``params`` (zeros for an empty memory)."""
    owner = "ewc_gradient"
    memory = _check_memory(owner, memory)
    check_number(owner, "strength", strength, low=0.0)
    total = {name: torch.zeros_like(p) for name, p in params.items()}
    for anchor, precision in memory.terms():
        _check_params(owner, params, precision)
        pulled = precision.mvp(_difference(params, anchor))
        total = {name: total[name] + pulled[name].to(total[name].dtype) for name in total}
    return {name: strength * g for name, g in total.items()}


def ewc_penalty(memory: TaskMemory, params: Params, strength: float = 1.0) -> torch.Tensor:
    """``P(θ) = (λ/2) Σ_k (θ − a_k)ᵀ C_k (θ − a_k)`` (0-dim; 0 for an empty memory).

    Differentiable in ``params`` (``torch.func.grad`` gives :func:`ewc_gradient`), so
    it can be added to a training loss instead of using :func:`ewc`.
    """
    owner = "ewc_penalty"
    memory = _check_memory(owner, memory)
    check_number(owner, "strength", strength, low=0.0)
    if not isinstance(params, dict) or not params:
        raise TypeError(f"{owner}: params must be a non-empty dict name -> tensor, got {type(params).__name__}")
    first = next(iter(params.values()))
    total = torch.zeros((), dtype=first.dtype, device=first.device)
    for anchor, precision in memory.terms():
        _check_params(owner, params, precision)
        total = total + precision.quadratic_form(_difference(params, anchor)).to(first.dtype)
    return 0.5 * strength * total


def ewc(memory: TaskMemory | None = None, strength: float = 1.0) -> GradientTransformation:
    """Elastic weight consolidation as a gradient transformation: ``g ← g + λ Σ_k C_k (θ − a_k)``.

    The gradient of :func:`ewc_penalty` added to the incoming updates (Kirkpatrick et
    al. 2017; with a Kronecker-factored memory, Ritter et al. 2018). Put it first in
    a chain, before momentum, Adam or a preconditioner::

        memory = consolidate(task_memory(), model, params, task_a_batches, structure="kron")
        optimizer = fp.chain(ewc(memory, strength=1.0 / n_b), fp.scale_by_adam(), fp.scale_by_learning_rate(1e-3))

    Args:
        memory: the memory to hold fixed; or None to read it from the ``memory=``
            keyword of every ``update`` (for ensembles: a stacked memory goes through
            ``vmap`` as an argument, and keywords are not mapped by ``vmap``, so pass it
            inside the vmapped function).
        strength: ``λ >= 0``.

    The state is empty, so a chain can be rebuilt with a new memory after each task
    and keep the state of its other links. ``update`` needs ``params``.
    """
    owner = "ewc"
    check_number(owner, "strength", strength, low=0.0)
    if memory is not None:
        _check_memory(owner, memory)
    fixed = memory

    def init(params: Params) -> EmptyState:
        del params
        return EmptyState()

    def update(updates: Updates, state: EmptyState, params: Params | None = None, **extra: Any):
        params = require_params(owner, params)
        given = extra.get("memory")
        if fixed is not None and given is not None:
            raise TypeError(f"{owner}.update(): a memory was given to ewc() and as the keyword 'memory'; "
                            "pass it in one place")
        current = fixed if fixed is not None else given
        if current is None:
            raise TypeError(f"{owner}.update() needs a memory: ewc(memory) or update(..., memory=memory)")
        pull = ewc_gradient(current, params, strength)
        return tree_map(lambda u, p: u + p.to(u.dtype), updates, pull), state

    return GradientTransformation(init, update)
