"""The eigensolver: thick-restart Lanczos (:mod:`.solver`) and the Krylov-basis algebra it runs on
(:mod:`.backends`: torch, NumPy, CuPy with the CUDA kernels of ``cuda/``)."""
from .solver import LanczosResult, lanczos

__all__ = ["lanczos", "LanczosResult"]
