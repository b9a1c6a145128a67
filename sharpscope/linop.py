"""A small base class for symmetric, matrix-free linear operators on flat torch vectors.

Subclasses implement one product, :meth:`SymmetricOperator._matvec`; the base class counts products,
checks shapes, and provides ``@``, :meth:`matmat`, :meth:`to_scipy`, :meth:`to_dense`, scalar
multiples and a cheap symmetry probe. Shaped like :class:`scipy.sparse.linalg.LinearOperator`.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

__all__ = ["SymmetricOperator", "SymmetryCheck", "NotSymmetricError", "StochasticForwardError",
           "StaleOperatorError", "check_symmetry", "NOT_SYMMETRIC_HINT"]

NOT_SYMMETRIC_HINT = ("either the products are random (a forward pass that stays stochastic in eval mode, e.g. "
                      "F.dropout(training=True) or input noise, or a shuffled data order) or an op's double "
                      "backward is wrong or missing (a custom autograd.Function with @once_differentiable)")


class NotSymmetricError(RuntimeError):
    """The operator failed the symmetry probe ``u.(A v) == v.(A u)``: random products (stochastic
    forward pass, shuffled data) or an op whose double backward is wrong or missing."""


class StochasticForwardError(NotSymmetricError):
    """Two forward passes over the same data disagreed: the operator would not be one fixed matrix."""


class StaleOperatorError(RuntimeError):
    """The model (or optimizer state) an operator reads changed between the products of one solve."""


@dataclass(frozen=True)
class SymmetryCheck:
    """Result of :func:`check_symmetry`: ``relative_error = |u.Av - v.Au| / (|u| |Av| + |v| |Au|)``."""

    u_Av: float
    v_Au: float
    relative_error: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.relative_error <= self.tolerance


class SymmetricOperator:
    """Base class: a symmetric linear map ``A`` on 1-D tensors of length ``n``.

    Attributes:
        shape: ``(n, n)``.
        dtype, device: of the vectors the operator accepts and returns.
        num_matvecs: number of operator applications so far (``matmat`` with ``m`` columns counts ``m``).
    """

    def __init__(self, n: int, dtype: torch.dtype, device: torch.device) -> None:
        self.shape = (int(n), int(n))
        self.dtype = dtype
        self.device = torch.device(device)
        self.num_matvecs = 0
        self._pins = 0

    # -- the one product subclasses implement ------------------------------------------
    def _matvec(self, v: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- public products -----------------------------------------------------------------
    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``A v`` for a 1-D tensor ``v`` of length ``n`` (cast to the operator's dtype/device)."""
        self._sync()
        v = self._check_vector(v)
        out = self._matvec(v)
        self.num_matvecs += 1
        return out

    # -- one matrix per solve ----------------------------------------------------------------
    @contextlib.contextmanager
    def pinned(self) -> Iterator["SymmetricOperator"]:
        """A block in which the operator must stay one matrix: solvers and estimators run their
        products inside it. An operator that reads live state (a model, an optimizer) raises
        :class:`StaleOperatorError` if that state changes inside the block, since a Krylov space
        built from two matrices is meaningless; outside, it follows the live state (:meth:`_sync`)."""
        self._sync()
        self._pins += 1
        try:
            with contextlib.ExitStack() as stack:
                for dep in self._dependencies():
                    stack.enter_context(dep.pinned())
                yield self
        finally:
            self._pins -= 1

    def _sync(self) -> None:
        """Called before every product: operators over live state check it here (default: nothing)."""

    def _dependencies(self) -> tuple["SymmetricOperator", ...]:
        """Operators whose products this one takes (pinned together with it)."""
        return ()

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """``A V`` for a 2-D tensor ``V`` of shape ``(n, m)``, one column at a time."""
        if V.ndim != 2 or V.shape[0] != self.shape[0]:
            raise ValueError(f"matmat expects a ({self.shape[0]}, m) matrix, got shape {tuple(V.shape)}")
        cols = [self.matvec(V[:, j]) for j in range(V.shape[1])]
        if not cols:
            return torch.empty(self.shape[0], 0, dtype=self.dtype, device=self.device)
        return torch.stack(cols, dim=1)

    def __matmul__(self, other: torch.Tensor) -> torch.Tensor:
        if isinstance(other, torch.Tensor) and other.ndim == 1:
            return self.matvec(other)
        if isinstance(other, torch.Tensor) and other.ndim == 2:
            return self.matmat(other)
        return NotImplemented

    def __mul__(self, scalar: float) -> "ScaledOperator":
        return ScaledOperator(self, float(scalar))

    __rmul__ = __mul__

    # -- conversions ----------------------------------------------------------------------
    def to_dense(self, max_dim: int = 20_000) -> torch.Tensor:
        """The dense ``n x n`` matrix, column by column (``n`` products): small problems only."""
        n = self.shape[0]
        if n > max_dim:
            raise ValueError(f"to_dense() on a {n}-dimensional operator would need {n} products and "
                             f"{n * n * 8 / 2**30:.1f} GiB; raise max_dim if you really mean it")
        eye = torch.eye(n, dtype=self.dtype, device=self.device)
        return self.matmat(eye)

    def to_scipy(self):
        """A :class:`scipy.sparse.linalg.LinearOperator` applying the same product (numpy in/out)."""
        from scipy.sparse.linalg import LinearOperator

        np_dtype = torch.empty(0, dtype=self.dtype).numpy().dtype

        def mv(x: np.ndarray) -> np.ndarray:
            v = torch.as_tensor(np.ascontiguousarray(x).reshape(-1), dtype=self.dtype, device=self.device)
            return self.matvec(v).detach().cpu().numpy()

        return LinearOperator(self.shape, matvec=mv, rmatvec=mv, dtype=np_dtype)

    def check_symmetry(self, seed: int = 0, tol: float | None = None) -> SymmetryCheck:
        """Probe symmetry with two random vectors (two products); see :func:`check_symmetry`."""
        return check_symmetry(self, seed=seed, tol=tol)

    # -- helpers --------------------------------------------------------------------------
    def _check_vector(self, v: torch.Tensor) -> torch.Tensor:
        if not isinstance(v, torch.Tensor):
            v = torch.as_tensor(v)
        if v.ndim != 1 or v.shape[0] != self.shape[0]:
            raise ValueError(f"matvec expects a vector of length {self.shape[0]}, got shape {tuple(v.shape)}")
        return v.to(dtype=self.dtype, device=self.device)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={self.shape[0]}, dtype={self.dtype}, device={self.device})"


class ScaledOperator(SymmetricOperator):
    """``c * A`` for a scalar ``c``."""

    def __init__(self, base: SymmetricOperator, scale: float) -> None:
        super().__init__(base.shape[0], base.dtype, base.device)
        self.base, self.scale = base, scale

    def _dependencies(self) -> tuple[SymmetricOperator, ...]:
        return (self.base,)

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self.base.matvec(v) * self.scale


def check_symmetry(op: SymmetricOperator, seed: int = 0, tol: float | None = None) -> SymmetryCheck:
    """Cheap symmetry probe: compare ``u.(A v)`` with ``v.(A u)`` for random ``u, v``.

    The relative error ``|u.Av - v.Au| / (|u||Av| + |v||Au|)`` is ~machine epsilon for a symmetric
    operator; random products or an op with a wrong double backward give O(1) (see
    :data:`NOT_SYMMETRIC_HINT`). Curvature operators refuse a stochastic forward pass before their
    first product (:class:`StochasticForwardError`), so a failure here points at the derivatives.
    The default tolerance is ``1e3 * eps`` of the operator's dtype (``1e-4`` for float32).
    """
    gen = torch.Generator().manual_seed(seed)
    with pinned(op):
        n = op.shape[0]
        u = torch.randn(n, generator=gen, dtype=torch.float64).to(op.dtype).to(op.device)
        v = torch.randn(n, generator=gen, dtype=torch.float64).to(op.dtype).to(op.device)
        Av, Au = op.matvec(v), op.matvec(u)
    uAv, vAu = float(torch.dot(u, Av)), float(torch.dot(v, Au))
    scale = float(u.norm() * Av.norm() + v.norm() * Au.norm())
    rel = abs(uAv - vAu) / scale if scale > 0 else 0.0
    if tol is None:
        tol = 1e3 * torch.finfo(op.dtype).eps if op.dtype.is_floating_point else 1e-6
        tol = max(tol, 1e-12)
    return SymmetryCheck(u_Av=uAv, v_Au=vAu, relative_error=rel, tolerance=float(tol))


def pinned(op) -> contextlib.AbstractContextManager:
    """``op.pinned()`` for a :class:`SymmetricOperator`, a no-op block for other objects with a ``matvec``."""
    pin = getattr(op, "pinned", None)
    return pin() if callable(pin) else contextlib.nullcontext(op)
