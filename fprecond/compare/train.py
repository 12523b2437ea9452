"""One training run of one method (or a vmapped ensemble of it) on one task.

Every method of a comparison starts from the same initialisation (``torch.manual_seed(seed)``
before the module is built) and sees the same batches in the same order (a
permutation per epoch from a generator seeded with ``seed``). A step is::

    loss, grads = fp.loss_and_grads(model, params, batch)
    updates, state = transform.update(grads, state, params, batch=batch, key=key)
    params = fp.apply_updates(params, updates)

with ``key = fp.random.key(seed)`` (recipes fold it with their own step count).
Step times count these three calls only (with a device synchronisation); the
evaluation on the test split every ``eval_every`` steps is not timed. A run stops
at the budget (epochs, or seconds of training time) or as soon as a training loss
is not finite (``diverged``).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import statistics
import time
from typing import Any, Callable, Iterator

import torch
from torch.func import vmap

import fprecond as fp
from fprecond.compare.methods import build_transform
from fprecond.compare.tasks import Task
from fprecond.tree import tree_map

__all__ = ["Budget", "evaluate", "Stepper", "FunctionalStepper", "EnsembleStepper", "run_loop", "train_run", "train_ensemble",
           "batches"]

# Steps left out of the step-time statistics: the first steps run one-time work
# (state probing, allocator growth, the first refreshes of every schedule).
_TIMING_SKIP = 3


@dataclasses.dataclass(frozen=True)
class Budget:
    """Stop after ``epochs`` passes over the training split, or after ``seconds`` of
    training time, whichever comes first (``None``: no such limit)."""

    epochs: float | None = 10
    seconds: float | None = None

    def steps(self, steps_per_epoch: int) -> int | None:
        return None if self.epochs is None else max(1, math.ceil(self.epochs * steps_per_epoch))


def batches(task: Task, batch_size: int, seed: int, device: torch.device):
    """An endless stream of ``(inputs, targets)`` batches, reshuffled each epoch."""
    inputs, targets = task.train
    generator = torch.Generator().manual_seed(seed)
    count = len(targets)
    while True:
        order = torch.randperm(count, generator=generator)
        for first in range(0, count - batch_size + 1, batch_size):  # full batches only: one shape
            index = order[first:first + batch_size]
            yield inputs[index].to(device), targets[index].to(device)


def _synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def evaluate(task: Task, model: fp.Model, params: Any, device: torch.device) -> tuple[float, float]:
    inputs, targets = task.test
    with torch.no_grad():
        outputs = model.apply(params, inputs.to(device))
        targets = targets.to(device)
        return float(model.loss(outputs, targets)), float(task.accuracy(outputs, targets))


def _step_time_summary(step_times: list[float]) -> dict[str, float | None]:
    timed = step_times[_TIMING_SKIP:] or step_times
    if not timed:
        return {"step_time_s": None, "step_time_mean_s": None}
    return {"step_time_s": statistics.median(timed), "step_time_mean_s": statistics.fmean(timed)}


class Stepper:
    """What the training loop drives: ``step(batch) -> loss`` (one 0-dim tensor, or one
    per ensemble member), ``evaluate() -> (test loss, test accuracy, per-member
    accuracies or None)`` and ``finite() -> bool`` (the parameters hold no NaN/Inf)."""

    def step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self) -> tuple[float, float, list[float] | None]:
        raise NotImplementedError

    def finite(self) -> bool:
        raise NotImplementedError


def run_loop(stepper: Stepper, stream: Iterator[tuple[torch.Tensor, torch.Tensor]], *, steps_per_epoch: int,
             budget: Budget, eval_every: int, target_accuracy: float | None, device: torch.device,
             progress: Callable[[int, int | None], None] | None = None,
             on_batch: Callable[[int, Any], None] | None = None) -> dict[str, Any]:
    """Drive ``stepper`` over ``stream`` within ``budget``; time the steps, evaluate every
    ``eval_every`` steps (untimed) and at the end, stop early on a non-finite loss.

    Returns:
        ``steps``, ``losses`` (mean training loss per step), ``times`` (cumulative
        training seconds after each step), ``evals`` (``{step, time, test_loss,
        test_accuracy}``, plus ``member_accuracy`` for ensembles), ``diverged``,
        ``to_target`` (``{step, time}`` of the first evaluation at ``target_accuracy``
        or above, else ``None``), and ``step_time_s`` (median, first steps left out).
    """
    sync = _synchronizer(device)
    max_steps = budget.steps(steps_per_epoch)
    losses: list[float] = []
    times: list[float] = []
    step_times: list[float] = []
    evals: list[dict[str, Any]] = []
    elapsed = 0.0
    diverged = False
    to_target: dict[str, float] | None = None

    def record_eval(step: int) -> None:
        nonlocal to_target
        test_loss, test_accuracy, members = stepper.evaluate()
        entry: dict[str, Any] = {"step": step, "time": elapsed, "test_loss": test_loss,
                                 "test_accuracy": test_accuracy}
        if members is not None:
            entry["member_accuracy"] = members
        evals.append(entry)
        if to_target is None and target_accuracy is not None and test_accuracy >= target_accuracy:
            to_target = {"step": step, "time": elapsed}

    record_eval(0)
    step = 0
    while (max_steps is None or step < max_steps) and (budget.seconds is None or elapsed < budget.seconds):
        batch = next(stream)
        if on_batch is not None:
            on_batch(step, batch)
        sync()
        start = time.perf_counter()
        loss = stepper.step(batch)
        sync()
        took = time.perf_counter() - start
        step += 1
        elapsed += took
        step_times.append(took)
        value = float(loss.mean())
        losses.append(value)
        times.append(elapsed)
        if progress is not None:
            progress(step, max_steps)
        if not math.isfinite(value) or not stepper.finite():
            diverged = True
            break
        if step % eval_every == 0:
            record_eval(step)
    if not diverged and evals[-1]["step"] != step:
        record_eval(step)
    return {"steps": step, "losses": losses, "times": times, "evals": evals, "diverged": diverged,
            "to_target": to_target, **_step_time_summary(step_times), "step_times": step_times}


class FunctionalStepper(Stepper):
    """One fprecond transform on one set of parameters (see the module docstring)."""

    def __init__(self, task: Task, method: str, settings: dict[str, Any], seed: int,
                 example_inputs: torch.Tensor, device: torch.device) -> None:
        torch.manual_seed(seed)
        module = task.build().to(device=device, dtype=torch.float32)
        self.task, self.device = task, device
        self.model = task.model(module)
        self.params = self.model.params()
        self.transform = build_transform(method, self.model, example_inputs, settings)
        self.state = self.transform.init(self.params)
        self.key = fp.random.key(seed).to(device)

    def step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        loss, grads = fp.loss_and_grads(self.model, self.params, batch)
        updates, self.state = self.transform.update(grads, self.state, self.params, batch=batch, key=self.key)
        self.params = fp.apply_updates(self.params, updates)
        return loss.detach()

    def evaluate(self) -> tuple[float, float, list[float] | None]:
        return (*evaluate(self.task, self.model, self.params, self.device), None)

    def finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in self.params.values())


def train_run(task: Task, method: str, settings: dict[str, Any], *, seed: int, batch_size: int, budget: Budget,
              eval_every: int, target_accuracy: float | None, device: torch.device,
              progress: Callable[[int, int | None], None] | None = None) -> dict[str, Any]:
    """Train ``method`` with ``settings`` once; return what :func:`run_loop` returns, plus
    ``skipped`` (steps the recipe's NaN guard skipped, where it counts them) and
    ``parameters`` (their number)."""
    stream = batches(task, batch_size, seed, device)
    first = next(stream)
    stepper = FunctionalStepper(task, method, settings, seed, first[0], device)
    result = run_loop(stepper, itertools.chain([first], stream), steps_per_epoch=len(task.train[1]) // batch_size,
                      budget=budget, eval_every=eval_every, target_accuracy=target_accuracy, device=device,
                      progress=progress)
    skipped = getattr(stepper.state, "skipped", None)
    result["skipped"] = None if skipped is None else int(skipped)
    result["parameters"] = sum(p.numel() for p in stepper.params.values())
    return result


def _stack(trees: list[Any]) -> Any:
    return tree_map(lambda *leaves: torch.stack(leaves), *trees)


class EnsembleStepper(Stepper):
    """``members`` initialisations (seeds ``seed, seed+1, ...``) stepped at once by
    ``torch.func.vmap`` on shared batches, each with its own key."""

    def __init__(self, task: Task, method: str, settings: dict[str, Any], seed: int, members: int,
                 example_inputs: torch.Tensor, device: torch.device) -> None:
        modules = []
        for member in range(members):
            torch.manual_seed(seed + member)
            modules.append(task.build().to(device=device, dtype=torch.float32))
        self.task, self.device, self.members = task, device, members
        self.model = task.model(modules[0])
        self.transform = build_transform(method, self.model, example_inputs, settings)
        self.params = _stack([task.model(module).params() for module in modules])
        self.state = vmap(self.transform.init)(self.params)
        self.keys = torch.stack([fp.random.key(seed + member) for member in range(members)]).to(device)
        self.batched_step = vmap(self.one_step, in_dims=(0, 0, None, 0))

    def one_step(self, params: Any, state: Any, batch: Any, key: torch.Tensor) -> tuple[Any, Any, torch.Tensor]:
        loss, grads = fp.loss_and_grads(self.model, params, batch)
        updates, state = self.transform.update(grads, state, params, batch=batch, key=key)
        return fp.apply_updates(params, updates), state, loss

    def step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        self.params, self.state, loss = self.batched_step(self.params, self.state, batch, self.keys)
        return loss.detach()

    def evaluate(self) -> tuple[float, float, list[float] | None]:
        inputs, targets = self.task.test
        with torch.no_grad():
            outputs = vmap(self.model.apply, in_dims=(0, None))(self.params, inputs.to(self.device))
            targets = targets.to(self.device)
            loss = float(vmap(self.model.loss, in_dims=(0, None))(outputs, targets).mean())
            accuracies = [float(a) for a in vmap(self.task.accuracy, in_dims=(0, None))(outputs, targets)]
        return loss, statistics.fmean(accuracies), accuracies

    def finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in self.params.values())

    def loop_step_times(self, start: tuple[Any, Any], used: list[Any]) -> list[float]:
        """Seconds per step of a Python loop over the members on the batches ``used``,
        from the ensemble's state ``start``."""
        sync = _synchronizer(self.device)
        params, state = start
        looped = [(tree_map(lambda leaf, i=i: leaf[i], params), tree_map(lambda leaf, i=i: leaf[i], state))
                  for i in range(self.members)]
        times = []
        for batch in used:
            sync()
            begin = time.perf_counter()
            for i in range(self.members):
                member_params, member_state, _ = self.one_step(*looped[i], batch, self.keys[i])
                looped[i] = (member_params, member_state)
            sync()
            times.append(time.perf_counter() - begin)
        return times


def train_ensemble(task: Task, method: str, settings: dict[str, Any], *, members: int, seed: int, batch_size: int,
                   budget: Budget, eval_every: int, target_accuracy: float | None, device: torch.device,
                   loop_steps: int = 10,
                   progress: Callable[[int, int | None], None] | None = None) -> dict[str, Any]:
    """Train ``members`` initialisations at once with ``torch.func.vmap`` (see
    :class:`EnsembleStepper`), then time a Python loop over the members on the first
    ``loop_steps`` batches from the same start, for the speed-up of the vmapped step.

    Returns what :func:`run_loop` returns (losses are the members' mean; evaluations
    carry ``member_accuracy``), plus ``members``, ``loop_step_time_s`` (one step of
    every member in a loop, median) and ``vmap_speedup`` (that over the vmapped
    step's median over the same steps).
    """
    stream = batches(task, batch_size, seed, device)
    first = next(stream)
    stepper = EnsembleStepper(task, method, settings, seed, members, first[0], device)
    start = (stepper.params, stepper.state)
    used: list[Any] = []

    def keep(step: int, batch: Any) -> None:
        if step < loop_steps:
            used.append(batch)

    result = run_loop(stepper, itertools.chain([first], stream), steps_per_epoch=len(task.train[1]) // batch_size,
                      budget=budget, eval_every=eval_every, target_accuracy=target_accuracy, device=device,
                      progress=progress, on_batch=keep)
    loop_times = stepper.loop_step_times(start, used)
    skip = min(_TIMING_SKIP, max(len(loop_times) - 1, 0))
    loop_median = statistics.median(loop_times[skip:]) if loop_times else None
    vmapped = result["step_times"][skip:len(loop_times)]
    vmap_median = statistics.median(vmapped) if vmapped else None
    result.update(members=members, skipped=None, parameters=sum(p[0].numel() for p in stepper.params.values()),
                  loop_step_time_s=loop_median,
                  vmap_speedup=None if not loop_median or not vmap_median else loop_median / vmap_median)
    return result
