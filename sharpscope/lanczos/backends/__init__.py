"""Vector algebra of the Lanczos solver over its Krylov basis, on interchangeable backends.

* ``"torch"`` (default): :class:`.torch_basis.TorchBasis`, torch BLAS on the operator's device.
* ``"numpy"``: :class:`.array_basis.ArrayBasis` on NumPy with the kernels' NumPy references (CPU
  operators only): the array code path of the GPU backend, run in CI.
* ``"cupy"``: the same class on CuPy with the fused kernels of ``cuda/`` (CUDA operators only).
* ``"auto"``: ``"cupy"`` when the operator is on a CUDA device and CuPy imports and the kernels
  compile and pass their load-time check against the references (:mod:`.selfcheck`), else
  ``"torch"`` (with a warning when CuPy is there but its kernels are not usable).

The operator's products stay in torch; only the basis algebra moves (see :mod:`.base` for the
interface and the ``basis=`` storage options).
"""
from __future__ import annotations

import functools
import warnings

import torch

from .base import BASIS_CHOICES, KrylovBasis, storage_of

__all__ = ["BACKEND_CHOICES", "BASIS_CHOICES", "KrylovBasis", "resolve_backend", "make_basis",
           "cupy_status", "cuda_index"]

BACKEND_CHOICES = ("torch", "numpy", "cupy", "auto")


def cuda_index(device: torch.device | str) -> int:
    """The CUDA device index of ``device`` (a bare ``"cuda"`` means torch's current device)."""
    device = torch.device(device)
    return torch.cuda.current_device() if device.index is None else device.index


def cupy_status(device: torch.device | str = "cuda") -> str | None:
    """``None`` when the CuPy backend can run on ``device``, else what is missing (one line)."""
    try:
        import cupy
    except Exception as exc:  # ImportError, or a CUDA library that fails to load
        return f"CuPy is not importable ({type(exc).__name__}: {exc}); install it with pip install -e .[cupy]"
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "CuPy sees no CUDA device"
    except Exception as exc:
        return f"CuPy sees no CUDA device ({exc})"
    return _kernel_status(cuda_index(device))


@functools.lru_cache(maxsize=None)
def _kernel_status(index: int) -> str | None:
    """Compile and check the kernels on one device, once per process (a failure is remembered too)."""
    import cupy

    try:
        from .kernels import load_kernels

        with cupy.cuda.Device(index):
            load_kernels()
    except Exception as exc:
        return f"sharpscope's CUDA kernels did not load ({type(exc).__name__}: {exc})"
    return None


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend (``"torch"``, ``"numpy"`` or ``"cupy"``) for a ``backend=`` choice and the
    operator's device; raises ValueError on a bad name or device, RuntimeError when CuPy is missing."""
    device = torch.device(device)
    if backend not in BACKEND_CHOICES:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKEND_CHOICES))}, got {backend!r}")
    if backend == "auto":
        if device.type != "cuda":
            return "torch"
        missing = cupy_status(device)
        if missing is not None and "did not load" in missing:  # installed but broken: say so once
            warnings.warn(f"backend='auto' uses torch: {missing}", RuntimeWarning, stacklevel=3)
        return "cupy" if missing is None else "torch"
    if backend == "numpy" and device.type != "cpu":
        raise ValueError(f"backend='numpy' needs an operator on the CPU, got device {device}; "
                         "use backend='cupy' or 'torch'")
    if backend == "cupy":
        if device.type != "cuda":
            raise ValueError(f"backend='cupy' needs an operator on a CUDA device, got device {device}; "
                             "use backend='numpy' for the same code path on the CPU")
        missing = cupy_status(device)
        if missing is not None:
            raise RuntimeError(f"backend='cupy' is unavailable: {missing}")
    return backend


def make_basis(backend: str, basis: str, m: int, n: int, dtype: torch.dtype, device: torch.device) -> KrylovBasis:
    """A Krylov basis of ``m + 1`` rows of length ``n`` for a resolved backend and a ``basis=`` choice."""
    storage_of(basis)  # validates the name
    if backend == "torch":
        from .torch_basis import TorchBasis

        return TorchBasis(m, n, dtype, device, basis)
    from .array_basis import ArrayBasis

    if backend == "numpy":
        return ArrayBasis(m, n, dtype, device, basis)
    if backend == "cupy":
        import cupy

        from .kernels import load_kernels

        with cupy.cuda.Device(cuda_index(device)):
            return ArrayBasis(m, n, dtype, device, basis, xp=cupy, ops=load_kernels())
    raise ValueError(f"unresolved backend {backend!r}")
