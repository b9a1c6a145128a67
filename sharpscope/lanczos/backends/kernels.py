"""Load the CUDA kernels of ``cuda/`` with ``cupy.RawModule`` and call them like :mod:`.reference`.

Where the ``.cu`` files are found (first hit wins):

1. ``$SHARPSCOPE_CUDA_DIR``;
2. ``<repo>/cuda`` next to the package -- the editable install (``pip install -e .``) this repository
   uses, where ``sharpscope/`` is imported from the checkout;
3. ``<sys.prefix>/share/sharpscope/cuda`` -- a regular install, where ``setup.py`` ships the files as
   ``data_files``.

``common.cuh`` is inlined into each source before compilation (NVRTC then needs no include path).
Kernels are compiled once per process and device (CuPy also caches the binaries on disk), and
checked against their NumPy references before first use (:mod:`.selfcheck`).

Compiler options: :data:`NVRTC_OPTIONS`, no fast-math. CuPy appends ``-ftz=true`` to every
RawModule's options (NVRTC honours the last occurrence), so the reductions may flush subnormals (they
are checked to a tolerance); the bit-exact scaled store does not depend on it (inline PTX
``mul.rn.f32``, integer rounding: ``cuda/common.cuh``).
"""
from __future__ import annotations

import os
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np

__all__ = ["cuda_index", "cuda_source_dir", "kernel_source", "CupyKernels", "load_kernels", "staged_rows", "basis_kind",
           "NVRTC_OPTIONS"]

_FILES = ("orthogonalize.cu", "normalize.cu")
_TPB, _VEC, _TPB_UP, _TPB_N = 256, 4, 128, 256  # must match the #defines in cuda/*.cu
_ROWCHUNK = 32  # cuda/orthogonalize.cu: rows per shared-memory round of the block reductions
_SHARED = 48 * 1024  # shared memory a block gets without opting in
_STATIC_UP = _ROWCHUNK * (_TPB // 32) * 4  # update_project's static shared memory (its `red`)
_MAX_ROWS = (_SHARED - _STATIC_UP) // 4  # float32 coefficients in the dynamic shared memory
NVRTC_OPTIONS = ("--std=c++17",)


def cuda_index(device) -> int:
    """The CUDA device index of a torch ``device`` (a bare ``"cuda"`` means torch's current device)."""
    import torch

    device = torch.device(device)
    return torch.cuda.current_device() if device.index is None else device.index


def staged_rows(itemsize: int) -> int:
    """The most basis rows whose ``update_project`` tile (rows x 128 elements of ``itemsize`` bytes,
    plus the rows' float32 coefficients) fits the dynamic shared memory: 93 float32, 185 bfloat16."""
    return (_SHARED - _STATIC_UP) // (4 + _TPB_UP * itemsize)


def basis_kind(dtype) -> str:
    """``"f32"`` or ``"bf16"`` for a basis storage dtype; a one-line TypeError for any other."""
    dtype = np.dtype(dtype)
    if dtype == np.uint16:
        return "bf16"
    if dtype == np.float32:
        return "f32"
    raise TypeError(f"sharpscope's CUDA kernels take a float32 basis or bfloat16 bits (uint16), got {dtype}; "
                    "convert with .astype(numpy.float32)")


def cuda_source_dir() -> Path:
    """The directory holding the ``.cu`` files (see the module docstring for the search order)."""
    candidates = []
    if os.environ.get("SHARPSCOPE_CUDA_DIR"):
        candidates.append(Path(os.environ["SHARPSCOPE_CUDA_DIR"]))
    candidates.append(Path(__file__).resolve().parents[3] / "cuda")
    candidates.append(Path(sys.prefix) / "share" / "sharpscope" / "cuda")
    for path in candidates:
        if all((path / f).is_file() for f in _FILES):
            return path
    raise FileNotFoundError("sharpscope's CUDA kernels were not found; looked in: "
                            + ", ".join(str(p) for p in candidates))


def kernel_source(name: str) -> str:
    """The source of ``cuda/<name>`` with ``common.cuh`` inlined."""
    root = cuda_source_dir()
    common = (root / "common.cuh").read_text().replace("#pragma once", "")
    return (root / name).read_text().replace('#include "common.cuh"', common)


class CupyKernels:
    """The compiled kernels behind the functions of :mod:`.reference` (same signatures, CuPy arrays)."""

    def __init__(self) -> None:
        import cupy

        self.cp = cupy
        ortho = cupy.RawModule(code=kernel_source("orthogonalize.cu"), options=NVRTC_OPTIONS)
        norm = cupy.RawModule(code=kernel_source("normalize.cu"), options=NVRTC_OPTIONS)
        self._k = {name: ortho.get_function(name) for name in (
            "project_f32", "project_bf16", "update_f32", "update_bf16", "update_project_f32",
            "update_project_bf16", "reduce_rows")}
        self._k.update({name: norm.get_function(name) for name in (
            "sumsq_partial", "scale_store_f32", "scale_store_bf16")})
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        self._grid_cap = 32 * int(props["multiProcessorCount"])

    @staticmethod
    def _kind(Q) -> str:
        return basis_kind(Q.dtype)

    @staticmethod
    def _check(Q, w) -> None:
        basis_kind(Q.dtype)
        if w.dtype != np.float32:
            raise TypeError(f"sharpscope's CUDA kernels take a float32 vector w, got {w.dtype}")
        if Q.ndim != 2 or w.ndim != 1 or Q.shape[1] != w.shape[0]:
            raise ValueError(f"expected Q (rows, n) and w (n,), got {Q.shape} and {w.shape}")
        if Q.shape[0] > _MAX_ROWS:  # the update kernels keep the coefficients in shared memory
            raise ValueError(f"at most {_MAX_ROWS} basis rows per kernel call, got {Q.shape[0]}")
        if Q.strides[1] != Q.itemsize or not w.flags.c_contiguous:
            raise ValueError("Q rows and w must be contiguous")

    def _reduce(self, partial, rows: int, nblocks: int):
        out = self.cp.empty(rows, dtype=self.cp.float32)
        self._k["reduce_rows"]((rows,), (_TPB,), (partial, np.int32(nblocks), out))
        return out

    def project(self, Q, w):
        """``Q @ w`` (float32 accumulation), Q read once."""
        self._check(Q, w)
        rows, n = Q.shape
        if rows == 0:
            return self.cp.zeros(0, dtype=self.cp.float32)
        ld = Q.strides[0] // Q.itemsize
        nblocks = max(1, -(-n // (_TPB * _VEC)))
        partial = self.cp.empty(rows * nblocks, dtype=self.cp.float32)
        self._k["project_" + self._kind(Q)]((nblocks,), (_TPB,),
                                            (Q, np.int64(ld), np.int32(rows), w, np.int64(n), partial))
        return self._reduce(partial, rows, nblocks)

    def update(self, Q, w, h) -> None:
        """``w -= Q.T @ h`` in place."""
        self._check(Q, w)
        rows, n = Q.shape
        h = self.cp.ascontiguousarray(h, dtype=self.cp.float32)
        nblocks = max(1, min(self._grid_cap, -(-n // _TPB)))
        self._k["update_" + self._kind(Q)]((nblocks,), (_TPB,),
                                           (Q, np.int64(Q.strides[0] // Q.itemsize), np.int32(rows), h, w,
                                            np.int64(n)), shared_mem=4 * max(rows, 1))

    def update_project(self, Q, w, h, staged: bool | None = None):
        """``w -= Q.T @ h`` in place, then ``(Q @ w, ||w||^2)``, reading Q once from DRAM: the block's
        tile of Q is kept in shared memory between the two sweeps when it fits (``staged=None``:
        up to :func:`staged_rows` rows; ``True``/``False`` force it, for the self-check)."""
        self._check(Q, w)
        rows, n = Q.shape
        h = self.cp.ascontiguousarray(h, dtype=self.cp.float32)
        fits = rows <= staged_rows(Q.itemsize)
        staged = fits if staged is None else bool(staged) and fits
        nblocks = max(1, -(-n // _TPB_UP))
        partial = self.cp.empty((rows + 1) * nblocks, dtype=self.cp.float32)
        shared = 4 * max(rows, 1) + (rows * _TPB_UP * Q.itemsize if staged else 0)
        self._k["update_project_" + self._kind(Q)](
            (nblocks,), (_TPB_UP,),
            (Q, np.int64(Q.strides[0] // Q.itemsize), np.int32(rows), h, w, np.int64(n), partial,
             np.int32(staged)),
            shared_mem=shared)
        out = self._reduce(partial, rows + 1, nblocks)
        return out[:rows], out[rows]

    def sumsq(self, w):
        """``||w||^2`` (float32, deterministic two-stage reduction)."""
        n = w.shape[0]
        nblocks = max(1, min(self._grid_cap, -(-n // _TPB_N)))
        partial = self.cp.empty(nblocks, dtype=self.cp.float32)
        self._k["sumsq_partial"]((nblocks,), (_TPB_N,), (w, np.int64(n), partial))
        return self._reduce(partial, 1, nblocks)[0]

    def scale_store(self, w, scale: float, out, out_f32=None) -> None:
        """``out = scale * w``, encoded to bfloat16 bits when ``out`` is ``uint16`` (then ``out_f32``,
        if given, receives the float32 values), in one pass; bit-exact (see :mod:`.bf16`)."""
        n = w.shape[0]
        if w.dtype != np.float32:
            raise TypeError(f"sharpscope's CUDA kernels take a float32 vector w, got {w.dtype}")
        if out.shape != w.shape or not out.flags.c_contiguous or not w.flags.c_contiguous:
            raise ValueError("scale_store needs a contiguous w and a contiguous output of w's shape")
        nblocks = max(1, min(self._grid_cap, -(-n // _TPB_N)))
        if self._kind(out) == "f32":
            self._k["scale_store_f32"]((nblocks,), (_TPB_N,), (w, np.float32(scale), out, np.int64(n)))
            return
        if out_f32 is None:
            out_f32 = self.cp.empty(n, dtype=self.cp.float32)
        elif out_f32.dtype != np.float32 or out_f32.shape != w.shape or not out_f32.flags.c_contiguous:
            raise ValueError("scale_store needs a contiguous float32 out_f32 of w's shape")
        self._k["scale_store_bf16"]((nblocks,), (_TPB_N,), (w, np.float32(scale), out, out_f32, np.int64(n)))


@lru_cache(maxsize=None)
def _load(device_id: int) -> CupyKernels:
    import cupy

    from .selfcheck import check_kernels

    with cupy.cuda.Device(device_id):
        kernels = CupyKernels()
        check_kernels(kernels, xp=cupy)  # a kernel that computes wrong here never runs a solve
        return kernels


def load_kernels() -> CupyKernels:
    """The kernels compiled for CuPy's current device (cached per device)."""
    import cupy

    return _load(cupy.cuda.Device().id)
