"""Losses with the pieces curvature needs: value, Hessian w.r.t. the model output,
a square-root factor of it, and targets sampled from the model's predictive.

Shapes: outputs are ``(N, C)`` or, for sequences, ``(N, T, C)``; a *loss term* is
one row ``(n, t)`` of ``C`` outputs. Writing ``ℓ_nt`` for the unreduced loss of a
term, the batch loss is

    ``L = (1/R) Σ_{n,t} ℓ_nt``

with the *reduction factor* ``R = 1`` for ``reduction="sum"``, ``R = N·T`` for
cross-entropy with ``"mean"`` and ``R = N·T·C`` for MSE with ``"mean"`` (MSE
averages over outputs too, as ``torch.nn.MSELoss`` does). ``ℓ_nt`` is
``-log softmax(f_nt)[y_nt]`` for cross-entropy and ``Σ_c (f_ntc - y_ntc)²`` for MSE.

The Hessian of ``L`` w.r.t. the outputs is block-diagonal over terms; its blocks,
their square roots and Hessian-vector products all carry the ``1/R`` factor, so
``Jᵀ H J`` is the GGN of ``L`` as reduced (the convention of
``curvlinops-for-pytorch``).
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import Literal

import torch

from fprecond import random as fprandom
from fprecond._validation import check_choice, inspectable_values

__all__ = ["Loss", "CrossEntropyLoss", "MSELoss", "cross_entropy", "mse", "Reduction"]

Reduction = Literal["mean", "sum"]


@dataclasses.dataclass(frozen=True)
class Loss(abc.ABC):
    """A loss ``L(outputs, targets)`` with its output-space curvature (see module docstring)."""

    reduction: Reduction = "mean"

    def __post_init__(self) -> None:
        check_choice(type(self).__name__, "reduction", self.reduction, ("mean", "sum"))

    # ---- values -----------------------------------------------------------------------------
    @abc.abstractmethod
    def term_losses(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Unreduced ``ℓ_nt``, shape ``outputs.shape[:-1]``."""

    @abc.abstractmethod
    def reduction_factor(self, outputs: torch.Tensor) -> int:
        """``R`` with ``L = (1/R) Σ ℓ_nt`` (a Python int, from shapes only)."""

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The batch loss ``L`` (0-dim)."""
        self.check(outputs, targets)
        return self.term_losses(outputs, targets).sum() / self.reduction_factor(outputs)

    def per_example(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Each example's loss on its own, under the same reduction, shape ``(N,)``.

        ``L`` is their mean (``"mean"``) or their sum (``"sum"``).
        """
        self.check(outputs, targets)
        terms = self.term_losses(outputs, targets).reshape(outputs.shape[0], -1).sum(dim=1)
        return terms / self.reduction_factor(outputs[:1])

    @abc.abstractmethod
    def output_gradient(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``∂L/∂f`` in closed form (carries ``1/R``), shaped like the outputs; targets may have
        extra leading dimensions (e.g. Monte-Carlo samples), which the result then has too."""

    # ---- curvature in output space ---------------------------------------------------------
    @abc.abstractmethod
    def hessian(self, outputs: torch.Tensor) -> torch.Tensor:
        """Blocks ``∂²L/∂f_nt²``, shape ``(*outputs.shape, C)``."""

    @abc.abstractmethod
    def hessian_sqrt(self, outputs: torch.Tensor) -> torch.Tensor:
        """``S`` with ``S_nt S_ntᵀ = ∂²L/∂f_nt²``, shape ``(*outputs.shape, C)`` (last dim: columns)."""

    @abc.abstractmethod
    def hessian_vp(self, outputs: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
        """``(∂²L/∂f²) v`` for ``v`` shaped like the outputs, without forming the blocks."""

    # ---- sampling ---------------------------------------------------------------------------
    @abc.abstractmethod
    def sample_targets(self, outputs: torch.Tensor, key: torch.Tensor, samples: int | None = None) -> torch.Tensor:
        """Targets drawn from the model's predictive distribution at ``outputs``.

        The predictive is the one whose negative log-likelihood is ``ℓ`` (up to a
        constant), so the expected outer product of sampled gradients is the Fisher.
        With ``samples`` given, a leading dimension of that size is added.
        """

    # ---- checks -----------------------------------------------------------------------------
    def check(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        """Raise ``ValueError`` for outputs/targets that do not fit this loss."""
        if outputs.dim() not in (2, 3):
            raise ValueError(
                f"{type(self).__name__}: outputs must have shape (N, C) or (N, T, C), got {tuple(outputs.shape)}"
            )


@dataclasses.dataclass(frozen=True)
class CrossEntropyLoss(Loss):
    """Softmax cross-entropy on logits with integer class targets ``(N,)`` or ``(N, T)``.

    Output Hessian of a term: ``diag(p) - p pᵀ`` with ``p = softmax(f)``; its square
    root ``S = diag(√p) - p √pᵀ`` (``S Sᵀ = diag(p) - p pᵀ`` because ``Σ p = 1``).
    """

    def term_losses(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        log_probs = torch.log_softmax(outputs, dim=-1)
        return -torch.gather(log_probs, -1, targets.long().unsqueeze(-1)).squeeze(-1)

    def reduction_factor(self, outputs: torch.Tensor) -> int:
        return math.prod(outputs.shape[:-1]) if self.reduction == "mean" else 1

    def output_gradient(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(outputs, dim=-1)
        one_hot = torch.nn.functional.one_hot(targets.long(), outputs.shape[-1]).to(outputs.dtype)
        return (probs - one_hot) / self.reduction_factor(outputs)

    def hessian(self, outputs: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(outputs, dim=-1)
        return (torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)) / self.reduction_factor(outputs)

    def hessian_sqrt(self, outputs: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(outputs, dim=-1)
        root_p = torch.sqrt(p)
        factor = torch.diag_embed(root_p) - p.unsqueeze(-1) * root_p.unsqueeze(-2)
        return factor / math.sqrt(self.reduction_factor(outputs))

    def hessian_vp(self, outputs: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(outputs, dim=-1)
        product = p * vector - p * (p * vector).sum(dim=-1, keepdim=True)
        return product / self.reduction_factor(outputs)

    def sample_targets(self, outputs: torch.Tensor, key: torch.Tensor, samples: int | None = None) -> torch.Tensor:
        return fprandom.categorical(key, outputs.detach(), samples=samples)

    def check(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        super().check(outputs, targets)
        if targets.shape != outputs.shape[:-1]:
            raise ValueError(
                f"cross_entropy: targets must have shape {tuple(outputs.shape[:-1])} (class indices) "
                f"for outputs of shape {tuple(outputs.shape)}, got {tuple(targets.shape)}"
            )
        if targets.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
            raise ValueError(f"cross_entropy: targets must be integer class indices, got dtype {targets.dtype}")
        values = inspectable_values(targets)
        if values is not None and values.numel():
            classes = outputs.shape[-1]
            low, high = int(values.min()), int(values.max())
            if low < 0 or high >= classes:
                bad = low if low < 0 else high
                raise ValueError(f"cross_entropy: class index {bad} is out of range for outputs with {classes} "
                                 f"classes (targets must lie in [0, {classes}))")


@dataclasses.dataclass(frozen=True)
class MSELoss(Loss):
    """Squared error ``Σ_c (f_c - y_c)²`` per term, targets shaped like the outputs.

    Output Hessian of a term: ``2 I``. The matching predictive is
    ``N(f, ½ I)`` (its negative log-likelihood is ``(f - y)²`` up to a constant).
    Written as a plain mean of squares, not ``F.mse_loss``, which breaks
    forward-over-reverse differentiation in torch 2.x.
    """

    def term_losses(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return ((outputs - targets) ** 2).sum(dim=-1)

    def reduction_factor(self, outputs: torch.Tensor) -> int:
        return math.prod(outputs.shape) if self.reduction == "mean" else 1

    def output_gradient(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return (2.0 / self.reduction_factor(outputs)) * (outputs - targets)

    def hessian(self, outputs: torch.Tensor) -> torch.Tensor:
        eye = torch.eye(outputs.shape[-1], dtype=outputs.dtype, device=outputs.device)
        return (2.0 / self.reduction_factor(outputs)) * eye.expand(*outputs.shape, outputs.shape[-1])

    def hessian_sqrt(self, outputs: torch.Tensor) -> torch.Tensor:
        eye = torch.eye(outputs.shape[-1], dtype=outputs.dtype, device=outputs.device)
        return math.sqrt(2.0 / self.reduction_factor(outputs)) * eye.expand(*outputs.shape, outputs.shape[-1])

    def hessian_vp(self, outputs: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
        return (2.0 / self.reduction_factor(outputs)) * vector

    def sample_targets(self, outputs: torch.Tensor, key: torch.Tensor, samples: int | None = None) -> torch.Tensor:
        shape = tuple(outputs.shape) if samples is None else (samples, *outputs.shape)
        noise = fprandom.normal(key, shape, dtype=outputs.dtype)
        return outputs.detach() + math.sqrt(0.5) * noise

    def check(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        super().check(outputs, targets)
        if targets.shape != outputs.shape:
            raise ValueError(
                f"mse: targets must have the outputs' shape {tuple(outputs.shape)}, got {tuple(targets.shape)}"
            )
        if not targets.is_floating_point():
            raise ValueError(f"mse: targets must be floating point, got dtype {targets.dtype}")


def cross_entropy(reduction: Reduction = "mean") -> CrossEntropyLoss:
    """Softmax cross-entropy over the last output dimension (see :class:`CrossEntropyLoss`)."""
    return CrossEntropyLoss(reduction=reduction)


def mse(reduction: Reduction = "mean") -> MSELoss:
    """Squared error, averaged over examples, positions and outputs for ``"mean"`` (see :class:`MSELoss`)."""
    return MSELoss(reduction=reduction)
