"""Dense linear algebra for preconditioners: damped inverses, matrix roots, solves.

Every function is pure, batches over any leading dimensions ``(..., n, n)``,
works under (nested) ``torch.func.vmap``, and has no Python branching on
tensor values: iterations run a fixed number of times and stop per member by
masking, and rarely needed work (a Cholesky retry, an eigendecomposition
fallback, a CG step after convergence) goes through
:func:`fprecond.lazy.lazy_where`, which skips it when no member needs it.
For finite input the results are finite, also for singular, indefinite and
zero matrices; each docstring says what is returned there.

Conventions:

* ``damping`` is a number or a tensor broadcastable to the batch dimensions
  ``(...)`` (one damping per matrix); it adds ``damping · I``. Numbers are
  validated (``ValueError``); tensors cannot be checked without reading their
  values and are used as given.
* Symmetric input is read from its lower triangle where a LAPACK routine does
  so (``cholesky_ex``, ``eigh``); pass symmetric matrices.
* Where a negative power of a singular matrix is asked for, eigenvalues are
  floored at ``eps(dtype) · n · max|λ|``, and at a tiny absolute value that
  keeps every powered eigenvalue below ``1/sqrt(tiny)`` (~1e154 in float64,
  ~1e19 in float32; it matters for a zero matrix), so the result is large but
  finite.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from fprecond._validation import check_choice, check_number
from fprecond.lazy import lazy_where
from fprecond.spectral import damped_power, symmetric_eigh

__all__ = [
    "damped_cholesky_inverse",
    "damped_eigh",
    "eigh_power",
    "gram_woodbury",
    "inverse_root_newton",
    "newton_schulz_inverse",
    "orthogonalize",
    "woodbury_solve",
]

Damping = float | torch.Tensor

# Odd polynomial X <- (a I + b XXᵀ + c (XXᵀ)²) X of a Newton–Schulz step.
_ORTHOGONALIZE_COEFFICIENTS = {
    "cubic": (1.5, -0.5),  # classical Newton–Schulz, converges to U Vᵀ
    "quintic": (3.4445, -4.7750, 2.0315),  # Muon (Jordan, 2024): fast, singular values in ~[0.7, 1.2]
}


# --------------------------------------------------------------------------- helpers


def _check_square(owner: str, matrix: torch.Tensor) -> int:
    if matrix.ndim < 2 or matrix.shape[-1] != matrix.shape[-2]:
        raise ValueError(f"{owner}: matrix must have shape (..., n, n), got {tuple(matrix.shape)}")
    if not matrix.is_floating_point():
        raise ValueError(f"{owner}: matrix must be floating point, got {matrix.dtype}")
    return matrix.shape[-1]


def _damping(owner: str, damping: Damping, like: torch.Tensor, *, positive: bool = False) -> torch.Tensor:
    """``damping`` as a tensor of ``like``'s dtype, shaped ``(...)`` or 0-dim."""
    if isinstance(damping, torch.Tensor):
        return damping.to(dtype=like.dtype, device=like.device)
    check_number(owner, "damping", damping, low=0.0, low_inclusive=not positive)
    return torch.tensor(float(damping), dtype=like.dtype, device=like.device)


def _eye(matrix: torch.Tensor) -> torch.Tensor:
    return torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)


def _add_damping(matrix: torch.Tensor, damping: torch.Tensor) -> torch.Tensor:
    return matrix + damping[..., None, None] * _eye(matrix)


def _spectral_function(values: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """``V diag(values) Vᵀ``."""
    return (vectors * values[..., None, :]) @ vectors.mT


def _modify_eigenvalues(owner: str, values: torch.Tensor, eigenvalues: str) -> torch.Tensor:
    check_choice(owner, "eigenvalues", eigenvalues, ("clamp", "abs"))
    return values.clamp_min(0.0) if eigenvalues == "clamp" else values.abs()


def _power_from_eigh(values: torch.Tensor, vectors: torch.Tensor, damping: torch.Tensor, exponent: float,
                     eigenvalues: str, owner: str) -> torch.Tensor:
    """``(f(Λ) + damping)^exponent`` in the eigenbasis, floored for negative exponents."""
    check_choice(owner, "eigenvalues", eigenvalues, ("clamp", "abs"))
    return _spectral_function(damped_power(values, damping[..., None], exponent, eigenvalues), vectors)


def _frobenius(matrix: torch.Tensor) -> torch.Tensor:
    return torch.linalg.matrix_norm(matrix, "fro", keepdim=True)


def _matrix_power(matrix: torch.Tensor, power: int) -> torch.Tensor:
    """``matrix^power`` for an integer ``power >= 1`` by repeated squaring."""
    result: torch.Tensor | None = None
    base = matrix
    while power:
        if power & 1:
            result = base if result is None else result @ base
        power >>= 1
        if power:
            base = base @ base
    assert result is not None
    return result


# --------------------------------------------------------------------------- Cholesky


def _cholesky_attempt(matrix: torch.Tensor, damping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``((matrix + damping I)^-1, failed)``; failed members hold the identity."""
    factor, info = torch.linalg.cholesky_ex(_add_damping(matrix, damping))
    failed = info != 0
    # A failed factor is partial: replace it so no garbage (or NaN gradient) flows on.
    # (lazy_where: no copy of the factor when every member succeeded, the usual case.)
    factor = lazy_where(failed[..., None, None], lambda: _eye(matrix).expand_as(matrix), factor)
    inverse = torch.cholesky_inverse(factor)
    # In float32 a tiny pivot can overflow the inverse: count that as a failure too. The
    # diagonal suffices: an SPD inverse B has |B_ij| <= sqrt(B_ii B_jj), so it holds the
    # largest entries (and checking n entries instead of n² matters for unit-wise blocks).
    failed = failed | ~torch.isfinite(torch.diagonal(inverse, dim1=-2, dim2=-1)).all(-1)
    return lazy_where(failed[..., None, None], lambda: _eye(matrix).expand_as(matrix), inverse), failed


def damped_cholesky_inverse(matrix: torch.Tensor, damping: Damping, *, retries: int = 3,
                            growth: float = 10.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The explicit inverse ``(matrix + damping·I)^-1`` of a symmetric matrix by Cholesky.

    Members whose factorisation fails (not positive definite in floating point)
    retry with ``damping · growth^k`` for ``k = 1 .. retries``; members that fail
    every retry fall back to the eigendecomposition formula of
    :func:`eigh_power` with exponent -1 and ``eigenvalues="clamp"``:
    ``V (max(Λ, 0) + damping)^-1 Vᵀ`` with the damped eigenvalues floored at
    ``eps · n · max|λ|`` (so ``damping = 0`` on a singular matrix stays finite).
    A retry with the same damping (``damping = 0``) would fail again: it is
    counted but not computed. Each retry and the fallback run through
    :func:`~fprecond.lazy.lazy_where`: they cost nothing when no member needs
    them, and a member that succeeds gets the same bits whether or not others
    of its batch (or ``vmap``) fail.

    Args:
        matrix: ``(..., n, n)`` symmetric (lower triangle read), float32/float64.
        damping: ``>= 0``; a number or a tensor broadcastable to ``(...)``.
        retries: number of retries with grown damping (``>= 0``).
        growth: factor by which damping grows per retry (``> 1``).

    Returns:
        ``(inverse, failures)``: ``inverse`` of shape ``(..., n, n)``; ``failures``
        an int64 tensor of shape ``(...)`` counting the failed attempts per
        matrix: 0 when the first Cholesky succeeded, ``k`` when retry ``k``
        (damping ``damping · growth^k``) did, ``retries + 1`` when the
        eigendecomposition fallback was used.
    """
    owner = "damped_cholesky_inverse"
    _check_square(owner, matrix)
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ValueError(f"{owner}: retries must be an int >= 0, got {retries!r}")
    check_number(owner, "growth", growth, low=1.0, low_inclusive=False)
    damping = _damping(owner, damping, matrix)

    inverse, failed = _cholesky_attempt(matrix, damping)
    failures = failed.to(torch.int64)
    for k in range(1, retries + 1):
        retry_damping = damping * growth**k
        # Same damping => same (failed) factorisation: no need to compute it.
        needed = failed & (retry_damping != damping)

        def retry(retry_damping: torch.Tensor = retry_damping) -> tuple[torch.Tensor, torch.Tensor]:
            new_inverse, new_failed = _cholesky_attempt(matrix, retry_damping)
            return new_inverse, new_failed[..., None, None]

        inverse, still = lazy_where(needed[..., None, None], retry, (inverse, failed[..., None, None]))
        failed = still[..., 0, 0]
        failures = failures + failed.to(torch.int64)

    def fallback() -> torch.Tensor:
        values, vectors = symmetric_eigh(matrix)
        return _power_from_eigh(values, vectors, damping, -1.0, "clamp", owner)

    inverse = lazy_where(failed[..., None, None], fallback, inverse)
    return inverse, failures


# --------------------------------------------------------------------------- eigendecomposition


def damped_eigh(matrix: torch.Tensor, damping: Damping,
                *, eigenvalues: str = "clamp") -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues and eigenvectors of ``f(matrix) + damping·I`` for a symmetric matrix.

    ``f`` acts on the eigenvalues: ``"clamp"`` sets negative ones to 0 (the
    nearest positive semi-definite matrix); ``"abs"`` takes absolute values,
    as saddle-free Newton does (Dauphin et al., 2014).

    Args:
        matrix: ``(..., n, n)`` symmetric (lower triangle read).
        damping: ``>= 0``; a number or a tensor broadcastable to ``(...)``.
        eigenvalues: ``"clamp"`` or ``"abs"``.

    Returns:
        ``(values, vectors)`` of shapes ``(..., n)`` and ``(..., n, n)`` with
        ``f(matrix) + damping·I = vectors @ diag(values) @ vectors.mT``. The order
        is that of ``torch.linalg.eigh(matrix)`` (ascending eigenvalues of
        ``matrix``; with ``"abs"`` the values are no longer sorted).
    """
    owner = "damped_eigh"
    _check_square(owner, matrix)
    damping = _damping(owner, damping, matrix)
    check_choice(owner, "eigenvalues", eigenvalues, ("clamp", "abs"))
    values, vectors = symmetric_eigh(matrix)
    return _modify_eigenvalues(owner, values, eigenvalues) + damping[..., None], vectors


def eigh_power(matrix: torch.Tensor, exponent: float, damping: Damping = 0.0,
               *, eigenvalues: str = "clamp") -> torch.Tensor:
    """``(f(matrix) + damping·I)^exponent`` for a symmetric matrix, through ``eigh``.

    ``f`` is as in :func:`damped_eigh`. For a negative ``exponent`` the damped
    eigenvalues are floored at ``eps(dtype) · n · max|λ(matrix)|`` (at a tiny
    absolute value for a zero matrix), so singular input gives a large but
    finite result. ``exponent = -1`` is the inverse, ``-1/4`` Shampoo's root.

    Args:
        matrix: ``(..., n, n)`` symmetric (lower triangle read).
        exponent: any real number.
        damping: ``>= 0``; a number or a tensor broadcastable to ``(...)``.
        eigenvalues: ``"clamp"`` or ``"abs"``.

    Returns:
        A symmetric ``(..., n, n)`` tensor.
    """
    owner = "eigh_power"
    _check_square(owner, matrix)
    check_number(owner, "exponent", exponent)
    damping = _damping(owner, damping, matrix)
    check_choice(owner, "eigenvalues", eigenvalues, ("clamp", "abs"))
    values, vectors = symmetric_eigh(matrix)
    return _power_from_eigh(values, vectors, damping, float(exponent), eigenvalues, owner)


# --------------------------------------------------------------------------- Newton iterations


def inverse_root_newton(matrix: torch.Tensor, root: int, damping: Damping = 0.0, *, iterations: int = 50,
                        tol: float | None = None) -> torch.Tensor:
    """``(matrix + damping·I)^(-1/root)`` of an SPD matrix by the coupled Newton iteration.

    Guo & Higham (2006), "A Schur–Newton method for the matrix p-th root and its
    inverse", as used by Shampoo (Anil et al., 2020, "Scalable second order
    optimization for deep learning"). With ``A = matrix + damping·I``, ``p = root``
    and ``c^p = 2·b/(p+1)`` for a norm bound ``b >= ||A||₂`` (the smaller of the
    Frobenius and 1-norms), start from ``X₀ = I/c``, ``M₀ = A/c^p`` (eigenvalues
    in ``(0, (p+1)/2]``) and iterate::

        T = ((p+1)·I − M_k) / p,   X_{k+1} = X_k T,   M_{k+1} = T^p M_k

    so ``X_k → A^(-1/p)`` while ``M_k = X_k^p A → I``. A member stops updating
    once ``||M_k − I||_F <= tol`` or once a step fails to lower that error (the
    rounding floor, or input that is not SPD), keeping its best iterate; a step
    that would overflow is rejected too. Small eigenvalues grow by
    ``((p+1)/p)^p >= 2`` per step before quadratic convergence, so the default 50
    iterations reach the rounding floor for condition numbers up to ~1e12
    (float64). Singular input gives a finite result that grows with
    ``iterations`` along the null space; a zero matrix gives ``I/c`` with ``c``
    floored at a tiny value.

    Args:
        matrix: ``(..., n, n)`` symmetric positive (semi-)definite.
        root: ``p``, an int ``>= 1``.
        damping: ``>= 0``; a number or a tensor broadcastable to ``(...)``.
        iterations: fixed number of iterations (each ~``log2(p) + 2`` matmuls).
        tol: stop tolerance on ``||M − I||_F``; ``None`` for ``n · eps(dtype)``.

    Returns:
        A symmetric ``(..., n, n)`` tensor (symmetrised at the end).
    """
    owner = "inverse_root_newton"
    n = _check_square(owner, matrix)
    if isinstance(root, bool) or not isinstance(root, int) or root < 1:
        raise ValueError(f"{owner}: root must be an int >= 1, got {root!r}")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
        raise ValueError(f"{owner}: iterations must be an int >= 0, got {iterations!r}")
    if tol is None:
        tol = n * torch.finfo(matrix.dtype).eps
    check_number(owner, "tol", tol, low=0.0)
    damped = _add_damping(matrix, _damping(owner, damping, matrix))
    p = root
    eye = _eye(matrix)

    one_norm = damped.abs().sum(-2).amax(-1)[..., None, None]
    bound = torch.minimum(_frobenius(damped), one_norm).clamp_min(math.sqrt(torch.finfo(matrix.dtype).tiny))
    scale_p = 2.0 * bound / (p + 1)  # c^p
    x = eye / scale_p.pow(1.0 / p)
    m = damped / scale_p
    error = _frobenius(m - eye)
    done = error <= tol
    for _ in range(iterations):
        t = ((p + 1) * eye - m) / p
        new_x = x @ t
        new_m = _matrix_power(t, p) @ m
        new_error = _frobenius(new_m - eye)
        accept = ~done & (new_error < error) & torch.isfinite(new_x).all(-1, keepdim=True).all(-2, keepdim=True)
        x = torch.where(accept, new_x, x)
        m = torch.where(accept, new_m, m)
        error = torch.where(accept, new_error, error)
        done = done | ~accept | (error <= tol)
    return 0.5 * (x + x.mT)


def newton_schulz_inverse(matrix: torch.Tensor, damping: Damping = 0.0, *, iterations: int = 60) -> torch.Tensor:
    """``(matrix + damping·I)^-1`` by the Newton–Schulz iteration ``X ← X (2I − A X)``.

    Schulz (1933); the start ``X₀ = Aᵀ / (||A||₁ ||A||_∞)`` (Ben-Israel, 1966;
    Pan & Schreiber, 1991) puts every singular value of ``X₀ A`` in ``(0, 1]``, so
    the iteration converges for any nonsingular square ``A`` (symmetric or not,
    definite or not): the residual ``I − X_k A`` is squared each step. A singular
    value ``σ`` needs about ``log2(||A||₁||A||_∞ / σ²) + 6`` steps, so the default
    60 iterations resolve condition numbers up to ~1e7 for n ≲ 1000; directions
    not yet resolved are damped towards 0, not blown up. Singular input: a null
    space held exactly (zero rows and columns, a zero matrix) gives the
    pseudo-inverse there (zero for a zero matrix); a null space that rounding
    makes nearly singular is slowly inverted as such (its part grows by 2 per
    step towards ``~1/(eps ||A||)``), so use ``damping > 0`` there. A step that
    would overflow is rejected, so the result is always finite.

    Args:
        matrix: ``(..., n, n)`` square.
        damping: ``>= 0``; a number or a tensor broadcastable to ``(...)``.
        iterations: fixed number of iterations (two matmuls each).

    Returns:
        A ``(..., n, n)`` tensor.
    """
    owner = "newton_schulz_inverse"
    _check_square(owner, matrix)
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
        raise ValueError(f"{owner}: iterations must be an int >= 0, got {iterations!r}")
    damped = _add_damping(matrix, _damping(owner, damping, matrix))
    tiny = torch.finfo(matrix.dtype).tiny
    one_norm = damped.abs().sum(-2).amax(-1)[..., None, None].clamp_min(tiny)
    inf_norm = damped.abs().sum(-1).amax(-1)[..., None, None].clamp_min(tiny)
    x = damped.mT / one_norm / inf_norm  # divided in turn: the product of norms may overflow
    two_eye = 2.0 * _eye(matrix)
    for _ in range(iterations):
        new_x = x @ (two_eye - damped @ x)
        finite = torch.isfinite(new_x).all(-1, keepdim=True).all(-2, keepdim=True)
        x = torch.where(finite, new_x, x)
    return x


def orthogonalize(matrix: torch.Tensor, *, steps: int = 5, coefficients: str | Sequence[float] = "quintic",
                  eps: float = 1e-7) -> torch.Tensor:
    """Newton–Schulz iteration towards the orthogonal polar factor ``U Vᵀ`` of ``matrix``.

    With ``matrix = U Σ Vᵀ`` (thin SVD), the matrix is normalised as
    ``X = matrix / (||matrix||_F + eps)`` (singular values in ``[0, 1]``) and,
    with the Gram matrix ``A = X Xᵀ`` taken on the smaller side, each step applies
    the odd polynomial ``X ← (a I + b A + c A²) X``, which maps every singular
    value ``σ ↦ aσ + bσ³ + cσ⁵`` and keeps ``U``, ``V``:

    * ``"cubic"`` ``(1.5, -0.5)``: the classical iteration (Higham, 2008, §8.3);
      singular values converge to 1, so the output converges to ``U Vᵀ``
      (slowly for tiny singular values, which grow by 1.5 per step).
    * ``"quintic"`` ``(3.4445, -4.7750, 2.0315)``: Muon's coefficients (Keller
      Jordan, 2024, "Muon: An optimizer for hidden layers"), tuned for 5 steps;
      singular values land roughly in ``[0.7, 1.2]``, not at 1.
    * a sequence ``(a, b)`` or ``(a, b, c)`` of your own.

    Args:
        matrix: ``(..., m, n)``, any ``m``, ``n``.
        steps: number of iterations (``>= 0``).
        coefficients: ``"quintic"``, ``"cubic"``, or 2 or 3 numbers.
        eps: added to the Frobenius norm (Muon's 1e-7); a zero matrix gives zero.

    Returns:
        A ``(..., m, n)`` tensor with the singular vectors of ``matrix``.
    """
    owner = "orthogonalize"
    if matrix.ndim < 2:
        raise ValueError(f"{owner}: matrix must have shape (..., m, n), got {tuple(matrix.shape)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"{owner}: steps must be an int >= 0, got {steps!r}")
    check_number(owner, "eps", eps, low=0.0)
    if isinstance(coefficients, str):
        check_choice(owner, "coefficients", coefficients, tuple(_ORTHOGONALIZE_COEFFICIENTS))
        coefficients = _ORTHOGONALIZE_COEFFICIENTS[coefficients]
    coefficients = tuple(coefficients)
    if len(coefficients) not in (2, 3):
        raise ValueError(f"{owner}: coefficients must be 'quintic', 'cubic' or 2 or 3 numbers, got {coefficients!r}")
    for value in coefficients:
        check_number(owner, "coefficients", value)

    tall = matrix.shape[-2] > matrix.shape[-1]
    x = matrix.mT if tall else matrix
    norm = _frobenius(x) + eps
    x = x / norm.clamp_min(torch.finfo(matrix.dtype).tiny)
    a, b = coefficients[0], coefficients[1]
    for _ in range(steps):
        gram = x @ x.mT
        polynomial = b * gram if len(coefficients) == 2 else b * gram + coefficients[2] * (gram @ gram)
        x = a * x + polynomial @ x
    return x.mT if tall else x


# --------------------------------------------------------------------------- low-rank solves


def gram_woodbury(gram: torch.Tensor, projected: torch.Tensor, damping: Damping) -> torch.Tensor:
    """``(damping·I + gram)^-1 projected`` for a Gram matrix ``gram = V Vᵀ``.

    The inner solve of :func:`woodbury_solve` for callers that build ``V Vᵀ``
    and ``V rhs`` themselves (e.g. from factored per-example gradients). Uses
    :func:`damped_cholesky_inverse`, so a rank-deficient ``gram`` with small
    damping stays finite.

    Args:
        gram: ``(..., R, R)`` symmetric positive semi-definite.
        projected: ``(..., R)``, i.e. ``V rhs``.
        damping: ``>= 0`` (``> 0`` for a well-defined result); a number or a
            tensor broadcastable to ``(...)``.

    Returns:
        A ``(..., R)`` tensor.
    """
    owner = "gram_woodbury"
    _check_square(owner, gram)
    inverse, _ = damped_cholesky_inverse(gram, _damping(owner, damping, gram))
    return (inverse @ projected[..., None])[..., 0]


def woodbury_solve(vectors: torch.Tensor, rhs: torch.Tensor, damping: Damping) -> torch.Tensor:
    """``(damping·I_P + Vᵀ V)^-1 rhs`` in the ``R × R`` space of ``R`` vectors (Woodbury).

    ``(λI + VᵀV)^-1 b = (b − Vᵀ (λI_R + V Vᵀ)^-1 V b) / λ``: one ``R × R``
    inverse instead of a ``P × P`` solve, as for per-example-gradient (empirical
    Fisher) or low-rank curvature with ``R`` much smaller than ``P``. The
    subtraction loses about ``eps · ||VᵀV|| / damping`` in relative accuracy.

    Args:
        vectors: ``V`` of shape ``(..., R, P)`` (rows are the vectors).
        rhs: ``(..., P)``.
        damping: ``λ > 0`` (required: the formula divides by it); a number, or a
            tensor broadcastable to ``(...)`` (floored at the dtype's ``tiny``).

    Returns:
        A ``(..., P)`` tensor.
    """
    owner = "woodbury_solve"
    if vectors.ndim < 2:
        raise ValueError(f"{owner}: vectors must have shape (..., R, P), got {tuple(vectors.shape)}")
    damping = _damping(owner, damping, vectors, positive=True).clamp_min(torch.finfo(vectors.dtype).tiny)
    gram = vectors @ vectors.mT
    projected = (vectors @ rhs[..., None])[..., 0]
    coefficients = gram_woodbury(gram, projected, damping)
    return (rhs - (vectors.mT @ coefficients[..., None])[..., 0]) / damping[..., None]
