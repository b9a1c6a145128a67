r"""Thick-restart Lanczos for a few extreme eigenpairs of a symmetric operator.

The Lanczos recurrence (Lanczos 1950) builds an orthonormal basis :math:`Q_j` of the Krylov space
:math:`\mathcal K_j(A, q_1)` with :math:`A Q_j = Q_j T_j + \beta_j q_{j+1} e_j^\top`, :math:`T_j`
tridiagonal. The eigenpairs :math:`(\theta_i, s_i)` of :math:`T_j` give Ritz pairs
:math:`(\theta_i, Q_j s_i)` whose residual norm is exactly :math:`|\beta_j s_{j,i}|` (Saad,
*Numerical Methods for Large Eigenvalue Problems*, Sec. 6.6); a pair is converged when
:math:`|\beta_j s_{j,i}| \le \mathrm{tol} \cdot \max(|\theta_i|, \sqrt{\epsilon}\,\|T\|)`.

Orthogonality (without it Lanczos returns spurious copies, "ghosts", of converged eigenvalues):

* ``reorth="full"``: every new vector is orthogonalized against the whole basis, twice (classical
  Gram-Schmidt run twice is enough: Giraud, Langou & Rozloznik 2005). Costs 4 passes over the
  basis per step.
* ``reorth="partial"`` (default): Simon's partial reorthogonalization (Simon 1984, "The Lanczos
  algorithm with partial reorthogonalization"): the loss of orthogonality
  :math:`\omega_{j+1,i} \approx q_{j+1}^\top q_i` is tracked with the recurrence it obeys in
  floating point, and the basis is reorthogonalized (twice, two consecutive vectors) only when
  :math:`\max_i |\omega_{j+1,i}| > \sqrt{\epsilon}`. The recurrence's rounding term is not the
  textbook :math:`\epsilon\|A\|` but the products' measured noise, read off at no cost from the
  symmetry mismatch :math:`|q_{j-1}^\top A q_j - \beta_{j-1}|` (float32 autograd through a deep,
  sharp network is far noisier than :math:`\epsilon\|A\|`). Semi-orthogonality keeps :math:`T_j` the
  projection of :math:`A` to working precision, so Ritz values are as accurate as with full
  reorthogonalization, at a fraction of the basis traffic.

When the basis reaches ``max_basis`` vectors the method restarts thickly (Wu & Simon 2000): it
keeps the best Ritz vectors, whose projected matrix is diagonal plus one coupling row (an
"arrowhead"), and continues the recurrence from the last residual. The projected eigenproblem is
solved in float64 (``scipy.linalg.eigh_tridiagonal`` before the first restart, ``eigh`` after).
An exhausted Krylov space (:math:`\beta_j \approx 0`, e.g. a low-rank operator) is continued from
a fresh random vector orthogonal to the basis, so its repeated eigenvalues are found.

Limitation shared by every single-vector Krylov method (ARPACK/``scipy.sparse.linalg.eigsh``,
PyHessian's power iteration): an eigenvalue that is *exactly* repeated inside the wanted set, with
the space not exhausted, is seen once; the next distinct eigenvalue then takes the copy's place.
Block Lanczos (``block_size=b``, :mod:`.block`) sees up to ``b`` copies of each.

Engine (:mod:`.state`): the loop is a state object with small steps (expand, reorthogonalize, Ritz
test, restart), driven here after validation and followed by extraction. The start vector is drawn on
the operator's device by a generator seeded with ``seed``: results are deterministic for a seed on each
device type, and a CUDA operator draws other numbers than a CPU one. A step without
reorthogonalization synchronizes with the host once (``alpha_j``, ``beta_j`` and the symmetry probe in
one transfer). The Ritz problem is solved only when the test can change the answer: not before ``k``
Ritz values exist, then at intervals of 1 to 3 products predicted from the residuals' decay (so at
most 2 products beyond the first step at which the test would pass), and always at a restart, a
breakdown and the last product allowed.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np
import torch

from .._memory import memory_budget
from ..linop import NotSymmetricError, SymmetricOperator, after_asymmetry, derivative_check_of, pinned, same_on_all_ranks
from .backends import make_basis, resolve_backend, storage_of
from .recurrence import make_generator, random_unit
from .state import LanczosConfig, LanczosState, Ritz, RoundedBasisLost

__all__ = ["lanczos", "LanczosResult"]

Which = Literal["LA", "SA", "LM"]


@dataclass(frozen=True)
class LanczosResult:
    """Eigenvalues (float64, ordered by ``which``: descending for LA/LM, ascending for SA), Ritz
    residual norms ``||A y - theta y||``, a per-value ``converged`` mask, the eigenvectors as
    columns ``(n, k)`` when asked for, the cost (``num_matvecs`` counts every operator product,
    each column of a block included) and what the operator's derivative check found
    (``derivative_check``: ``"passed"``, ``"inconclusive"``, ``"switched"`` to finite differences or
    ``"unchecked"``; :attr:`sharpscope.linop.SymmetricOperator.derivative_check`)."""

    eigenvalues: torch.Tensor
    residuals: torch.Tensor
    converged: torch.Tensor
    num_matvecs: int
    num_restarts: int
    num_reorthogonalizations: int
    eigenvectors: torch.Tensor | None = None
    which: str = "LA"
    derivative_check: str = "unchecked"

    @property
    def all_converged(self) -> bool:
        return bool(self.converged.all())


def _default_max_basis(n: int, k: int, bytes_per_vector: int, device: torch.device, block_size: int = 1) -> int:
    """Basis size: ``max(2k + 20, 60)`` vectors (``k + 3b`` at least in block mode), capped by the
    dimension and by the memory (1/8 of the RAM, 1/4 of a GPU's free memory)."""
    budget = memory_budget(device, gpu_free=0.25, host=0.125)
    by_memory = max(k + 2 * block_size, int(budget // max(bytes_per_vector, 1)) - block_size)
    return int(min(n, max(2 * k + 20, 60, k + 3 * block_size), by_memory))


def lanczos(op: SymmetricOperator, k: int = 5, which: Which = "LA", tol: float = 1e-6,
            max_matvecs: int | None = None, seed: int = 0, backend: str = "torch",
            return_eigenvectors: bool = False, *, v0: torch.Tensor | None = None, basis: str = "device",
            max_basis: int | None = None, reorth: Literal["partial", "full"] = "partial",
            callback: Callable[[int, np.ndarray, np.ndarray], None] | None = None, block_size: int = 1) -> LanczosResult:
    """Top-``k`` eigenpairs of a symmetric operator by thick-restart Lanczos (module docstring).

    Args:
        op: a :class:`~sharpscope.linop.SymmetricOperator` (any object with ``shape``, ``dtype``,
            ``device`` and ``matvec``; :func:`sharpscope.as_operator` wraps a tensor or a function).
        k: number of eigenpairs, ``1 <= k < n``.
        which: ``"LA"`` largest algebraic (sharpness; default), ``"SA"`` smallest algebraic,
            ``"LM"`` largest magnitude.
        tol: relative Ritz-residual tolerance; ``1e-6`` gives eigenvalues to ~1e-10 relative
            when they are separated (the error is about residual^2 / gap).
        max_matvecs: cap on operator products, each column of a block counted (default
            ``max(300, 30 k)``, twice that in block mode); an unconverged result has ``converged``
            False where it fell short, never a silently wrong value.
        seed: seeds the start vector, drawn on the operator's device (deterministic for a seed on each
            device type; CPU and CUDA generators draw different numbers).
        backend: where the basis algebra runs (:mod:`sharpscope.lanczos.backends`): ``"torch"`` (default, on
            the operator's device), ``"cupy"`` (fused CUDA kernels; CUDA operators), ``"numpy"``
            (the same array code on the CPU) or ``"auto"`` (cupy when available for a CUDA operator,
            else torch). The operator's products are torch in every case.
        return_eigenvectors: also return the Ritz vectors as columns of an ``(n, k)`` tensor.
        v0: start vector (e.g. the previous top eigenvector, for warm starts); in block mode an
            ``(n, b)`` block or one vector (the other columns drawn at random).
        basis: storage of the Krylov basis: ``"device"`` (default; the working dtype on the
            operator's device), ``"device-bf16"`` (bfloat16 rows, half the memory, float32
            accumulation; eigenvalues to ~1e-4, eigenvectors to ~4e-3 relative; its residuals are
            the float32 recurrence's, which certify the eigenvalues but not the rounding carried by
            the returned eigenvectors; should the rounded basis lose orthogonality, the solve is
            repeated with ``"device"``, with a warning and the products of both counted) or
            ``"host"`` (pinned host memory streamed per pass, for bases that do not fit the GPU);
            see :mod:`sharpscope.lanczos.backends.base`.
        max_basis: basis vectors kept before a thick restart (default ``max(2k + 20, 60)``, capped by
            ``n`` and 1/8 of the memory).
        reorth: ``"partial"`` (default) or ``"full"`` reorthogonalization (block mode: always full).
        callback: called as ``callback(num_matvecs, ritz_values, residuals)`` after each Ritz test.
        block_size: ``b > 1`` runs block Lanczos (:mod:`.block`): ``b`` products per step through
            ``op.matmat`` (batched where that is faster), exactly repeated eigenvalues found with their
            multiplicity up to ``b``; torch backend and ``basis="device"`` only.

    Example:
        >>> import torch, sharpscope as ss
        >>> A = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64))
        >>> res = ss.lanczos(ss.as_operator(A), k=3)
        >>> [round(x, 6) for x in res.eigenvalues.tolist()]
        [100.0, 99.0, 98.0]
    """
    args = dict(k=k, which=which, tol=tol, max_matvecs=max_matvecs, seed=seed, backend=backend,
                return_eigenvectors=return_eigenvectors, v0=v0, max_basis=max_basis, reorth=reorth,
                callback=callback, block_size=block_size)
    try:
        with pinned(op):
            res = _solve_switching(op, basis=basis, **args)
    except RoundedBasisLost as lost:
        # a bfloat16 basis can lose orthogonality where a float32 one keeps it (seen on operators of
        # low rank, whose Krylov space is exhausted between thick restarts): solve again, in float32
        warnings.warn(f"basis='device-bf16' lost orthogonality ({lost}); solved again with basis='device'",
                      RuntimeWarning, stacklevel=2)
        with pinned(op):
            res = _solve_switching(op, basis="device", **args)
        res = dataclasses.replace(res, num_matvecs=res.num_matvecs + lost.num_matvecs)
    return dataclasses.replace(_same_on_all_ranks(op, res), derivative_check=derivative_check_of(op))


class _SwitchedError(Exception):
    """The operator switched its product after a symmetry failure (auto -> finite differences)."""

    def __init__(self, num_matvecs: int) -> None:
        super().__init__(num_matvecs)
        self.num_matvecs = num_matvecs


def _solve_switching(op, **args) -> LanczosResult:
    """:func:`_solve`, restarted once when the symmetry probe failed and the operator switched to a product
    that cures it (``hvp_mode="auto"`` to finite differences at the first steps): the Krylov space built
    so far belongs to the wrong matrix. ``num_matvecs`` counts the products of both attempts."""
    try:
        return _solve(op, **args)
    except _SwitchedError as switched:
        res = _solve(op, **args)
        return dataclasses.replace(res, num_matvecs=res.num_matvecs + switched.num_matvecs)


def _run(op, run: Callable[[], Ritz], state) -> Ritz:
    """``run()``; a symmetry failure is offered to the operator (:meth:`SymmetricOperator._after_asymmetry`)."""
    try:
        return run()
    except NotSymmetricError as err:
        if type(err) is NotSymmetricError and after_asymmetry(op, err, state.num_mv):
            raise _SwitchedError(state.num_mv) from err
        raise


def _same_on_all_ranks(op, res: LanczosResult) -> LanczosResult:
    """The result as rank 0 holds it, on every rank of a data-parallel operator (unchanged otherwise)."""
    packed = torch.stack([res.eigenvalues, res.residuals, res.converged.to(torch.float64)])
    shared = same_on_all_ranks(op, packed)
    if shared is packed:
        return res
    vectors = None if res.eigenvectors is None else same_on_all_ranks(op, res.eigenvectors)
    return dataclasses.replace(res, eigenvalues=shared[0].clone(), residuals=shared[1].clone(),
                               converged=shared[2] != 0, eigenvectors=vectors)


# =============================================================================================
# validate
# =============================================================================================
def _validate(op, k, which, tol, max_matvecs, reorth, block_size) -> None:
    """One-line errors for bad arguments (before any product)."""
    n = op.shape[0]
    if which not in ("LA", "SA", "LM"):
        raise ValueError(f"which must be 'LA', 'SA' or 'LM', got {which!r}")
    if reorth not in ("partial", "full"):
        raise ValueError(f"reorth must be 'partial' or 'full', got {reorth!r}")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if k >= n:
        raise ValueError(f"k={k} must be smaller than the operator's dimension n={n}; "
                         "use op.to_dense() and torch.linalg.eigvalsh for all eigenvalues")
    if not tol > 0:
        raise ValueError(f"tol must be positive, got {tol}")
    if max_matvecs is not None and (not isinstance(max_matvecs, (int, np.integer)) or max_matvecs < 1):
        raise ValueError(f"max_matvecs must be a positive integer (operator products), got {max_matvecs!r}")
    if not isinstance(block_size, (int, np.integer)) or not 1 <= block_size <= n:
        raise ValueError(f"block_size must be an integer from 1 to the operator's dimension n={n}, "
                         f"got {block_size!r}")
    if not op.dtype.is_floating_point:
        raise TypeError(f"the operator's dtype must be floating point, got {op.dtype}")


def _config(op, k, which, tol, max_matvecs, reorth, callback, *, storage, placement, max_basis,
            block_size) -> LanczosConfig:
    """The validated settings of one solve: working dtype, product cap and basis size."""
    n = op.shape[0]
    # half-precision operators (bf16/fp16 models) get a float32 basis: the recurrence needs it
    dtype = torch.float32 if torch.finfo(op.dtype).bits < 32 else op.dtype
    if storage == "bfloat16" and dtype != torch.float32:
        raise ValueError(f"basis='device-bf16' needs a float32 (or half-precision) operator, got {op.dtype}: "
                         "a bfloat16 basis limits the accuracy to float32 level at best")
    if max_matvecs is None:
        max_matvecs = max(300, 30 * k) * (1 if block_size == 1 else 2)
    if max_matvecs < block_size:
        raise ValueError(f"max_matvecs={max_matvecs} is smaller than one block of block_size={block_size}")
    itemsize = 2 if storage == "bfloat16" else torch.empty(0, dtype=dtype).element_size()
    budget_device = torch.device("cpu") if placement == "host" else op.device
    m = (_default_max_basis(n, k, n * itemsize, budget_device, block_size) if max_basis is None
         else int(max_basis))
    m = min(m, n)
    need = k + 2 if block_size == 1 else k + 2 * block_size
    if m < min(need, n):
        raise ValueError(f"max_basis={m} is too small for k={k}"
                         + (": need at least k + 2" if block_size == 1 else
                            f" and block_size={block_size}: need at least k + 2 * block_size"))
    return LanczosConfig(n=n, k=k, which=which, tol=tol, max_matvecs=int(max_matvecs), max_basis=m,
                         reorth=reorth, dtype=dtype, op_dtype=op.dtype, device=torch.device(op.device),
                         callback=callback)


def _start_vector(v0, cfg: LanczosConfig, gen: torch.Generator) -> torch.Tensor:
    if v0 is None:
        return random_unit(cfg.n, gen, cfg.dtype, cfg.device)
    v = torch.as_tensor(v0).reshape(-1).to(dtype=cfg.dtype, device=cfg.device)
    if v.shape[0] != cfg.n or not torch.isfinite(v).all() or float(v.norm()) == 0.0:
        raise ValueError(f"v0 must be a finite nonzero vector of length {cfg.n}")
    return v / v.norm()


# =============================================================================================
# iterate
# =============================================================================================
def _solve(op, k, which, tol, max_matvecs, seed, backend, return_eigenvectors, *, v0, basis, max_basis,
           reorth, callback, block_size) -> LanczosResult:
    """:func:`lanczos` for one basis storage: validate, iterate, extract."""
    _validate(op, k, which, tol, max_matvecs, reorth, block_size)
    backend = resolve_backend(backend, op.device)
    storage, placement = storage_of(basis)
    cfg = _config(op, k, which, tol, max_matvecs, reorth, callback, storage=storage, placement=placement,
                  max_basis=max_basis, block_size=block_size)
    gen = make_generator(seed, cfg.device)
    if block_size > 1:
        from .block import block_lanczos

        if backend != "torch" or basis != "device":
            raise ValueError(f"block_size={block_size} needs backend='torch' and basis='device' "
                             f"(got backend={backend!r}, basis={basis!r})")
        return block_lanczos(op, cfg, block_size, gen, v0, return_eigenvectors, run=_run)
    Q = make_basis(backend, basis, cfg.max_basis, cfg.n, cfg.dtype, cfg.device)
    Q.set(0, same_on_all_ranks(op, _start_vector(v0, cfg, gen)))
    state = LanczosState(op, cfg, Q, gen)
    ritz = _run(op, state.run, state)
    return _extract(state, ritz, return_eigenvectors)


# =============================================================================================
# extract
# =============================================================================================
def _extract(state: LanczosState, ritz: Ritz, return_eigenvectors: bool) -> LanczosResult:
    idx = ritz.wanted
    vectors = state.Q.ritz_vectors(ritz.S[:, idx], state.j) if return_eigenvectors else None
    return make_result(ritz, idx, state.cfg, vectors, num_matvecs=state.num_mv, num_restarts=state.restarts,
                       num_reorthogonalizations=state.reorths)


def make_result(ritz: Ritz, idx: np.ndarray, cfg: LanczosConfig, vectors: torch.Tensor | None,
                **counts: int) -> LanczosResult:
    """The :class:`LanczosResult` of the Ritz pairs ``idx``."""
    return LanczosResult(
        eigenvalues=torch.as_tensor(ritz.theta[idx].copy(), dtype=torch.float64),
        residuals=torch.as_tensor(ritz.residuals[idx].copy(), dtype=torch.float64),
        converged=torch.as_tensor(ritz.converged(cfg.tol, idx)),
        eigenvectors=vectors, which=cfg.which, **counts)
