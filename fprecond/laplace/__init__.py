"""Laplace approximations of the posterior over parameters (MacKay 1992; Ritter et al. 2018;
Daxberger et al. 2021): fit from any curvature kind and structure, over all parameters,
the last layer (Kristiadi et al. 2020) or a subnetwork, sample, predict, and tune the
prior (and the regression noise) by the marginal likelihood.

Example::

    posterior = laplace.fit_laplace(model, params, batches, kind="ggn", structure="kron")
    posterior = laplace.optimize_prior_precision(posterior)
    last = laplace.fit_laplace(model, params, batches, structure="full", subset="last_layer")
    probabilities = laplace.predict_glm(model, posterior, x_test).mean        # probit
    samples = laplace.sample_parameters(posterior, fp.random.key(0), 16)      # {name: (16, *shape)}
"""

from fprecond.laplace.factor import (
    DenseFactor,
    DiagonalFactor,
    KroneckerFactor,
    PosteriorFactor,
    UnitFactor,
    factorize,
)
from fprecond.laplace.marginal import (
    CurvatureSpectrum,
    curvature_spectrum,
    log_likelihood,
    log_marginal_likelihood,
    optimize_prior_precision,
)
from fprecond.laplace.posterior import LaplacePosterior, fit_laplace, posterior_precision, prior_groups
from fprecond.laplace.predictive import FunctionalPosterior, Predictive, functional_covariance, predict_glm, predict_mc
from fprecond.laplace.sampling import sample_parameters
from fprecond.laplace.subset import SUBSETS, resolve_subset

__all__ = [
    "CurvatureSpectrum",
    "DenseFactor",
    "DiagonalFactor",
    "FunctionalPosterior",
    "KroneckerFactor",
    "LaplacePosterior",
    "PosteriorFactor",
    "Predictive",
    "SUBSETS",
    "UnitFactor",
    "curvature_spectrum",
    "factorize",
    "fit_laplace",
    "functional_covariance",
    "log_likelihood",
    "log_marginal_likelihood",
    "optimize_prior_precision",
    "posterior_precision",
    "predict_glm",
    "predict_mc",
    "prior_groups",
    "resolve_subset",
    "sample_parameters",
]
