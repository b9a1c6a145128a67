"""bfloat16 emulation: a float32's upper 16 bits, stored as ``uint16``, and the bit-exact scaled store.

bfloat16 keeps float32's sign and 8-bit exponent and the top 7 mantissa bits. These functions are the
NumPy references of the integer algorithm in ``cuda/common.cuh`` (``ss_bf16_from_bits``,
``ss_scale_bits``); kernel and reference agree bit for bit on every input (the load-time self-check,
:mod:`.selfcheck`, compares them on the special values):

* float32 -> bfloat16: round to nearest, ties to even, by integer arithmetic on the float32 bits
  (``bits + 0x7FFF + ((bits >> 16) & 1)``, then the upper half): values past the largest bfloat16
  round to +-inf, subnormals round like any other value (never flushed to zero).
* The NaN rule: a NaN becomes the quiet NaN of its sign, ``0x7FC0 | sign`` in bfloat16 (and
  ``0x7FC00000 | sign`` in float32); the payload is dropped.
* The scaled store ``q = s * w`` (:func:`scale_bits`) is one IEEE float32 multiplication (subnormals
  kept); a NaN product becomes ``0x7FC00000 | sign`` with ``sign = sign(w) XOR sign(s)``, the sign IEEE
  gives every other product (so a NaN in ``w`` keeps its sign when ``s > 0``), whatever NaN the
  hardware returns (NVIDIA GPUs return ``0x7FFFFFFF``).

:func:`float32_to_bf16_bits` and :func:`bf16_bits_to_float32` are written against the NumPy/CuPy
common API (``xp=cupy`` for device arrays: integer operations only, so exact there too).
"""
from __future__ import annotations

import numpy as np

__all__ = ["float32_to_bf16_bits", "bf16_bits_to_float32", "scale_bits", "NAN_RULE"]

NAN_RULE = "a NaN becomes the quiet NaN with the same sign: 0x7FC0 | sign (bfloat16), 0x7FC00000 | sign (float32)"


def float32_to_bf16_bits(x, xp=np, out=None):
    """Round float32 ``x`` to bfloat16 (nearest, ties to even; NaN -> ``0x7FC0 | sign``); returns the
    ``uint16`` bit patterns.

    >>> float32_to_bf16_bits(np.array([1.0, 1.00390625, 1.01171875, -2.5, 1e-40, -np.nan], np.float32)).tolist()
    [16256, 16256, 16258, 49184, 1, 65472]
    """
    bits = xp.ascontiguousarray(x, dtype=xp.float32).view(xp.uint32)
    lsb = (bits >> 16) & xp.uint32(1)
    rounded = ((bits + xp.uint32(0x7FFF) + lsb) >> 16).astype(xp.uint16)
    nan = (bits & xp.uint32(0x7FFFFFFF)) > xp.uint32(0x7F800000)
    quiet = (((bits >> 16) & xp.uint32(0x8000)) | xp.uint32(0x7FC0)).astype(xp.uint16)
    rounded = xp.where(nan, quiet, rounded)
    if out is None:
        return rounded
    out[...] = rounded
    return out


def bf16_bits_to_float32(bits, xp=np):
    """The float32 values of bfloat16 bit patterns (exact: zero-fill the low 16 bits)."""
    return (xp.asarray(bits).astype(xp.uint32) << 16).view(xp.float32)


def scale_bits(w: np.ndarray, scale: float) -> np.ndarray:
    """The float32 bit patterns (``uint32``) of ``float32(scale) * w`` under the NaN rule (module
    docstring): the reference of the kernels' ``ss_scale_bits``. NumPy float32 arrays only (on the
    host the product is IEEE with subnormals kept; NumPy does not enable flush-to-zero).

    >>> [hex(b) for b in scale_bits(np.array([np.nan, -np.nan, 3.0], np.float32), 0.5)]
    ['0x7fc00000', '0xffc00000', '0x3fc00000']
    """
    w = np.ascontiguousarray(w, dtype=np.float32)
    s = np.float32(scale)
    with np.errstate(all="ignore"):
        bits = (w * s).view(np.uint32)
    sign = (w.view(np.uint32) ^ np.array(s).view(np.uint32)) & np.uint32(0x80000000)
    nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    return np.where(nan, sign | np.uint32(0x7FC00000), bits).astype(np.uint32)
