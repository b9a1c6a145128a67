r"""The interface between the Lanczos recurrence and the storage of its Krylov basis.

:func:`sharpscope.lanczos` keeps the recurrence's scalars (``T``, the omega estimates) in float64 NumPy
and the operator's products in torch; everything that touches the basis ``Q`` (``m + 1`` rows of
length ``n``) goes through a :class:`KrylovBasis`: storing a row, the projections ``Q[lo:hi] w``, the
update ``w += Q[lo:hi]^T c``, norms, a classical Gram-Schmidt pass run twice when the DGKS test asks
for it (Daniel, Gragg, Kaufman & Stewart 1976), the thick-restart recombination
``Q[:l] <- Y^T Q[:m]`` and the Ritz vectors ``Q^T S``, and the recurrence's two steps on top of them:
:meth:`KrylovBasis.three_term` and :meth:`KrylovBasis.reorthogonalize`, each with its scalars read back in
one host transfer where the working rows are torch tensors on the device. ``w`` is always a torch tensor
on the operator's device, updated in place.

Sharded vectors (:class:`~sharpscope.vector_space.ShardedSpace`): a basis built with ``space=`` holds this
rank's shard of every row (``n`` is the local length) and sums every inner product and norm over the ranks
through ``space.reduce``: the local partial sums of one pass (a projection's coefficients, with the norm
where the pass needs it) go in one ``all_reduce``. A step without reorthogonalization takes two (``alpha``
with the symmetry probe, then ``beta``), a Gram-Schmidt pass one more per pass. Without ``space`` (one
process, or data-parallel operators, whose vectors are whole on every rank) the reduction is skipped.

Storage (``basis=``):

* ``"device"``: float32 (or the operator's float64) rows on the operator's device.
* ``"device-bf16"``: bfloat16 rows (half the memory and traffic; float32 accumulation). Stored rows
  carry a relative rounding error of up to :math:`2^{-8}` (bfloat16's unit roundoff), so the
  recurrence itself runs on float32 copies of the last two vectors (:attr:`KrylovBasis.recent`):
  without reorthogonalizations and restarts ``T`` is exactly float32 Lanczos'. Rows ``0..k-1`` (the
  "head", :func:`float_head_rows`) are stored in float32: a thick restart puts the k wanted Ritz vectors
  there, so restarts do not round them (rounded, they no longer matched the Ritz values the projected matrix
  kept for them, and restarted solves ended "converged" with wrong eigenvalues). The returned vectors still
  combine rounded rows (residuals of about 1e-3 of the operator), so :func:`sharpscope.lanczos` certifies them
  with explicit residuals (:mod:`sharpscope.lanczos.refine`).
* ``"host"``: float32 rows in (pinned, on CUDA) host memory, streamed to the device in row blocks for
  each Gram-Schmidt pass: the basis no longer limits the model size, the passes become PCIe-bound
  (~25 GB/s against ~3 TB/s of HBM), which partial reorthogonalization keeps rare. On a CPU operator
  it is the same as ``"device"``.
"""
from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch

__all__ = ["KrylovBasis", "BASIS_CHOICES", "storage_of", "basis_nbytes", "float_head_rows"]

BASIS_CHOICES = ("device", "device-bf16", "host")


def storage_of(basis: str) -> tuple[str, str]:
    """``(storage, placement)`` of a ``basis=`` choice: ``("float32"|"bfloat16", "device"|"host")``."""
    if basis not in BASIS_CHOICES:
        raise ValueError(f"basis must be one of {', '.join(map(repr, BASIS_CHOICES))}, got {basis!r}")
    return ("bfloat16" if basis == "device-bf16" else "float32"), ("host" if basis == "host" else "device")


def keeps_working_copies(basis: str, device: torch.device) -> bool:
    """Whether a basis keeps float working copies of its last two rows (:attr:`KrylovBasis.recent`): rounded
    (bfloat16) rows, or rows in host memory for a GPU operator."""
    storage, placement = storage_of(basis)
    return storage == "bfloat16" or (placement == "host" and torch.device(device).type != "cpu")


def float_head_rows(basis: str, k: int) -> int:
    """Rows ``0..k-1`` of a bfloat16 basis are stored in the working dtype (the "head"): a thick restart puts
    the ``k`` wanted Ritz vectors there, so restarts do not round them (module docstring); 0 for other bases."""
    return int(k) if storage_of(basis)[0] == "bfloat16" else 0


def basis_nbytes(rows: int, n: int, dtype: torch.dtype, basis: str, device: torch.device, head: int = 0) -> int:
    """Bytes a basis of ``rows`` rows of length ``n`` holds: the stored rows (2 bytes an entry in bfloat16,
    else ``dtype``'s size; the first ``head`` rows of a bfloat16 basis in ``dtype``: :func:`float_head_rows`)
    plus, where kept, the two working copies in ``dtype``."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    stored = 2 if storage_of(basis)[0] == "bfloat16" else itemsize
    copies = 2 * n * itemsize if keeps_working_copies(basis, device) else 0
    return rows * n * stored + head * n * (itemsize - stored) + copies


class KrylovBasis:
    """Rows ``0..m`` of a Krylov basis; subclasses implement the storage-specific methods.

    Attributes:
        m, n: the basis holds ``m + 1`` rows of length ``n``.
        dtype, device: the working precision and device of the vectors (those of the operator, at
            least float32).
        storage, placement: see :func:`storage_of`.
        recent: working copies (``dtype``, on ``device``) of the last two rows stored, when the stored
            rows are rounded or remote; the recurrence reads these.
    """

    name = "base"

    def __init__(self, m: int, n: int, dtype: torch.dtype, device: torch.device, basis: str = "device",
                 space=None, head: int = 0) -> None:
        self.m, self.n, self.dtype, self.device = int(m), int(n), dtype, torch.device(device)
        self.storage, self.placement = storage_of(basis)
        # rows 0..h-1 of a bfloat16 basis in the working dtype (float_head_rows): the kept wanted Ritz vectors
        self.h = min(int(head), self.m) if self.storage == "bfloat16" else 0
        self.recent: dict[int, torch.Tensor] = {}
        self._keep_recent = keeps_working_copies(basis, self.device)
        self.space = space if space is not None and space.sharded else None  # None: nothing to reduce

    # -- sums over the ranks of a sharded space (identities otherwise) ------------------------------
    def _sum(self, partial: torch.Tensor) -> torch.Tensor:
        """The global sum of this rank's partial sums (a tensor of one pass's scalars: one ``all_reduce``)."""
        return partial if self.space is None else self.space.reduce(partial)

    def _norm_t(self, w: torch.Tensor) -> torch.Tensor:
        """``||w||`` as a 0-d tensor (summed over the ranks of a sharded space)."""
        return torch.linalg.vector_norm(w) if self.space is None else self.space.norm(w)

    def _unit_columns(self, vectors: torch.Tensor) -> torch.Tensor:
        """``vectors`` with unit columns (norms summed over the ranks of a sharded space)."""
        if self.space is None:
            return vectors / vectors.norm(dim=0, keepdim=True)
        return vectors / self.space.column_norms(vectors, dim=0)

    # -- storage-specific ------------------------------------------------------------------
    def set(self, j: int, v: torch.Tensor) -> None:
        """Store ``v`` as row ``j``."""
        raise NotImplementedError

    def set_scaled(self, j: int, w: torch.Tensor, beta: float) -> None:
        """Store ``w / beta`` as row ``j`` (the fused normalize)."""
        raise NotImplementedError

    def get(self, j: int) -> torch.Tensor:
        """Row ``j`` as a working tensor (a view where storage allows; do not modify)."""
        raise NotImplementedError

    def project_stored(self, w: torch.Tensor, lo: int, hi: int) -> np.ndarray:
        """``Q[lo:hi] w`` from the stored rows, as float64."""
        raise NotImplementedError

    def axpy_stored(self, w: torch.Tensor, lo: int, hi: int, coeffs: np.ndarray) -> None:
        """``w += Q[lo:hi]^T coeffs`` from the stored rows, in place."""
        raise NotImplementedError

    def norm(self, w: torch.Tensor) -> float:
        """``||w||``."""
        return float(w.norm()) if self.space is None else float(self.space.norm(w))

    def _orthogonalize_stored(self, w: torch.Tensor, j: int) -> np.ndarray:
        """Classical Gram-Schmidt of ``w`` against stored rows ``0..j-1``, repeated once when the first
        pass cancelled more than half of ``w``'s norm (DGKS); returns the coefficients (float64)."""
        raise NotImplementedError

    def restart(self, Y: np.ndarray, m: int, keep: int) -> None:
        """Thick restart: rows ``0..keep-1`` become ``Y^T Q[:m]`` (``Y`` is ``(m, keep)``), row ``keep``
        becomes row ``m``."""
        raise NotImplementedError

    def ritz_vectors(self, S: np.ndarray, j: int) -> torch.Tensor:
        """``Q[:j]^T S`` with unit columns, an ``(n, k)`` tensor of the working dtype on the device."""
        raise NotImplementedError

    def stored_nbytes(self) -> int:
        """Bytes of the stored rows (the storage's own count)."""
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        """Bytes this basis holds: the stored rows and the working copies of :attr:`recent` (two rows in
        ``dtype`` where kept, counted whether or not filled yet)."""
        itemsize = torch.empty(0, dtype=self.dtype).element_size()
        return self.stored_nbytes() + (2 * self.n * itemsize if self._keep_recent else 0)

    # -- shared ------------------------------------------------------------------------------
    def orthogonalize(self, w: torch.Tensor, j: int) -> np.ndarray:
        """Gram-Schmidt of ``w`` against rows ``0..j-1`` (CGS, twice when DGKS asks); returns the
        coefficients (float64). Where :attr:`recent` keeps working copies, ``w`` is then also made
        orthogonal to them: the recurrence's symmetry (``q_j . A q_(j+1) = beta_j``) is between the
        working vectors, not their rounded copies."""
        h = self._orthogonalize_stored(w, j)
        if self._keep_recent:
            for r in sorted(self.recent):
                if r < j:
                    c = float(self._sum(torch.dot(self.recent[r], w)))
                    w.add_(self.recent[r], alpha=-c)
                    h[r] += c
        return h

    def project(self, w: torch.Tensor, lo: int, hi: int) -> np.ndarray:
        """``Q[lo:hi] w`` (float64); rows kept in :attr:`recent` are read from their working copies."""
        if self._keep_recent and all(r in self.recent for r in range(lo, hi)):
            return self._sum(torch.stack([torch.dot(self.recent[r], w) for r in range(lo, hi)])).double().cpu().numpy()
        return self.project_stored(w, lo, hi)

    def axpy(self, w: torch.Tensor, lo: int, hi: int, coeffs) -> None:
        """``w += Q[lo:hi]^T coeffs`` in place (working copies of :attr:`recent` rows where kept)."""
        coeffs = np.asarray(coeffs, dtype=np.float64)
        if self._keep_recent and all(r in self.recent for r in range(lo, hi)):
            for r, c in zip(range(lo, hi), coeffs):
                w.add_(self.recent[r], alpha=float(c))
            return
        self.axpy_stored(w, lo, hi, coeffs)

    # -- the recurrence's steps -------------------------------------------------------------
    def _working_rows(self, lo: int, hi: int) -> torch.Tensor | None:
        """Rows ``lo..hi-1`` as one torch tensor of the working dtype on the device where this basis has
        them (here: the working copies of :attr:`recent`); else None."""
        if self.recent and all(r in self.recent for r in range(lo, hi)):
            return torch.stack([self.recent[r] for r in range(lo, hi)])
        return None

    def three_term(self, w: torch.Tensor, lo: int, j: int, beta_prev: float) -> tuple[np.ndarray, float]:
        r"""One Lanczos update in place: ``h = Q[lo:j+1] w`` (``lo`` is ``j - 1`` or ``j``), then
        ``w -= beta_prev q_{j-1} + h[-1] q_j`` (only ``h[-1] q_j`` when ``lo == j``), ``beta = ||w||``.

        Returns ``(h, beta)`` on the host (float64 array, float): ``h[-1]`` is ``alpha_j``, ``h[0]`` (two
        rows) is ``q_{j-1}^\top A q_j``, the symmetry probe. Where the rows are torch tensors on the device
        (:meth:`_working_rows`) the scalars stay there until ONE device-to-host transfer; otherwise through
        ``project``/``axpy``/``norm`` (the same numbers, a host round trip per call)."""
        rows = self._working_rows(lo, j + 1)
        if rows is None:
            h = self.project(w, lo, j + 1)
            coeffs = -h
            if j > lo:
                coeffs[0] = -beta_prev
            self.axpy(w, lo, j + 1, coeffs)
            return h, self.norm(w)
        if j == lo:
            alpha = self._sum(torch.dot(rows[0], w))
            w.addcmul_(rows[0], alpha, value=-1.0)
            h = alpha.reshape(1)
        else:
            h = self._sum(torch.mv(rows, w))
            coeffs = -h
            coeffs[0] = -beta_prev  # a host scalar written into the device tensor: no transfer back
            w.addmv_(rows.T, coeffs)
        values = torch.cat([h, self._norm_t(w).reshape(1)]).tolist()  # the one host sync
        return np.array(values[:-1]), float(values[-1])

    def reorthogonalize(self, w: torch.Tensor, j: int) -> float:
        """Gram-Schmidt of ``w`` against rows ``0..j-1`` (:meth:`orthogonalize`), in place; returns ``||w||``."""
        self.orthogonalize(w, j)
        return self.norm(w)

    def _remember(self, j: int, v: torch.Tensor) -> None:
        if self._keep_recent:
            self.recent = {r: t for r, t in self.recent.items() if r == j - 1}
            self.recent[j] = v

    def _after_restart(self, m: int, keep: int) -> None:
        last = self.recent.get(m)
        self.recent = {} if last is None else {keep: last}

    @staticmethod
    def _dgks(norm_before: float, norm_after: float) -> bool:
        """Whether a second Gram-Schmidt pass is needed ("twice is enough")."""
        return norm_after < norm_before / math.sqrt(2.0)

    def _row_blocks(self, lo: int, hi: int, budget_bytes: int = 64 << 20) -> Iterator[tuple[int, int]]:
        step = max(1, budget_bytes // max(4 * self.n, 1))
        for a in range(lo, hi, step):
            yield a, min(a + step, hi)

    def _col_blocks(self, rows: int, budget_bytes: int = 64 << 20) -> Iterator[tuple[int, int]]:
        step = max(1, budget_bytes // max(4 * rows, 1))
        for a in range(0, self.n, step):
            yield a, min(a + step, self.n)
