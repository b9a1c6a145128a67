r"""The Ritz test and the stop rule, shared by single-vector and block Lanczos.

A Ritz pair :math:`(\theta_i, Q s_i)` of the projected matrix has the residual norm
:math:`\|A Q s_i - \theta_i Q s_i\|`, read from the small problem without another product (Saad,
*Numerical Methods for Large Eigenvalue Problems*, Sec. 6.6): :math:`|\beta_j s_{j,i}|` for a single
vector, :math:`\|B_i S_{i,\cdot}\|` for a block. A pair is converged when its residual is at most
:math:`\mathrm{tol} \cdot \max(|\theta_i|, \sqrt{\epsilon}\,\|T\|)`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .config import LanczosConfig

__all__ = ["Ritz", "ritz_pairs", "StopRule", "order", "scores"]


def order(theta: np.ndarray, which: str) -> np.ndarray:
    """Indices of ``theta`` from most to least wanted for ``which``."""
    if which == "LA":
        return np.argsort(-theta, kind="stable")
    if which == "SA":
        return np.argsort(theta, kind="stable")
    return np.argsort(-np.abs(theta), kind="stable")


def scores(theta: np.ndarray, which: str) -> np.ndarray:
    """Values as "bigger is better" scores for ``which``, sorted descending."""
    score = {"LA": theta, "SA": -theta, "LM": np.abs(theta)}[which]
    return np.sort(score)[::-1]


@dataclass
class Ritz:
    """The projected eigenproblem at one check: values, vectors, residual norms, the wanted indices."""

    theta: np.ndarray
    S: np.ndarray
    residuals: np.ndarray
    order: np.ndarray
    wanted: np.ndarray
    floor: float

    def converged(self, tol: float, idx: np.ndarray | None = None) -> np.ndarray:
        idx = self.wanted if idx is None else idx
        return self.residuals[idx] <= tol * np.maximum(np.abs(self.theta[idx]), self.floor)


def ritz_pairs(cfg: "LanczosConfig", theta: np.ndarray, S: np.ndarray, residuals: np.ndarray, j: int,
               anorm: float, num_mv: int) -> Ritz:
    """The Ritz test of a basis of ``j`` vectors: the pairs ``(theta, S)`` of the projected matrix, their
    residual norms (zero once the basis spans the whole space), the wanted ones first; reported to the
    callback and the progress bar."""
    if j >= cfg.n:
        residuals[:] = 0.0  # the Krylov space is the whole space: Ritz pairs are exact
    idx = order(theta, cfg.which)
    floor = math.sqrt(cfg.eps) * max(float(np.max(np.abs(theta))), anorm * cfg.eps)
    ritz = Ritz(theta, S, residuals, idx, idx[: cfg.k], floor)
    if cfg.callback is not None:
        cfg.callback(num_mv, theta[ritz.wanted].copy(), residuals[ritz.wanted].copy())
    if cfg.progress is not None:
        w = ritz.wanted
        off = residuals[w] / np.maximum(cfg.tol * np.maximum(np.abs(theta[w]), floor), 1e-300)
        cfg.progress.note(f"top {theta[w[0]]:.6g}, residual/tol {float(np.max(off)):.2g}")
    return ritz


class StopRule:
    """Whether a solve has its answer: every wanted pair converged (``k`` of them exist) or the basis spans
    the whole space. After fresh directions entered an exhausted Krylov space, the solve goes on until a
    run no longer improves the wanted values by more than the tolerance (so repeated copies are found)."""

    def __init__(self, cfg: "LanczosConfig") -> None:
        self.cfg = cfg
        self.best = np.full(cfg.k, -np.inf)  # wanted values (scores) when the last fresh run began

    def finished(self, ritz: Ritz, j: int, fresh: bool) -> bool:
        cfg = self.cfg
        finished = (j >= cfg.k and bool(ritz.converged(cfg.tol).all())) or j >= cfg.n
        if fresh and j < cfg.n:
            s = np.full(cfg.k, -np.inf)
            s[: len(ritz.wanted)] = scores(ritz.theta[ritz.wanted], cfg.which)
            margin = cfg.tol * np.maximum(np.abs(np.where(np.isfinite(s), s, 0.0)), ritz.floor)
            improved = bool(np.any(s > self.best + margin))
            self.best = s
            finished = finished and not improved
        return finished
