r"""Device-side pieces of the Lanczos recurrence: random start vectors drawn where the operator lives,
and the three-term step with its scalars read back in ONE host transfer.

:func:`three_term` is written as a candidate :class:`~sharpscope.lanczos.backends.base.KrylovBasis`
method: for a basis whose working rows are torch tensors on the operator's device (the torch backend's
``"device"`` storage, or the working copies :attr:`~.KrylovBasis.recent` of the rounded or remote
storages) it keeps ``alpha_j``, ``q_{j-1}^\top A q_j`` and ``beta_j`` on the device until the one
transfer; for any other basis it falls back to the interface's ``project``/``axpy``/``norm`` (the same
numbers, with a host round trip per call).
"""
from __future__ import annotations

import numpy as np
import torch

from .backends import KrylovBasis

__all__ = ["make_generator", "random_unit", "random_block", "working_rows", "three_term", "reorthogonalize"]


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    """A generator on ``device`` seeded with ``seed`` (the CPU generator for a CPU operator, so CPU
    results are those of earlier versions; CUDA draws other numbers than the CPU for the same seed)."""
    device = torch.device(device)
    if device.type == "cpu":
        return torch.Generator().manual_seed(seed)
    try:
        return torch.Generator(device=device).manual_seed(seed)
    except RuntimeError:  # pragma: no cover - a device type without its own generator: draw on the CPU
        return torch.Generator().manual_seed(seed)


def random_block(rows: int, n: int, gen: torch.Generator, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``rows`` standard normal rows of length ``n``, drawn by ``gen`` and returned on ``device``."""
    v = torch.randn(rows, n, generator=gen, dtype=dtype, device=gen.device)
    return v if v.device == torch.device(device) else v.to(device)


def random_unit(n: int, gen: torch.Generator, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A random unit vector drawn by ``gen`` (on the operator's device when ``gen`` is; no host sync)."""
    v = random_block(1, n, gen, dtype, device)[0]
    return v / v.norm()


def _plain_rows(Q: KrylovBasis, lo: int, hi: int) -> torch.Tensor | None:
    """A view of stored rows ``lo..hi-1`` when the basis stores them as one torch tensor of the working
    dtype on the device (the torch backend's ``"device"`` storage); else None."""
    stored = getattr(Q, "Q", None)
    if isinstance(stored, torch.Tensor) and stored.dtype == Q.dtype and stored.device == Q.device and not Q.recent:
        return stored[lo:hi]
    return None


def working_rows(Q: KrylovBasis, lo: int, hi: int) -> torch.Tensor | None:
    """Rows ``lo..hi-1`` as one torch tensor of the working dtype on the device, where the basis has
    them (a view of the torch backend's plain storage, or its working copies); else None."""
    recent = getattr(Q, "recent", None) or {}
    if recent and all(r in recent for r in range(lo, hi)):
        return torch.stack([recent[r] for r in range(lo, hi)])
    return _plain_rows(Q, lo, hi)


def three_term(Q: KrylovBasis, w: torch.Tensor, lo: int, j: int, beta_prev: float) -> tuple[np.ndarray, float]:
    r"""One Lanczos update in place: ``h = Q[lo:j+1] w`` (``lo`` is ``j - 1`` or ``j``), then
    ``w -= beta_prev q_{j-1} + h[-1] q_j`` (only ``h[-1] q_j`` when ``lo == j``), ``beta = ||w||``.

    Returns ``(h, beta)`` on the host (float64 array, float): ``h[-1]`` is ``alpha_j``, ``h[0]`` (two
    rows) is ``q_{j-1}^\\top A q_j``, the symmetry probe. One device-to-host transfer in all."""
    rows = working_rows(Q, lo, j + 1)
    if rows is None:
        h = Q.project(w, lo, j + 1)
        coeffs = -h
        if j > lo:
            coeffs[0] = -beta_prev
        Q.axpy(w, lo, j + 1, coeffs)
        return h, Q.norm(w)
    if j == lo:
        alpha = torch.dot(rows[0], w)
        w.addcmul_(rows[0], alpha, value=-1.0)
        h = alpha.reshape(1)
    else:
        h = torch.mv(rows, w)
        coeffs = -h
        coeffs[0] = -beta_prev  # a host scalar written into the device tensor: no transfer back
        w.addmv_(rows.T, coeffs)
    values = torch.cat([h, torch.linalg.vector_norm(w).reshape(1)]).tolist()  # the one host sync
    return np.array(values[:-1]), float(values[-1])


def reorthogonalize(Q: KrylovBasis, w: torch.Tensor, j: int) -> float:
    """Classical Gram-Schmidt of ``w`` against rows ``0..j-1``, repeated when the pass cancelled more than
    half of ``w``'s norm (DGKS), in place; returns ``||w||``. The same arithmetic as the interface's
    ``orthogonalize`` followed by ``norm``, with the norms before and after read in one transfer on a torch
    basis (a second transfer only when DGKS asks for the second pass)."""
    rows = _plain_rows(Q, 0, j)
    if rows is None:
        Q.orthogonalize(w, j)
        return Q.norm(w)
    before = torch.linalg.vector_norm(w)
    w.sub_(torch.mv(rows.T, torch.mv(rows, w)))
    norms = torch.stack([before, torch.linalg.vector_norm(w)]).tolist()
    if not KrylovBasis._dgks(norms[0], norms[1]):
        return float(norms[1])
    w.sub_(torch.mv(rows.T, torch.mv(rows, w)))
    return float(torch.linalg.vector_norm(w))
