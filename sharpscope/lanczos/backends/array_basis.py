"""The array backend: the basis as one NumPy (CPU) or CuPy (GPU) array, written once against their
common API, with the fused kernels of ``cuda/`` on CuPy and their NumPy references on the CPU.

Vectors cross from torch without copies: ``tensor.numpy()`` on the CPU, DLPack
(``cupy.from_dlpack`` / ``torch.from_dlpack``) on the GPU, so in-place updates of the array are
updates of the tensor the recurrence holds. bfloat16 rows are ``uint16`` bit patterns (:mod:`.bf16`).

Orthogonalization (CGS2 with the DGKS test) with the CuPy kernels takes 2 sweeps over ``Q`` when one
pass suffices and 3 when it does not (``project``; ``update_project``, which applies the first update
and computes the second projection and ``||w||`` in the same sweep; ``update``), against torch's 2
and 4; the NumPy references compute the same values without the fusion. A bfloat16 basis keeps its first
``h`` rows (:func:`~.base.float_head_rows`) in a separate array :attr:`ArrayBasis.head` of the working dtype
(its passes then take one kernel call per part).
"""
from __future__ import annotations

import numpy as np
import torch

from . import reference
from .base import KrylovBasis
from .bf16 import bf16_bits_to_float32, float32_to_bf16_bits

__all__ = ["ArrayBasis"]


class ArrayBasis(KrylovBasis):
    """A :class:`~.base.KrylovBasis` on a ``(m + 1, n)`` NumPy or CuPy array :attr:`Q`.

    Args:
        xp: ``numpy`` or ``cupy``.
        ops: the kernel functions (:mod:`.reference` or a :class:`.kernels.CupyKernels`); the
            references are used for float64 working precision.
    """

    def __init__(self, m: int, n: int, dtype: torch.dtype, device: torch.device, basis: str = "device",
                 xp=np, ops=reference, space=None, head: int = 0) -> None:
        super().__init__(m, n, dtype, device, basis, space, head)
        self.xp = xp
        self.name = "cupy" if xp is not np else "numpy"
        self.np_dtype = np.float32 if dtype == torch.float32 else np.float64
        self.ops = ops if self.np_dtype == np.float32 else reference
        store = np.uint16 if self.storage == "bfloat16" else self.np_dtype
        self._host = self.placement == "host" and xp is not np
        if self._host:
            import cupyx

            self.Q = cupyx.empty_pinned((m + 1, n), dtype=store)
        else:
            self.Q = xp.empty((m + 1 - self.h, n), dtype=store)  # rows h..m; rows 0..h-1 in head
        self.head = xp.empty((self.h, n), dtype=self.np_dtype)
        if xp is not np:
            self._on_operator_stream()

    def _on_operator_stream(self) -> None:
        """Run every basis method on the operator's GPU and on torch's current stream there, so that
        the kernels are ordered after the products that wrote ``w`` (CuPy would otherwise use its own
        current device and stream)."""
        import contextlib

        from .kernels import cuda_index

        index = cuda_index(self.device)
        stream = self.xp.cuda.ExternalStream(torch.cuda.current_stream(index).cuda_stream)
        device = self.xp.cuda.Device(index)

        def on_stream(method):
            def run(*args, **kwargs):
                with contextlib.ExitStack() as stack:
                    stack.enter_context(device)
                    stack.enter_context(stream)
                    return method(*args, **kwargs)
            return run

        for name in ("set", "set_scaled", "get", "project_stored", "axpy_stored", "norm",
                     "_orthogonalize_stored", "restart", "ritz_vectors"):
            setattr(self, name, on_stream(getattr(self, name)))

    # -- conversions -------------------------------------------------------------------------
    def _arr(self, t: torch.Tensor):
        t = t.detach()
        if self.xp is np:
            return t.numpy()
        return self.xp.from_dlpack(t)

    def _tensor(self, a) -> torch.Tensor:
        return torch.from_numpy(a) if self.xp is np else torch.from_dlpack(a)

    def _sum_arr(self, a):
        """The global sum of an array of partial sums (itself unless the space is sharded)."""
        if self.space is None:
            return a
        return self._arr(self._sum(self._tensor(self.xp.ascontiguousarray(a)).clone()))

    def _dev(self, a):
        """An array on the compute device (a no-op unless the basis is in host memory)."""
        return self.xp.asarray(np.ascontiguousarray(a)) if self._host else a

    def _decode(self, block):
        block = bf16_bits_to_float32(block, xp=self.xp) if block.dtype == np.uint16 else block
        return block.astype(self.np_dtype, copy=False)

    def _blocks(self, lo: int, hi: int):
        """Row blocks of rows ``lo..hi-1`` on the device: views (the head's rows, then the stored ones), or
        streamed blocks from host memory."""
        if not self._host:
            h = self.h
            if lo < min(hi, h):
                yield lo, min(hi, h), self.head[lo:min(hi, h)]
            if hi > max(lo, h):
                yield max(lo, h), hi, self.Q[max(lo, h) - h: hi - h]
            return
        for a, b in self._row_blocks(lo, hi):
            yield a, b, self._dev(self.Q[a:b])

    # -- storage ------------------------------------------------------------------------------
    def _cols(self, hi: int, a: int, b: int):
        """Rows ``0..hi-1``, columns ``a..b-1``, decoded to the working dtype on the device."""
        parts = [self._decode(self._dev(block[:, a:b])) for _, _, block in self._blocks(0, hi)]
        return parts[0] if len(parts) == 1 else self.xp.concatenate(parts)

    def set(self, j: int, v: torch.Tensor) -> None:
        a = self._arr(v.contiguous())
        if j < self.h:
            self.head[j] = a
        elif self.storage == "bfloat16":
            self.Q[j - self.h] = float32_to_bf16_bits(a, xp=self.xp)  # (never in host memory)
        else:
            self.Q[j] = a.get() if self._host else a
        self._remember(j, v)

    def set_scaled(self, j: int, w: torch.Tensor, beta: float) -> None:
        a = self._arr(w)
        q = self.xp.empty_like(a)
        if self._host or self.np_dtype != np.float32 or j < self.h:
            self.ops.scale_store(a, 1.0 / beta, q)
            self.set(j, self._tensor(q))
        elif self.storage == "bfloat16":
            self.ops.scale_store(a, 1.0 / beta, self.Q[j - self.h], q)  # fused: float32 copy + rounded row
            self._remember(j, self._tensor(q))
        else:
            self.ops.scale_store(a, 1.0 / beta, self.Q[j])

    def get(self, j: int) -> torch.Tensor:
        if j in self.recent:
            return self.recent[j]
        if j < self.h:
            return self._tensor(self.head[j])
        row = self.Q[j - self.h]
        if self.storage == "float32" and not self._host:
            return self._tensor(row)
        return self._tensor(self._decode(self._dev(row)))

    # -- algebra ------------------------------------------------------------------------------
    def project_stored(self, w: torch.Tensor, lo: int, hi: int) -> np.ndarray:
        h = self._sum_arr(self._project_rows(self._arr(w), lo, hi))
        return np.asarray(h.get() if self.xp is not np else h, dtype=np.float64)

    def axpy_stored(self, w: torch.Tensor, lo: int, hi: int, coeffs: np.ndarray) -> None:
        a = self._arr(w)
        h = self.xp.asarray(-np.asarray(coeffs), dtype=self.np_dtype)
        for b0, b1, block in self._blocks(lo, hi):
            self.ops.update(block, a, h[b0 - lo: b1 - lo])

    def norm(self, w: torch.Tensor) -> float:
        return max(float(self._sum_arr(self.xp.reshape(self.ops.sumsq(self._arr(w)), (1,)))[0]), 0.0) ** 0.5

    def _project_rows(self, a, lo: int, hi: int):
        """``Q[lo:hi] a`` as an array of the backend (block by block for a host basis)."""
        parts = [self.ops.project(block, a) for _, _, block in self._blocks(lo, hi)]
        return parts[0] if len(parts) == 1 else self.xp.concatenate(parts)

    def _update_all(self, a, j: int, h) -> None:
        for b0, b1, block in self._blocks(0, j):
            self.ops.update(block, a, h[b0:b1])

    def _orthogonalize_stored(self, w: torch.Tensor, j: int) -> np.ndarray:
        a = self._arr(w)
        before = self.norm(w)
        h = self._sum_arr(self._project_rows(a, 0, j))
        if self._host or j > self.h > 0:  # the fused sweep takes one array
            self._update_all(a, j, h)
            h2 = self._project_rows(a, 0, j)
            sq = self.ops.sumsq(a)
        else:
            h2, sq = self.ops.update_project(self.head[:j] if self.h else self.Q[:j], a, h)
        if self.space is not None:  # the second projection and the norm in one all_reduce
            both = self._sum_arr(self.xp.concatenate([h2, self.xp.reshape(sq, (1,)).astype(h2.dtype)]))
            h2, sq = both[:-1], both[-1]
        after = max(float(sq), 0.0) ** 0.5
        if self._dgks(before, after):
            self._update_all(a, j, h2)
            h = h + h2
        return np.asarray(h.get() if self.xp is not np else h, dtype=np.float64)

    def restart(self, Y: np.ndarray, m: int, keep: int) -> None:
        xp, Q = self.xp, self.Q
        Yt = xp.asarray(np.ascontiguousarray(Y.T), dtype=self.np_dtype)
        h = self.h
        for a, b in self._col_blocks(m):  # column blocks are independent: recombine in place
            new = xp.concatenate([Yt @ self._cols(m, a, b), self._decode(self._dev(Q[m - h:m - h + 1, a:b]))])
            self.head[: min(keep, h), a:b] = new[: min(keep, h)]  # rows 0..keep-1: the kept Ritz vectors
            low = new[h:]  # rows h..keep (row keep: row m)
            if Q.dtype == np.uint16:
                low = float32_to_bf16_bits(low, xp=xp)
            Q[: keep + 1 - h, a:b] = low.get() if self._host else low
        self._after_restart(m, keep)

    def stored_nbytes(self) -> int:
        return int(self.Q.nbytes) + int(self.head.nbytes)

    def ritz_vectors(self, S: np.ndarray, j: int) -> torch.Tensor:
        xp = self.xp
        Sk = xp.asarray(S, dtype=self.np_dtype)
        vectors = xp.zeros((self.n, S.shape[1]), dtype=self.np_dtype)
        for a, b in self._col_blocks(j):
            vectors[a:b] = self._cols(j, a, b).T @ Sk
        if self.space is None:
            vectors /= xp.linalg.norm(vectors, axis=0, keepdims=True)
            return self._tensor(vectors)
        return self._unit_columns(self._tensor(vectors))
