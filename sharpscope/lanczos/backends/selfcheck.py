"""A load-time check of the fused kernels against their NumPy references.

The kernels of ``cuda/`` are compiled by NVRTC on the user's machine, for whatever device and driver
it has; a wrong result there would poison every eigenvalue silently. So when the kernels are loaded,
each one runs once on small random inputs (float32 and bfloat16 bases, a length that is not a
multiple of any block size, outputs poisoned with NaN first) and is compared with
:mod:`.reference` on the host: the reductions in float64 to a relative tolerance (their summation
order differs), the elementwise ``scale_store`` bit for bit, on random values and on the special
values of :data:`SPECIAL_BITS` (infinities, NaNs of either sign and any payload, the rounding
boundaries to bfloat16 infinity, ties, subnormals, signed zeros) at several scales. A kernel that
disagrees makes the CuPy backend unavailable, with the reason, instead of running.

The H200 case (2026-11-28): the scale_store kernel of the time multiplied in float32 under CuPy's
``-ftz=true`` and returned the GPU's canonical NaN, so for :data:`H200_INPUTS` it wrote
``[32640, 65408, 32767, 32767, 32640, 16256, 16258, 0, 32768, 0, 32768]`` where the reference wants
:data:`H200_REFERENCE`; this check rejected it, as it should.
"""
from __future__ import annotations

import numpy as np

from . import reference
from .bf16 import float32_to_bf16_bits

__all__ = ["check_kernels", "check_scale_store", "KernelMismatch", "H200_INPUTS", "H200_REFERENCE",
           "SPECIAL_BITS", "SPECIAL_SCALES"]

# the inputs of the special-value check the H200 run failed, and the reference's output for them
H200_INPUTS = np.array([np.inf, -np.inf, np.nan, -np.nan, np.finfo(np.float32).max, 1.0 + 2.0 ** -8,
                        1.0 + 3 * 2.0 ** -8, 1e-40, -1e-40, 0.0, -0.0], dtype=np.float32)
H200_REFERENCE = [32640, 65408, 32704, 65472, 32640, 16256, 16258, 1, 32769, 0, 32768]

# float32 bit patterns: NaNs (quiet and signalling, both signs, payloads), infinities, the largest
# finite values and the bfloat16 overflow boundary (0x7F7F7FFF rounds down, the tie 0x7F7F8000 up to
# inf), ties to even (lsb 0 and 1), subnormals (smallest, largest, ties), the smallest normal, zeros
SPECIAL_BITS = np.array([
    0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001, 0x7FFFFFFF, 0xFFFFFFFF, 0x7FC00001, 0x7FA00000,
    0x7F800000, 0xFF800000, 0x7F7FFFFF, 0xFF7FFFFF, 0x7F7F7FFF, 0x7F7F8000, 0xFF7F8000, 0x7F7E8000,
    0x3F808000, 0x3F818000, 0x3F808001, 0xBF818000, 0x00000001, 0x80000001, 0x007FFFFF, 0x807FFFFF,
    0x00008000, 0x00018000, 0x00017FFF, 0x00800000, 0x80800000, 0x00000000, 0x80000000, 0x3F800000,
], dtype=np.uint32)
# 1.0 keeps the inputs; the others round subnormal products, scale into the subnormals, overflow,
# and make NaNs from 0 * inf with either sign
SPECIAL_SCALES = (1.0, -0.5, 3.0, 2.0 ** -100, 2.0 ** 100, float("inf"), float("-inf"))


class KernelMismatch(RuntimeError):  # noqa: N818 - a public name since 0.1
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
        want = w0.copy()
        want_h, want_s = reference.update_project(Q, want, h0)
        for staged in (True, False):  # the tile of Q kept in shared memory, or re-read
            w = xp.asarray(w0.copy())
            got_h, got_s = ops.update_project(Qd, w, xp.asarray(h0), staged=staged)
            how = f"update_project ({kind}, {'staged' if staged else 'unstaged'})"
            agree(f"{how}: w", w, want)
            agree(f"{how}: Q w", got_h, want_h)
            agree(f"{how}: ||w||^2", got_s, want_s)
    agree("sumsq", ops.sumsq(xp.asarray(w0)), reference.sumsq(w0.astype(np.float64)))
    check_scale_store(ops, xp, w0)


def _bits(a) -> np.ndarray:
    a = np.asarray(a.get() if hasattr(a, "get") else a)
    return a.view(np.uint32) if a.dtype == np.float32 else a


def check_scale_store(ops, xp=np, random_values: np.ndarray | None = None) -> None:
    """``scale_store`` of ``ops`` against the reference, bit for bit: the H200 case (bfloat16, scale 1),
    then :data:`SPECIAL_BITS` (and ``random_values``, if given) at every scale of
    :data:`SPECIAL_SCALES`, into a float32 row and into a bfloat16 row with its float32 copy."""
    out = xp.full(H200_INPUTS.size, 0xFFFF, dtype=np.uint16)
    ops.scale_store(xp.asarray(H200_INPUTS), 1.0, out)
    want = np.empty(H200_INPUTS.size, dtype=np.uint16)
    reference.scale_store(H200_INPUTS, 1.0, want)
    got = _bits(out).astype(np.uint16)
    if not np.array_equal(got, want):
        raise KernelMismatch(f"kernel scale_store (bfloat16) rounds special values unlike the reference: "
                             f"{got.tolist()} vs {want.tolist()}")
    inputs = SPECIAL_BITS.view(np.float32)
    if random_values is not None:
        inputs = np.concatenate([inputs, np.asarray(random_values, dtype=np.float32)])
    n = inputs.size
    for scale in SPECIAL_SCALES:
        want32, want16 = np.empty(n, np.float32), np.empty(n, np.uint16)
        reference.scale_store(inputs, scale, want32)
        reference.scale_store(inputs, scale, want16)
        out32 = xp.full(n, np.nan, dtype=np.float32)
        out16, copy32 = xp.full(n, 0xFFFF, dtype=np.uint16), xp.full(n, np.nan, dtype=np.float32)
        ops.scale_store(xp.asarray(inputs), scale, out32)
        ops.scale_store(xp.asarray(inputs), scale, out16, copy32)
        for name, got, want in (("float32", out32, want32), ("bfloat16", out16, want16),
                                ("bfloat16: float32 copy", copy32, want32)):
            got, want = _bits(got), _bits(want)
            bad = np.flatnonzero(got != want)
            if bad.size:
                i = int(bad[0])
                raise KernelMismatch(
                    f"kernel scale_store ({name}) differs from its reference bit for bit at {bad.size} of {n} "
                    f"inputs, first: scale {scale!r}, input 0x{int(inputs.view(np.uint32)[i]):08X}, "
                    f"kernel 0x{int(got[i]):X}, reference 0x{int(want[i]):X}")
