#!/usr/bin/env python
"""CPU figures of the eigensolver's basis algebra (the GPU ones are scripts/bench_gpu.py's).

1. One Gram-Schmidt pass (CGS with the DGKS repeat) of a vector against a ``rows x n`` basis, for each
   backend (torch, numpy) and storage (float32, bfloat16): median time and the ratio to torch/float32.
2. ``scipy.linalg.eigh_tridiagonal`` on an SLQ-sized tridiagonal (why SLQ's eigensolves stay on the host).

Run: .venv/bin/python scripts/bench_basis_cpu.py [--rows 40] [--n 1840000] [--repeats 5]
Measured ratios are in one run, alternating the variants, because this machine is shared and noisy.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import scipy.linalg
import torch

from sharpscope.lanczos.backends import make_basis

VARIANTS = [("torch", "device"), ("numpy", "device"), ("torch", "device-bf16"), ("numpy", "device-bf16")]


def filled_basis(backend: str, basis: str, rows: int, n: int, gen: torch.Generator):
    Q = make_basis(backend, basis, rows, n, torch.float32, torch.device("cpu"))
    for j in range(rows):
        v = torch.randn(n, generator=gen)
        Q.set(j, v / v.norm())
    return Q


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=40)
    p.add_argument("--n", type=int, default=1_840_000, help="vector length (default: the 1.84M-parameter MLP)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=80, help="tridiagonal size for the SLQ eigensolve")
    args = p.parse_args()
    gen = torch.Generator().manual_seed(0)
    bases = {v: filled_basis(*v, args.rows, args.n, gen) for v in VARIANTS}
    times: dict[tuple[str, str], list[float]] = {v: [] for v in VARIANTS}
    for _ in range(args.repeats):
        for v in VARIANTS:  # alternating, so that load changes hit every variant alike
            w = torch.randn(args.n, generator=gen)
            start = time.perf_counter()
            bases[v].orthogonalize(w, args.rows)
            times[v].append(time.perf_counter() - start)
    ref = statistics.median(times[VARIANTS[0]])
    print(f"Gram-Schmidt pass against {args.rows} x {args.n:,} rows, median of {args.repeats} "
          f"(torch threads: {torch.get_num_threads()}):")
    print(f"  {'backend':<8} {'basis':<12} {'ms':>8} {'/ torch float32':>16}")
    for v in VARIANTS:
        t = statistics.median(times[v])
        print(f"  {v[0]:<8} {v[1]:<12} {1e3 * t:8.1f} {t / ref:16.2f}")
    a, b = np.random.default_rng(0).standard_normal(args.steps), np.random.default_rng(1).random(args.steps - 1)
    runs = []
    for _ in range(200):
        start = time.perf_counter()
        scipy.linalg.eigh_tridiagonal(a, b)
        runs.append(time.perf_counter() - start)
    print(f"eigh_tridiagonal, {args.steps} x {args.steps}: {1e6 * statistics.median(runs):.0f} us (median of 200)")


if __name__ == "__main__":
    main()
