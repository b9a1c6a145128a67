"""The default backend: the basis as one torch tensor, the algebra as torch BLAS calls.

With ``basis="device"`` this is exactly the code :func:`sharpscope.lanczos` always ran (same calls,
same results). ``"device-bf16"`` stores a ``torch.bfloat16`` tensor and converts row blocks to the
working dtype for each pass (float32 accumulation); ``"host"`` keeps the rows in pinned host memory
and copies row blocks to the device per pass (see :mod:`.base`). A bfloat16 basis keeps its first ``h`` rows
(:func:`~.base.float_head_rows`) in a separate tensor :attr:`TorchBasis.head` of the working dtype.
"""
from __future__ import annotations

import numpy as np
import torch

from .base import KrylovBasis

__all__ = ["TorchBasis"]


class TorchBasis(KrylovBasis):
    """A :class:`~.base.KrylovBasis` on a ``(m + 1, n)`` torch tensor :attr:`Q`."""

    name = "torch"

    def __init__(self, m: int, n: int, dtype: torch.dtype, device: torch.device, basis: str = "device",
                 space=None, head: int = 0) -> None:
        super().__init__(m, n, dtype, device, basis, space, head)
        store_dtype = torch.bfloat16 if self.storage == "bfloat16" else dtype
        self.head = torch.empty(self.h, n, dtype=dtype, device=self.device)  # rows 0..h-1 (bfloat16 only)
        if self.placement == "host":
            pin = self.device.type == "cuda"
            self.Q = torch.empty(m + 1, n, dtype=store_dtype, device="cpu", pin_memory=pin)
        else:
            self.Q = torch.empty(m + 1 - self.h, n, dtype=store_dtype, device=self.device)  # rows h..m
        self._plain = self.Q.dtype == dtype and self.Q.device == self.device

    def _rows(self, a: int, b: int, cols: slice = slice(None)) -> torch.Tensor:
        """Rows ``a..b-1`` (columns ``cols``) in the working dtype on the device: head rows and stored ones."""
        h = self.h
        low = self.Q[max(a, h) - h: max(b, h) - h, cols].to(device=self.device, dtype=self.dtype, non_blocking=True)
        return low if a >= h else torch.cat([self.head[a:min(b, h), cols], low])

    def _store(self, lo: int, values: torch.Tensor, cols: slice = slice(None)) -> None:
        """Rows ``lo..lo+len(values)-1`` (columns ``cols``) := ``values``, rounded where stored in bfloat16."""
        h, hi = self.h, lo + values.shape[0]
        if lo < h:
            self.head[lo:min(hi, h), cols].copy_(values[: min(hi, h) - lo])
        if hi > h:
            self.Q[max(lo, h) - h: hi - h, cols].copy_(values[max(lo, h) - lo:])

    def set(self, j: int, v: torch.Tensor) -> None:
        if self._plain:
            self.Q[j] = v
        else:
            self._store(j, v.reshape(1, -1))
            self._remember(j, v)

    def set_scaled(self, j: int, w: torch.Tensor, beta: float) -> None:
        if self._plain:
            torch.div(w, beta, out=self.Q[j])
        else:
            self.set(j, w / beta)

    def get(self, j: int) -> torch.Tensor:
        if self._plain:
            return self.Q[j]
        return self.recent[j] if j in self.recent else self._rows(j, j + 1)[0]

    def project_stored(self, w: torch.Tensor, lo: int, hi: int) -> np.ndarray:
        if self._plain:
            if hi - lo == 1:
                return np.array([float(self._sum(torch.dot(self.Q[lo], w)))])
            return np.array(self._sum(torch.mv(self.Q[lo:hi], w)).tolist())
        return self._project_f(w, lo, hi).double().cpu().numpy()

    def axpy_stored(self, w: torch.Tensor, lo: int, hi: int, coeffs: np.ndarray) -> None:
        if self._plain and hi - lo == 1:
            w.add_(self.Q[lo], alpha=float(coeffs[0]))
        elif self._plain:
            w.addmv_(self.Q[lo:hi].T, torch.tensor(coeffs, dtype=self.dtype, device=self.device))
        else:
            self._update(w, lo, hi, -torch.as_tensor(coeffs, dtype=self.dtype).to(self.device))

    def _project_f(self, w: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        return self._sum(torch.cat([torch.mv(self._rows(a, b), w) for a, b in self._row_blocks(lo, hi)]))

    def _update(self, w: torch.Tensor, lo: int, hi: int, h: torch.Tensor) -> None:
        for a, b in self._row_blocks(lo, hi):
            w.sub_(torch.mv(self._rows(a, b).T, h[a - lo: b - lo]))

    def _orthogonalize_stored(self, w: torch.Tensor, j: int) -> np.ndarray:
        before = self.norm(w)
        if self._plain:
            Qj = self.Q[:j]
            h = self._sum(torch.mv(Qj, w))
            w.sub_(torch.mv(Qj.T, h))
            if self._dgks(before, self.norm(w)):
                h2 = self._sum(torch.mv(Qj, w))
                w.sub_(torch.mv(Qj.T, h2))
                h += h2
            return h.double().cpu().numpy()
        h = self._project_f(w, 0, j)
        self._update(w, 0, j, h)
        if self._dgks(before, self.norm(w)):
            h2 = self._project_f(w, 0, j)
            self._update(w, 0, j, h2)
            h += h2
        return h.double().cpu().numpy()

    def restart(self, Y: np.ndarray, m: int, keep: int) -> None:
        Q = self.Q
        if self._plain:
            newQ = torch.as_tensor(Y.T, dtype=self.dtype, device=self.device) @ Q[:m]  # (keep, n)
            last = Q[m].clone()
            Q[:keep] = newQ
            Q[keep] = last
            return
        Yt = torch.as_tensor(Y.T, dtype=self.dtype).to(self.device)
        for a, b in self._col_blocks(m):  # column blocks are independent: recombine in place
            cols = slice(a, b)
            new = torch.cat([Yt @ self._rows(0, m, cols), self._rows(m, m + 1, cols)])
            self._store(0, new, cols)  # rows 0..keep-1: the kept Ritz vectors; row keep: row m
        self._after_restart(m, keep)

    def stored_nbytes(self) -> int:
        return self.Q.untyped_storage().nbytes() + self.head.untyped_storage().nbytes()

    def _working_rows(self, lo: int, hi: int) -> torch.Tensor | None:
        return self.Q[lo:hi] if self._plain else super()._working_rows(lo, hi)

    def reorthogonalize(self, w: torch.Tensor, j: int) -> float:
        """Classical Gram-Schmidt of ``w`` against rows ``0..j-1``, repeated when the pass cancelled more
        than half of ``w``'s norm (DGKS), in place; returns ``||w||``. On plain storage the norms before and
        after reach the host in one transfer (a second only when DGKS asks for the second pass)."""
        if not self._plain:
            return super().reorthogonalize(w, j)
        if self.space is not None:
            return self._reorthogonalize_sharded(w, j)
        rows = self.Q[:j]
        before = torch.linalg.vector_norm(w)
        w.sub_(torch.mv(rows.T, torch.mv(rows, w)))
        norms = torch.stack([before, torch.linalg.vector_norm(w)]).tolist()
        if not self._dgks(norms[0], norms[1]):
            return float(norms[1])
        w.sub_(torch.mv(rows.T, torch.mv(rows, w)))
        return float(torch.linalg.vector_norm(w))

    def _reorthogonalize_sharded(self, w: torch.Tensor, j: int) -> float:
        """:meth:`reorthogonalize` on sharded rows: the projection and ``||w||^2`` of a pass summed over the
        ranks in one ``all_reduce``, the norm after it in another (two more when DGKS asks for a second pass)."""
        rows = self.Q[:j]
        first = self._sum(torch.cat([torch.mv(rows, w), torch.dot(w, w).reshape(1)]))
        w.sub_(torch.mv(rows.T, first[:-1]))
        before, after = float(first[-1].clamp_min(0).sqrt()), self.norm(w)
        if not self._dgks(before, after):
            return after
        w.sub_(torch.mv(rows.T, self._sum(torch.mv(rows, w))))
        return self.norm(w)

    def ritz_vectors(self, S: np.ndarray, j: int) -> torch.Tensor:
        Sk = torch.as_tensor(S, dtype=self.dtype, device=self.device)
        if self._plain:
            vectors = self.Q[:j].T @ Sk
        else:
            vectors = torch.zeros(self.n, S.shape[1], dtype=self.dtype, device=self.device)
            for a, b in self._row_blocks(0, j):
                vectors += self._rows(a, b).T @ Sk[a:b]
        return self._unit_columns(vectors)
