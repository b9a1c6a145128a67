r"""Block Lanczos (``lanczos(op, k, block_size=b)``): ``b`` products per step, through ``op.matmat``.

From an orthonormal start block :math:`X_0` (``n x b``) the recurrence
:math:`A X_i = \sum_{l \le i} X_l H_{l,i} + X_{i+1} B_i` builds a basis whose projected matrix is
block tridiagonal (Golub & Underwood 1977; Saad, *Numerical Methods for Large Eigenvalue Problems*,
Sec. 6.7). A block Krylov space holds up to ``b`` independent directions of every eigenspace, so an
eigenvalue repeated up to ``b`` times is found with its multiplicity, which a single vector cannot see.

Choices, for robustness over speed on the basis side (the products dominate):

* full reorthogonalization of every new block against the whole basis (classical Gram-Schmidt twice,
  as matrix products);
* the new block is orthonormalized by a QR factorization followed by an SVD of the small ``R``
  (rank-revealing): directions whose singular value is below :math:`\epsilon^{3/4}\|A\|` are an exhausted
  Krylov space, replaced by random vectors orthogonal to the basis (their coupling is zero), so repeated
  eigenvalues beyond ``b`` copies are still found, as in the single-vector solver;
* the projected problem (dense, float64, on the host) is solved after every block; a Ritz pair's residual
  is :math:`\|B_i S_{i,\cdot}\|`, exact in exact arithmetic;
* thick restart (Wu & Simon 2000) when the basis is full: the best Ritz vectors are kept, with the pending
  block coupled to them.
"""
from __future__ import annotations

import numpy as np
import scipy.linalg
import torch

from ..linop import NOT_SYMMETRIC_HINT, NotSymmetricError, matmat, same_on_all_ranks
from .config import LanczosConfig
from .result import LanczosResult, make_result
from .ritz import Ritz, StopRule, ritz_pairs
from .start import random_block
from .state import probe_tolerance

__all__ = ["BlockLanczosState"]


class BlockLanczosState:
    """The state of one block Lanczos solve: basis rows ``X`` (``m + b`` rows of length ``n``) and the
    projected matrix ``T`` (float64, host)."""

    def __init__(self, op, cfg: LanczosConfig, b: int, gen: torch.Generator) -> None:
        self.op, self.cfg, self.b, self.gen = op, cfg, b, gen
        m = cfg.max_basis
        self.X = torch.zeros(m + b, cfg.n, dtype=cfg.dtype, device=cfg.device)
        self.T = np.zeros((m + b, m + b))
        self.j = 0              # rows 0..j-1 have had their products taken
        self.width = 0          # the pending block: rows j..j+width-1
        self.B = np.zeros((0, 0))  # coupling of the last block to the pending one (width x previous width)
        self.num_mv = self.restarts = 0
        self.anorm = 0.0
        self.replaced = 0       # directions replaced by random ones at the last step (exhausted space)
        self.stop = StopRule(cfg)

    # -- start ------------------------------------------------------------------------------------
    def start(self, v0: torch.Tensor | None) -> None:
        """The orthonormal start block: ``v0`` (``(n, b)`` or one vector) completed by random columns."""
        cfg, b = self.cfg, self.b
        V = random_block(b, cfg.n, self.gen, cfg.dtype, cfg.device)
        if v0 is not None:
            given = torch.as_tensor(v0).to(dtype=cfg.dtype, device=cfg.device)
            given = given.reshape(-1, 1) if given.ndim == 1 else given
            if (given.ndim != 2 or given.shape[0] != cfg.n or not 1 <= given.shape[1] <= b
                    or not bool(torch.isfinite(given).all()) or float(given.norm()) == 0.0):
                raise ValueError(f"v0 must be a finite nonzero vector of length {cfg.n} or an ({cfg.n}, c) block "
                                 f"with c <= block_size={b}")
            V[: given.shape[1]] = given.T
        V = same_on_all_ranks(self.op, V)
        Qf, R = torch.linalg.qr(V.T)
        rows, s, _ = self._rotate(Qf, R.double().cpu().numpy())
        self._store(rows, s, 0, scale=max(float(s.max()), 1e-300))

    @staticmethod
    def _rotate(Qf: torch.Tensor, R: np.ndarray) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        """``W^T = Qf R`` as orthonormal rows times ``C^T``, ``C = diag(s) V^T`` from the SVD of the small
        ``R`` (its singular values ``s`` reveal the rank): returns ``(rows, s, C)``."""
        U, s, Vt = np.linalg.svd(R)
        rows = (Qf @ torch.as_tensor(U, dtype=Qf.dtype, device=Qf.device)).T
        return rows, s, s[:, None] * Vt

    def _store(self, rows: torch.Tensor, s: np.ndarray, at: int, scale: float) -> list[int]:
        """Store ``rows`` at ``at``; those with ``s <= eps^(3/4) scale`` are replaced by random rows
        orthogonal to the basis (dropped where the space has no room left). Sets :attr:`width` and
        :attr:`replaced`; returns the indices of the rows kept, in their order."""
        cfg = self.cfg
        room = cfg.n - at
        good = [i for i in range(len(s)) if s[i] > cfg.eps ** 0.75 * scale][:room]
        self.X[at: at + len(good)] = rows[good]
        self.replaced = max(0, min(len(s), room) - len(good))
        for i in range(self.replaced):
            self.X[at + len(good) + i] = self._fresh(at + len(good) + i)
        self.width = len(good) + self.replaced
        return good

    def _fresh(self, upto: int) -> torch.Tensor:
        """A random unit row orthogonal to rows ``0..upto-1`` (twice classical Gram-Schmidt)."""
        cfg = self.cfg
        q = same_on_all_ranks(self.op, random_block(1, cfg.n, self.gen, cfg.dtype, cfg.device)[0])
        for _ in range(2):
            X = self.X[:upto]
            q -= X.T @ (X @ q)
            q /= q.norm()
        return q

    # -- one block step ---------------------------------------------------------------------------
    def expand(self) -> None:
        """Products of the pending block, full reorthogonalization, the next block and its coupling."""
        j, w, cfg = self.j, self.width, self.cfg
        W = matmat(self.op, self.X[j: j + w].T).T.to(cfg.dtype)
        if W.untyped_storage().data_ptr() == self.X.untyped_storage().data_ptr():
            W = W.clone()  # an operator that returned its input
        W = W.detach().contiguous()
        self.num_mv += w
        if cfg.progress is not None:
            cfg.progress.advance(self.num_mv)
        H, Qf, R = self._project_out(W, j + w)
        self._symmetry_probe(H[:j])
        Aj = H[j: j + w]
        self.T[j: j + w, j: j + w] = (Aj + Aj.T) / 2
        rows, s, C = self._rotate(Qf, R)
        previous = np.linalg.norm(self.T[j: j + w, :j], 2) if j else 0.0
        self.anorm = max(self.anorm, float(np.linalg.norm(Aj, 2) + s.max() + previous))
        self.j = j + w
        good = self._store(rows, s, self.j, scale=self.anorm)
        B = np.zeros((self.width, w))
        B[: len(good)] = C[good]
        self.B = B
        self.T[self.j: self.j + self.width, j: j + w] = B
        self.T[j: j + w, self.j: self.j + self.width] = B.T

    def _project_out(self, W: torch.Tensor, rows: int) -> tuple[np.ndarray, torch.Tensor, np.ndarray]:
        """Classical Gram-Schmidt of the rows of ``W`` against basis rows ``0..rows-1``, twice, and the QR
        factorization of the rest; the projections ``H`` and ``R`` reach the host in one transfer."""
        Xa = self.X[:rows]
        H = Xa @ W.T
        W -= H.T @ Xa
        H2 = Xa @ W.T
        W -= H2.T @ Xa
        H += H2
        Qf, R = torch.linalg.qr(W.T)
        host = torch.cat([H.reshape(-1), R.reshape(-1)]).double().cpu().numpy()
        if not np.isfinite(host).all():
            raise FloatingPointError("the operator returned NaN or inf; check the model, loss and data")
        w = W.shape[0]
        return host[: rows * w].reshape(rows, w), Qf, host[rows * w:].reshape(w, w)

    def _symmetry_probe(self, H_prev: np.ndarray) -> None:
        """The projections on earlier rows must equal the stored coupling (``X_l^T A X_i = B^T``)."""
        j, w = self.j, self.width
        if j == 0:
            return
        mismatch = float(np.max(np.abs(H_prev - self.T[:j, j: j + w])))
        if mismatch > probe_tolerance(self.cfg.op_dtype, self.cfg.n) * self.anorm:
            raise NotSymmetricError(f"the operator is not symmetric: block projections differ from the recurrence's "
                                    f"coupling by {mismatch:.3g} (step {j}): {NOT_SYMMETRIC_HINT}")

    # -- Ritz test and restart ----------------------------------------------------------------------
    def ritz_test(self) -> Ritz:
        """The Ritz pairs and their residual norms ``||B S_last||`` (after every block)."""
        j = self.j
        theta, S = scipy.linalg.eigh(self.T[:j, :j], check_finite=False)
        last = S[j - self.B.shape[1]: j, :]
        residuals = np.linalg.norm(self.B @ last, axis=0) if self.B.size else np.zeros(j)
        return ritz_pairs(self.cfg, theta, S, residuals, j, self.anorm, self.num_mv)

    def done(self, ritz: Ritz) -> bool:
        """The stop rule (fresh directions: those replaced at this step), or out of products or room."""
        finished = self.stop.finished(ritz, self.j, fresh=self.replaced > 0)
        return finished or self.num_mv + self.width > self.cfg.max_matvecs or self.width == 0

    def restart_if_full(self, ritz: Ritz) -> None:
        """Thick restart when the next block does not fit: keep the best Ritz vectors, the pending block
        coupled to them through ``B S``."""
        m, k, b = self.cfg.max_basis, self.cfg.k, self.b
        j, w = self.j, self.width
        if j + w <= m:
            return
        keep_n = max(k, min(k + (m - k) // 2, m - 2 * b))
        keep = ritz.order[:keep_n]
        Y = torch.as_tensor(ritz.S[:, keep], dtype=self.X.dtype, device=self.X.device)
        kept = Y.T @ self.X[:j]
        pending = self.X[j: j + w].clone()
        self.X[:keep_n] = kept
        self.X[keep_n: keep_n + w] = pending
        self.X[keep_n + w:] = 0.0
        coupling = self.B @ ritz.S[j - self.B.shape[1]: j, keep]  # (w, keep)
        self.T[:] = 0.0
        self.T[np.arange(keep_n), np.arange(keep_n)] = ritz.theta[keep]
        self.T[keep_n: keep_n + w, :keep_n] = coupling
        self.T[:keep_n, keep_n: keep_n + w] = coupling.T
        self.j = keep_n
        self.restarts += 1

    def run(self) -> Ritz:
        while True:
            self.expand()
            ritz = self.ritz_test()
            if self.done(ritz):
                return ritz
            self.restart_if_full(ritz)

    @property
    def basis_bytes(self) -> int:
        return self.X.untyped_storage().nbytes()

    def extract(self, ritz: Ritz, return_eigenvectors: bool) -> LanczosResult:
        """The wanted Ritz pairs of the last test (the Ritz vectors ``X^T S`` when asked for)."""
        idx = ritz.wanted
        vectors = None
        if return_eigenvectors:
            S = torch.as_tensor(ritz.S[:, idx], dtype=self.cfg.dtype, device=self.cfg.device)
            vectors = self.X[: self.j].T @ S
            vectors = vectors / vectors.norm(dim=0, keepdim=True)
        return make_result(ritz, idx, self.cfg, vectors, num_matvecs=self.num_mv, num_restarts=self.restarts,
                           num_reorthogonalizations=self.num_mv, basis_bytes=self.basis_bytes)
