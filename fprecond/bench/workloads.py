"""The models and batches the benchmarks run on.

Each workload is a model in float32 with a batch of random data fixed by a seed,
cross-entropy over 10 classes with ``reduction="mean"``. ``quick`` gives tiny
versions of the same architectures for smoke tests.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import nn

__all__ = ["MODELS", "Workload", "workload", "largest_layer_size"]

MODELS: tuple[str, ...] = ("mlp", "cnn")


@dataclasses.dataclass(frozen=True)
class Workload:
    """A model and a batch of random float32 data. ``shares_weights``: has layers that
    apply one weight at many positions (convolutions), which changes which Hessian
    structures are defined or affordable."""

    name: str
    description: str
    module: nn.Module
    batch: tuple[torch.Tensor, torch.Tensor]
    shares_weights: bool


# A builder returns (description without the batch size, module, input shape, default batch size).
_Built = tuple[str, nn.Module, tuple[int, ...], int]


def _mlp(quick: bool) -> _Built:
    sizes = (64, 32, 10) if quick else (784, 512, 512, 10)
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    return f"MLP {'-'.join(map(str, sizes))} (ReLU)", nn.Sequential(*layers[:-1]), (sizes[0],), 16 if quick else 128


def _cnn(quick: bool) -> _Built:
    width, side, batch = ((4, 8), 8, 8) if quick else ((16, 32), 32, 64)
    narrow, wide = width
    module = nn.Sequential(
        nn.Conv2d(3, narrow, 3, padding=1), nn.ReLU(),
        nn.Conv2d(narrow, wide, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(wide, wide, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(wide * (side // 4) ** 2, 10),
    )
    description = f"CNN 3 conv ({narrow}-{wide}-{wide} channels) + linear on 3x{side}x{side}"
    return description, module, (3, side, side), batch


_BUILDERS: dict[str, Callable[[bool], _Built]] = {"mlp": _mlp, "cnn": _cnn}


def workload(name: str, quick: bool = False, seed: int = 0, device: str = "cpu",
             batch_size: int | None = None) -> Workload:
    """Build workload ``name`` (``"mlp"`` or ``"cnn"``) in float32 on ``device``, with
    parameters and data fixed by ``seed``; cross-entropy over 10 classes, mean.

    ``batch_size``: examples in the batch; ``None`` takes the workload's default
    (MLP 128, CNN 64; 16 and 8 with ``quick``).
    """
    if name not in _BUILDERS:
        raise ValueError(f"workload: name must be one of {', '.join(_BUILDERS)}, got {name!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                   or batch_size < 1):
        raise ValueError(f"workload: batch_size must be a positive int or None, got {batch_size!r}")
    # float32 explicitly: the default dtype may have been changed by the caller (tests use float64).
    torch.manual_seed(seed)
    description, module, input_shape, default_size = _BUILDERS[name](quick)
    size = default_size if batch_size is None else batch_size
    module = module.to(device=device, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed + 1)
    inputs = torch.randn((size, *input_shape), generator=generator, dtype=torch.float32)
    targets = torch.randint(0, 10, (size,), generator=generator, dtype=torch.int64)
    return Workload(name, f"{description}, batch {size}, cross-entropy mean", module,
                    (inputs.to(device), targets.to(device)),
                    shares_weights=any(isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) for m in module.modules()))


def largest_layer_size(module: nn.Module) -> int:
    """The most parameters any one submodule holds directly (weight and bias of one layer)."""
    return max((sum(p.numel() for p in m.parameters(recurse=False)) for m in module.modules()), default=0)
