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

Probes go through the operator in blocks (``block_size``), by :meth:`~sharpscope.linop.SymmetricOperator.matmat`:
batched products where the operator finds them faster (:mod:`sharpscope.operators`), and SLQ runs the
Lanczos recurrences of a block of probes in lockstep (one product block and one host transfer per step).
The probes are drawn by a CPU generator, in the order of earlier versions (the same numbers on every
device for a seed), so the estimates are those of one probe at a time up to floating-point rounding
(summation order).

Sharded vectors (``ss.shard_vectors(H)`` on an FSDP2 model): probes, sketches and Lanczos bases are held as
each rank's shard, the probes drawn per shard so that any number of ranks draws the same global vectors for
a seed, and every inner product is summed over the ranks (:mod:`sharpscope.vector_space`; Hutch++'s QR is a
TSQR).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import scipy.linalg
import torch

from ._memory import memory_budget
from .linop import SymmetricOperator, derivative_check_of, matmat, pinned, same_on_all_ranks
from .progress import Progress
from .vector_space import space_of

__all__ = ["hutchinson_trace", "hutchpp_trace", "spectral_density", "TraceEstimate", "SpectralDensity",
           "lanczos_tridiagonal"]


@dataclass(frozen=True)
class TraceEstimate:
    """A trace estimate with its standard error and cost; ``samples`` are the per-probe values;
    ``derivative_check`` what the operator's first-product check found (:class:`~sharpscope.LanczosResult`)."""

    estimate: float
    stderr: float
    num_matvecs: int
    samples: np.ndarray
    method: str = "hutchinson"
    derivative_check: str = "unchecked"


def _rademacher(op, count: int, gen: torch.Generator) -> torch.Tensor:
    """``count`` Rademacher rows for ``op`` (drawn on the CPU: the same numbers on every device for a seed;
    rank 0's on every rank of a data-parallel operator; this rank's shards on sharded vectors)."""
    return space_of(op).rademacher(count, gen, op.dtype, op.device)


def _check_probes(num_probes: int, minimum: int = 1) -> None:
    if not isinstance(num_probes, int) or num_probes < minimum:
        raise ValueError(f"num_probes must be an integer >= {minimum}, got {num_probes!r}")


def _block_size(block_size: int | None, default: int) -> int:
    if block_size is None:
        return default
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    return block_size


def _quadratic_forms(op, Z: torch.Tensor) -> torch.Tensor:
    """``z_i^T A z_i`` for the rows ``z_i`` of ``Z`` (on the device), by one block product."""
    return space_of(op).reduce(torch.linalg.vecdot(Z.T, matmat(op, Z.T), dim=0))


def hutchinson_trace(op: SymmetricOperator, num_probes: int = 100, seed: int = 0, *,
                     block_size: int | None = None, progress: bool | None = None) -> TraceEstimate:
    """Hutchinson's trace estimate with Rademacher probes (module docstring), ``block_size`` probes per
    block product (default 32). ``progress``: a bar of the products, updated per block, with the running
    estimate (None: once the call has run 2 s; True: always; False: never; :class:`sharpscope.progress.Progress`)."""
    _check_probes(num_probes, 2)
    block = _block_size(block_size, 32)
    with pinned(op), Progress("hutchinson_trace", num_probes, progress) as bar:
        return _hutchinson(op, num_probes, seed, block, bar)


def _hutchinson(op: SymmetricOperator, num_probes: int, seed: int, block: int, bar: Progress) -> TraceEstimate:
    gen = torch.Generator().manual_seed(seed)
    parts = []
    for i in range(0, num_probes, block):
        parts.append(_quadratic_forms(op, _rademacher(op, min(block, num_probes - i), gen)))
        bar.advance(i + len(parts[-1]))
        if bar.bar is not None:  # shown: the running estimate (one host read per block)
            bar.note(f"estimate {float(torch.cat(parts).double().mean()):.6g}")
    samples = same_on_all_ranks(op, torch.cat(parts)).double().cpu().numpy()
    return TraceEstimate(float(samples.mean()), float(samples.std(ddof=1) / math.sqrt(num_probes)),
                         num_probes, samples, derivative_check=derivative_check_of(op))


def hutchpp_trace(op: SymmetricOperator, num_matvecs: int = 102, seed: int = 0, *,
                  progress: bool | None = None) -> TraceEstimate:
    """Hutch++ trace estimate using ``num_matvecs`` products (a multiple of 3 is used exactly), in three
    block products of ``num_matvecs / 3`` columns (batched where the operator finds that faster).

    The standard error is that of the Hutchinson part on the deflated operator (the sketch part is exact).
    ``progress``: a bar of the products, updated per block (as :func:`hutchinson_trace`).
    """
    third = num_matvecs // 3
    if third < 2:
        raise ValueError(f"hutchpp_trace needs num_matvecs >= 6, got {num_matvecs}")
    with pinned(op), Progress("hutchpp_trace", 3 * min(third, op.shape[0]), progress) as bar:
        return _hutchpp(op, third, seed, bar)


def _hutchpp(op: SymmetricOperator, third: int, seed: int, bar: Progress) -> TraceEstimate:
    n, space = op.shape[0], space_of(op)
    third = min(third, n)
    gen = torch.Generator().manual_seed(seed)
    S = _rademacher(op, third, gen).T
    Qs = space.orthonormalize(matmat(op, S))
    bar.advance(third)
    exact = torch.trace(Qs.T @ matmat(op, Qs))
    bar.advance(2 * third)
    G = _rademacher(op, third, gen).T
    G = G - Qs @ space.reduce(Qs.T @ G)
    values = space.reduce(torch.cat([exact.reshape(1), torch.linalg.vecdot(G, matmat(op, G), dim=0)]))
    bar.advance(3 * third)
    values = same_on_all_ranks(op, values).double().cpu().numpy()
    exact, samples = float(values[0]), values[1:]
    std = samples.std(ddof=1) / math.sqrt(third) if third > 1 else float("nan")
    return TraceEstimate(exact + float(samples.mean()), float(std), 3 * third, samples, method="hutch++",
                         derivative_check=derivative_check_of(op))


def lanczos_tridiagonal(op: SymmetricOperator, v: torch.Tensor, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """``num_steps`` Lanczos steps from ``v`` with full reorthogonalization: returns ``(alpha, beta)``
    of the tridiagonal ``T`` (shorter if the Krylov space is exhausted); one solve (:func:`~sharpscope.linop.pinned`)."""
    with pinned(op):
        return _lanczos_tridiagonal(op, v, num_steps)


def _lanczos_tridiagonal(op: SymmetricOperator, v: torch.Tensor, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
    space = space_of(op)  # sharded vectors: v and the basis are this rank's shards
    steps = min(num_steps, op.shape[0])
    Q = torch.empty(steps, space.local_size, dtype=op.dtype, device=op.device)
    Q[0] = v / space.norm(v)
    alpha: list[float] = []
    beta: list[float] = []
    eps = torch.finfo(op.dtype).eps
    scale = 0.0
    for j in range(steps):
        w = op.matvec(Q[j])
        alpha.append(float(space.reduce(torch.dot(Q[j], w))))
        for _ in range(2):  # classical Gram-Schmidt against the whole basis, twice
            w.sub_(Q[: j + 1].T @ space.reduce(Q[: j + 1] @ w))
        b = float(space.norm(w))
        scale = max(scale, abs(alpha[-1]) + b)
        if j == steps - 1 or b <= 10 * eps * scale:  # done, or the Krylov space is exhausted
            break
        beta.append(b)
        Q[j + 1] = w / b
    return np.array(alpha), np.array(beta)


@dataclass(frozen=True)
class SpectralDensity:
    """SLQ quadrature: ``nodes[p]`` and ``weights[p]`` (summing to 1) per probe ``p``; ``n`` the dimension;
    ``derivative_check`` what the operator's first-product check found (:class:`~sharpscope.LanczosResult`)."""

    nodes: list[np.ndarray]
    weights: list[np.ndarray]
    num_matvecs: int
    n: int
    derivative_check: str = "unchecked"

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


def spectral_density(op: SymmetricOperator, num_probes: int = 10, num_steps: int = 80, seed: int = 0, *,
                     block_size: int | None = None, progress: bool | None = None) -> SpectralDensity:
    """Stochastic Lanczos quadrature with Rademacher probes (module docstring); ``num_probes * num_steps``
    products.

    ``block_size`` probes run their recurrences in lockstep, one block product per step (default: all the
    probes, as many as fit 1/8 of the RAM or 1/4 of the free GPU memory with their ``num_steps``-vector
    bases). Each probe's small tridiagonal eigenproblem is solved on the host by
    ``scipy.linalg.eigh_tridiagonal`` (LAPACK): about 0.25 ms for 80 steps on one CPU core
    (``scripts/bench_basis_cpu.py``), against 80 products of a network's Hessian per probe, so a
    batched GPU eigensolver would not change the run time (docs/perf-gpu.md).

    ``progress``: a bar of the products (at most ``num_probes * num_steps``; a probe whose Krylov space is
    exhausted stops early), updated per step (None: once the call has run 2 s; True: always; False: never)."""
    _check_probes(num_probes)
    if not isinstance(num_steps, int) or num_steps < 2:
        raise ValueError(f"num_steps must be an integer >= 2, got {num_steps!r}")
    n, itemsize = op.shape[0], torch.empty(0, dtype=op.dtype).element_size()
    local = space_of(op).local_size  # the entries of a vector this process holds
    fits = memory_budget(op.device, gpu_free=0.25, host=0.125) // max(1, min(num_steps, n) * local * itemsize)
    block = _block_size(block_size, int(max(1, min(num_probes, fits))))
    total = num_probes * min(num_steps, n)
    with pinned(op), Progress("spectral_density", total, progress) as bar:
        return _slq(op, num_probes, num_steps, seed, block, bar)


def _slq(op: SymmetricOperator, num_probes: int, num_steps: int, seed: int, block: int,
         bar: Progress) -> SpectralDensity:
    gen = torch.Generator().manual_seed(seed)
    nodes, weights = [], []
    before = op.num_matvecs
    for i in range(0, num_probes, block):
        Z = _rademacher(op, min(block, num_probes - i), gen)
        for alpha, beta in _LockstepLanczos(op, Z, num_steps).run(lambda: bar.advance(op.num_matvecs - before)):
            theta, S = scipy.linalg.eigh_tridiagonal(alpha, beta)
            nodes.append(theta)
            weights.append(S[0, :] ** 2)
        bar.note(f"{len(nodes)}/{num_probes} probes")
    nodes, weights = _quadrature_on_all_ranks(op, nodes, weights)
    return SpectralDensity(nodes, weights, op.num_matvecs - before, op.shape[0], derivative_check_of(op))


def _quadrature_on_all_ranks(op, nodes: list[np.ndarray], weights: list[np.ndarray]):
    """Rank 0's nodes and weights on every rank of a data-parallel operator (unchanged otherwise)."""
    packed = torch.as_tensor(np.concatenate(nodes + weights))
    shared = same_on_all_ranks(op, packed)
    if shared is packed:
        return nodes, weights
    flat = shared.cpu().numpy()
    sizes = [len(t) for t in nodes + weights]
    parts = np.split(flat, np.cumsum(sizes)[:-1])
    return parts[: len(nodes)], parts[len(nodes):]


class _LockstepLanczos:
    """The Lanczos recurrences (full reorthogonalization) of a block of start vectors, run in lockstep:
    one block product and one host transfer per step; a probe whose Krylov space is exhausted stops."""

    def __init__(self, op, Z: torch.Tensor, num_steps: int) -> None:
        c, n = Z.shape  # n: the entries of a vector this process holds
        self.op, self.steps, self.space = op, min(num_steps, op.shape[0]), space_of(op)
        self.Q = torch.empty(c, self.steps, n, dtype=op.dtype, device=op.device)
        self.Q[:, 0] = Z / self.space.column_norms(Z, dim=1)
        self.alpha: list[list[float]] = [[] for _ in range(c)]
        self.beta: list[list[float]] = [[] for _ in range(c)]
        self.scale = [0.0] * c
        self.active = list(range(c))
        self.eps = torch.finfo(op.dtype).eps

    def _basis(self, j: int) -> torch.Tensor:
        if len(self.active) == self.Q.shape[0]:
            return self.Q[:, : j + 1]
        return self.Q[self.active, : j + 1]

    def step(self, j: int) -> None:
        basis = self._basis(j)                       # (a, j + 1, n)
        qj = basis[:, j]
        W = matmat(self.op, qj.T).T.contiguous()     # (a, n)
        alpha = self.space.reduce(torch.linalg.vecdot(qj, W))
        for _ in range(2):  # classical Gram-Schmidt against each probe's own basis, twice
            W -= torch.bmm(basis.transpose(1, 2), self.space.reduce(torch.bmm(basis, W.unsqueeze(2)))).squeeze(2)
        b = self.space.column_norms(W, dim=1)[:, 0]
        values = torch.stack([alpha, b]).double().cpu().numpy()  # the step's one host transfer
        survivors = []
        for row, p in enumerate(self.active):
            self.alpha[p].append(float(values[0, row]))
            self.scale[p] = max(self.scale[p], abs(values[0, row]) + values[1, row])
            if j < self.steps - 1 and values[1, row] > 10 * self.eps * self.scale[p]:
                self.beta[p].append(float(values[1, row]))
                self.Q[p, j + 1] = W[row] / values[1, row]
                survivors.append(p)
        self.active = survivors  # done, or the Krylov space is exhausted

    def run(self, after_step: Callable[[], None] | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        for j in range(self.steps):
            if not self.active:
                break
            self.step(j)
            if after_step is not None:
                after_step()
        return [(np.array(a), np.array(b)) for a, b in zip(self.alpha, self.beta)]
