"""ASDL's implementation of a method, trained on the same task, for ``--reference asdl``.

ASDL (PyPI ``asdfghjkl``, import name ``asdl``; Osawa et al. 2023, "ASDL: A
Unified Interface for Gradient Preconditioning in PyTorch") computes the same
preconditioners with module hooks and updates the module in place. Its run here
uses the same initialisation, batches and budget as fprecond's, its gradient
maker for the method with the matching settings (damping, curvature and inverse
intervals, running-average decay), and ``torch.optim.SGD`` with the method's
learning rate, momentum and weight decay. fprecond-only features have no ASDL
counterpart (K-FAC's KL clipping and π-damping, Shampoo's grafting), so accuracies
can differ; the step times and peak memory are the point of the comparison.
"""

from __future__ import annotations

import importlib.util
import inspect
from typing import Any

import torch
from torch import nn

from fprecond.compare.methods import METHODS
from fprecond.compare.tasks import Task
from fprecond.compare.train import Stepper, evaluate

__all__ = ["ASDL_MAKERS", "asdl_installed", "asdl_note", "AsdlStepper"]

# fprecond method -> (ASDL gradient maker, extra keyword arguments for it).
ASDL_MAKERS: dict[str, tuple[str, dict[str, Any]]] = {
    "kfac": ("KfacGradientMaker", {"fisher_type": "fisher_mc"}),
    "natural_gradient": ("KfacGradientMaker", {"fisher_type": "fisher_exact"}),
    "ekfac": ("EkfacGradientMaker", {"fisher_type": "fisher_emp"}),  # ASDL's EKFAC takes only this kind
    "unit_wise_ng": ("UnitWiseNaturalGradientMaker", {"fisher_type": "fisher_mc"}),
    "diag_ng": ("DiagNaturalGradientMaker", {"fisher_type": "fisher_mc"}),
    "shampoo": ("ShampooGradientMaker", {}),
    "psgd": ("KronPsgdGradientMaker", {}),
    "kbfgs": ("KronBfgsGradientMaker", {}),
    "seng": ("SengGradientMaker", {}),
    "smw_ng": ("SmwEmpNaturalGradientMaker", {}),
}


def asdl_installed() -> bool:
    return importlib.util.find_spec("asdl") is not None


def asdl_note(method: str) -> str | None:
    """Why ``method`` has no ASDL row, or ``None`` when it can have one."""
    if method not in ASDL_MAKERS:
        return "not in ASDL"
    if not asdl_installed():
        return "ASDL not installed (pip install asdfghjkl)"
    return None


def effective_settings(method: str, settings: dict[str, Any]) -> dict[str, Any]:
    """The recipe's defaults overlaid with the comparison's ``settings``."""
    defaults = {name: parameter.default for name, parameter in METHODS[method].parameters().items()
                if parameter.default is not inspect.Parameter.empty}
    return {**defaults, **settings}


def _silence_nvtx() -> None:
    """ASDL marks its phases with NVTX ranges, which a CPU-only build of torch rejects;
    in the worker process that runs ASDL they become no-ops."""
    if torch.cuda.is_available():
        return
    import torch.cuda.nvtx as nvtx

    nvtx.range_push = lambda *args, **kwargs: 0  # type: ignore[assignment]
    nvtx.range_pop = lambda *args, **kwargs: 0  # type: ignore[assignment]


def _cross_entropy(outputs: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    # ASDL reads the ``reduction`` argument (it rescales per-example terms by it).
    return nn.functional.cross_entropy(outputs.flatten(0, -2), targets.flatten(), reduction=reduction)


class AsdlStepper(Stepper):
    """ASDL's gradient maker for ``method`` with ``torch.optim.SGD``, on a module in place."""

    def __init__(self, task: Task, method: str, settings: dict[str, Any], seed: int, batch_size: int,
                 device: torch.device) -> None:
        import asdl  # type: ignore[import-untyped]

        _silence_nvtx()
        torch.manual_seed(seed)
        self.module = task.build().to(device=device, dtype=torch.float32)
        self.task, self.device = task, device
        self.model = task.model(self.module)
        values = effective_settings(method, settings)
        config_type = asdl.SmwEmpNaturalGradientConfig if method == "smw_ng" else asdl.PreconditioningConfig
        config = config_type(data_size=batch_size, damping=float(values.get("damping", 1e-3)))
        curvature_every = values.get("curvature_every") or values.get("statistics_every")
        inverse_every = values.get("inverse_every") or values.get("update_interval")
        if curvature_every:
            config.curvature_upd_interval = int(curvature_every)
        if inverse_every:
            config.preconditioner_upd_interval = int(inverse_every)
        if values.get("ema_decay") is not None:
            # ASDL weights the new estimate by its ema_decay; fprecond keeps ema_decay of the old one.
            config.ema_decay = 1.0 - float(values["ema_decay"])
        maker_name, options = ASDL_MAKERS[method]
        self.maker = getattr(asdl, maker_name)(self.module, config, **options)
        learning_rate = values.get("learning_rate", 0.1)
        if callable(learning_rate):
            raise ValueError(f"{method}: --reference asdl needs a constant learning rate")
        self.optimizer = torch.optim.SGD(self.module.parameters(), lr=float(learning_rate),
                                         momentum=float(values.get("momentum") or 0.0),
                                         weight_decay=float(values.get("weight_decay") or 0.0))

    def step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        inputs, targets = batch
        self.optimizer.zero_grad(set_to_none=True)
        outputs = self.maker.setup_model_call(self.module, inputs)
        self.maker.setup_loss_call(_cross_entropy, outputs, targets)
        _, loss = self.maker.forward_and_backward()
        self.optimizer.step()
        return loss.detach()

    def evaluate(self) -> tuple[float, float, list[float] | None]:
        params = {name: p.detach() for name, p in self.module.named_parameters()}
        return (*evaluate(self.task, self.model, params, self.device), None)

    def finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in self.module.parameters())
