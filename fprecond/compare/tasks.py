"""The training tasks ``fprecond compare`` runs: data that ships with a package or is
generated in code (no download), a model builder, and an accuracy.

- ``mlp``: scikit-learn's 8x8 digits (1437 train, 360 test), MLP 64-128-10 (ReLU).
- ``cnn``: the same digits as 1x8x8 images, two convolutions and a linear head.
- ``transformer``: reverse a random token sequence (vocabulary 16, length 12; 4096
  train, 1024 test sequences generated from a fixed seed). One pre-norm Transformer
  block (token and position embeddings, 2-head self-attention with ``nn.Linear``
  projections, LayerNorm, GELU MLP) predicts every output token; accuracy is per token.
- ``npz``: a user's own arrays (see :func:`load_npz`): an MLP on flattened float
  features, or the Transformer on integer token sequences with per-token targets.

Every task uses cross-entropy with ``reduction="mean"`` and float32 models.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Callable

import torch
from torch import nn

import fprecond as fp

__all__ = ["TASKS", "Task", "TaskError", "build_task", "load_npz", "ReverseTransformer"]

TASKS: tuple[str, ...] = ("mlp", "cnn", "transformer", "npz")


class TaskError(ValueError):
    """A task that cannot be built from the given settings or data (bad file, shapes)."""


@dataclasses.dataclass(frozen=True)
class Task:
    """A classification task: data, a model builder and how accuracy is counted.

    ``train`` and ``test`` are ``(inputs, targets)``; ``build()`` returns a fresh
    float32 module (call it after ``torch.manual_seed`` for a given initialisation).
    Accuracy is the fraction of correct argmax predictions over every target
    (every token for sequence outputs).
    """

    name: str
    description: str
    build: Callable[[], nn.Module]
    train: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]

    def model(self, module: nn.Module) -> fp.Model:
        return fp.model(module, fp.losses.cross_entropy("mean"))

    @staticmethod
    def accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Fraction of correct argmax predictions (0-dim); works per member under ``vmap``."""
        return (outputs.argmax(-1) == targets).to(outputs.dtype).mean()


class ReverseTransformer(nn.Module):
    """One pre-norm Transformer block over token sequences: ``(N, T)`` ints -> ``(N, T, V)``.

    The attention projections are ``nn.Linear`` layers and the attention itself
    explicit matmuls, so curvature methods see every weight matrix as a layer.
    """

    def __init__(self, vocab: int, length: int, dim: int = 32, heads: int = 2, hidden: int = 64) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"ReverseTransformer: dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.tokens = nn.Embedding(vocab, dim)
        self.positions = nn.Embedding(length, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.project = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)
        self.norm3 = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[-1]
        # Positions expanded to the tokens' shape: every layer then sees one row per example.
        positions = torch.arange(length, device=tokens.device).expand(tokens.shape)
        x = self.tokens(tokens) + self.positions(positions)
        h = self.norm1(x)
        *batch, _, dim = h.shape
        split = (*batch, length, self.heads, dim // self.heads)
        q, k, v = (layer(h).reshape(split).transpose(-2, -3) for layer in (self.query, self.key, self.value))
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dim // self.heads), dim=-1)
        attended = (weights @ v).transpose(-2, -3).reshape(*batch, length, dim)
        x = x + self.project(attended)
        x = x + self.down(nn.functional.gelu(self.up(self.norm2(x))))
        return self.head(self.norm3(x))


def _digits_task(name: str) -> Task:
    from fprecond.datasets import digits

    (train_x, train_y), (test_x, test_y) = digits()
    if name == "mlp":
        return Task("mlp", "MLP 64-128-10 (ReLU) on scikit-learn digits",
                    lambda: nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)),
                    (train_x, train_y), (test_x, test_y))

    def cnn() -> nn.Module:
        return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1),
                             nn.ReLU(), nn.Flatten(), nn.Linear(32 * 4 * 4, 10))

    images = (train_x.reshape(-1, 1, 8, 8), test_x.reshape(-1, 1, 8, 8))
    return Task("cnn", "CNN conv 1-16-32 + linear on scikit-learn digits (1x8x8)", cnn,
                (images[0], train_y), (images[1], test_y))


def _reverse_task(train_size: int = 4096, test_size: int = 1024, vocab: int = 16, length: int = 12) -> Task:
    generator = torch.Generator().manual_seed(1234)
    tokens = torch.randint(0, vocab, (train_size + test_size, length), generator=generator)
    targets = tokens.flip(-1)
    return Task("transformer", f"Transformer (1 block, d=32, 2 heads) reversing sequences of {length} tokens "
                               f"from {vocab}", lambda: ReverseTransformer(vocab, length),
                (tokens[:train_size], targets[:train_size]), (tokens[train_size:], targets[train_size:]))


def _first_key(arrays: dict[str, object], names: tuple[str, ...]) -> str | None:
    return next((name for name in names if name in arrays), None)


def load_npz(path: str, test_fraction: float = 0.2
             ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Read ``path`` (numpy ``.npz``): ``inputs`` (or ``x``) and ``targets`` (or ``y``),
    optionally ``test_inputs``/``test_targets`` (or ``x_test``/``y_test``); without a
    test split the last ``test_fraction`` of the examples (after a seeded shuffle) is
    held out. Targets are integer class labels.

    Raises:
        TaskError: naming the file and what is wrong with it.
    """
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except FileNotFoundError:
        raise TaskError(f"data file {path!r} does not exist") from None
    except Exception as error:  # numpy raises several types for a file that is not an .npz
        raise TaskError(f"cannot read data file {path!r}: {type(error).__name__}: {error}") from None
    keys = {
        "inputs": _first_key(arrays, ("inputs", "x")),
        "targets": _first_key(arrays, ("targets", "y")),
        "test_inputs": _first_key(arrays, ("test_inputs", "x_test")),
        "test_targets": _first_key(arrays, ("test_targets", "y_test")),
    }
    if keys["inputs"] is None or keys["targets"] is None:
        raise TaskError(f"data file {path!r} needs arrays 'inputs' and 'targets' (or 'x' and 'y'); "
                        f"it has {sorted(arrays)}")
    if (keys["test_inputs"] is None) != (keys["test_targets"] is None):
        raise TaskError(f"data file {path!r}: give both test inputs and test targets, or neither")
    tensors = {role: torch.as_tensor(arrays[name]) for role, name in keys.items() if name is not None}
    for role, tensor in tensors.items():
        if role.endswith("targets") and (tensor.dtype.is_floating_point or tensor.dtype.is_complex
                                         or tensor.dtype == torch.bool):
            raise TaskError(f"data file {path!r}: {keys[role]!r} must hold integer class labels, got {tensor.dtype}")
        if role.endswith("targets") and tensor.numel() and int(tensor.min()) < 0:
            raise TaskError(f"data file {path!r}: {keys[role]!r} has negative class labels")
    for prefix in ("", "test_"):
        if prefix + "inputs" not in tensors:
            continue
        inputs, targets = tensors[prefix + "inputs"], tensors[prefix + "targets"]
        if inputs.shape[0] != targets.shape[0] or inputs.shape[0] == 0:
            raise TaskError(f"data file {path!r}: {keys[prefix + 'inputs']!r} has {inputs.shape[0]} examples and "
                            f"{keys[prefix + 'targets']!r} {targets.shape[0]}; they must match and be non-empty")
    if "test_inputs" in tensors and tensors["test_inputs"].shape[1:] != tensors["inputs"].shape[1:]:
        raise TaskError(f"data file {path!r}: test inputs have shape {tuple(tensors['test_inputs'].shape[1:])} per "
                        f"example, train inputs {tuple(tensors['inputs'].shape[1:])}")
    inputs, targets = tensors["inputs"], tensors["targets"].long()
    if "test_inputs" in tensors:
        return (inputs, targets), (tensors["test_inputs"], tensors["test_targets"].long())
    order = torch.randperm(len(targets), generator=torch.Generator().manual_seed(0))
    cut = max(1, int(round(len(targets) * (1 - test_fraction))))
    if cut >= len(targets):
        raise TaskError(f"data file {path!r}: {len(targets)} examples are too few to hold out a test split")
    return (inputs[order[:cut]], targets[order[:cut]]), (inputs[order[cut:]], targets[order[cut:]])


def _npz_task(path: str) -> Task:
    (train_x, train_y), (test_x, test_y) = load_npz(path)
    classes = int(max(train_y.max(), test_y.max())) + 1
    if train_x.dtype.is_floating_point:
        features = math.prod(train_x.shape[1:])
        if train_y.ndim != 1:
            raise TaskError(f"data file {path!r}: float inputs take one class label per example, targets have "
                            f"shape {tuple(train_y.shape)}")

        def mlp() -> nn.Module:
            return nn.Sequential(nn.Flatten(), nn.Linear(features, 128), nn.ReLU(), nn.Linear(128, classes))

        return Task("npz", f"MLP {features}-128-{classes} (ReLU) on {Path(path).name}", mlp,
                    (train_x.float(), train_y), (test_x.float(), test_y))
    if train_x.dtype.is_complex or train_x.dtype == torch.bool:
        raise TaskError(f"data file {path!r}: inputs must be float features or integer tokens, got {train_x.dtype}")
    if train_x.ndim != 2 or train_y.shape != train_x.shape:
        raise TaskError(f"data file {path!r}: integer inputs are token sequences (N, T) with one target per token; "
                        f"got inputs {tuple(train_x.shape)} and targets {tuple(train_y.shape)}")
    if int(min(train_x.min(), test_x.min())) < 0:
        raise TaskError(f"data file {path!r}: token ids must be non-negative")
    vocab = int(max(train_x.max(), test_x.max())) + 1
    length = train_x.shape[1]

    def transformer() -> nn.Module:
        module = ReverseTransformer(max(vocab, classes), length)
        module.head = nn.Linear(module.head.in_features, classes)
        return module

    return Task("npz", f"Transformer (1 block) on token sequences of {length} from {Path(path).name}", transformer,
                (train_x.long(), train_y), (test_x.long(), test_y))


def build_task(name: str, data: str | None = None) -> Task:
    """The task ``name`` (one of :data:`TASKS`); ``data`` is the ``.npz`` path for ``npz``.

    Raises:
        TaskError: unknown task, a missing or unreadable data file, or shapes that do not fit.
    """
    if name not in TASKS:
        raise TaskError(f"unknown workload {name!r}; choose from {', '.join(TASKS)}")
    if name == "npz":
        if data is None:
            raise TaskError("workload 'npz' needs --data PATH (an .npz file with inputs and targets)")
        return _npz_task(data)
    if data is not None:
        raise TaskError(f"--data is only read by the 'npz' workload, not by {name!r}")
    if name == "transformer":
        return _reverse_task()
    return _digits_task(name)
