"""Spectral analysis of curvature matrices, matrix-free and with explicit keys.

- :func:`curvature_mvp`: ``v ↦ C v`` for the Hessian, GGN, Fisher or empirical
  Fisher of a batch loss, on parameter pytrees.
- :func:`lanczos`: the Lanczos process with full reorthogonalisation and restarts
  at breakdown; :func:`lanczos_quadrature` its Gauss quadrature.
- :func:`top_eigenpairs` / :func:`curvature_eigenpairs`: the top-``k`` eigenpairs
  by Lanczos or power iteration with deflation.
- :func:`hutchinson_trace`: Hutchinson's trace estimate with its standard error.
- :func:`spectral_density`: the eigenvalue density by stochastic Lanczos quadrature.

Every function is pure: randomness comes only from an explicit
:mod:`fprecond.random` key, and all loops have a fixed length, so the tools run
under ``torch.func.vmap`` (over keys, say).
"""

from fprecond.analysis.density import SpectralDensity, gaussian_smoothing, spectral_density
from fprecond.analysis.eigenpairs import Eigenpairs, curvature_eigenpairs, top_eigenpairs
from fprecond.analysis.lanczos import LanczosResult, lanczos, lanczos_quadrature, tridiagonal
from fprecond.analysis.operators import CURVATURE_KINDS, CurvatureKind, Mvp, curvature_mvp, flatten_mvp
from fprecond.analysis.trace import TraceEstimate, hutchinson_trace

__all__ = [
    "CURVATURE_KINDS",
    "CurvatureKind",
    "Eigenpairs",
    "LanczosResult",
    "Mvp",
    "SpectralDensity",
    "TraceEstimate",
    "curvature_eigenpairs",
    "curvature_mvp",
    "flatten_mvp",
    "gaussian_smoothing",
    "hutchinson_trace",
    "lanczos",
    "lanczos_quadrature",
    "spectral_density",
    "top_eigenpairs",
    "tridiagonal",
]
