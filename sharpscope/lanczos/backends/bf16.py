"""bfloat16 emulation: a float32's upper 16 bits, stored as ``uint16``.

bfloat16 keeps float32's sign and 8-bit exponent and the top 7 mantissa bits. Rounding to nearest,
ties to even, is done on the integer bits (the same trick as ``torch``/CUDA's ``__float2bfloat16_rn``):
``bits + 0x7FFF + ((bits >> 16) & 1)``, then the upper half. NaNs are kept quiet NaNs. These two
functions are written against the NumPy/CuPy common API (pass ``xp=cupy`` for device arrays) and are
the reference that ``ss_bf16_encode`` of ``cuda/common.cuh`` is tested against.
"""
from __future__ import annotations

import numpy as np

__all__ = ["float32_to_bf16_bits", "bf16_bits_to_float32"]


def float32_to_bf16_bits(x, xp=np, out=None):
    """Round float32 ``x`` to bfloat16 (nearest, ties to even); returns the ``uint16`` bit patterns.

    >>> float32_to_bf16_bits(np.array([1.0, 1.00390625, 1.01171875, -2.5], np.float32)).tolist()
    [16256, 16256, 16258, 49184]
    """
    bits = xp.ascontiguousarray(x, dtype=xp.float32).view(xp.uint32)
    lsb = (bits >> 16) & 1
    rounded = ((bits + xp.uint32(0x7FFF) + lsb) >> 16).astype(xp.uint16)
    nan = (bits & xp.uint32(0x7FFFFFFF)) > xp.uint32(0x7F800000)
    rounded = xp.where(nan, ((bits >> 16) | 0x0040).astype(xp.uint16), rounded)
    if out is None:
        return rounded
    out[...] = rounded
    return out


def bf16_bits_to_float32(bits, xp=np):
    """The float32 values of bfloat16 bit patterns (exact: zero-fill the low 16 bits)."""
    return (xp.asarray(bits).astype(xp.uint32) << 16).view(xp.float32)
