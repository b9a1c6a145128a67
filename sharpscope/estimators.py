r"""Randomized estimators of spectral sums: trace (Hutchinson, Hutch++) and spectral density (SLQ).

* Hutchinson (1989): :math:`\mathrm{tr} A = \mathbb E[z^\top A z]` for Rademacher :math:`z`;
  the estimate is the probe mean, its standard error the probe standard deviation over
  :math:`\sqrt m`.
* Hutch++ (Meyer, Musco, Musco & Woodruff 2021): with :math:`m` products, sketch
  :math:`Q = \mathrm{orth}(A S)` from :math:`m/3` probes, take :math:`\mathrm{tr}(Q^\top A Q)` exactly
  and Hutchinson on the deflated :math:`(I - QQ^\top) A (I - QQ^\top)` with the last :math:`m/3`.
  Its error falls like :math:`1/m` instead of :math:`1/\sqrt m` when the spectrum decays
  (Hessians: a few outliers over a bulk).
* Stochastic Lanczos quadrature (Golub & Meurant; Ubaru, Chen & Saad 2017; Ghorbani, Krishnan &
  Xiao 2019; Papyan 2020): for a unit probe :math:`v`, :math:`m` Lanczos steps give
  :math:`T_m = S \Theta S^\top`, and :math:`v^\top f(A) v \approx \sum_i \tau_i^2 f(\theta_i)` with
  :math:`\tau_i = S_{1i}`. The density estimate is :math:`\phi(x) = \frac1{n_v}\sum_{v}\sum_i \tau_{v,i}^2
  \delta(x - \theta_{v,i})`, smoothed with a Gaussian of width :math:`\sigma`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import torch

from .linop import SymmetricOperator, pinned

__all__ = ["hutchinson_trace", "hutchpp_trace", "spectral_density", "TraceEstimate", "SpectralDensity",
           "lanczos_tridiagonal"]


@dataclass(frozen=True)
class TraceEstimate:
    """A trace estimate with its standard error and cost; ``samples`` are the per-probe values."""

    estimate: float
    stderr: float
    num_matvecs: int
    samples: np.ndarray
    method: str = "hutchinson"


def _rademacher(n: int, count: int, gen: torch.Generator, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    z = torch.randint(0, 2, (count, n), generator=gen, dtype=torch.int8)
    return (2 * z - 1).to(dtype=dtype, device=device)


def _check_probes(num_probes: int, minimum: int = 1) -> None:
    if not isinstance(num_probes, int) or num_probes < minimum:
        raise ValueError(f"num_probes must be an integer >= {minimum}, got {num_probes!r}")


def hutchinson_trace(op: SymmetricOperator, num_probes: int = 100, seed: int = 0) -> TraceEstimate:
    """Hutchinson's trace estimate with Rademacher probes (module docstring)."""
    _check_probes(num_probes, 2)
    with pinned(op):
        return _hutchinson(op, num_probes, seed)


def _hutchinson(op: SymmetricOperator, num_probes: int, seed: int) -> TraceEstimate:
    gen = torch.Generator().manual_seed(seed)
    samples = np.empty(num_probes)
    n = op.shape[0]
    for i in range(num_probes):
        z = _rademacher(n, 1, gen, op.dtype, op.device)[0]
        samples[i] = float(torch.dot(z, op.matvec(z)))
    return TraceEstimate(float(samples.mean()), float(samples.std(ddof=1) / math.sqrt(num_probes)),
                         num_probes, samples)


def hutchpp_trace(op: SymmetricOperator, num_matvecs: int = 102, seed: int = 0) -> TraceEstimate:
    """Hutch++ trace estimate using ``num_matvecs`` products (a multiple of 3 is used exactly).

    The standard error is that of the Hutchinson part on the deflated operator (the sketch part is exact).
    """
    third = num_matvecs // 3
    if third < 2:
        raise ValueError(f"hutchpp_trace needs num_matvecs >= 6, got {num_matvecs}")
    with pinned(op):
        return _hutchpp(op, third, seed)


def _hutchpp(op: SymmetricOperator, third: int, seed: int) -> TraceEstimate:
    n = op.shape[0]
    third = min(third, n)
    gen = torch.Generator().manual_seed(seed)
    S = _rademacher(n, third, gen, op.dtype, op.device).T
    Qs, _ = torch.linalg.qr(op.matmat(S))
    exact = float(torch.trace(Qs.T @ op.matmat(Qs)))
    G = _rademacher(n, third, gen, op.dtype, op.device).T
    G = G - Qs @ (Qs.T @ G)
    samples = np.array([float(torch.dot(G[:, i], op.matvec(G[:, i]))) for i in range(third)])
    std = samples.std(ddof=1) / math.sqrt(third) if third > 1 else float("nan")
    return TraceEstimate(exact + float(samples.mean()), float(std), 3 * third, samples, method="hutch++")


def lanczos_tridiagonal(op: SymmetricOperator, v: torch.Tensor, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """``num_steps`` Lanczos steps from ``v`` with full reorthogonalization: returns ``(alpha, beta)``
    of the tridiagonal ``T`` (shorter if the Krylov space is exhausted)."""
    n = op.shape[0]
    steps = min(num_steps, n)
    Q = torch.empty(steps, n, dtype=op.dtype, device=op.device)
    Q[0] = v / v.norm()
    alpha: list[float] = []
    beta: list[float] = []
    eps = torch.finfo(op.dtype).eps
    scale = 0.0
    for j in range(steps):
        w = op.matvec(Q[j])
        alpha.append(float(torch.dot(Q[j], w)))
        for _ in range(2):  # classical Gram-Schmidt against the whole basis, twice
            w.sub_(Q[: j + 1].T @ (Q[: j + 1] @ w))
        b = float(w.norm())
        scale = max(scale, abs(alpha[-1]) + b)
        if j == steps - 1 or b <= 10 * eps * scale:  # done, or the Krylov space is exhausted
            break
        beta.append(b)
        Q[j + 1] = w / b
    return np.array(alpha), np.array(beta)


@dataclass(frozen=True)
class SpectralDensity:
    """SLQ quadrature: ``nodes[p]`` and ``weights[p]`` (summing to 1) per probe ``p``; ``n`` the dimension."""

    nodes: list[np.ndarray]
    weights: list[np.ndarray]
    num_matvecs: int
    n: int

    def moment(self, power: int) -> float:
        """Estimate of ``tr(A^power) / n``."""
        return float(np.mean([np.sum(w * t ** power) for t, w in zip(self.nodes, self.weights)]))

    def default_sigma(self) -> float:
        all_nodes = np.concatenate(self.nodes)
        span = float(all_nodes.max() - all_nodes.min()) or max(abs(float(all_nodes.max())), 1.0)
        return span / 200.0

    def pdf(self, grid: np.ndarray | torch.Tensor, sigma: float | None = None) -> np.ndarray:
        """Gaussian-smoothed density on ``grid``: ``mean_p sum_i w_pi N(x; theta_pi, sigma^2)``."""
        x = np.asarray(grid, dtype=np.float64)
        sigma = self.default_sigma() if sigma is None else float(sigma)
        if sigma <= 0:
            raise ValueError(f"sigma must be positive, got {sigma}")
        out = np.zeros_like(x)
        for t, w in zip(self.nodes, self.weights):
            out += (w[None, :] * np.exp(-0.5 * ((x[:, None] - t[None, :]) / sigma) ** 2)).sum(axis=1)
        return out / (len(self.nodes) * sigma * math.sqrt(2 * math.pi))

    def plot(self, ax=None, sigma: float | None = None, num_points: int = 1000, log: bool = True, **kwargs):
        """Plot the smoothed density (log scale by default, as in Ghorbani et al. 2019); returns the axes."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(6, 3.5))
        all_nodes = np.concatenate(self.nodes)
        sigma = self.default_sigma() if sigma is None else sigma
        lo, hi = all_nodes.min() - 5 * sigma, all_nodes.max() + 5 * sigma
        grid = np.linspace(lo, hi, num_points)
        dens = self.pdf(grid, sigma)
        ax.plot(grid, np.maximum(dens, 1e-12) if log else dens, **kwargs)
        if log:
            ax.set_yscale("log")
            ax.set_ylim(bottom=max(float(dens.max()) * 1e-8, 1e-12))
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("density")
        return ax


def spectral_density(op: SymmetricOperator, num_probes: int = 10, num_steps: int = 80, seed: int = 0) -> SpectralDensity:
    """Stochastic Lanczos quadrature with Rademacher probes (module docstring); ``num_probes * num_steps`` products.

    Each probe's small tridiagonal eigenproblem is solved on the host by
    ``scipy.linalg.eigh_tridiagonal`` (LAPACK): about 0.25 ms for 80 steps on one CPU core
    (``scripts/bench_basis_cpu.py``), against 80 products of a network's Hessian per probe, so a
    batched GPU eigensolver would not change the run time (docs/perf-gpu.md)."""
    _check_probes(num_probes)
    if not isinstance(num_steps, int) or num_steps < 2:
        raise ValueError(f"num_steps must be an integer >= 2, got {num_steps!r}")
    with pinned(op):
        return _slq(op, num_probes, num_steps, seed)


def _slq(op: SymmetricOperator, num_probes: int, num_steps: int, seed: int) -> SpectralDensity:
    gen = torch.Generator().manual_seed(seed)
    nodes, weights = [], []
    before = op.num_matvecs
    for _ in range(num_probes):
        z = _rademacher(op.shape[0], 1, gen, op.dtype, op.device)[0]
        alpha, beta = lanczos_tridiagonal(op, z, num_steps)
        theta, S = scipy.linalg.eigh_tridiagonal(alpha, beta)
        nodes.append(theta)
        weights.append(S[0, :] ** 2)
    return SpectralDensity(nodes, weights, op.num_matvecs - before, op.shape[0])
