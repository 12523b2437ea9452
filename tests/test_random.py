"""Counter-based random draws: distributions, independence, purity under vmap."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import vmap

import fprecond.random as fr

N = 200_000


def _within(value: float, expected: float, standard_error: float, k: float = 5.0) -> bool:
    return abs(value - expected) <= k * standard_error


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_uniform_moments_and_range(dtype):
    u = fr.uniform(fr.key(0), (N,), dtype=dtype)
    assert u.dtype == dtype and u.min() >= 0 and u.max() < 1
    assert _within(u.mean().item(), 0.5, math.sqrt(1 / 12 / N))
    assert _within(u.var().item(), 1 / 12, math.sqrt(1 / 180 / N))
    counts = torch.histc(u.double(), bins=20, min=0, max=1)
    chi2 = (((counts - N / 20) ** 2) / (N / 20)).sum().item()
    assert chi2 < 43.8  # 99.9% quantile of chi-square with 19 degrees of freedom


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_normal_moments(dtype):
    z = fr.normal(fr.key(1), (N,), dtype=dtype).double()
    assert _within(z.mean().item(), 0.0, math.sqrt(1 / N))
    assert _within(z.var().item(), 1.0, math.sqrt(2 / N))
    assert _within((z ** 3).mean().item(), 0.0, math.sqrt(15 / N))
    assert _within((z ** 4).mean().item(), 3.0, math.sqrt(96 / N))
    # Tail mass beyond 2 sigma: 4.55%.
    tail = (z.abs() > 2).double().mean().item()
    assert _within(tail, 0.0455, math.sqrt(0.0455 * 0.9545 / N))


def test_rademacher_is_balanced_and_uncorrelated():
    r = fr.rademacher(fr.key(2), (N,))
    assert set(r.unique().tolist()) == {-1.0, 1.0}
    assert _within(r.mean().item(), 0.0, math.sqrt(1 / N))
    assert _within((r[1:] * r[:-1]).mean().item(), 0.0, math.sqrt(1 / N))


def test_categorical_frequencies_chi_square():
    probabilities = torch.tensor([0.05, 0.15, 0.3, 0.5])
    draws = fr.categorical(fr.key(3), torch.log(probabilities).expand(N, 4))
    counts = torch.bincount(draws, minlength=4).double()
    expected = probabilities.double() * N
    chi2 = (((counts - expected) ** 2) / expected).sum().item()
    assert chi2 < 16.3  # 99.9% quantile, 3 degrees of freedom


def test_split_keys_give_independent_streams():
    a, b = fr.split(fr.key(4))
    x, y = fr.normal(a, (N,)), fr.normal(b, (N,))
    correlation = torch.corrcoef(torch.stack([x, y]))[0, 1].item()
    assert abs(correlation) < 5 / math.sqrt(N)
    assert not torch.equal(a, b)
    # Neighbouring seeds and folded-in steps are decorrelated too.
    for other in (fr.normal(fr.key(5), (N,)), fr.normal(fr.fold_in(fr.key(4), 1), (N,))):
        assert abs(torch.corrcoef(torch.stack([fr.normal(fr.key(4), (N,)), other]))[0, 1].item()) < 5 / math.sqrt(N)


def test_draws_are_deterministic_and_keys_validated():
    assert torch.equal(fr.normal(fr.key(7), (10,)), fr.normal(fr.key(7), (10,)))
    assert not torch.equal(fr.normal(fr.key(7), (10,)), fr.normal(fr.key(8), (10,)))
    with pytest.raises(TypeError, match="key"):
        fr.normal(torch.zeros(2), (3,))


@pytest.mark.parametrize("draw", ["uniform", "normal", "rademacher", "categorical", "split", "fold_in"])
def test_vmap_over_keys_equals_loop(draw):
    keys = fr.split(fr.key(9), 3)
    logits = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))

    def one(k):
        if draw == "categorical":
            return fr.categorical(k, logits, samples=2)
        if draw == "split":
            return fr.split(k, 3)
        if draw == "fold_in":
            return fr.fold_in(k, 12)
        return getattr(fr, draw)(k, (6, 2))

    batched = vmap(one)(keys)  # default randomness="error": no random op is used
    looped = torch.stack([one(k) for k in keys])
    assert torch.equal(batched, looped)
    assert torch.equal(vmap(fr.key)(torch.arange(3)), torch.stack([fr.key(i) for i in range(3)]))
