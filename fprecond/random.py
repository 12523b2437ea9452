"""Explicit, counter-based random numbers from integer keys.

A key is an int64 tensor of shape ``(2,)`` holding two 32-bit words. Every draw
is a pure function of ``(key, shape)``: the words and a counter per entry go
through a keyed integer hash (the "lowbias32" finaliser, applied in rounds),
computed with int64 tensor ops only. Hence draws

- are reproducible on every device and under ``torch.compile``,
- work under ``torch.func.vmap`` with its default ``randomness="error"`` (no
  random op is called), and ``vmap`` over a batch of keys equals a loop over them,
- never touch the global generator of ``torch.manual_seed``.

Multiplications are split into 16-bit halves so no intermediate overflows int64.

Example::

    k = key(0)
    k_init, k_data = split(k)           # two independent keys
    x = normal(k_data, (128, 10))
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = [
    "key",
    "split",
    "fold_in",
    "random_bits",
    "uniform",
    "normal",
    "rademacher",
    "categorical",
]

_MASK32 = 0xFFFFFFFF
_MUL1 = 0x7FEB352D
_MUL2 = 0x846CA68B
_GOLDEN = 0x9E3779B9  # domain separation between the two key words
_SPLIT_DOMAIN = 0x5BD1E995


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """``(x * constant) mod 2**32`` for ``x`` in [0, 2**32), without int64 overflow."""
    low, high = constant & 0xFFFF, constant >> 16
    return (x * low + (((x * high) & 0xFFFF) << 16)) & _MASK32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit mixing function (C. Wellons' "lowbias32")."""
    x = x ^ (x >> 16)
    x = _mul32(x, _MUL1)
    x = x ^ (x >> 15)
    x = _mul32(x, _MUL2)
    return x ^ (x >> 16)


def _check_key(k: torch.Tensor) -> None:
    if not isinstance(k, torch.Tensor) or k.dtype != torch.int64 or k.shape[-1:] != (2,):
        shape = tuple(k.shape) if isinstance(k, torch.Tensor) else type(k).__name__
        raise TypeError(f"expected a key (int64 tensor of shape (2,), from fprecond.random.key), got {shape}")


def _keyed_hash(k: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """32-bit words from counters in [0, 2**32) under key ``k``: three keyed rounds."""
    k0, k1 = k[..., 0], k[..., 1]
    x = _hash32(counter ^ k0)
    x = _hash32(x ^ k1)
    return _hash32((x + (k0 ^ _GOLDEN)) & _MASK32)


def key(seed: int | torch.Tensor) -> torch.Tensor:
    """A key from an integer seed (a Python int, or an integer tensor for ``vmap`` over seeds)."""
    seed_tensor = torch.as_tensor(seed, dtype=torch.int64)
    low = seed_tensor & _MASK32
    high = (seed_tensor >> 32) & _MASK32
    # The constants keep seed 0 away from the hash's fixed point at zero.
    word0 = _hash32(_hash32(low ^ _SPLIT_DOMAIN) ^ high)
    word1 = _hash32(_hash32(high ^ _GOLDEN) ^ word0)
    return torch.stack([word0, word1], dim=-1)


def split(k: torch.Tensor, num: int = 2) -> torch.Tensor:
    """``num`` independent keys from ``k``, as a ``(num, 2)`` tensor (unpack with ``a, b = split(k)``)."""
    _check_key(k)
    counters = torch.arange(2 * num, dtype=torch.int64, device=k.device)
    words = _keyed_hash(k ^ _SPLIT_DOMAIN, counters)
    return words.reshape(num, 2)


def fold_in(k: torch.Tensor, data: int | torch.Tensor) -> torch.Tensor:
    """A new key from ``k`` and an integer ``data`` (e.g. the step count or a rank)."""
    _check_key(k)
    value = torch.as_tensor(data, dtype=torch.int64, device=k.device) & _MASK32
    counters = torch.stack([2 * value, 2 * value + 1]) & _MASK32
    return _keyed_hash(k, counters)


def _numel(shape: Sequence[int]) -> int:
    # A list, not a generator: torch.compile cannot pass a generator to math.prod.
    return math.prod([int(s) for s in shape])


def random_bits(k: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Uniform 32-bit words (int64 tensor with entries in ``[0, 2**32)``) of ``shape``."""
    _check_key(k)
    counters = torch.arange(_numel(shape), dtype=torch.int64, device=k.device)
    return _keyed_hash(k, counters).reshape(tuple(shape))


def _unit_interval(k: torch.Tensor, shape: Sequence[int], dtype: torch.dtype, open_low: bool) -> torch.Tensor:
    """Uniform draws in [0, 1) (or (0, 1) with ``open_low``) with the dtype's full mantissa."""
    if dtype == torch.float64:
        words = random_bits(k, (2, *shape))
        integer = (words[0] >> 5) * (1 << 26) + (words[1] >> 6)  # 53 random bits
        scale_bits = 53
    else:
        integer = random_bits(k, shape) >> 8  # 24 random bits, exact in float32
        scale_bits = 24
    value = integer.to(torch.float64 if dtype == torch.float64 else torch.float32)
    if open_low:
        value = value + 0.5
    return (value * 2.0 ** (-scale_bits)).to(dtype)


def uniform(k: torch.Tensor, shape: Sequence[int], dtype: torch.dtype = torch.float32,
            low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    """Uniform draws in ``[low, high)``."""
    return low + (high - low) * _unit_interval(k, shape, dtype, open_low=False)


def normal(k: torch.Tensor, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal draws (Box-Muller on two uniform draws per entry)."""
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    u = _unit_interval(k, (2, *shape), compute, open_low=True)
    radius = torch.sqrt(-2.0 * torch.log(u[0]))
    return (radius * torch.cos(2.0 * math.pi * u[1])).to(dtype)


def rademacher(k: torch.Tensor, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Draws of ±1 with equal probability."""
    bit = (random_bits(k, shape) >> 16) & 1  # a middle bit of the hash
    return (2 * bit - 1).to(dtype)


def categorical(k: torch.Tensor, logits: torch.Tensor, samples: int | None = None) -> torch.Tensor:
    """Class indices drawn from ``softmax(logits)`` over the last dimension (Gumbel-max trick).

    Args:
        logits: unnormalised log-probabilities of shape ``(..., C)``.
        samples: when given, draw that many independent samples per row.

    Returns:
        int64 indices of shape ``logits.shape[:-1]``, or ``(samples, *logits.shape[:-1])``.
    """
    shape = tuple(logits.shape) if samples is None else (samples, *logits.shape)
    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
    u = _unit_interval(k, shape, compute, open_low=True)
    gumbel = -torch.log(-torch.log(u))
    return torch.argmax(logits.to(compute) + gumbel, dim=-1)
