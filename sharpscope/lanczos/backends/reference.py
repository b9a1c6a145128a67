r"""NumPy references of the CUDA kernels in ``cuda/`` (same arguments, same storage formats).

The array backend runs these on the CPU, so the exact code path of the GPU backend is exercised in CI;
under the ``gpu`` test marker each kernel is checked against its reference. ``Q`` is a block of basis
rows, ``(rows, n)``, stored as float32 or as bfloat16 bit patterns (``uint16``, see :mod:`.bf16`);
``w`` is a float32 vector of length ``n``, updated in place. Accumulation is in float32, as in the
kernels (so the reductions of a reference and a kernel agree to float32 rounding, not bitwise: the
summation order differs). ``scale_store`` is elementwise and agrees with its kernel bit for bit on
every float32 input: one IEEE multiplication with subnormals kept, round-to-nearest-even to bfloat16
by integer arithmetic, and the NaN rule of :mod:`.bf16` (a NaN product becomes the quiet NaN
``0x7FC00000 | sign``, ``0x7FC0 | sign`` in bfloat16, with ``sign = sign(w) XOR sign(s)``).

* ``project``: :math:`h = Q w`.
* ``update``: :math:`w \leftarrow w - Q^\top h`.
* ``update_project``: the update followed by the next classical Gram-Schmidt projection
  :math:`h' = Q w` and :math:`\|w\|^2`, in one pass over ``Q`` on the GPU (CGS2, "twice is enough":
  Giraud, Langou & Rozloznik 2005).
* ``sumsq`` and ``scale_store``: :math:`\|w\|^2`, and :math:`q = s\,w` written to a float32 or
  bfloat16 row (the fused normalize).
"""
from __future__ import annotations

import numpy as np

from .bf16 import bf16_bits_to_float32, float32_to_bf16_bits, scale_bits

__all__ = ["decode", "project", "update", "update_project", "sumsq", "scale_store"]

_ROWS = 16  # rows decoded at a time from bfloat16 storage (bounds the float32 temporary)


def decode(Q: np.ndarray) -> np.ndarray:
    """Basis rows as float32 (a view for float32 storage, a converted copy for bfloat16 bits)."""
    return bf16_bits_to_float32(Q, xp=_namespace(Q)) if Q.dtype == np.uint16 else Q


def _chunks(rows: int):
    for lo in range(0, rows, _ROWS):
        yield lo, min(lo + _ROWS, rows)


def project(Q: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``Q @ w`` in ``w``'s precision (float32 for the kernels)."""
    if Q.dtype != np.uint16:
        return Q @ w
    return _concat([decode(Q[lo:hi]) @ w for lo, hi in _chunks(Q.shape[0])])


def update(Q: np.ndarray, w: np.ndarray, h: np.ndarray) -> None:
    """``w -= Q.T @ h`` in place."""
    h = h.astype(w.dtype, copy=False)
    if Q.dtype != np.uint16:
        w -= h @ Q
        return
    acc = None
    for lo, hi in _chunks(Q.shape[0]):
        part = h[lo:hi] @ decode(Q[lo:hi])
        acc = part if acc is None else acc + part
    if acc is not None:
        w -= acc


def sumsq(w: np.ndarray):
    """``||w||^2`` (a 0-d array of ``w``'s dtype)."""
    return w @ w


def _concat(parts):
    return parts[0] if len(parts) == 1 else _namespace(parts[0]).concatenate(parts)


def update_project(Q: np.ndarray, w: np.ndarray, h: np.ndarray, staged: bool | None = None
                   ) -> tuple[np.ndarray, np.float32]:
    """``w -= Q.T @ h`` in place, then ``(Q @ w, ||w||^2)``. (``staged`` is the kernel's choice of
    keeping its tile of ``Q`` in shared memory; it changes nothing here.)"""
    update(Q, w, h)
    return project(Q, w), sumsq(w)


def scale_store(w: np.ndarray, scale: float, out: np.ndarray, out_f32: np.ndarray | None = None) -> None:
    """``out = scale * w``; when ``out`` holds bfloat16 bits it gets ``scale * w`` rounded, and
    ``out_f32`` (if given) the unrounded ``scale * w`` (the recurrence's working copy).

    For float32 NumPy input this is the kernels' bit-exact rule (:func:`.bf16.scale_bits`, NaN rule
    included); float64 (and CuPy) input is a plain multiplication.
    """
    if w.dtype == np.float32 and isinstance(w, np.ndarray):
        q = scale_bits(w, scale).view(np.float32)
    else:
        q = w * w.dtype.type(scale)
    if out.dtype == np.uint16:
        if out_f32 is not None:
            out_f32[...] = q
        float32_to_bf16_bits(q, xp=_namespace(w), out=out)
    else:
        out[...] = q


def _namespace(a):
    """NumPy for NumPy arrays, CuPy for CuPy arrays (the module defining the array type)."""
    import sys

    return sys.modules[type(a).__module__.split(".")[0]]
