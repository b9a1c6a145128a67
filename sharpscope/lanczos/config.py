"""What one solve was asked for, validated, and the size of its basis (:func:`sharpscope.lanczos`).

The basis holds ``max_basis`` vectors before a thick restart (``max_basis + block_size`` rows in block
mode, ``max_basis + 1`` otherwise). Its size, in this order of precedence:

* ``max_basis=`` as given;
* ``max_memory=``: as many vectors as fit that many bytes (or that fraction of the free memory), counting
  the storage of ``basis=`` (:func:`~.backends.base.basis_nbytes`), at most ``max_matvecs`` (a basis
  never holds more vectors than products fill);
* the default, sized to the question: :func:`default_basis_size` vectors (``2 k + 8``, whatever the storage),
  at most 1/4 of a GPU's free memory or 1/8 of the RAM.

Always capped by the dimension ``n`` and at least ``k + 2`` (``k + 2 b`` for blocks of ``b``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from .._memory import max_memory_bytes, memory_budget
from ..vector_space import space_of
from .backends import basis_nbytes, float_head_rows, storage_of

__all__ = ["LanczosConfig", "Request", "validate", "make_config", "default_basis_size", "basis_size"]


@dataclass(frozen=True)
class Request:
    """The arguments of one :func:`sharpscope.lanczos` call, as given."""

    k: int
    which: str
    tol: float
    max_matvecs: int | None
    seed: int
    backend: str
    return_eigenvectors: bool
    v0: torch.Tensor | None
    basis: str
    max_basis: int | None
    max_memory: int | float | None
    reorth: str
    callback: Callable | None
    block_size: int


@dataclass(frozen=True)
class LanczosConfig:
    """What one solve runs with, validated: sizes, working dtype, product cap, basis size."""

    n: int
    k: int
    which: str
    tol: float
    max_matvecs: int
    max_basis: int
    reorth: str
    dtype: torch.dtype
    op_dtype: torch.dtype
    device: torch.device
    callback: Callable | None = None
    progress: Any = None  # a sharpscope.progress.Progress (products and the last Ritz test), or None
    space: Any = None  # the operator's vector space (sharpscope.vector_space): local length, inner products

    @property
    def eps(self) -> float:
        return torch.finfo(self.dtype).eps


def validate(op, req: Request) -> None:
    """One-line errors for bad arguments (before any product)."""
    n = op.shape[0]
    k, block_size, max_matvecs = req.k, req.block_size, req.max_matvecs
    if req.which not in ("LA", "SA", "LM"):
        raise ValueError(f"which must be 'LA', 'SA' or 'LM', got {req.which!r}")
    if req.reorth not in ("partial", "full"):
        raise ValueError(f"reorth must be 'partial' or 'full', got {req.reorth!r}")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if k >= n:
        raise ValueError(f"k={k} must be smaller than the operator's dimension n={n}; "
                         "use op.to_dense() and torch.linalg.eigvalsh for all eigenvalues")
    if not req.tol > 0:
        raise ValueError(f"tol must be positive, got {req.tol}")
    if max_matvecs is not None and (not isinstance(max_matvecs, (int, np.integer)) or max_matvecs < 1):
        raise ValueError(f"max_matvecs must be a positive integer (operator products), got {max_matvecs!r}")
    if not isinstance(block_size, (int, np.integer)) or not 1 <= block_size <= n:
        raise ValueError(f"block_size must be an integer from 1 to the operator's dimension n={n}, "
                         f"got {block_size!r}")
    if not op.dtype.is_floating_point:
        raise TypeError(f"the operator's dtype must be floating point, got {op.dtype}")
    if req.max_basis is not None and req.max_memory is not None:
        raise ValueError("give max_basis (vectors) or max_memory (bytes), not both")
    storage_of(req.basis)  # the name


def working_dtype(op_dtype: torch.dtype) -> torch.dtype:
    """The basis's working dtype: half-precision operators (bf16/fp16 models) get float32, which the
    recurrence needs; float32 and float64 operators their own."""
    return torch.float32 if torch.finfo(op_dtype).bits < 32 else op_dtype


def make_config(op, req: Request, basis: str, progress=None) -> LanczosConfig:
    """The validated settings of one solve with basis storage ``basis``."""
    n, k, b = op.shape[0], req.k, req.block_size
    dtype = working_dtype(op.dtype)
    if basis == "device-bf16" and dtype != torch.float32:
        raise ValueError(f"basis='device-bf16' needs a float32 (or half-precision) operator, got {op.dtype}: "
                         "a bfloat16 basis limits the accuracy to float32 level at best")
    max_matvecs = req.max_matvecs
    if max_matvecs is None:
        max_matvecs = max(300, 30 * k) * (1 if b == 1 else 2)
    if max_matvecs < b:
        raise ValueError(f"max_matvecs={max_matvecs} is smaller than one block of block_size={b}")
    if basis == "device-bf16" and max_matvecs < 2 * k:
        raise ValueError(f"max_matvecs={max_matvecs} is too few for basis='device-bf16' with k={k}: its certificate "
                         f"takes k products beyond the k the solve needs at least; give max_matvecs >= {2 * k}")
    space = space_of(op)
    m = basis_size(n, k, b, dtype, basis, torch.device(op.device), req.max_basis, req.max_memory, max_matvecs,
                   row_length=space.local_size)
    return LanczosConfig(n=n, k=k, which=req.which, tol=req.tol, max_matvecs=int(max_matvecs), max_basis=m,
                         reorth=req.reorth, dtype=dtype, op_dtype=op.dtype, device=torch.device(op.device),
                         callback=req.callback, progress=progress, space=space)


def default_basis_size(k: int, block_size: int = 1) -> int:
    """The default ``max_basis``, sized to the question (before the memory cap and ``n``): ``2 k + 8`` vectors
    (``k + 3 b`` at least for blocks of ``b``). With thick restart (:meth:`.state.LanczosState.restart` keeps
    ``k + (m - k) / 2`` Ritz vectors) it costs a few percent more products than the earlier
    ``max(2 k + 20, 60)`` for several times less memory (measured by ``scripts/bench_basis_default.py``;
    docs: performance, "Memory and the Krylov basis"). The same for a bfloat16 basis (``basis="device-bf16"``),
    whose restarts keep the wanted Ritz vectors in float32 rows and whose certificate is the returned vectors'
    explicit residual (:mod:`.refine`); before, it kept ``max(2 k + 20, 60)``."""
    return max(2 * k + 8, k + 3 * block_size)


def basis_size(n: int, k: int, b: int, dtype: torch.dtype, basis: str, device: torch.device,
               max_basis: int | None, max_memory: int | float | None, max_matvecs: int, *,
               row_length: int | None = None) -> int:
    """``max_basis`` of a solve (module docstring); one-line errors when it cannot hold ``k`` pairs.
    ``row_length``: the entries of a row this process holds (its shard of sharded vectors; default ``n``)."""
    need = k + 2 if b == 1 else k + 2 * b
    spare = 1 if b == 1 else b  # rows beyond max_basis: the pending vector (block)
    local = n if row_length is None else max(int(row_length), 1)
    head = float_head_rows(basis, k) if b == 1 else 0
    fixed = basis_nbytes(0, local, dtype, basis, device, head)
    row = basis_nbytes(1, local, dtype, basis, device, head) - fixed
    where = torch.device("cpu") if storage_of(basis)[1] == "host" else device
    if max_basis is not None:
        m = int(max_basis)
    elif max_memory is not None:
        budget = max_memory_bytes(max_memory, where)
        fits = (budget - fixed) // row - spare
        m = min(fits, max_matvecs, n)
        if m < min(need, n):
            least = (min(need, n) + spare) * row + fixed
            raise ValueError(f"max_memory={budget} bytes holds {max(fits, 0)} basis vectors of {local} entries "
                             f"({row} bytes each) with basis={basis!r}, and k={k} needs {min(need, n)}: give at "
                             f"least {least} bytes, or basis='device-bf16' (half the bytes) or 'host'")
    else:
        budget = memory_budget(where, gpu_free=0.25, host=0.125)
        m = min(default_basis_size(k, b), max(need, (budget - fixed) // row - spare))
    m = min(m, n)
    if m < min(need, n):
        raise ValueError(f"max_basis={m} is too small for k={k}"
                         + (": need at least k + 2" if b == 1 else
                            f" and block_size={b}: need at least k + 2 * block_size"))
    return m
