"""The Laplace posterior: a Gaussian around the trained parameters with a curvature precision.

Laplace approximation (MacKay 1992; Ritter et al. 2018; Daxberger et al. 2021):
with a prior ``θ ~ N(0, P₀⁻¹)`` and the negative log-likelihood of the data set
``-log p(D | θ)``, the posterior around a maximum a posteriori ``θ*`` is

    ``p(θ | D) ≈ N(θ*, P⁻¹)``,  ``P = s · C + P₀``,

with ``C`` the curvature of the **summed** loss ``Σ_n ℓ_n`` over every training
example (:func:`fprecond.curvature.dataset_curvature`: any kind, in ``full``,
``layer``, ``kron``, ``unit`` or ``diag`` structure) and ``s`` the factor that
turns the loss into the log-likelihood, divided by the temperature ``T``:

- cross-entropy (classification): ``ℓ_n = -log p(y_n | f_n)``, so ``s = 1/T``;
- squared error (regression, ``ℓ_n = Σ_c (f_nc - y_nc)²``) with a Gaussian
  likelihood ``N(y | f, σ²)``: ``-log p = ℓ / (2σ²) + const``, so ``s = 1/(2σ²T)``
  (the squared error's GGN is ``2 Jᵀ J``; the likelihood's is ``Jᵀ J / σ²``).

``P₀ = δ I`` with one prior precision ``δ`` for all parameters, or ``δ_l`` per
*prior group*: each supported layer (weight and bias together, so a Kronecker
block keeps one ``δ_l`` and stays exact in its eigenbasis) and each other
parameter on its own (:func:`prior_groups`). These are laplace-torch's
conventions (``prior_precision``, ``temperature``, ``sigma_noise``, a zero prior
mean), except that its per-layer prior has one entry per parameter tensor.

A :class:`LaplacePosterior` holds tensors only (static metadata aside), so an
ensemble of posteriors is a posterior with stacked leaves and goes through
``torch.func.vmap``.

Last-layer and subnetwork Laplace (Kristiadi et al. 2020; Daxberger et al. 2021):
``fit_laplace(..., subset=...)`` restricts the Gaussian to a subset ``S`` of the
parameters (:mod:`fprecond.laplace.subset`), ``P = s · C_SS + P₀,S``; the other
parameters stay at their MAP values. ``mean`` still holds every parameter, the
curvature (hence ``P``, the prior groups and the prior term of the marginal
likelihood) only the subset's.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Collection, Iterable, Iterator

import torch

from fprecond._validation import check_choice, check_number
from fprecond.curvature.blocks import CurvatureBlock, DenseBlock, DiagonalBlock, KroneckerBlock, UnitBlock
from fprecond.curvature.matrix import Curvature
from fprecond.laplace.subset import resolve_subset, subset_statistics
from fprecond.losses import CrossEntropyLoss, MSELoss
from fprecond.modeling import Model, unpack_batch
from fprecond.tree import pytree_dataclass, static_field

__all__ = ["LaplacePosterior", "fit_laplace", "prior_groups", "posterior_precision", "STRUCTURES"]

Params = dict[str, torch.Tensor]
PriorGroups = tuple[tuple[str, tuple[str, ...]], ...]

#: Curvature structures a Laplace posterior can be fitted in.
STRUCTURES: tuple[str, ...] = ("full", "layer", "kron", "unit", "diag")


def prior_groups(model: Model, subset: Collection[str] | None = None) -> PriorGroups:
    """``((label, parameter names), ...)``: one group per supported layer (its weight and
    bias) and one per parameter outside supported layers, ordered by their first
    parameter in ``named_parameters`` order. A per-layer prior precision has one entry
    per group, in this order.

    With ``subset`` (parameter names), each group keeps its names inside the subset and
    groups left empty are dropped: the prior groups of a subnetwork posterior."""
    groups: list[tuple[str, tuple[str, ...]]] = [(layer.name, layer.param_names) for layer in model.layers]
    groups += [(name, (name,)) for name in model.unsupported]
    if subset is not None:
        wanted = set(subset)
        groups = [(label, tuple(name for name in names if name in wanted)) for label, names in groups]
        groups = [(label, names) for label, names in groups if names]
    order = {name: index for index, name in enumerate(model.param_names)}
    return tuple(sorted(groups, key=lambda group: order[group[1][0]]))


@pytree_dataclass
class LaplacePosterior:
    """A Laplace posterior ``N(mean, P⁻¹)`` with ``P = likelihood_scale · curvature + P₀``.

    Attributes:
        mean: the parameters it is centred on (``{name: tensor}``, the MAP estimate):
            every parameter of the model, including those outside the subset.
        curvature: the curvature ``C`` of the summed training loss at ``mean``, over
            the subset's parameters (``curvature.names``; all of them by default).
        prior_precision: ``δ``: 0-dim (one for all parameters) or ``(L,)``, one per
            entry of ``groups`` (per layer).
        loss: the summed training loss ``Σ_n ℓ_n`` at ``mean`` (0-dim).
        n_data: the number of training examples (0-dim int64).
        n_targets: the number of scalar targets (0-dim int64; the Gaussian
            likelihood's normaliser counts them).
        temperature: ``T`` (0-dim); ``T < 1`` sharpens the posterior.
        sigma_noise: the regression likelihood's noise standard deviation ``σ`` (0-dim;
            1 for classification).
        likelihood: ``"classification"`` (cross-entropy) or ``"regression"`` (squared error).
        groups: the prior groups of the subset (:func:`prior_groups`), static.
    """

    mean: Params
    curvature: Curvature
    prior_precision: torch.Tensor
    loss: torch.Tensor
    n_data: torch.Tensor
    n_targets: torch.Tensor
    temperature: torch.Tensor
    sigma_noise: torch.Tensor
    likelihood: str = static_field()
    groups: PriorGroups = static_field()

    @property
    def likelihood_scale(self) -> torch.Tensor:
        """``s`` with ``-log p(D | θ) = s · T · Σ_n ℓ_n + const``: ``1/T`` for
        classification, ``1/(2σ²T)`` for regression (see the module docstring)."""
        if self.likelihood == "regression":
            return 1.0 / (2.0 * self.sigma_noise.square() * self.temperature)
        return 1.0 / self.temperature

    @property
    def num_params(self) -> int:
        """The number of parameters the Gaussian covers (the subset's)."""
        return self.curvature.size

    @property
    def subset(self) -> tuple[str, ...]:
        """The names of the parameters the Gaussian covers, in ``named_parameters`` order;
        the others are fixed at ``mean``."""
        return self.curvature.names

    def subset_mean(self) -> Params:
        """``{name: mean[name]}`` over :attr:`subset`."""
        return {name: self.mean[name] for name in self.curvature.names}

    def with_sigma_noise(self, sigma_noise: float | torch.Tensor) -> "LaplacePosterior":
        """The same posterior with another regression noise ``σ`` (a positive number or a
        0-dim tensor; the precision's likelihood scale ``1/(2σ²T)`` follows)."""
        return dataclasses.replace(self, sigma_noise=sigma_noise_tensor(sigma_noise, self.likelihood,
                                                                   self.sigma_noise, "with_sigma_noise"))

    def with_prior_precision(self, prior_precision: float | torch.Tensor) -> "LaplacePosterior":
        """The same posterior with another prior precision (checked like :func:`fit_laplace`'s)."""
        like = next(iter(self.mean.values()))
        value = _prior_tensor(prior_precision, len(self.groups), like)
        return dataclasses.replace(self, prior_precision=value)

    def prior_per_parameter(self, prior_precision: torch.Tensor | None = None) -> Params:
        """``{name: δ of its group}`` (0-dim tensors) for ``prior_precision`` (default: the posterior's)."""
        delta = self.prior_precision if prior_precision is None else prior_precision
        if delta.dim() == 0:
            return {name: delta for name in self.curvature.names}
        return {name: delta[index] for index, (_, names) in enumerate(self.groups) for name in names}


def _prior_tensor(value: float | torch.Tensor, groups: int, like: torch.Tensor) -> torch.Tensor:
    """``value`` as a 0-dim or ``(groups,)`` tensor in ``like``'s dtype and device, checked positive."""
    owner = "laplace"
    if isinstance(value, torch.Tensor):
        if value.dim() > 1 or (value.dim() == 1 and value.shape[0] not in (1, groups)):
            raise ValueError(f"{owner}: prior_precision must be a number, a 0-dim tensor or one value per prior "
                             f"group ({groups}), got shape {tuple(value.shape)}")
        tensor = value.to(dtype=like.dtype, device=like.device)
        if tensor.dim() == 1 and tensor.shape[0] == 1 and groups != 1:
            tensor = tensor[0]
        if not bool(torch.isfinite(tensor).all()) or not bool((tensor > 0).all()):
            raise ValueError(f"{owner}: prior_precision must be finite and > 0, got {tensor.tolist()}")
        return tensor
    check_number(owner, "prior_precision", value, low=0.0, low_inclusive=False)
    return torch.tensor(float(value), dtype=like.dtype, device=like.device)


def sigma_noise_tensor(value: float | torch.Tensor, likelihood: str, like: torch.Tensor, owner: str) -> torch.Tensor:
    """``value`` as a 0-dim tensor in ``like``'s dtype and device: the regression noise ``σ``.

    Numbers are checked positive; a tensor is checked for its shape only, so that
    ``σ`` can be traced (``grad``, ``vmap``) without reading its value."""
    if likelihood != "regression":
        raise ValueError(f"{owner}: sigma_noise is the regression likelihood's noise; it is fixed at 1 for "
                         f"{likelihood}")
    if isinstance(value, torch.Tensor):
        if value.dim() != 0:
            raise ValueError(f"{owner}: sigma_noise must be a number or a 0-dim tensor, got shape "
                             f"{tuple(value.shape)}")
        return value.to(dtype=like.dtype, device=like.device)
    check_number(owner, "sigma_noise", value, low=0.0, low_inclusive=False)
    return torch.tensor(float(value), dtype=like.dtype, device=like.device)


def _likelihood_of(model: Model) -> str:
    if isinstance(model.loss, CrossEntropyLoss):
        return "classification"
    if isinstance(model.loss, MSELoss):
        return "regression"
    raise TypeError(f"laplace: the model's loss must be cross_entropy or mse, got {type(model.loss).__name__}")


def fit_laplace(model: Model, params: Params, batches: Iterable[Any], *, kind: str = "ggn", structure: str = "kron",
                prior_precision: float | torch.Tensor = 1.0, temperature: float = 1.0, sigma_noise: float = 1.0,
                approx: str = "expand", key: torch.Tensor | None = None, samples: int = 1,
                fallback: str = "error", buffers: Params | None = None,
                subset: str | Collection[str] = "all") -> LaplacePosterior:
    """Fit a Laplace posterior at ``params`` (trained to a minimum of the regularised loss).

    One pass over ``batches`` computes the curvature of the summed loss
    (:func:`fprecond.curvature.dataset_statistics`), the summed loss and the counts.
    The GGN (the default) is positive semi-definite; the Hessian can be indefinite
    at an inexact optimum, and its negative curvature is handled as described in
    :mod:`fprecond.laplace.factor`.

    With ``subset`` other than ``"all"``, only the subset's curvature blocks are
    estimated (for ``full``, one ``(|S|, |S|)`` block over the subset's ``|S|`` entries)
    and the other parameters stay at ``params``.

    Args:
        model: from :func:`fprecond.model`, with a cross-entropy (classification) or
            squared-error (regression) loss; any reduction.
        params: the trained parameters ``{name: tensor}``.
        batches: an iterable of ``(inputs, targets)``: the training data, read once.
        kind: ``"ggn"`` (default, as laplace-torch), ``"fisher"``, ``"fisher_mc"``,
            ``"empirical_fisher"`` or ``"hessian"``.
        structure: ``"kron"`` (default, Ritter et al. 2018), ``"full"``, ``"layer"``,
            ``"unit"`` or ``"diag"``.
        prior_precision: ``δ > 0``: a number or a 0-dim tensor, or a ``(L,)`` tensor
            with one value per prior group (:func:`prior_groups`).
        temperature: ``T > 0``.
        sigma_noise: ``σ > 0``, the regression noise; must be 1 for classification.
        approx, key, samples, fallback, buffers: as
            :func:`fprecond.curvature.estimate` (``key`` for ``fisher_mc``, folded
            with the batch index).
        subset: ``"all"`` (default), ``"last_layer"`` (the last supported layer's weight
            and bias; Kristiadi et al. 2020) or a collection of parameter names
            (subnetwork inference; Daxberger et al. 2021). See
            :mod:`fprecond.laplace.subset` for the blocks a subset gets.

    Returns:
        A :class:`LaplacePosterior`.
    """
    owner = "fit_laplace"
    check_choice(owner, "structure", structure, STRUCTURES)
    check_number(owner, "temperature", temperature, low=0.0, low_inclusive=False)
    check_number(owner, "sigma_noise", sigma_noise, low=0.0, low_inclusive=False)
    likelihood = _likelihood_of(model)
    if likelihood == "classification" and sigma_noise != 1.0:
        raise ValueError(f"{owner}: sigma_noise is the regression noise; it must be 1 for classification, "
                         f"got {sigma_noise}")
    model.check_params(params)
    names = resolve_subset(model, subset)
    like = next(iter(params.values()))
    groups = prior_groups(model, None if names == model.param_names else names)
    delta = _prior_tensor(prior_precision, len(groups), like)

    target_entries: list[int] = []

    def counted() -> Iterator[Any]:
        for batch in batches:
            target_entries.append(int(unpack_batch(batch)[1].numel()))
            yield batch

    stats = subset_statistics(model, params, counted(), names, kind=kind, structure=structure, approx=approx, key=key,
                              samples=samples, fallback=fallback, buffers=buffers)

    def scalar(value: float) -> torch.Tensor:
        return torch.tensor(value, dtype=like.dtype, device=like.device)

    return LaplacePosterior(
        mean={name: value.detach() for name, value in params.items()},
        curvature=stats.curvature, prior_precision=delta, loss=stats.loss, n_data=stats.examples,
        n_targets=torch.tensor(sum(target_entries), dtype=torch.int64, device=like.device),
        temperature=scalar(float(temperature)), sigma_noise=scalar(float(sigma_noise)),
        likelihood=likelihood, groups=groups)


# --------------------------------------------------------------------------- the precision


def _prior_vector(names: tuple[str, ...], shapes: tuple[tuple[int, ...], ...], prior: Params,
                  like: torch.Tensor) -> torch.Tensor:
    """The prior precision of every entry of a block's flat vector (``(P_b,)``)."""
    return torch.cat([prior[name] * torch.ones(math.prod(shape), dtype=like.dtype, device=like.device)
                      for name, shape in zip(names, shapes)])


def precision_block(block: CurvatureBlock, scale: torch.Tensor, prior: Params) -> CurvatureBlock:
    """``scale · block + P₀`` restricted to the block (``prior``: ``{name: δ}``).

    Unit-wise and Kronecker blocks cover one layer, hence one prior group: their
    prior is ``δ I`` (for Kronecker blocks kept as exact damping).
    """
    if isinstance(block, DenseBlock):
        diagonal = _prior_vector(block.names, block.shapes, prior, block.matrix)
        return DenseBlock(scale * block.matrix + torch.diag_embed(diagonal), block.names, block.param_shapes)
    if isinstance(block, DiagonalBlock):
        return DiagonalBlock({name: scale * d + prior[name] for name, d in block.diagonal.items()}, block.names)
    delta = prior[block.names[0]]
    if isinstance(block, KroneckerBlock):
        return KroneckerBlock(block.input_factor, scale * block.output_factor, scale * block.damping + delta,
                              block.layout)
    if isinstance(block, UnitBlock):
        eye = torch.eye(block.blocks.shape[-1], dtype=block.blocks.dtype, device=block.blocks.device)
        return UnitBlock(scale * block.blocks + delta * eye, block.layout)
    raise TypeError(f"laplace: no posterior precision for a {type(block).__name__}")


def posterior_precision(posterior: LaplacePosterior, prior_precision: torch.Tensor | None = None) -> Curvature:
    """The posterior precision ``P = s · C + P₀`` as a :class:`~fprecond.curvature.Curvature`
    with the curvature's block structure (``to_dense()`` gives the ``(P, P)`` matrix).

    ``prior_precision`` overrides the posterior's (same shape conventions).
    """
    prior = posterior.prior_per_parameter(prior_precision)
    scale = posterior.likelihood_scale
    curvature = posterior.curvature
    blocks = tuple(precision_block(block, scale, prior) for block in curvature.blocks)
    return Curvature(blocks, curvature.kind, curvature.structure, curvature.names, curvature.shapes)
