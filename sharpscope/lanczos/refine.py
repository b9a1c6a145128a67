r"""The certificate of a bfloat16 basis: explicit residuals of the returned vectors, refined until they pass.

A Ritz vector of a bfloat16 basis is :math:`y = \tilde Q s`, a combination of rounded rows
:math:`\tilde q_r = q_r + e_r` with :math:`\|e_r\| \le u = 2^{-8}`, so :math:`y` is off the Ritz vector the
recurrence certified (:math:`Q s`, whose residual is :math:`|\beta_j s_{j,i}|`) by
:math:`d = \sum_r s_r e_r`, of norm about :math:`u / \sqrt 3`, and its residual is off by
:math:`(A - \theta) d`: about :math:`10^{-3} \|A\|` however small :math:`|\beta_j s_{j,i}|` is. No projected
quantity sees :math:`d` (the rounding is not in the Krylov space), so the certificate is computed from the
stored vectors themselves: one product per wanted vector, :math:`R = A Y - Y \Theta` after a Rayleigh-Ritz
step on :math:`Y` (Parlett, *The Symmetric Eigenvalue Problem*, Sec. 11.4), and :math:`\|R e_i\|` is what the
result reports.

Where that residual exceeds its threshold (:func:`thresholds`: ``tol`` relative, floored at the products'
rounding), the vectors are refined by LOBPCG (Knyazev 2001, "Toward the optimal preconditioned
eigensolver"): Rayleigh-Ritz on :math:`[Y, D, P]`, :math:`D` the unit residuals of the pairs not yet
converged (one product each), :math:`P` the previous step; the new pairs' products and residuals follow from
those already taken (:math:`A [Y, D, P] C`), so every reported residual is explicit. The error :math:`d` is
spread over the whole spectrum, most of it far from :math:`\theta`, where a step removes most of it; the
vectors it adds are float32, so no rounding enters again. Each step takes its products from what remains of
``max_matvecs``; its residuals are not monotone, so the best step is kept, and without a better one in
:data:`PATIENCE` steps, or without products, the pairs are reported with their explicit residuals,
unconverged.

Memory: held after the Krylov basis is released, and counted in :attr:`Refined.nbytes` (the result's
``basis_bytes`` is the larger of the two): ``Y``, ``A Y`` and ``R`` for the explicit residuals (``3 k`` vectors
of the working dtype); a LOBPCG step holds ``Y``, ``A Y``, the directions ``D``, ``A D``, ``P``, ``A P``, the
next ``Y``, ``A Y``, ``P``, ``A P`` and the best step's ``Y``: up to ``11 k`` vectors (refining the pairs one at
a time against the others, in less memory, stalled on the test problems at residuals near 2e-5 relative).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .ritz import order

__all__ = ["Refined", "refine", "thresholds", "PATIENCE", "ROUNDING"]

ROUNDING = 64.0  # explicit residuals are resolved down to ROUNDING * eps * ||A|| (7.6e-6 ||A|| in float32)
PATIENCE = 3  # steps without a new best worst residual (relative to its threshold) before refine() stops


@dataclass
class Refined:
    """Eigenpairs with explicit residual norms ``||A y - theta y||``, ordered by ``which``."""

    theta: np.ndarray
    residuals: np.ndarray
    vectors: torch.Tensor
    products: int
    nbytes: int


def thresholds(theta: np.ndarray, tol: float, floor: float, atol: float) -> np.ndarray:
    """The residual each pair must reach: ``max(tol * max(|theta|, floor), atol)``, ``atol`` the rounding of
    float32 products (:data:`ROUNDING` eps ||A||), below which an explicit residual is not resolved. Noisier
    products (float32 autograd through deep networks) can keep a residual above it: the pair is then reported
    unconverged, with its residual."""
    return np.maximum(tol * np.maximum(np.abs(theta), floor), atol)


def refine(op, Y: torch.Tensor, which: str, tol: float, floor: float, atol: float, budget: int,
           reduce: Callable[[torch.Tensor], torch.Tensor]) -> Refined:
    r"""The pairs of ``Y`` (``(n, k)``, unit columns) with explicit residuals, refined by LOBPCG steps while
    some residual exceeds its :func:`thresholds` and ``budget`` products remain (module docstring).
    ``reduce`` sums partial inner products over the ranks of a sharded space; ``atol`` floors the thresholds."""
    k = Y.shape[1]
    AY = _product(op, Y)
    products = k
    theta, Y, AY, _ = _rayleigh_ritz([Y], [AY], k, which, reduce)
    R, res = _residuals(Y, AY, theta, reduce)
    P = AP = None
    nbytes = 3 * _bytes(Y)
    best, since = (float(np.max(res / thresholds(theta, tol, floor, atol))), theta, Y, res), 0
    while True:
        scale = thresholds(theta, tol, floor, atol)
        open_ = np.flatnonzero(res > scale)
        if len(open_) == 0 or budget - products < len(open_) or since >= PATIENCE:
            break
        D = R[:, open_] / torch.as_tensor(np.maximum(res[open_], 1e-300), dtype=R.dtype, device=R.device)
        del R
        AD = _product(op, D)
        products += len(open_)
        blocks, prods = [Y, D] + ([P] if P is not None else []), [AY, AD] + ([AP] if P is not None else [])
        new_theta, new_Y, new_AY, C = _rayleigh_ritz(blocks, prods, k, which, reduce)
        # LOBPCG's third block: the step just taken, without its component along Y, with unit columns (the
        # Gram matrix is formed in float32: columns of very different norms lose the small ones)
        new_P = sum(b @ c for b, c in zip(blocks[1:], C[1:]))
        new_AP = sum(b @ c for b, c in zip(prods[1:], C[1:]))
        norms = reduce(torch.linalg.vector_norm(new_P, dim=0) ** 2).sqrt().clamp_min(torch.finfo(new_P.dtype).tiny)
        new_P, new_AP = new_P / norms, new_AP / norms
        nbytes = max(nbytes, sum(map(_bytes, blocks + prods)) + 5 * _bytes(new_Y))
        theta, Y, AY, P, AP = new_theta, new_Y, new_AY, new_P, new_AP
        R, res = _residuals(Y, AY, theta, reduce)
        worst = float(np.max(res / thresholds(theta, tol, floor, atol)))
        # residuals of LOBPCG are not monotone (the Ritz values are): keep the best step
        best, since = ((worst, theta, Y, res), 0) if worst < best[0] else (best, since + 1)
    _, theta, Y, res = best
    return Refined(theta, res, Y, products, nbytes)


def _product(op, V: torch.Tensor) -> torch.Tensor:
    """``A V``, one product per column (as the recurrence takes them: sharded operators take shards)."""
    return torch.stack([op.matvec(V[:, i].contiguous()).detach().to(V.dtype) for i in range(V.shape[1])], dim=1)


def _bytes(V: torch.Tensor) -> int:
    return V.element_size() * V.numel()


def _rayleigh_ritz(blocks: list[torch.Tensor], products: list[torch.Tensor], k: int, which: str,
                   reduce: Callable) -> tuple[np.ndarray, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """The ``k`` wanted Ritz pairs of ``A`` on the span of ``S = [blocks]`` (their products ``A B`` given): the
    Gram matrix ``G = S^T S`` and ``H = S^T A S`` in float64, block by block, directions with ``G``'s
    eigenvalues below 1e-10 of the largest dropped, then ``eigh``; returns ``(theta, S C, A S C, C split by
    block)``, orthonormal columns."""
    G = np.block([[reduce(a.T @ b).double().cpu().numpy() for b in blocks] for a in blocks])
    H = np.block([[reduce(a.T @ b).double().cpu().numpy() for b in products] for a in blocks])
    G, H = (G + G.T) / 2, (H + H.T) / 2
    g, U = np.linalg.eigh(G)
    keep = g > 1e-10 * g[-1]
    W = U[:, keep] / np.sqrt(g[keep])
    theta, Z = np.linalg.eigh(W.T @ H @ W)
    idx = order(theta, which)[:k]
    ref = blocks[0]
    C = list(torch.split(torch.as_tensor(W @ Z[:, idx], dtype=ref.dtype, device=ref.device),
                         [b.shape[1] for b in blocks]))
    return (theta[idx], sum(b @ c for b, c in zip(blocks, C)), sum(b @ c for b, c in zip(products, C)), C)


def _residuals(Y: torch.Tensor, AY: torch.Tensor, theta: np.ndarray,
               reduce: Callable) -> tuple[torch.Tensor, np.ndarray]:
    """``R = A Y - Y diag(theta)`` and its column norms (float64, summed over the ranks)."""
    R = AY - Y * torch.as_tensor(theta, dtype=Y.dtype, device=Y.device)
    norms = reduce(torch.linalg.vector_norm(R, dim=0) ** 2)
    return R, np.sqrt(np.maximum(norms.double().cpu().numpy(), 0.0))
