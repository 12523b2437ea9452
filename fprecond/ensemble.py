"""Deep ensembles trained as one: stacked parameters, one vmapped step, predictions.

An ensemble of ``K`` members is a params dict whose tensors carry a leading
member dimension ``K`` (``{name: (K, *shape)}``); optimizer states and keys are
stacked the same way. Since every fprecond transform is a pure function of
``(grads, state, params, batch, key)``, ``torch.func.vmap`` of one member's
training step trains all members at once and gives what a Python loop over the
members gives (Lakshminarayanan et al. 2017, "Simple and scalable predictive
uncertainty estimation using deep ensembles", for the method; the vmapped form
follows the ``torch.func`` model-ensembling tutorial).

Example::

    params = init_ensemble(module, seeds=range(8))                # {name: (8, ...)}
    md = fprecond.model(module, fprecond.losses.cross_entropy())
    opt = fprecond.kfac(md)
    state = torch.func.vmap(opt.init)(params)
    keys = torch.stack([fprecond.random.key(s) for s in range(8)])
    step = ensemble_step(train_step(md, opt))
    params, state, metrics = step(params, state, batch, keys)    # metrics["loss"]: (8,)
    mean, spread = ensemble_predict(md, params, inputs)
"""

from __future__ import annotations

import copy
from typing import Any, Iterable, Sequence

import torch
from torch import nn
from torch.func import vmap

from fprecond.base import OptState, Params
from fprecond.losses import CrossEntropyLoss
from fprecond.modeling import Model
from fprecond.training import Metrics, Step
from fprecond.tree import PyTree, tree_leaves, tree_map

__all__ = ["init_ensemble", "ensemble_step", "member", "stack_members", "ensemble_predict"]


def _seeds(seeds: Iterable[int]) -> list[int]:
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Iterable):
        raise TypeError(f"init_ensemble: seeds must be a sequence of ints, got {type(seeds).__name__}")
    values = list(seeds)
    if not values:
        raise ValueError("init_ensemble: seeds must hold at least one seed")
    for seed in values:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"init_ensemble: every seed must be an int, got {seed!r}")
    return values


def _reinitialized(module: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    fresh = copy.deepcopy(module)
    torch.manual_seed(seed)
    with torch.no_grad():
        for sub in fresh.modules():
            reset = getattr(sub, "reset_parameters", None)
            if callable(reset):
                reset()
    return {name: p.detach().clone() for name, p in fresh.named_parameters()}


def init_ensemble(module: nn.Module, seeds: Iterable[int]) -> dict[str, torch.Tensor]:
    """Fresh initialisations of ``module``, one per seed, stacked: ``{name: (K, *shape)}``.

    Member ``k`` holds what ``torch.manual_seed(seeds[k])`` followed by
    ``reset_parameters()`` of every submodule of a deep copy of ``module`` (in
    ``module.modules()`` order) gives. For modules whose constructor initialises
    its layers in that order with ``reset_parameters`` (``nn.Linear``,
    ``nn.Conv2d``, ... in an ``nn.Sequential``), that equals building the module
    after ``torch.manual_seed(seeds[k])``. Parameters of a submodule without
    ``reset_parameters`` keep ``module``'s values in every member.

    ``module`` is not modified, and the global random generator is restored
    afterwards (the draws use it only inside :func:`torch.random.fork_rng`), so
    calling this does not shift the caller's random stream. Keys follow
    ``module.named_parameters()`` (tied parameters once, as :meth:`Model.params`).
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"init_ensemble: module must be a torch.nn.Module, got {type(module).__name__}")
    values = _seeds(seeds)
    devices = sorted({p.device.index or 0 for p in module.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        members = [_reinitialized(module, seed) for seed in values]
    if not members[0]:
        raise ValueError("init_ensemble: the module has no parameters")
    return stack_members(members)


def stack_members(members: Sequence[PyTree]) -> PyTree:
    """Stack same-structured trees (params dicts, states) leaf-wise along a new leading
    member dimension: the inverse of :func:`member`.

    Raises ``ValueError`` naming the first member and entry that differs from
    member 0 in keys, shape or dtype.
    """
    if isinstance(members, (str, bytes)) or not isinstance(members, Sequence) or not members:
        raise ValueError("stack_members: expected a non-empty list of trees (one per member)")
    first = members[0]
    if isinstance(first, dict):
        for index, other in enumerate(members[1:], start=1):
            if not isinstance(other, dict) or list(other) != list(first):
                names = list(other) if isinstance(other, dict) else type(other).__name__
                raise ValueError(f"stack_members: member {index} has entries {names}, member 0 has {list(first)}")
    reference = tree_leaves(first)
    for index, other in enumerate(members[1:], start=1):
        leaves = tree_leaves(other)
        if len(leaves) != len(reference):
            raise ValueError(f"stack_members: member {index} has {len(leaves)} tensors, member 0 has {len(reference)}")
        for position, (a, b) in enumerate(zip(reference, leaves)):
            if a.shape != b.shape or a.dtype != b.dtype:
                where = list(first)[position] if isinstance(first, dict) else f"leaf {position}"
                raise ValueError(f"stack_members: member {index}'s {where!r} is {tuple(b.shape)} {b.dtype}, "
                                 f"member 0's is {tuple(a.shape)} {a.dtype}")
    return tree_map(lambda *leaves: torch.stack(leaves), *members)


def _members(stacked: PyTree, owner: str) -> int:
    leaves = tree_leaves(stacked)
    if not leaves:
        raise ValueError(f"{owner}: the stacked tree holds no tensors")
    sizes = {leaf.shape[0] if leaf.dim() else None for leaf in leaves}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(f"{owner}: every tensor needs the same leading member dimension, got sizes "
                         f"{sorted(str(s) for s in sizes)}")
    return int(next(iter(sizes)))  # type: ignore[arg-type]


def member(stacked: PyTree, index: int, buffers: dict[str, torch.Tensor] | None = None) -> PyTree:
    """Member ``index`` of a stacked tree, as plain tensors (copies, not views).

    For stacked params this is a state dict: ``module.load_state_dict(member(params, i),
    strict=False)`` loads member ``i`` (``strict=False`` because buffers are not in
    it); with ``buffers`` (one dict for all members, as :func:`fprecond.training.train_step`
    takes them), the buffers are added and ``strict=True`` works. Works on any
    stacked tree (an ensemble's optimizer state too). Negative indices count from
    the end, as in Python.
    """
    count = _members(stacked, "member")
    if isinstance(index, bool) or not isinstance(index, int) or not -count <= index < count:
        raise IndexError(f"member: index must be an int in [-{count}, {count}), got {index!r}")
    picked = tree_map(lambda leaf: leaf[index].detach().clone(), stacked)
    if buffers is None:
        return picked
    if not isinstance(picked, dict) or not isinstance(buffers, dict):
        raise TypeError("member: buffers can only be added to a params dict, given as a dict name -> tensor")
    clash = [name for name in buffers if name in picked]
    if clash:
        raise ValueError(f"member: buffers {clash} have the names of parameters")
    return {**picked, **{name: b.detach().clone() for name, b in buffers.items()}}


def ensemble_step(step: Step, *, shared_batch: bool = True) -> Step:
    """The ensemble version of a :func:`fprecond.training.train_step` step, by ``torch.func.vmap``.

    ``step(params, state, batch, keys) -> (params, state, metrics)`` with params and
    state stacked over ``K`` members (``vmap(transform.init)(params)`` stacks a
    state) and ``keys`` of shape ``(K, 2)`` (one :func:`fprecond.random.key` per
    member, so members draw independently; ``None`` for transforms that draw
    nothing). With ``shared_batch`` (default) every member trains on the same
    ``batch``; otherwise every tensor of ``batch`` has a leading ``K`` dimension
    and member ``k`` trains on its slice. Metrics have shape ``(K,)``.

    Because the step is pure and fprecond's randomness is counter-based, the
    result equals a Python loop over the members (tested), while scheduled work
    (K-FAC's inverses) runs batched over members on the steps it is due.
    """
    if not callable(step):
        raise TypeError(f"ensemble_step: step must be a callable (from train_step), got {type(step).__name__}")
    if not isinstance(shared_batch, bool):
        raise TypeError(f"ensemble_step: shared_batch must be a bool, got {type(shared_batch).__name__}")
    batch_dim = None if shared_batch else 0
    with_keys = vmap(step, in_dims=(0, 0, batch_dim, 0))
    without_keys = vmap(lambda params, state, batch: step(params, state, batch, None), in_dims=(0, 0, batch_dim))

    def stepped(params: Params, state: OptState, batch: Any, keys: torch.Tensor | None = None
                ) -> tuple[Params, OptState, Metrics]:
        if keys is None:
            return without_keys(params, state, batch)
        return with_keys(params, state, batch, keys)

    return stepped


def ensemble_predict(model: Model, stacked: dict[str, torch.Tensor], inputs: Any, *, probabilities: bool = True,
                     buffers: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ensemble's mean prediction and its spread over members, for one batch of ``inputs``.

    Every member's outputs ``f_k`` (shape ``(N, ..., C)``) come from one vmapped
    :meth:`Model.apply`. For a cross-entropy model with ``probabilities=True``
    (default) the members' predictive distributions ``p_k = softmax(f_k)`` are
    averaged (the deep-ensemble predictive of Lakshminarayanan et al. 2017);
    otherwise (MSE, or ``probabilities=False``) the raw outputs are.

    Returns:
        ``(mean, spread)``, each shaped like one member's outputs: ``mean =
        (1/K) Σ_k p_k`` and ``spread`` the standard deviation over members with
        divisor ``K`` (population, so one member gives 0 rather than NaN).
    """
    if not isinstance(model, Model):
        raise TypeError(f"ensemble_predict: model must be an fprecond Model, got {type(model).__name__}")
    _members(stacked, "ensemble_predict")
    outputs = vmap(model.apply, in_dims=(0, None, None))(stacked, inputs, buffers)
    if probabilities and isinstance(model.loss, CrossEntropyLoss):
        outputs = torch.softmax(outputs, dim=-1)
    return outputs.mean(dim=0), outputs.std(dim=0, correction=0)
