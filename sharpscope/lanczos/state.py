r"""The single-vector thick-restart Lanczos iteration as a state object with small steps.

:func:`sharpscope.lanczos` validates its arguments, builds a :class:`LanczosState` and drives it (the
split of scipy's ARPACK wrapper: validate, iterate, extract). One iteration is

1. :meth:`LanczosState.expand`: one product ``w = A q_j`` and the three-term recurrence; ``alpha_j``,
   ``beta_j`` and the symmetry probe ``q_{j-1}^T A q_j`` reach the host in one transfer
   (:meth:`~.backends.base.KrylovBasis.three_term`), the only host synchronization of a step that needs
   no reorthogonalization;
2. :meth:`LanczosState.reorthogonalize`: Simon's omega recurrence on the host, and a Gram-Schmidt pass
   against the basis only when semi-orthogonality is about to be lost;
3. :meth:`LanczosState.ritz_test`: the Ritz values and residual norms from the projected matrix
   (:func:`.ritz.ritz_pairs`), solved only when the test can change the answer (:class:`CheckSchedule`);
   :meth:`LanczosState.done` applies the stop rule (:class:`.ritz.StopRule`);
4. :meth:`LanczosState.advance`: store ``q_{j+1}``, or continue from a fresh vector after a breakdown,
   and restart thickly when the basis is full.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import scipy.linalg
import torch

from ..linop import ASYMMETRY_CAP, NOT_SYMMETRIC_HINT, NotSymmetricError
from .backends import KrylovBasis
from .config import LanczosConfig
from .refine import ROUNDING, refine, thresholds
from .result import LanczosResult, make_result
from .ritz import Ritz, StopRule, ritz_pairs
from .start import random_unit

__all__ = ["LanczosState", "CheckSchedule", "RoundedBasisLost", "probe_tolerance"]


ROUNDED_ORTHOGONALITY = 2.0 ** -8  # a bfloat16 row's rounding: omega's floor is this / sqrt(n) (LanczosState)
PROBE_LIMIT = 0.1  # above this, 100 sqrt(eps) leaves the probe nothing to refuse (16-bit dtypes)


def probe_tolerance(op_dtype: torch.dtype, n: int) -> float:
    r"""The symmetry probe's tolerance on :math:`|q_{j-1}^\top A q_j - \beta_{j-1}|`, relative to
    :math:`\|A\|`: ``100 sqrt(eps)`` of the operator's dtype where that is below ``PROBE_LIMIT`` (float32:
    0.0345, float64: 1.5e-6), else ``ASYMMETRY_CAP / sqrt(n)`` (16-bit, where ``100 sqrt(eps)`` is 8.8 in
    bfloat16 and 3.1 in float16: a tolerance no relative mismatch can exceed).

    Why not ``1 / sqrt(n)`` in every dtype: the rounding error of a product is not in a random direction
    relative to the Krylov vectors, so a symmetric float32 operator's per-step mismatch does not shrink with
    ``n`` (a float32 GPT-2 of 26M parameters, tolerance 9.7e-6 under that rule, was refused at step 1 in
    autograd and finite-difference modes alike). A grossly asymmetric operator gives about
    :math:`\|A\| / (2\sqrt n)` per step, so at large ``n`` in float32 this probe does not catch a triangle
    behind a function: :func:`~sharpscope.as_operator` checks dense matrices exactly,
    :func:`~sharpscope.check_symmetry` tests random pairs (where ``1 / sqrt(n)`` does hold), and curvature
    operators check their derivatives on the first product."""
    loose = 100 * math.sqrt(torch.finfo(op_dtype).eps)
    return loose if loose < PROBE_LIMIT else ASYMMETRY_CAP / math.sqrt(max(n, 1))


class RoundedBasisLost(RuntimeError):  # noqa: N818 - internal; caught by lanczos() to solve again
    """The bfloat16-stored basis lost orthogonality (seen as a symmetry mismatch of the recurrence)."""

    def __init__(self, message: str, num_matvecs: int) -> None:
        super().__init__(message)
        self.num_matvecs = num_matvecs


class CheckSchedule:
    """When to solve the Ritz problem: never before ``k`` Ritz values exist, then predicted from the decay
    of the wanted residuals. After a check that failed by ``D = max_i log(r_i / (tol |theta_i|))``, with
    ``rate`` the fastest decrease of ``D`` per product over the last three intervals between checks, the
    next check comes after ``clamp(floor(D / (2 rate)), 1, max_skip)`` products: at most ``max_skip - 1``
    products beyond the first step at which the test would have passed (none on the test problems and the
    benchmark models). Deterministic (it reads only the residuals)."""

    def __init__(self, k: int, max_skip: int = 3) -> None:
        self.k, self.max_skip = k, max_skip
        self.next = 0
        self.history: list[tuple[int, float]] = []

    def due(self, num_mv: int, j: int) -> bool:
        return j >= self.k and num_mv >= self.next

    def failed(self, num_mv: int, distance: float) -> None:
        points = self.history[-3:] + [(num_mv, distance)]
        rates = [(a[1] - b[1]) / (b[0] - a[0]) for a, b in zip(points, points[1:]) if b[0] > a[0]]
        rate = max(rates, default=0.0)
        skip = int(min(self.max_skip, max(1.0, 0.5 * distance / rate))) if rate > 0 else 1
        self.history.append((num_mv, distance))
        self.next = num_mv + skip


class LanczosState:
    """The state of one thick-restart Lanczos solve (module docstring) on the basis ``Q``."""

    def __init__(self, op, cfg: LanczosConfig, Q: KrylovBasis, gen: torch.Generator) -> None:
        self.op, self.cfg, self.Q, self.gen = op, cfg, Q, gen
        m = cfg.max_basis
        self.T = np.zeros((m + 1, m + 1))
        self.omega_prev = np.zeros(m + 1)  # omega_{j-1, i} ~ q_{j-1} . q_i
        self.omega = np.zeros(m + 1)       # omega_{j, i}   ~ q_j . q_i
        self.num_mv = self.restarts = self.reorths = 0
        self.j = 0          # vectors 0..j-1 have had their products taken; Q[j] is the current vector
        self.start = 0      # first vector of the current Lanczos run (after a thick restart: the coupled one)
        self.arrow = False  # whether T has an arrowhead block (after a restart)
        self.force_reorth = False
        self.anorm = 0.0
        self.beta = 0.0
        self.noise = 0.0
        self.coupled = False
        self.stop = StopRule(cfg)
        self.schedule = CheckSchedule(cfg.k)
        # a bfloat16 basis stores rounded rows: inner products of rounded unit vectors are off by about
        # u / sqrt(n) (u = 2^-8), which the symmetry probe must tolerate and the omega recurrence cannot see
        self.rounded = Q.storage == "bfloat16"
        self.sym_floor = 100 * 2.0 ** -8 / math.sqrt(cfg.n) if self.rounded else 0.0
        # ... and a vector orthogonalized against rounded rows is orthogonal to the exact ones only to about
        # u / sqrt(n): Simon's omega starts there after a reorthogonalization, not at eps (at n < 256 in float32
        # this exceeds sqrt(eps), and partial reorthogonalization becomes full)
        self.omega_floor = max(cfg.eps, ROUNDED_ORTHOGONALITY / math.sqrt(cfg.n)) if self.rounded else cfg.eps
        # a rounded basis keeps k products for the explicit residuals of what it returns (extract)
        self.cap = max(cfg.max_matvecs - cfg.k, 1) if self.rounded else cfg.max_matvecs

    # -- 1. expand ------------------------------------------------------------------------------
    def expand(self) -> torch.Tensor:
        """``w = A q_j`` and the recurrence's new column of ``T``; returns ``w`` (not yet normalized)."""
        j, T = self.j, self.T
        qj = self.Q.get(j)
        w = self.op.matvec(qj)
        self.num_mv += 1
        if self.cfg.progress is not None:
            self.cfg.progress.advance(self.num_mv)
        if w.dtype != self.cfg.dtype:
            w = w.to(self.cfg.dtype)
        elif w.data_ptr() == qj.data_ptr():
            w = w.clone()
        w = w.detach().contiguous()
        self.noise = 2 * self.cfg.eps * self.anorm  # rounding added to q_{j+1}; raised by the symmetry probe
        self.coupled = j == self.start and self.start > 0
        if self.coupled:
            # first step after a restart: couple to every kept vector (the arrowhead column)
            h = self.Q.orthogonalize(w, j + 1)
            T[: j + 1, j] = h
            T[j, : j + 1] = h
            self.reorths += 1
            self.beta = self.Q.norm(w)
        else:
            lo = j - 1 if j > self.start else j
            h, self.beta = self.Q.three_term(w, lo, j, T[j, j - 1] if j > lo else 0.0)
            if j > lo:
                self._symmetry_probe(float(h[0]))
            T[j, j] = float(h[-1])
        if not math.isfinite(self.beta + T[j, j]):
            raise FloatingPointError("the operator returned NaN or inf; check the model, loss and data")
        self.anorm = max(self.anorm, abs(T[j, j]) + self.beta + (abs(T[j, j - 1]) if j > 0 else 0.0))
        return w

    def _symmetry_probe(self, back: float) -> None:
        """``q_{j-1} . A q_j`` must equal ``beta_{j-1} = q_j . A q_{j-1}``: the small mismatch of a symmetric
        operator measures its products' rounding (float32 autograd through many layers is far noisier
        than eps ||A||), which feeds the omega recurrence's noise term; a large one is an error."""
        j, T = self.j, self.T
        mismatch = abs(back - T[j, j - 1])
        self.noise = max(self.noise, mismatch)
        if mismatch > max(probe_tolerance(self.cfg.op_dtype, self.cfg.n), self.sym_floor) * self.anorm:
            if self.rounded:  # the rounded rows, not necessarily the operator: lanczos() retries in float32
                raise RoundedBasisLost(f"symmetry mismatch {mismatch:.3g} at step {j}", self.num_mv)
            raise NotSymmetricError(
                f"the operator is not symmetric: q_(j-1).A q_j = {back:.6g} but q_j.A q_(j-1) = "
                f"{T[j, j - 1]:.6g} (step {j}): {NOT_SYMMETRIC_HINT}")

    # -- 2. reorthogonalize ---------------------------------------------------------------------
    def reorthogonalize(self, w: torch.Tensor) -> None:
        """Partial (Simon) or full reorthogonalization of ``w``; then ``beta_j`` enters ``T`` and ``j``
        advances."""
        j, beta = self.j, self.beta
        # after a thick restart the kept Ritz vectors carry the previous cycle's semi-orthogonality
        # (~sqrt(eps)), which the omega recurrence cannot see: reorthogonalize fully from then on
        need = not self.coupled and j > 0 and (self.cfg.reorth == "full" or self.restarts > 0
                                               or self.force_reorth or (self.rounded and self.start > 0))
        if not self.coupled and not need and j > self.start and beta > 0:
            need = self._omega_step()
        elif not need:
            self._reset_omega()
        if need:
            self.beta = self.Q.reorthogonalize(w, j + 1)
            self.reorths += 1
            self.force_reorth = not self.force_reorth and self.cfg.reorth == "partial"  # the next one too (Simon)
            self._reset_omega()
        self.T[j + 1, j] = self.T[j, j + 1] = self.beta
        self.j += 1

    def _omega_step(self) -> bool:
        """Simon's recurrence for ``omega_{j+1, i} ~ q_{j+1} . q_i`` (i < j), from ``A q_i = sum_r T[r, i] q_r``
        and ``beta_j q_{j+1} = A q_j - alpha_j q_j - beta_{j-1} q_{j-1}``; whether to reorthogonalize."""
        j, T, beta = self.j, self.T, self.beta
        om = self.omega[: j + 1].copy()
        om[j] = 1.0
        omp = self.omega_prev[:j].copy()
        omp[j - 1] = 1.0
        est = T[: j + 1, :j].T @ om - T[j, j] * om[:j] - T[j, j - 1] * omp
        est = (est + np.sign(est) * self.noise) / beta
        self.omega_prev, self.omega = self.omega, np.zeros(self.cfg.max_basis + 1)
        self.omega[:j] = est
        self.omega[j] = self.noise / beta
        return bool(np.max(np.abs(est)) > math.sqrt(self.cfg.eps))

    def _reset_omega(self) -> None:
        self.omega_prev, self.omega = self.omega, np.full(self.cfg.max_basis + 1, self.omega_floor)

    # -- 3. Ritz test ---------------------------------------------------------------------------
    @property
    def breakdown(self) -> bool:
        """The Krylov space is exhausted (``beta_j ~ 0``) or is the whole space."""
        return self.beta <= self.cfg.eps ** 0.75 * max(self.anorm, 1e-300) or self.j >= self.cfg.n

    def must_check(self) -> bool:
        """Whether the Ritz problem is needed now whatever the schedule says: a restart, a breakdown, the
        last product allowed."""
        return (self.j >= self.cfg.max_basis or self.breakdown or self.num_mv >= self.cap)

    def ritz_test(self) -> Ritz | None:
        """The Ritz pairs and their residual norms ``|beta_j s_{j,i}|``, or None when no test is due."""
        if not (self.must_check() or self.schedule.due(self.num_mv, self.j)):
            return None
        j, cfg = self.j, self.cfg
        Tj = self.T[:j, :j]
        if self.arrow:
            theta, S = scipy.linalg.eigh(Tj, check_finite=False)
        else:
            theta, S = scipy.linalg.eigh_tridiagonal(np.diag(Tj).copy(), np.diag(Tj, -1).copy(), check_finite=False)
        return ritz_pairs(cfg, theta, S, np.abs(self.beta * S[j - 1, :]), j, self.anorm, self.num_mv)

    def done(self, ritz: Ritz | None) -> bool:
        """Whether the solve stops after this step (the stop rule, or out of products)."""
        if ritz is None:
            return False
        if self.j >= self.cfg.k:
            self._schedule(ritz, ritz.converged(self.cfg.tol))
        finished = self.stop.finished(ritz, self.j, fresh=self.breakdown)
        return finished or self.num_mv >= self.cap

    def _schedule(self, ritz: Ritz, ok: np.ndarray) -> None:
        if ok.all():
            return
        w = ritz.wanted
        scale = self.cfg.tol * np.maximum(np.abs(ritz.theta[w]), ritz.floor)
        distance = float(np.max(np.log(np.maximum(ritz.residuals[w], 1e-300) / np.maximum(scale, 1e-300))))
        self.schedule.failed(self.num_mv, distance)

    # -- 4. advance / restart -------------------------------------------------------------------
    def advance(self, w: torch.Tensor, ritz: Ritz | None) -> None:
        """Store ``q_{j+1} = w / beta_j`` (or a fresh vector after a breakdown); restart when full."""
        breakdown = self.breakdown
        if breakdown:
            self._fresh_vector()
            if self.j < self.cfg.max_basis:
                return  # (at j == m: restart below, with zero coupling)
        else:
            self.Q.set_scaled(self.j, w, self.beta)
        if self.j == self.cfg.max_basis:
            self.restart(ritz, breakdown)

    def _fresh_vector(self) -> None:
        """Invariant subspace found: continue from a random vector orthogonal to the basis."""
        j, cfg = self.j, self.cfg
        q = random_unit(cfg.space, self.gen, cfg.dtype, cfg.device)
        self.Q.orthogonalize(q, j)
        q = q / self.Q.norm(q)
        self.T[j, j - 1] = self.T[j - 1, j] = 0.0
        self.Q.set(j, q)
        self.start = j
        self.omega_prev, self.omega = np.zeros(cfg.max_basis + 1), np.full(cfg.max_basis + 1, self.omega_floor)

    def restart(self, ritz: Ritz, breakdown: bool) -> None:
        """Thick restart (Wu & Simon 2000): keep the best Ritz vectors; ``T`` becomes an arrowhead."""
        m, k = self.cfg.max_basis, self.cfg.k
        keep_n = min(m - 1, max(k + (m - k) // 2, k + 1))
        keep = ritz.order[:keep_n]
        coupling = self.beta * ritz.S[m - 1, keep] if not breakdown else np.zeros(keep_n)
        self.Q.restart(ritz.S[:, keep], m, keep_n)  # Q[:l] <- Y^T Q[:m]
        T = self.T
        T[:] = 0.0
        T[np.arange(keep_n), np.arange(keep_n)] = ritz.theta[keep]
        T[keep_n, :keep_n] = T[:keep_n, keep_n] = coupling
        self.j = self.start = keep_n
        self.arrow = True
        self.restarts += 1
        self.omega_prev, self.omega = np.zeros(m + 1), np.full(m + 1, self.omega_floor)

    # -- the loop, and what it found ----------------------------------------------------------------
    def run(self) -> Ritz:
        """Iterate until converged or out of products; the last Ritz test."""
        while True:
            w = self.expand()
            self.reorthogonalize(w)
            ritz = self.ritz_test()
            if self.done(ritz):
                return ritz
            self.advance(w, ritz)

    @property
    def basis_bytes(self) -> int:
        return self.Q.nbytes

    def extract(self, ritz: Ritz, return_eigenvectors: bool) -> LanczosResult:
        """The wanted Ritz pairs of the last test (the Ritz vectors ``Q^T S`` when asked for); from a rounded
        basis, the Ritz vectors with explicit residuals, refined where they exceed ``tol`` (:mod:`.refine`)."""
        idx = ritz.wanted
        counts = dict(num_restarts=self.restarts, num_reorthogonalizations=self.reorths)
        if self.rounded:
            return self._certified(ritz, idx, return_eigenvectors, counts)
        vectors = self.Q.ritz_vectors(ritz.S[:, idx], self.j) if return_eigenvectors else None
        return make_result(ritz, idx, self.cfg, vectors, num_matvecs=self.num_mv, basis_bytes=self.basis_bytes,
                           **counts)

    def _certified(self, ritz: Ritz, idx: np.ndarray, return_eigenvectors: bool, counts: dict) -> LanczosResult:
        """:meth:`extract` for a bfloat16 basis: the Ritz vectors formed in the working dtype, the basis
        released, then :func:`.refine.refine` with the products left (at least ``k``, kept by :attr:`cap`)."""
        cfg, basis_bytes, reduce = self.cfg, self.basis_bytes, self.Q._sum
        Y = self.Q.ritz_vectors(ritz.S[:, idx], self.j)
        self.Q = None  # the rounded rows are not needed any more: the refinement's vectors take their place
        atol = ROUNDING * cfg.eps * self.anorm  # the float32 products' rounding
        done = refine(self.op, Y, cfg.which, cfg.tol, ritz.floor, atol, cfg.max_matvecs - self.num_mv, reduce)
        self.num_mv += done.products
        res = make_result(Ritz(done.theta, np.eye(len(done.theta)), done.residuals, np.arange(len(done.theta)),
                               np.arange(len(done.theta)), ritz.floor), np.arange(len(done.theta)), cfg,
                          done.vectors if return_eigenvectors else None, num_matvecs=self.num_mv,
                          basis_bytes=max(basis_bytes, done.nbytes), **counts)
        ok = torch.as_tensor(done.residuals <= thresholds(done.theta, cfg.tol, ritz.floor, atol))
        return dataclasses.replace(res, converged=ok)
