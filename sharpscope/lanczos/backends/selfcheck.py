"""A load-time check of the fused kernels against their NumPy references.

The kernels of ``cuda/`` are compiled by NVRTC on the user's machine, for whatever device and driver
it has; a wrong result there would poison every eigenvalue silently. So when the kernels are loaded,
each one runs once on small random inputs (float32 and bfloat16 bases, a length that is not a
multiple of any block size, outputs poisoned with NaN first) and is compared with
:mod:`.reference` in float64 on the host. A kernel that disagrees makes the CuPy backend
unavailable, with the reason (``backend="auto"`` then uses torch), instead of running.
"""
from __future__ import annotations

import numpy as np

from . import reference
from .bf16 import float32_to_bf16_bits

__all__ = ["check_kernels", "KernelMismatch"]


class KernelMismatch(RuntimeError):
    """A compiled kernel disagrees with its NumPy reference."""


def _host(a) -> np.ndarray:
    return np.asarray(a.get() if hasattr(a, "get") else a, dtype=np.float64)


def check_kernels(ops, xp=np, rows: int = 37, n: int = 70001, seed: int = 0, rtol: float = 1e-4) -> None:
    """Run every operation of ``ops`` (:class:`.kernels.CupyKernels`, or anything with the same
    methods) on random inputs in the array module ``xp`` and compare with :mod:`.reference`;
    raises :class:`KernelMismatch` naming the first operation that disagrees. The defaults take the
    row loops past one 32-row chunk and the grid-stride loops past one sweep."""
    rng = np.random.default_rng(seed)
    q32 = (rng.standard_normal((rows, n)) / np.sqrt(n)).astype(np.float32)
    storages = {"float32": q32, "bfloat16": float32_to_bf16_bits(q32)}
    w0 = rng.standard_normal(n).astype(np.float32)
    h0 = rng.standard_normal(rows).astype(np.float32)

    def agree(name: str, got, want) -> None:
        got, want = _host(got), _host(want)
        if got.shape != want.shape:
            raise KernelMismatch(f"kernel {name}: shape {got.shape}, its NumPy reference {want.shape}")
        tolerance = rtol * max(float(np.abs(want).max(initial=0.0)), 1e-30)
        error = float(np.abs(got - want).max(initial=0.0)) if np.all(np.isfinite(got)) else float("inf")
        if error > tolerance:
            raise KernelMismatch(f"kernel {name} disagrees with its NumPy reference (max error {error:.3g}, "
                                 f"tolerance {tolerance:.3g})")

    for kind, Q in storages.items():
        Qd = xp.asarray(Q)
        agree(f"project ({kind})", ops.project(Qd, xp.asarray(w0)), reference.project(Q, w0))
        w, want = xp.asarray(w0.copy()), w0.copy()
        ops.update(Qd, w, xp.asarray(h0))
        reference.update(Q, want, h0)
        agree(f"update ({kind})", w, want)
        w, want = xp.asarray(w0.copy()), w0.copy()
        got_h, got_s = ops.update_project(Qd, w, xp.asarray(h0))
        want_h, want_s = reference.update_project(Q, want, h0)
        agree(f"update_project ({kind}): w", w, want)
        agree(f"update_project ({kind}): Q w", got_h, want_h)
        agree(f"update_project ({kind}): ||w||^2", got_s, want_s)
        out = xp.full(n, np.nan, dtype=np.float32) if kind == "float32" else xp.full(n, 0xFFFF, dtype=np.uint16)
        out_f32 = xp.full(n, np.nan, dtype=np.float32)
        ops.scale_store(xp.asarray(w0), 0.5, out, out_f32 if kind == "bfloat16" else None)
        want_out = np.empty(n, dtype=Q.dtype)
        reference.scale_store(w0, 0.5, want_out)
        if kind == "bfloat16":
            if not np.array_equal(_host(out).astype(np.uint16), want_out):
                raise KernelMismatch("kernel scale_store (bfloat16) does not round like the reference")
            agree("scale_store (bfloat16): float32 copy", out_f32, 0.5 * w0)
        else:
            agree("scale_store (float32)", out, want_out)
    agree("sumsq", ops.sumsq(xp.asarray(w0)), reference.sumsq(w0.astype(np.float64)))
    # bfloat16 rounding of the special cases: infinities, NaNs (kept quiet, with their sign), the
    # largest finite float32 (rounds to inf), ties to even, subnormals
    special = np.array([np.inf, -np.inf, np.nan, -np.nan, np.finfo(np.float32).max, 1.0 + 2.0 ** -8,
                        1.0 + 3 * 2.0 ** -8, 1e-40, -1e-40, 0.0, -0.0], dtype=np.float32)
    out = xp.full(special.size, 0xFFFF, dtype=np.uint16)
    ops.scale_store(xp.asarray(special), 1.0, out)
    want = np.empty(special.size, dtype=np.uint16)
    reference.scale_store(special, 1.0, want)
    if not np.array_equal(_host(out).astype(np.uint16), want):
        raise KernelMismatch(f"kernel scale_store (bfloat16) rounds special values unlike the reference: "
                             f"{_host(out).astype(np.uint16).tolist()} vs {want.tolist()}")
