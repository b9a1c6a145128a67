"""A small base class for symmetric, matrix-free linear operators on flat torch vectors.

Subclasses implement one product, :meth:`SymmetricOperator._matvec`, and may implement a batched one,
:meth:`SymmetricOperator._matmat`; the base class counts products, checks shapes and staleness, and
provides ``@``, :meth:`matmat`, :meth:`to_scipy`, :meth:`to_dense`, scalar multiples and a cheap
symmetry probe. Shaped like :class:`scipy.sparse.linalg.LinearOperator`. :func:`as_operator` makes one
of a dense symmetric matrix or of a product function.

Solves. Every product belongs to a *solve*: the block of :meth:`SymmetricOperator.pinned` that
:func:`~sharpscope.lanczos` and the estimators open, or, for a product called outside one, that product
alone. Whatever an operator proves or caches about the live state it reads (a gradient graph, the
determinism check) serves one solve and is dropped when the solve ends (docs/operators-semantics.md).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch

__all__ = ["SymmetricOperator", "SymmetryCheck", "NotSymmetricError", "StochasticForwardError",
           "StaleOperatorError", "DerivativeCheckError", "check_symmetry", "NOT_SYMMETRIC_HINT", "as_operator",
           "DenseOperator", "FunctionOperator", "same_on_all_ranks", "after_asymmetry", "derivative_check_of",
           "symmetry_tolerance", "dense_symmetry_tolerance", "ASYMMETRY_CAP"]

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


class DerivativeCheckError(RuntimeError):
    """The first product of an operator whose ``hvp_mode`` the user fixed disagrees, conclusively, with
    central differences of its gradient: an op's second derivative is wrong (docs/operators-semantics.md)."""


# The random bilinear test of a symmetric operator whose products carry a relative rounding error rho gives
# |u.Av - v.Au| / (|u||Av| + |v||Au|) ~ rho / sqrt(2n) (the error lies in a random direction), and of a
# grossly asymmetric one (a triangle) ~ 1 / sqrt(2n): a tolerance CAP / sqrt(n) refuses, in every dtype, an
# operator whose asymmetric part is above about CAP * sqrt(2) of it, and never one rounded below that.
ASYMMETRY_CAP = 0.05


def symmetry_tolerance(dtype: torch.dtype, n: int) -> float:
    """Tolerance of the random bilinear symmetry test: ``min(max(1e3 eps, 1e-12), ASYMMETRY_CAP / sqrt(n))``,
    below 1 in every dtype (``1e3 eps`` alone is 7.8 in bfloat16, which no relative error can exceed)."""
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else 1e-9
    return min(max(1e3 * eps, 1e-12), ASYMMETRY_CAP / math.sqrt(max(int(n), 1)))


@dataclass(frozen=True)
class SymmetryCheck:
    """Result of :func:`check_symmetry`: ``relative_error = |u.Av - v.Au| / (|u| |Av| + |v| |Au|)``."""

    u_Av: float  # noqa: N815 - the math's own names, public since 0.1
    v_Au: float  # noqa: N815
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
        """``A v`` for a 1-D tensor ``v`` of length ``n`` (cast to the operator's dtype/device); outside
        :meth:`pinned`, a solve of its own (caches built for it are dropped after it)."""
        if not self._pins:
            with self.pinned():
                return self.matvec(v)
        self._sync()
        v = self._check_vector(v)
        out = self._matvec(v)
        self.num_matvecs += 1
        return out

    # -- one matrix per solve ----------------------------------------------------------------
    @contextlib.contextmanager
    def pinned(self) -> Iterator["SymmetricOperator"]:
        """A block in which the operator must stay one matrix -- one *solve*: solvers and estimators run
        their products inside it, and so may a user's own loop of products (``with op.pinned(): ...``, e.g.
        around scipy's ``eigsh(op.to_scipy())``). An operator that reads live state (a model, an optimizer)
        raises :class:`StaleOperatorError` if that state changes inside the block, since a Krylov space built
        from two matrices is meaningless; what it caches about that state (a gradient graph) serves the block
        and is dropped when the outermost block ends. A product outside any block is a solve of its own."""
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

    # -- several processes, and switching products ---------------------------------------------
    def same_on_all_ranks(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as rank 0 holds it, on every rank: solvers and estimators pass their random vectors (start
        vectors, probes) and their results through it. The identity for an operator on one process; a
        data-parallel operator (``distributed=``) broadcasts from rank 0; a wrapper asks the operator it
        wraps."""
        for dep in self._dependencies():
            return dep.same_on_all_ranks(x)
        return x

    @property
    def derivative_check(self) -> str:
        """What the first-product derivative check found (docs/operators-semantics.md): ``"passed"``,
        ``"inconclusive"``, ``"switched"`` (to finite differences), ``"unchecked"`` (no check applies:
        a fixed reverse/forward/finite-difference mode, a 16-bit model, a matrix) or ``"pending"`` (no
        product yet). A wrapper reports the operator it wraps."""
        for dep in self._dependencies():
            return dep.derivative_check
        return "unchecked"

    def _after_asymmetry(self, error: "NotSymmetricError", num_matvecs: int) -> bool:
        """Called by a solver whose symmetry probe failed after ``num_matvecs`` products: True when the
        operator switched to a product that cures it (the solver then restarts the solve: its Krylov space
        belongs to the wrong matrix); it may also raise a more precise error. Default: ask the wrapped
        operators; else False (the solver raises ``error``)."""
        return any(dep._after_asymmetry(error, num_matvecs) for dep in self._dependencies())

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """``A V`` for a 2-D tensor ``V`` of shape ``(n, m)``; counts ``m`` products.

        Operators with a batched product (:meth:`_matmat`: the curvature operators, dense ones) form it
        for the whole block after one staleness check; the others, and any instance whose ``_matvec``
        was replaced (a wrapper that counts or instruments products), take the columns one at a time
        through :meth:`matvec`."""
        if not isinstance(V, torch.Tensor):
            V = torch.as_tensor(V)
        if V.ndim != 2 or V.shape[0] != self.shape[0]:
            raise ValueError(f"matmat expects a ({self.shape[0]}, m) matrix, got shape {tuple(V.shape)}")
        m = V.shape[1]
        if m == 0:
            return torch.empty(self.shape[0], 0, dtype=self.dtype, device=self.device)
        if not self._pins:
            with self.pinned():
                return self.matmat(V)
        if not self._batches_products():
            return torch.stack([self.matvec(V[:, j]) for j in range(m)], dim=1)
        self._sync()
        out = self._matmat(V.to(dtype=self.dtype, device=self.device))
        if tuple(out.shape) != (self.shape[0], m):
            raise ValueError(f"{type(self).__name__}._matmat returned shape {tuple(out.shape)} for a "
                             f"({self.shape[0]}, {m}) block")
        self.num_matvecs += m
        return out

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        """``A V`` for a checked ``(n, m)`` block; subclasses with a batched product override this."""
        return torch.stack([self._matvec(V[:, j]) for j in range(V.shape[1])], dim=1)

    def _batches_products(self) -> bool:
        """Whether :meth:`matmat` calls :meth:`_matmat` (overridden, and ``_matvec`` not replaced on the
        instance: a replaced ``_matvec`` must see every product)."""
        return type(self)._matmat is not SymmetricOperator._matmat and "_matvec" not in vars(self)

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
        """A :class:`scipy.sparse.linalg.LinearOperator` applying the same product (numpy in/out). Each of
        its products is a solve of its own; run the scipy solver inside ``with op.pinned():`` to share one
        solve's caches (a curvature operator's gradient graph) across its products."""
        from scipy.sparse.linalg import LinearOperator

        np_dtype = torch.empty(0, dtype=self.dtype).numpy().dtype

        def mv(x: np.ndarray) -> np.ndarray:  # each call a solve of its own, unless inside op.pinned()
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

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.base.matmat(V) * self.scale


def check_symmetry(op: SymmetricOperator, seed: int = 0, tol: float | None = None) -> SymmetryCheck:
    """Cheap symmetry probe: compare ``u_i.(A u_j)`` with ``u_j.(A u_i)`` for four random vectors (one block
    product of four columns), the inner products accumulated in float64.

    The relative error is the root mean square over the six pairs of
    ``|u_i.Au_j - u_j.Au_i| / (|u_i||Au_j| + |u_j||Au_i|)`` (with two vectors, the one pair's value; four make
    an unlucky small draw for an asymmetric operator improbable: a chi-square of 6 degrees of freedom).
    A symmetric operator whose products carry a relative rounding error ``rho`` gives about
    ``rho / sqrt(2n)``; random products or an op with a wrong double backward give far more (see
    :data:`NOT_SYMMETRIC_HINT`). Curvature operators refuse a stochastic forward pass before their first
    product (:class:`StochasticForwardError`), so a failure here points at the derivatives. The default
    tolerance is :func:`symmetry_tolerance`: ``1e3 eps`` of the operator's dtype (``1.2e-4`` for float32),
    capped by ``0.05 / sqrt(n)`` so that it stays below what a grossly asymmetric operator gives in every
    dtype (``1e3 eps`` is 7.8 in bfloat16). ``u_Av`` and ``v_Au`` are the first pair's values.
    """
    gen = torch.Generator().manual_seed(seed)
    n = op.shape[0]
    with pinned(op):
        U = torch.randn(n, 4, generator=gen, dtype=torch.float64).to(op.dtype).to(op.device)
        U = same_on_all_ranks(op, U)
        AU = matmat(op, U)
    U, AU = U.double(), AU.double()  # accumulate in float64 whatever the operator's dtype
    M = U.T @ AU                     # M[i, j] = u_i . A u_j
    norms, anorms = U.norm(dim=0), AU.norm(dim=0)
    terms = []
    for i in range(4):
        for j in range(i + 1, 4):
            scale = float(norms[i] * anorms[j] + norms[j] * anorms[i])
            terms.append(abs(float(M[i, j] - M[j, i])) / scale if scale > 0 else 0.0)
    rel = math.sqrt(sum(t * t for t in terms) / len(terms))
    if tol is None:
        tol = symmetry_tolerance(op.dtype, n)
    return SymmetryCheck(u_Av=float(M[0, 1]), v_Au=float(M[1, 0]), relative_error=rel, tolerance=float(tol))


def matmat(op, V: torch.Tensor) -> torch.Tensor:
    """``A V`` for an ``(n, m)`` block: ``op.matmat`` (batched where the operator can), or column by column
    for an object that has only ``matvec``."""
    mm = getattr(op, "matmat", None)
    if callable(mm):
        return mm(V)
    return torch.stack([op.matvec(V[:, i]) for i in range(V.shape[1])], dim=1)


def same_on_all_ranks(op, x: torch.Tensor) -> torch.Tensor:
    """``op.same_on_all_ranks(x)`` for a :class:`SymmetricOperator` (rank 0's ``x`` on a data-parallel
    operator), ``x`` itself for other objects with a ``matvec``."""
    share = getattr(op, "same_on_all_ranks", None)
    return share(x) if callable(share) else x


def after_asymmetry(op, error: NotSymmetricError, num_matvecs: int) -> bool:
    """``op._after_asymmetry(error, num_matvecs)`` where the operator has it; False for other objects."""
    hook = getattr(op, "_after_asymmetry", None)
    return bool(hook(error, num_matvecs)) if callable(hook) else False


def derivative_check_of(op) -> str:
    """``op.derivative_check`` for a :class:`SymmetricOperator` ("pending" read as "unchecked": no product was
    checked), ``"unchecked"`` for other objects with a ``matvec``."""
    verdict = getattr(op, "derivative_check", "unchecked")
    return "unchecked" if verdict == "pending" or not isinstance(verdict, str) else verdict


def pinned(op) -> contextlib.AbstractContextManager:
    """``op.pinned()`` for a :class:`SymmetricOperator`, a no-op block for other objects with a ``matvec``."""
    pin = getattr(op, "pinned", None)
    return pin() if callable(pin) else contextlib.nullcontext(op)


# =============================================================================================
# as_operator
# =============================================================================================
class DenseOperator(SymmetricOperator):
    """A dense symmetric matrix ``A`` as an operator (:func:`as_operator`); products are ``A @ v``."""

    def __init__(self, A: torch.Tensor) -> None:
        super().__init__(A.shape[0], A.dtype, A.device)
        self.A = A

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self.A @ v

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.A @ V

    def to_dense(self, max_dim: int = 20_000) -> torch.Tensor:
        return self.A.clone()


class FunctionOperator(SymmetricOperator):
    """A product function as an operator (:func:`as_operator`): ``fn(v)`` for vectors, or, with
    ``matmat=True``, ``fn(V)`` for ``(n, m)`` blocks (vectors then go as one-column blocks)."""

    def __init__(self, fn: Callable, n: int, dtype: torch.dtype, device: torch.device, matmat: bool) -> None:
        super().__init__(n, dtype, device)
        self.fn, self.is_matmat = fn, matmat

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fn(x)
        if not isinstance(out, torch.Tensor):
            out = torch.as_tensor(np.asarray(out))
        if out.shape != x.shape:
            raise ValueError(f"the product function returned shape {tuple(out.shape)} for an input of shape "
                             f"{tuple(x.shape)}: it must return A @ x, shaped like x")
        return out.to(dtype=self.dtype, device=self.device)

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self._call(v[:, None])[:, 0] if self.is_matmat else self._call(v)

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        if not self.is_matmat:
            return super()._matmat(V)
        return self._call(V)


class _NumpyFunction:
    """A numpy-in, numpy-out product (scipy ``LinearOperator.matvec``/``matmat``) on torch tensors."""

    def __init__(self, fn: Callable, np_dtype) -> None:
        self.fn, self.np_dtype = fn, np_dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fn(x.detach().cpu().numpy().astype(self.np_dtype, copy=False))
        return torch.as_tensor(np.asarray(out).reshape(x.shape))


def _asymmetry_of_matrix(A: torch.Tensor) -> float:
    """``||A - A^T||_F / (2 ||A||_F)`` (0 for symmetric, at most 1, about 0.7 for a triangle), accumulated in
    float32 for 16-bit matrices and in the matrix's dtype otherwise; in blocks of rows (no ``n x n`` copy)."""
    work = torch.float32 if A.dtype.itemsize < 4 else A.dtype
    n, rows = A.shape[0], max(1, 2**22 // max(A.shape[0], 1))
    diff = total = 0.0
    for i in range(0, n, rows):
        block = A[i: i + rows].to(work)
        diff += float(torch.linalg.vector_norm(block - A[:, i: i + rows].T.to(work), dtype=torch.float64) ** 2)
        total += float(torch.linalg.vector_norm(block, dtype=torch.float64) ** 2)
    return math.sqrt(diff) / (2 * math.sqrt(total)) if total > 0 else 0.0


def dense_symmetry_tolerance(dtype: torch.dtype) -> float:
    """Tolerance of :func:`_asymmetry_of_matrix`: ``min(max(1e3 eps, 1e-12), ASYMMETRY_CAP)`` -- the
    bilinear test's without the ``sqrt(n)``, since this measure is exact (a 16-bit Hessian computed column by
    column is asymmetric by about one unit roundoff, 0.004 in bfloat16; a triangle by 0.7)."""
    return min(max(1e3 * torch.finfo(dtype).eps, 1e-12), ASYMMETRY_CAP)


def _dense_operator(A: Any, shape, dtype, device) -> DenseOperator:
    A = torch.as_tensor(A)
    if A.ndim != 2 or A.shape[0] != A.shape[1]:
        raise ValueError(f"as_operator needs a square 2-D matrix, got shape {tuple(A.shape)}")
    if shape is not None and _square_shape(shape) != A.shape[0]:
        raise ValueError(f"shape={shape} does not match the matrix's shape {tuple(A.shape)}")
    if A.is_complex():
        raise TypeError(f"as_operator takes real symmetric matrices, got {A.dtype}")
    if dtype is None and not A.is_floating_point():
        dtype = torch.get_default_dtype()
    A = A.to(dtype=dtype or A.dtype, device=device or A.device)
    if not bool(torch.isfinite(A).all()):
        raise ValueError("as_operator: the matrix contains NaN or inf")
    rel = _asymmetry_of_matrix(A)
    tol = dense_symmetry_tolerance(A.dtype)
    if not rel <= tol:
        raise ValueError(f"as_operator: the matrix is not symmetric (||A - A^T||_F / (2 ||A||_F) = {rel:.2g} > "
                         f"{tol:.2g}); pass (A + A.T) / 2 for its symmetric part")
    return DenseOperator(A)


def _square_shape(shape) -> int:
    dims = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
    if len(dims) == 1:
        dims = dims * 2
    if len(dims) != 2 or dims[0] != dims[1] or int(dims[0]) < 1:
        raise ValueError(f"shape must be n or (n, n) with n >= 1, got {shape!r}")
    return int(dims[0])


def _is_scipy_operator(A: Any) -> bool:
    try:
        import scipy.sparse
        from scipy.sparse.linalg import LinearOperator
    except ImportError:  # pragma: no cover
        return False
    return isinstance(A, LinearOperator) or scipy.sparse.issparse(A)


def _from_scipy(A: Any, shape, dtype, device) -> FunctionOperator:
    from scipy.sparse.linalg import aslinearoperator

    L = aslinearoperator(A)
    n = _square_shape(L.shape if shape is None else shape)
    if L.shape != (n, n):
        raise ValueError(f"as_operator needs a square operator, got shape {L.shape}")
    if dtype is None:
        dtype = torch.from_numpy(np.zeros(0, dtype=L.dtype)).dtype
    np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
    return FunctionOperator(_NumpyFunction(L.matmat, np_dtype), n, dtype, torch.device(device or "cpu"), matmat=True)


def as_operator(A: Any, shape: int | tuple[int, int] | None = None, dtype: torch.dtype | None = None,
                device: torch.device | str | None = None, *, matmat: bool = False) -> SymmetricOperator:
    """An operator usable wherever sharpscope takes one (:func:`~sharpscope.lanczos`, the estimators,
    :meth:`SymmetricOperator.to_scipy`) from a dense matrix or a product function.

    Args:
        A: a dense symmetric matrix (a 2-D tensor or array; its symmetry is checked exactly,
            ``||A - A^T||_F <= 2 tol ||A||_F`` with :func:`dense_symmetry_tolerance`, ``n^2`` work), a
            function returning ``A @ v`` for a 1-D tensor ``v`` (or, with ``matmat=True``, ``A @ V`` for
            ``(n, m)`` blocks), a scipy ``LinearOperator`` or sparse matrix, or an operator (returned as it
            is). Functions are trusted to be symmetric: :meth:`SymmetricOperator.check_symmetry` probes one
            with four products, and
            :func:`~sharpscope.lanczos` refuses an asymmetric one as it meets it.
        shape: ``n`` or ``(n, n)``; required for a function.
        dtype, device: of the vectors (default: the matrix's; for a function torch's default dtype on
            the CPU; for scipy its dtype).
        matmat: ``A`` is a block product ``V -> A @ V``: blocks (Hutch++, SLQ, block Lanczos) go to it whole.

    Example:
        >>> import torch, sharpscope as ss
        >>> op = ss.as_operator(torch.diag(torch.tensor([3.0, 1.0, 2.0], dtype=torch.float64)))
        >>> op.matvec(torch.ones(3, dtype=torch.float64)).tolist()
        [3.0, 1.0, 2.0]
        >>> ss.as_operator(lambda v: 2 * v, shape=4).shape
        (4, 4)
    """
    if isinstance(A, SymmetricOperator):
        if (dtype is not None and dtype != A.dtype) or (device is not None and torch.device(device) != A.device):
            raise ValueError("as_operator does not convert an existing operator's dtype or device")
        return A
    if isinstance(A, (torch.Tensor, np.ndarray)):
        return _dense_operator(A, shape, dtype, device)
    if _is_scipy_operator(A):
        return _from_scipy(A, shape, dtype, device)
    if callable(A):
        if shape is None:
            raise ValueError("as_operator(function) needs shape=n: the dimension cannot be read off a function")
        dtype = dtype or torch.get_default_dtype()
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be floating point, got {dtype}")
        return FunctionOperator(A, _square_shape(shape), dtype, torch.device(device or "cpu"), matmat)
    raise TypeError(f"as_operator takes a matrix, a product function, a scipy LinearOperator or an operator, "
                    f"got {type(A).__name__}")
