"""Vector algebra of the Lanczos solver over its Krylov basis, on interchangeable backends.

* ``"torch"`` (default): :class:`.torch_basis.TorchBasis`, torch BLAS on the operator's device.
* ``"numpy"``: :class:`.array_basis.ArrayBasis` on NumPy with the kernels' NumPy references (CPU
  operators only): the array code path of the GPU backend, run in CI.
* ``"cupy"``: the same class on CuPy with the fused kernels of ``cuda/`` (CUDA operators only).
* ``"auto"``: ``"torch"``, except on a CUDA device named in :data:`AUTO_CUPY_DEVICES`, where it is
  ``"cupy"`` when CuPy imports, its CUDA major version matches torch's and the kernels compile and
  pass their load-time check against the references (:mod:`.selfcheck`), else ``"torch"`` with a
  one-line warning giving the reason.

Which backend ``"auto"`` picks is one switch, :data:`AUTO_CUPY_DEVICES`, empty for now: on the one
GPU measured so far (an NVIDIA H200, 2026-11-28, with the kernels' special-value check bypassed) the
cupy backend was not faster than torch end to end (0.362 s against 0.350 s on a 14.7M-parameter MLP;
docs/perf-gpu.md). A device name goes into it only with a measurement from ``scripts/gpu_check.sh``
on that device showing the fused pass at >= 70% of the copy bandwidth and the cupy backend >= 10%
faster than torch end to end.

The operator's products stay in torch; only the basis algebra moves (see :mod:`.base` for the
interface and the ``basis=`` storage options).
"""
from __future__ import annotations

import functools
import warnings

import torch

from .base import BASIS_CHOICES, KrylovBasis, basis_nbytes, float_head_rows, storage_of
from .kernels import cuda_index

__all__ = ["BACKEND_CHOICES", "BASIS_CHOICES", "KrylovBasis", "basis_nbytes", "float_head_rows", "resolve_backend",
           "make_basis",
           "cupy_status", "cuda_index", "cuda_version_mismatch", "AUTO_CUPY_DEVICES", "auto_prefers_cupy"]

BACKEND_CHOICES = ("torch", "numpy", "cupy", "auto")

# CUDA device names (substrings of torch.cuda.get_device_name) on which backend="auto" uses the CuPy
# kernels; every other device gets torch. Add a name only with a gpu_check.sh measurement on it
# (module docstring; docs/perf-gpu.md says which backend wins where).
AUTO_CUPY_DEVICES: tuple[str, ...] = ()


def auto_prefers_cupy(device_name: str, devices: tuple[str, ...] | None = None) -> bool:
    """Whether ``backend="auto"`` tries CuPy on a CUDA device of this name (:data:`AUTO_CUPY_DEVICES`)."""
    devices = AUTO_CUPY_DEVICES if devices is None else devices
    return any(name.lower() in device_name.lower() for name in devices)


def cuda_version_mismatch(torch_cuda: str | None, cupy_runtime: int) -> str | None:
    """``None`` when CuPy's CUDA runtime (``cupy.cuda.runtime.runtimeGetVersion()``, e.g. 13000) has
    the CUDA major version of torch's build (``torch.version.cuda``, e.g. ``"13.0"``), else the
    reason (one line). A CPU build of torch (``None``) has nothing to mismatch.

    >>> cuda_version_mismatch("13.0", 13000) is None
    True
    >>> cuda_version_mismatch("13.0", 12080)
    "CuPy's CUDA 12.8 does not match torch's CUDA 13.0; install the CuPy wheel for CUDA 13: pip install -e .[cupy-cuda13]"
    """
    if not torch_cuda:
        return None
    torch_major = int(str(torch_cuda).split(".")[0])
    cupy_major, cupy_minor = int(cupy_runtime) // 1000, int(cupy_runtime) % 1000 // 10
    if torch_major == cupy_major:
        return None
    return (f"CuPy's CUDA {cupy_major}.{cupy_minor} does not match torch's CUDA {torch_cuda}; "
            f"install the CuPy wheel for CUDA {torch_major}: pip install -e .[cupy-cuda{torch_major}]")


def cupy_status(device: torch.device | str = "cuda") -> str | None:
    """``None`` when the CuPy backend can run on ``device``, else what is missing (one line)."""
    try:
        import cupy
    except Exception as exc:  # ImportError, or a CUDA library that fails to load
        return (f"CuPy is not importable ({type(exc).__name__}: {exc}); install it with "
                "pip install -e .[cupy-cuda13] (or [cupy-cuda12], matching torch's CUDA)")
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "CuPy sees no CUDA device"
    except Exception as exc:
        return f"CuPy sees no CUDA device ({exc})"
    try:
        mismatch = cuda_version_mismatch(torch.version.cuda, cupy.cuda.runtime.runtimeGetVersion())
    except Exception as exc:
        return f"CuPy's CUDA runtime version is unreadable ({type(exc).__name__}: {exc})"
    if mismatch is not None:
        return mismatch
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
        return f"sharpscope's CUDA kernels did not load ({one_line(exc)})"
    return None


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (an NVRTC error carries the whole compiler log)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    more = f" [+{len(lines) - 1} more lines]" if len(lines) > 1 else ""
    return f"{type(exc).__name__}: {lines[0] if lines else ''}{more}"


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend (``"torch"``, ``"numpy"`` or ``"cupy"``) for a ``backend=`` choice and the
    operator's device; raises ValueError on a bad name or device, RuntimeError when CuPy is missing."""
    device = torch.device(device)
    if backend not in BACKEND_CHOICES:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKEND_CHOICES))}, got {backend!r}")
    if backend == "auto":
        if device.type != "cuda" or not auto_prefers_cupy(torch.cuda.get_device_name(device)):
            return "torch"
        missing = cupy_status(device)
        if missing is not None:
            _warn_once(f"backend='auto' uses torch instead of cupy on this device: {missing}")
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
            raise RuntimeError(f"backend='cupy' is unavailable: {missing}; backend='torch' (the default) runs "
                               "the same solve")
    return backend


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=4)


def make_basis(backend: str, basis: str, m: int, n: int, dtype: torch.dtype, device: torch.device,
               space=None, head: int = 0) -> KrylovBasis:
    """A Krylov basis of ``m + 1`` rows of length ``n`` for a resolved backend and a ``basis=`` choice;
    ``space``: the vector space whose inner products it takes (a sharded one: ``n`` is this rank's shard);
    ``head``: rows of a bfloat16 basis kept in the working dtype (:func:`~.base.float_head_rows`)."""
    storage_of(basis)  # validates the name
    if backend == "torch":
        from .torch_basis import TorchBasis

        return TorchBasis(m, n, dtype, device, basis, space=space, head=head)
    from .array_basis import ArrayBasis

    if backend == "numpy":
        return ArrayBasis(m, n, dtype, device, basis, space=space, head=head)
    if backend == "cupy":
        import cupy

        from .kernels import load_kernels

        with cupy.cuda.Device(cuda_index(device)):
            return ArrayBasis(m, n, dtype, device, basis, xp=cupy, ops=load_kernels(), space=space, head=head)
    raise ValueError(f"unresolved backend {backend!r}")
