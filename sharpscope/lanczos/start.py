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


def random_unit(n: int, gen: torch.Generator, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A random unit vector drawn by ``gen`` (on the operator's device when ``gen`` is; no host sync)."""
    v = random_block(1, n, gen, dtype, device)[0]
    return v / v.norm()


def start_vector(v0: torch.Tensor | None, n: int, gen: torch.Generator, dtype: torch.dtype,
                 device: torch.device) -> torch.Tensor:
    """``v0`` normalized (checked: finite, nonzero, length ``n``), or a random unit vector."""
    if v0 is None:
        return random_unit(n, gen, dtype, device)
    v = torch.as_tensor(v0).reshape(-1).to(dtype=dtype, device=device)
    if v.shape[0] != n or not torch.isfinite(v).all() or float(v.norm()) == 0.0:
        raise ValueError(f"v0 must be a finite nonzero vector of length {n}")
    return v / v.norm()
