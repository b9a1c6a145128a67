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
test, restart), driven here after validation (:mod:`.config`) and followed by extraction. One retry loop
(:func:`_attempts`) starts the solve again when it must: a bfloat16 basis that lost orthogonality is
replaced by a float32 one, and an operator whose symmetry probe failed may switch its product once
(``hvp_mode="auto"`` to finite differences); the products of every attempt are counted. The start vector is drawn on
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
from typing import Callable, Literal

import torch

from ..linop import NotSymmetricError, SymmetricOperator, after_asymmetry, derivative_check_of, pinned, same_on_all_ranks
from ..progress import Progress
from ..vector_space import space_of
from .backends import float_head_rows, make_basis, resolve_backend
from .block import BlockLanczosState
from .config import Request, make_config, validate
from .result import LanczosResult
from .start import make_generator, start_vector
from .state import LanczosState, RoundedBasisLost

__all__ = ["lanczos", "LanczosResult"]

Which = Literal["LA", "SA", "LM"]


def lanczos(op: SymmetricOperator, k: int = 5, which: Which = "LA", tol: float = 1e-6,
            max_matvecs: int | None = None, seed: int = 0, backend: str = "torch",
            return_eigenvectors: bool = False, *, v0: torch.Tensor | None = None, basis: str = "device",
            max_basis: int | None = None, max_memory: int | float | None = None,
            reorth: Literal["partial", "full"] = "partial", callback: Callable | None = None,
            block_size: int = 1, progress: bool | None = None) -> LanczosResult:
    """Top-``k`` eigenpairs of a symmetric operator by thick-restart Lanczos (module docstring; docs:
    the eigensolver).

    Args:
        op: a :class:`~sharpscope.linop.SymmetricOperator` (or any object with ``shape``, ``dtype``,
            ``device`` and ``matvec``; :func:`sharpscope.as_operator` wraps a tensor or a function).
        k: number of eigenpairs, ``1 <= k < n``.
        which: ``"LA"`` largest algebraic (sharpness; default), ``"SA"`` smallest, ``"LM"`` largest magnitude.
        tol: relative Ritz-residual tolerance; the eigenvalue error is about residual^2 / gap.
        max_matvecs: cap on products, each column of a block counted (default ``max(300, 30 k)``, twice
            that in block mode); an unconverged value has ``converged`` False, never a silent wrong value.
        seed: seeds the start vector, drawn on the operator's device.
        backend: ``"torch"`` (default), ``"cupy"``, ``"numpy"`` or ``"auto"``: where the basis algebra runs.
        return_eigenvectors: also return the Ritz vectors as columns of an ``(n, k)`` tensor.
        v0: start vector (e.g. the previous top eigenvector); in block mode an ``(n, b)`` block.
        basis: ``"device"`` (default), ``"device-bf16"`` (half the memory; residuals of the returned vectors
            computed explicitly: :mod:`sharpscope.lanczos.refine`) or ``"host"`` (pinned host memory streamed
            per pass): see :mod:`sharpscope.lanczos.backends.base`.
        max_basis: vectors kept before a thick restart (default ``2k + 8``, at most 1/8 of the RAM or 1/4 of a
            GPU's free memory: :mod:`sharpscope.lanczos.config`).
        max_memory: the basis's memory instead: bytes (int), or a fraction of the free memory (float).
        reorth: ``"partial"`` (default) or ``"full"`` reorthogonalization (block mode: always full).
        callback: called as ``callback(num_matvecs, ritz_values, residuals)`` after each Ritz test.
        block_size: ``b > 1`` runs block Lanczos (:mod:`.block`), which finds multiplicities up to ``b``.
        progress: a bar of the products: None (default) once the call has run 2 s, True always, False never.

    Example:
        >>> import torch, sharpscope as ss
        >>> A = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64))
        >>> res = ss.lanczos(ss.as_operator(A), k=3)
        >>> [round(x, 6) for x in res.eigenvalues.tolist()]
        [100.0, 99.0, 98.0]
    """
    req = Request(k=k, which=which, tol=tol, max_matvecs=max_matvecs, seed=seed, backend=backend,
                  return_eigenvectors=return_eigenvectors, v0=v0, basis=basis, max_basis=max_basis,
                  max_memory=max_memory, reorth=reorth, callback=callback, block_size=block_size)
    validate(op, req)
    with pinned(op), Progress(f"lanczos k={k}", progress=progress) as bar:
        res = _attempts(op, req, bar)
    return dataclasses.replace(_same_on_all_ranks(op, res), derivative_check=derivative_check_of(op))


def _attempts(op, req: Request, bar: Progress) -> LanczosResult:
    """The solve, started again where it must be (module docstring): a bfloat16 basis that lost
    orthogonality (seen on operators of low rank, whose Krylov space is exhausted between thick restarts)
    by a float32 one, with a warning; a symmetry failure after which the operator switched its product
    (:meth:`~sharpscope.linop.SymmetricOperator._after_asymmetry`), once: the Krylov space built so far
    belongs to the wrong matrix. ``num_matvecs`` counts every attempt's products, ``basis_bytes`` the
    largest basis (one basis is alive at a time)."""
    backend = resolve_backend(req.backend, op.device)
    if req.block_size > 1 and (backend != "torch" or req.basis != "device"):
        raise ValueError(f"block_size={req.block_size} needs backend='torch' and basis='device' "
                         f"(got backend={backend!r}, basis={req.basis!r})")
    if req.block_size > 1 and space_of(op).sharded:
        raise ValueError(f"block_size={req.block_size} is not available on sharded vectors: use block_size=1")
    basis, spent, peak, switched = req.basis, 0, 0, False
    while True:
        state = _new_state(op, req, backend, basis, bar)
        try:
            ritz = state.run()
        except RoundedBasisLost as lost:
            warnings.warn(f"basis='device-bf16' lost orthogonality ({lost}); solved again with basis='device'",
                          RuntimeWarning, stacklevel=3)
            basis = "device"
        except NotSymmetricError as err:
            # asked even after a switch: an operator in finite-difference mode raises its own reason (random products)
            if type(err) is not NotSymmetricError or not after_asymmetry(op, err, state.num_mv) or switched:
                raise
            switched = True
        else:
            res = state.extract(ritz, req.return_eigenvectors)
            return dataclasses.replace(res, num_matvecs=res.num_matvecs + spent,
                                       basis_bytes=max(peak, res.basis_bytes))
        spent, peak = spent + state.num_mv, max(peak, state.basis_bytes)
        state = None  # the failed attempt's basis goes before the next one is allocated


def _new_state(op, req: Request, backend: str, basis: str, bar: Progress) -> LanczosState | BlockLanczosState:
    """A solve's state, its start vector (or block) drawn and stored."""
    cfg = make_config(op, req, basis, bar)
    gen = make_generator(req.seed, cfg.device)
    if req.block_size > 1:
        state = BlockLanczosState(op, cfg, req.block_size, gen)
        state.start(req.v0)
        return state
    space = cfg.space  # sharded vectors: the basis holds this rank's shards, its inner products all-reduced
    Q = make_basis(backend, basis, cfg.max_basis, space.local_size, cfg.dtype, cfg.device, space=space,
                   head=float_head_rows(basis, cfg.k))
    Q.set(0, start_vector(req.v0, space, gen, cfg.dtype, cfg.device))
    return LanczosState(op, cfg, Q, gen)


def _same_on_all_ranks(op, res: LanczosResult) -> LanczosResult:
    """The result as rank 0 holds it, on every rank of a data-parallel operator (unchanged otherwise)."""
    packed = torch.stack([res.eigenvalues, res.residuals, res.converged.to(torch.float64)])
    shared = same_on_all_ranks(op, packed)
    if shared is packed:
        return res
    vectors = None if res.eigenvectors is None else space_of(op).share_vectors(res.eigenvectors)  # shards stay
    return dataclasses.replace(res, eigenvalues=shared[0].clone(), residuals=shared[1].clone(),
                               converged=shared[2] != 0, eigenvectors=vectors)
