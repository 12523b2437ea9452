"""Ready recipes: each is a chain of building blocks."""

from fprecond.optimizers.ekfac import ekfac
from fprecond.optimizers.first_order import adam, adamw, sgd
from fprecond.optimizers.kfac import kfac
from fprecond.optimizers.natural_gradient import diag_ng, natural_gradient, unit_wise_ng
from fprecond.optimizers.newton import hessian_free, newton, newton_cg
from fprecond.optimizers.smw import seng, smw_ng

__all__ = ["adam", "adamw", "diag_ng", "ekfac", "hessian_free", "kfac", "natural_gradient", "newton", "newton_cg",
           "seng", "sgd", "smw_ng", "unit_wise_ng"]
