"""A short demonstration: train a small MLP on scikit-learn's digits with a chain."""

from __future__ import annotations

import time

import torch
from torch import nn

import fprecond as fp
from fprecond.datasets import digits


def run_demo(epochs: int = 5, batch_size: int = 64, seed: int = 0) -> list[float]:
    """Train ``64-64-10`` on digits with ``apply_if_finite(clip → Adam → lr)``; print and
    return the mean training loss of each epoch."""
    torch.manual_seed(seed)
    (train_x, train_y), (test_x, test_y) = digits(seed=seed)
    module = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
    md = fp.model(module, fp.losses.cross_entropy())
    optimizer = fp.apply_if_finite(
        fp.named_chain(
            ("clip", fp.clip_by_global_norm(5.0)),
            ("adam", fp.scale_by_adam()),
            ("lr", fp.scale_by_learning_rate(fp.schedules.cosine_decay_schedule(1e-2, epochs * 23))),
        )
    )
    params = md.params()
    state = optimizer.init(params)

    @torch.no_grad()
    def accuracy(p) -> float:
        return (md.apply(p, test_x).argmax(-1) == test_y).double().mean().item()

    print(f"fprecond {fp.__version__} demo: MLP 64-64-10 on digits ({len(train_y)} train, {len(test_y)} test), "
          f"chain = apply_if_finite(clip_by_global_norm -> scale_by_adam -> cosine learning rate)")
    print(f"epoch 0: test accuracy {accuracy(params):.3f}")
    losses = []
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(seed + epoch))
        total, count = 0.0, 0
        for first in range(0, len(order), batch_size):
            index = order[first:first + batch_size]
            loss, grads = fp.loss_and_grads(md, params, (train_x[index], train_y[index]))
            updates, state = optimizer.update(grads, state, params)
            params = fp.apply_updates(params, updates)
            total += loss.item() * len(index)
            count += len(index)
        losses.append(total / count)
        print(f"epoch {epoch}: train loss {losses[-1]:.4f}, test accuracy {accuracy(params):.3f}, "
              f"{time.perf_counter() - start:.1f} s")
    print(f"skipped steps: {int(state.skipped)}")
    return losses
