"""Start vectors: random vectors drawn where the operator lives, by a generator seeded per solve."""
from __future__ import annotations

import torch

__all__ = ["make_generator", "random_unit", "random_block", "start_vector"]


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


def random_unit(space, gen: torch.Generator, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A random unit vector of the operator's vector space (:mod:`sharpscope.vector_space`: whole, rank 0's
    on every rank of a data-parallel operator, or this rank's shard) drawn by ``gen`` (on the operator's
    device when ``gen`` is; no host sync in one process)."""
    v = space.random_rows(1, gen, dtype, device)[0]
    return v / space.norm(v)


def start_vector(v0: torch.Tensor | None, space, gen: torch.Generator, dtype: torch.dtype,
                 device: torch.device) -> torch.Tensor:
    """``v0`` normalized (checked: finite, nonzero, of the space's local length: a sharded space's ``v0`` is
    this rank's shard), or a random unit vector."""
    if v0 is None:
        return random_unit(space, gen, dtype, device)
    n = space.local_size
    v = torch.as_tensor(v0).reshape(-1).to(dtype=dtype, device=device)
    bad = v.shape[0] != n or not bool(torch.isfinite(v).all())
    if space.sharded:  # every rank must agree, or the ranks would part ways
        bad = bool(space.reduce(torch.tensor([float(bad)], dtype=torch.float64))[0])
    norm = None if bad else space.norm(v)
    if bad or float(norm) == 0.0:
        shard = " (this rank's shard)" if space.sharded else ""
        raise ValueError(f"v0 must be a finite nonzero vector of length {n}{shard}")
    return space.share_vectors(v / norm)
