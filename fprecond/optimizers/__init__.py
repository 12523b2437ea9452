"""Ready recipes: each is a chain of building blocks."""

from fprecond.optimizers.adahessian import adahessian, scale_by_adahessian
from fprecond.optimizers.ekfac import ekfac
from fprecond.optimizers.first_order import adam, adamw, sgd
from fprecond.optimizers.kbfgs import kbfgs, scale_by_kbfgs
from fprecond.optimizers.kfac import kfac
from fprecond.optimizers.muon import muon, muon_labels, scale_by_muon
from fprecond.optimizers.natural_gradient import diag_ng, natural_gradient, unit_wise_ng
from fprecond.optimizers.newton import hessian_free, newton, newton_cg
from fprecond.optimizers.psgd import psgd, scale_by_psgd
from fprecond.optimizers.shampoo import scale_by_shampoo, shampoo
from fprecond.optimizers.smw import seng, smw_ng
from fprecond.optimizers.soap import scale_by_soap, soap
from fprecond.optimizers.sophia import scale_by_sophia, sophia

__all__ = ["adahessian", "adam", "adamw", "diag_ng", "ekfac", "hessian_free", "kbfgs", "kfac", "muon", "muon_labels",
           "natural_gradient", "newton", "newton_cg", "psgd", "scale_by_adahessian", "scale_by_kbfgs",
           "scale_by_muon", "scale_by_psgd", "scale_by_shampoo", "scale_by_soap", "scale_by_sophia", "seng", "sgd", "shampoo",
           "smw_ng", "soap", "sophia", "unit_wise_ng"]
