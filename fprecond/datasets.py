"""Small datasets that ship with a package (no download), as float32 tensors."""

from __future__ import annotations

import torch

__all__ = ["digits"]


def digits(test_fraction: float = 0.2, seed: int = 0) -> tuple[tuple[torch.Tensor, torch.Tensor],
                                                               tuple[torch.Tensor, torch.Tensor]]:
    """scikit-learn's 8x8 handwritten digits: inputs ``(N, 64)`` scaled to [0, 1], labels ``(N,)``.

    Returns ``((train_inputs, train_labels), (test_inputs, test_labels))`` with a
    fixed, seeded split.
    """
    try:
        from sklearn.datasets import load_digits  # type: ignore[import-untyped]
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("the digits dataset needs scikit-learn: pip install 'fprecond[examples]'") from error
    data = load_digits()
    inputs = torch.as_tensor(data.data, dtype=torch.float32) / 16.0
    labels = torch.as_tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    cut = int(round(len(labels) * (1 - test_fraction)))
    train, test = order[:cut], order[cut:]
    return (inputs[train], labels[train]), (inputs[test], labels[test])
