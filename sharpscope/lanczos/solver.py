r"""Thick-restart Lanczos for a few extreme eigenpairs of a symmetric operator.

The Lanczos recurrence (Lanczos 1950) builds an orthonormal basis :math:`Q_j` of the Krylov space
:math:`\mathcal K_j(A, q_1)` with :math:`A Q_j = Q_j T_j + \beta_j q_{j+1} e_j^\top`, :math:`T_j`
tridiagonal. The eigenpairs :math:`(\theta_i, s_i)` of :math:`T_j` give Ritz pairs
:math:`(\theta_i, Q_j s_i)` whose residual norm is exactly :math:`|\beta_j s_{j,i}|` (Saad,
*Numerical Methods for Large Eigenvalue Problems*, Sec. 6.6); a pair is converged when
:math:`|\beta_j s_{j,i}| \le \mathrm{tol} \cdot \max(|\theta_i|, \sqrt{\epsilon}\,\|T\|)`.

Orthogonality (without it Lanczos returns spurious copies, "ghosts", of converged eigenvalues):

* ``reorth="full"``: every new vector is orthogonalized against the whole basis, twice (classical
  Gram-Schmidt run twice is enough: Giraud, Langou & Rozloznik 2005). Costs 4 passes over the
  basis per step.
* ``reorth="partial"`` (default): Simon's partial reorthogonalization (Simon 1984, "The Lanczos
  algorithm with partial reorthogonalization"): the loss of orthogonality
  :math:`\omega_{j+1,i} \approx q_{j+1}^\top q_i` is tracked with the recurrence it obeys in
  floating point, and the basis is reorthogonalized (twice, two consecutive vectors) only when
  :math:`\max_i |\omega_{j+1,i}| > \sqrt{\epsilon}`. The recurrence's rounding term is not the
  textbook :math:`\epsilon\|A\|` but the products' measured noise, read off at no cost from the
  symmetry mismatch :math:`|q_{j-1}^\top A q_j - \beta_{j-1}|` (float32 autograd through a deep,
  sharp network is far noisier than :math:`\epsilon\|A\|`). Semi-orthogonality keeps :math:`T_j` the
  projection of :math:`A` to working precision, so Ritz values are as accurate as with full
  reorthogonalization, at a fraction of the basis traffic.

When the basis reaches ``max_basis`` vectors the method restarts thickly (Wu & Simon 2000): it
keeps the best Ritz vectors, whose projected matrix is diagonal plus one coupling row (an
"arrowhead"), and continues the recurrence from the last residual. The projected eigenproblem is
solved in float64 (``scipy.linalg.eigh_tridiagonal`` before the first restart, ``eigh`` after).
An exhausted Krylov space (:math:`\beta_j \approx 0`, e.g. a low-rank operator) is continued from
a fresh random vector orthogonal to the basis, so its repeated eigenvalues are found.

Limitation shared by every single-vector Krylov method (ARPACK/``scipy.sparse.linalg.eigsh``,
PyHessian's power iteration): an eigenvalue that is *exactly* repeated inside the wanted set, with
the space not exhausted, is seen once; the next distinct eigenvalue then takes the copy's place.
Exact repeats at the top of a network's Hessian need a constructed symmetry (e.g. identical units).
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np
import scipy.linalg
import torch

from ..linop import NOT_SYMMETRIC_HINT, NotSymmetricError, SymmetricOperator, pinned
from .backends import make_basis, resolve_backend, storage_of

__all__ = ["lanczos", "LanczosResult"]

Which = Literal["LA", "SA", "LM"]


@dataclass(frozen=True)
class LanczosResult:
    """Eigenvalues (float64, ordered by ``which``: descending for LA/LM, ascending for SA), Ritz
    residual norms ``||A y - theta y||``, a per-value ``converged`` mask, the eigenvectors as
    columns ``(n, k)`` when asked for, and the cost."""

    eigenvalues: torch.Tensor
    residuals: torch.Tensor
    converged: torch.Tensor
    num_matvecs: int
    num_restarts: int
    num_reorthogonalizations: int
    eigenvectors: torch.Tensor | None = None
    which: str = "LA"

    @property
    def all_converged(self) -> bool:
        return bool(self.converged.all())


def _order(theta: np.ndarray, which: str) -> np.ndarray:
    if which == "LA":
        return np.argsort(-theta, kind="stable")
    if which == "SA":
        return np.argsort(theta, kind="stable")
    return np.argsort(-np.abs(theta), kind="stable")


def _score(theta: np.ndarray, which: str) -> np.ndarray:
    """Values as "bigger is better" scores for ``which``, sorted descending."""
    score = {"LA": theta, "SA": -theta, "LM": np.abs(theta)}[which]
    return np.sort(score)[::-1]


def _default_max_basis(n: int, k: int, bytes_per_vector: int, device: torch.device) -> int:
    """Basis size: ``max(2k + 20, 60)`` vectors, capped by the dimension and by 1/8 of the memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = free // 4
    else:
        try:
            import os
            budget = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 8
        except (ValueError, OSError, AttributeError):  # pragma: no cover
            budget = 2 << 30
    by_memory = max(k + 2, int(budget // max(bytes_per_vector, 1)) - 1)
    return int(min(n, max(2 * k + 20, 60), by_memory))


def _random_unit(n: int, gen: torch.Generator, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A unit vector drawn on the CPU generator (same numbers on every device for a seed)."""
    v = torch.randn(n, generator=gen, dtype=dtype).to(device=device)
    return v / v.norm()


def lanczos(op: SymmetricOperator, k: int = 5, which: Which = "LA", tol: float = 1e-6,
            max_iter: int | None = None, seed: int = 0, backend: str = "torch",
            return_eigenvectors: bool = False, *, v0: torch.Tensor | None = None, basis: str = "device",
            max_basis: int | None = None, reorth: Literal["partial", "full"] = "partial",
            callback: Callable[[int, np.ndarray, np.ndarray], None] | None = None) -> LanczosResult:
    """Top-``k`` eigenpairs of a symmetric operator by thick-restart Lanczos (module docstring).

    Args:
        op: a :class:`~sharpscope.linop.SymmetricOperator` (any object with ``shape``, ``dtype``,
            ``device`` and ``matvec``).
        k: number of eigenpairs, ``1 <= k < n``.
        which: ``"LA"`` largest algebraic (sharpness; default), ``"SA"`` smallest algebraic,
            ``"LM"`` largest magnitude.
        tol: relative Ritz-residual tolerance; ``1e-6`` gives eigenvalues to ~1e-10 relative
            when they are separated (the error is about residual^2 / gap).
        max_iter: cap on operator products (default ``max(300, 30 k)``); an unconverged result has
            ``converged`` False where it fell short, never a silently wrong value.
        seed: seeds the start vector (results are deterministic for a seed).
        backend: where the basis algebra runs (:mod:`sharpscope.lanczos.backends`): ``"torch"`` (default, on
            the operator's device), ``"cupy"`` (fused CUDA kernels; CUDA operators), ``"numpy"``
            (the same array code on the CPU) or ``"auto"`` (cupy when available for a CUDA operator,
            else torch). The operator's products are torch in every case.
        return_eigenvectors: also return the Ritz vectors as columns of an ``(n, k)`` tensor.
        v0: start vector (e.g. the previous top eigenvector, for warm starts).
        basis: storage of the Krylov basis: ``"device"`` (default; the working dtype on the
            operator's device), ``"device-bf16"`` (bfloat16 rows, half the memory, float32
            accumulation; eigenvalues to ~1e-4, eigenvectors to ~4e-3 relative; its residuals are
            the float32 recurrence's, which certify the eigenvalues but not the rounding carried by
            the returned eigenvectors; should the rounded basis lose orthogonality, the solve is
            repeated with ``"device"``, with a warning and the products of both counted) or
            ``"host"`` (pinned host memory streamed per pass, for bases that do not fit the GPU);
            see :mod:`sharpscope.lanczos.backends.base`.
        max_basis: basis vectors kept before a thick restart (default ``max(2k + 20, 60)``, capped by
            ``n`` and 1/8 of the memory).
        reorth: ``"partial"`` (default) or ``"full"`` reorthogonalization.
        callback: called as ``callback(num_matvecs, ritz_values, residuals)`` after each check.

    Example:
        >>> import torch, sharpscope as ss
        >>> A = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64))
        >>> class Dense(ss.SymmetricOperator):
        ...     def _matvec(self, v): return A @ v
        >>> res = ss.lanczos(Dense(100, torch.float64, "cpu"), k=3)
        >>> [round(x, 6) for x in res.eigenvalues.tolist()]
        [100.0, 99.0, 98.0]
    """
    args = dict(k=k, which=which, tol=tol, max_iter=max_iter, seed=seed, backend=backend,
                return_eigenvectors=return_eigenvectors, v0=v0, max_basis=max_basis, reorth=reorth,
                callback=callback)
    try:
        with pinned(op):
            return _lanczos(op, basis=basis, **args)
    except _RoundedBasisLost as lost:
        # a bfloat16 basis can lose orthogonality where a float32 one keeps it (seen on operators of
        # low rank, whose Krylov space is exhausted between thick restarts): solve again, in float32
        warnings.warn(f"basis='device-bf16' lost orthogonality ({lost}); solved again with basis='device'",
                      RuntimeWarning, stacklevel=2)
        with pinned(op):
            res = _lanczos(op, basis="device", **args)
        return dataclasses.replace(res, num_matvecs=res.num_matvecs + lost.num_matvecs)


class _RoundedBasisLost(RuntimeError):
    """The bfloat16-stored basis lost orthogonality (seen as a symmetry mismatch of the recurrence)."""

    def __init__(self, message: str, num_matvecs: int) -> None:
        super().__init__(message)
        self.num_matvecs = num_matvecs


def _lanczos(op: SymmetricOperator, k: int, which: Which, tol: float, max_iter: int | None, seed: int,
             backend: str, return_eigenvectors: bool, *, v0: torch.Tensor | None, basis: str,
             max_basis: int | None, reorth: str, callback) -> LanczosResult:
    """:func:`lanczos` for one basis storage (the module docstring describes the method)."""
    n = op.shape[0]
    backend = resolve_backend(backend, op.device)
    storage, placement = storage_of(basis)
    if which not in ("LA", "SA", "LM"):
        raise ValueError(f"which must be 'LA', 'SA' or 'LM', got {which!r}")
    if reorth not in ("partial", "full"):
        raise ValueError(f"reorth must be 'partial' or 'full', got {reorth!r}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if k >= n:
        raise ValueError(f"k={k} must be smaller than the operator's dimension n={n}; "
                         "use op.to_dense() and torch.linalg.eigvalsh for all eigenvalues")
    if not tol > 0:
        raise ValueError(f"tol must be positive, got {tol}")
    if not op.dtype.is_floating_point:
        raise TypeError(f"the operator's dtype must be floating point, got {op.dtype}")
    # half-precision operators (bf16/fp16 models) get a float32 basis: the recurrence needs it
    dtype = torch.float32 if torch.finfo(op.dtype).bits < 32 else op.dtype
    if storage == "bfloat16" and dtype != torch.float32:
        raise ValueError(f"basis='device-bf16' needs a float32 (or half-precision) operator, got {op.dtype}: "
                         "a bfloat16 basis limits the accuracy to float32 level at best")
    device = op.device
    eps = torch.finfo(dtype).eps
    op_eps = torch.finfo(op.dtype).eps  # the products' own rounding level (symmetry probe)
    max_iter = max(300, 30 * k) if max_iter is None else int(max_iter)
    itemsize = 2 if storage == "bfloat16" else torch.empty(0, dtype=dtype).element_size()
    budget_device = torch.device("cpu") if placement == "host" else device
    m = _default_max_basis(n, k, n * itemsize, budget_device) if max_basis is None else int(max_basis)
    m = min(m, n)
    if m < min(k + 2, n):
        raise ValueError(f"max_basis={m} is too small for k={k}: need at least k + 2")

    gen = torch.Generator().manual_seed(seed)
    Q = make_basis(backend, basis, m, n, dtype, device)
    # a bfloat16 basis stores rounded rows: inner products of rounded unit vectors are off by about
    # u / sqrt(n) (u = 2^-8, random rounding errors), which the symmetry probe must tolerate and the
    # omega recurrence cannot see (after a breakdown: reorthogonalize fully, as after a restart)
    rounded = Q.storage == "bfloat16"
    sym_floor = 100 * 2.0 ** -8 / math.sqrt(n) if rounded else 0.0
    if v0 is None:
        Q.set(0, _random_unit(n, gen, dtype, device))
    else:
        v = torch.as_tensor(v0).reshape(-1).to(dtype=dtype, device=device)
        if v.shape[0] != n or not torch.isfinite(v).all() or float(v.norm()) == 0.0:
            raise ValueError(f"v0 must be a finite nonzero vector of length {n}")
        Q.set(0, v / v.norm())

    T = np.zeros((m + 1, m + 1))
    omega_prev = np.zeros(m + 1)  # omega_{j-1, i} ~ q_{j-1} . q_i
    omega = np.zeros(m + 1)       # omega_{j, i}   ~ q_j . q_i
    num_mv = restarts = reorths = 0
    j = 0           # vectors 0..j-1 have had their products taken; Q[j] is the current vector
    start = 0       # first vector of the current Lanczos run (after a thick restart: the coupled one)
    arrow = False   # whether T has an arrowhead block (after a restart)
    force_reorth = False
    anorm = 0.0
    block_scores = np.full(k, -np.inf)  # wanted values (as scores) when the last fresh block began

    while True:
        qj = Q.get(j)
        w = op.matvec(qj)
        num_mv += 1
        if w.dtype != dtype:
            w = w.to(dtype)
        elif w.data_ptr() == qj.data_ptr():
            w = w.clone()
        w = w.detach().contiguous()
        noise = 2 * eps * anorm  # rounding added to q_{j+1}: raised below when the products are noisier
        coupled = j == start and start > 0
        if coupled:
            # first step after a restart: couple to every kept vector (the arrowhead column)
            h = Q.orthogonalize(w, j + 1)
            T[: j + 1, j] = h
            T[j, : j + 1] = h
            reorths += 1
        else:
            if j > start:
                back, alpha = Q.project(w, j - 1, j + 1).tolist()
                # free symmetry probe: q_{j-1} . A q_j must equal beta_{j-1} = q_j . A q_{j-1}; the
                # small mismatch of a symmetric operator measures its products' rounding (float32
                # autograd through many layers is far noisier than eps * ||A||), which feeds the
                # omega recurrence's noise term
                mismatch = abs(back - T[j, j - 1])
                noise = max(noise, mismatch)
                if mismatch > max(100 * math.sqrt(op_eps), sym_floor) * anorm:
                    if rounded:  # the rounded rows, not necessarily the operator: lanczos() retries in float32
                        raise _RoundedBasisLost(f"symmetry mismatch {mismatch:.3g} at step {j}", num_mv)
                    raise NotSymmetricError(
                        f"the operator is not symmetric: q_(j-1).A q_j = {back:.6g} but q_j.A q_(j-1) = "
                        f"{T[j, j - 1]:.6g} (step {j}): {NOT_SYMMETRIC_HINT}")
                # w -= beta_{j-1} q_{j-1} + alpha_j q_j in one pass
                Q.axpy(w, j - 1, j + 1, [-T[j, j - 1], -alpha])
            else:
                alpha = float(Q.project(w, j, j + 1)[0])
                Q.axpy(w, j, j + 1, [-alpha])
            T[j, j] = alpha
        beta = Q.norm(w)
        if not math.isfinite(beta + T[j, j]):
            raise FloatingPointError("the operator returned NaN or inf; check the model, loss and data")
        anorm = max(anorm, abs(T[j, j]) + beta + (abs(T[j, j - 1]) if j > 0 else 0.0))

        # after a thick restart the kept Ritz vectors carry the previous cycle's semi-orthogonality
        # (~sqrt(eps)), which the omega recurrence cannot see: reorthogonalize fully from then on
        need = not coupled and j > 0 and (reorth == "full" or restarts > 0 or force_reorth
                                          or (rounded and start > 0))
        if not coupled and not need and j > start and beta > 0:
            # partial reorthogonalization: omega_{j+1, i} ~ q_{j+1} . q_i for i < j (Simon 1984),
            # from A q_i = sum_r T[r, i] q_r and beta_j q_{j+1} = A q_j - alpha_j q_j - beta_{j-1} q_{j-1}
            om = omega[: j + 1].copy()
            om[j] = 1.0
            omp = omega_prev[:j].copy()
            omp[j - 1] = 1.0
            est = T[: j + 1, :j].T @ om - T[j, j] * om[:j] - T[j, j - 1] * omp
            est = (est + np.sign(est) * noise) / beta
            omega_prev, omega = omega, np.zeros(m + 1)
            omega[:j] = est
            omega[j] = noise / beta
            need = bool(np.max(np.abs(est)) > math.sqrt(eps))
        elif not need:
            omega_prev, omega = omega, np.full(m + 1, eps)
        if need:
            Q.orthogonalize(w, j + 1)
            reorths += 1
            beta = Q.norm(w)
            force_reorth = not force_reorth and reorth == "partial"  # the next vector too (Simon)
            omega_prev, omega = omega, np.full(m + 1, eps)
        T[j + 1, j] = T[j, j + 1] = beta
        j += 1

        # Ritz values of the projected matrix and their residuals |beta_j s_{j,i}|
        Tj = T[:j, :j]
        if arrow:
            theta, S = scipy.linalg.eigh(Tj)
        else:
            theta, S = scipy.linalg.eigh_tridiagonal(np.diag(Tj).copy(), np.diag(Tj, -1).copy())
        residuals = np.abs(beta * S[j - 1, :])
        order = _order(theta, which)
        wanted = order[:k]
        floor = math.sqrt(eps) * max(float(np.max(np.abs(theta))), anorm * eps)
        ok = residuals[wanted] <= tol * np.maximum(np.abs(theta[wanted]), floor)
        breakdown = beta <= eps ** 0.75 * max(anorm, 1e-300) or j >= n
        if j >= n:
            residuals[:] = 0.0  # the Krylov space is the whole space: Ritz pairs are exact
        if callback is not None:
            callback(num_mv, theta[wanted].copy(), residuals[wanted].copy())
        enough = j >= k or j >= n
        done = enough and (bool(ok.all()) or j >= n)
        if breakdown and j < n:
            # an invariant subspace is exhausted: the rest of the space is unexplored. Go on from a
            # fresh vector until a block no longer improves the wanted values (finds repeated copies)
            scores = np.full(k, -np.inf)
            scores[: len(wanted)] = _score(theta[wanted], which)
            margin = tol * np.maximum(np.abs(np.where(np.isfinite(scores), scores, 0.0)), floor)
            improved = bool(np.any(scores > block_scores + margin))
            block_scores = scores
            done = done and not improved
        if done:
            result_idx = wanted
            break
        if num_mv >= max_iter:
            result_idx = wanted
            break

        if breakdown:
            # invariant subspace found: continue from a fresh vector orthogonal to the basis
            q = _random_unit(n, gen, dtype, device)
            Q.orthogonalize(q, j)
            q = q / Q.norm(q)
            T[j, j - 1] = T[j - 1, j] = 0.0
            Q.set(j, q)
            start = j
            omega_prev, omega = np.zeros(m + 1), np.full(m + 1, eps)
            if j < m:
                continue  # (at j == m: restart below, with zero coupling)
        else:
            Q.set_scaled(j, w, beta)

        if j == m:  # thick restart (Wu & Simon 2000): keep the best Ritz vectors
            keep_n = min(m - 1, max(k + (m - k) // 2, k + 1))
            keep = order[:keep_n]
            Y = S[:, keep]                                                   # (m, l)
            coupling = beta * S[m - 1, keep] if not breakdown else np.zeros(keep_n)
            Q.restart(Y, m, keep_n)                                          # Q[:l] <- Y^T Q[:m]
            T[:] = 0.0
            T[np.arange(keep_n), np.arange(keep_n)] = theta[keep]
            T[keep_n, :keep_n] = T[:keep_n, keep_n] = coupling
            j = start = keep_n
            arrow = True
            restarts += 1
            omega_prev, omega = np.zeros(m + 1), np.full(m + 1, eps)

    idx = result_idx
    conv = residuals[idx] <= tol * np.maximum(np.abs(theta[idx]), floor)
    vectors = None
    if return_eigenvectors:
        vectors = Q.ritz_vectors(S[:, idx], j)
    return LanczosResult(
        eigenvalues=torch.as_tensor(theta[idx].copy(), dtype=torch.float64),
        residuals=torch.as_tensor(residuals[idx].copy(), dtype=torch.float64),
        converged=torch.as_tensor(conv),
        num_matvecs=num_mv, num_restarts=restarts, num_reorthogonalizations=reorths,
        eigenvectors=vectors, which=which,
    )
