"""Replay stop rules of online sharpness on recorded warm-started solves (docs/bench-notes.md, "Online tracking:
where a measurement goes").

Trains the MLP of ``scripts/bench_online.py`` (64-512-512-10 tanh, SGD lr 0.1, full batch 1024, sharpness
batch 256) for ``--steps`` steps and measures with :class:`~sharpscope.online.OnlineSharpness` every
``--every`` steps, its solves run to a Ritz residual of ``--run-tol`` (1e-3) so that looser rules can be
replayed on the same trajectory: each Ritz test's value and residual is recorded (lanczos's ``callback``) and
compared with ``lanczos(tol=1e-8)`` on a float64 copy at the same step. Per rule: the products each
measurement would have taken (first, median, mean) and the largest relative error of the value it would
have logged. Rules: a relative Ritz residual below 1e-2 (the default ``sharpness_tol``) and 3e-2, and an
oracle that stops at the first test within 1e-3 of the converged value (the floor of any stop rule aiming at
1e-3).

    PYTHONPATH=. python scripts/replay_online_stops.py [--steps 200] [--every 10] [--seed 0]
"""
from __future__ import annotations

import argparse
import importlib
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_online, a sibling
import bench_online  # noqa: E402

from sharpscope.online import OnlineSharpness  # noqa: E402


def record(steps: int, every: int, seed: int, run_tol: float) -> list[tuple[list[tuple[int, float, float]], float]]:
    """Per measurement: the Ritz tests ``(products, value, residual)`` and the converged float64 value."""
    model, opt, (x, y), sbatch, loss_fn = bench_online.mlp(seed)
    tracker = OnlineSharpness(model, loss_fn, sbatch, opt, tol=run_tol)
    lanczos_package = importlib.import_module("sharpscope.lanczos")  # the package (ss.lanczos is its function)
    solve, tests = lanczos_package.lanczos, []

    def recorded(*args, **kwargs):
        def callback(num_matvecs, values, residuals):
            tests.append((int(num_matvecs), float(values[0]), float(residuals[0])))
        return solve(*args, callback=callback, **kwargs)

    lanczos_package.lanczos = recorded  # OnlineSharpness.measure imports it at each call
    out = []
    try:
        for step in range(1, steps + 1):
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
            if step % every == 0:
                tests.clear()
                tracker.measure(step)
                out.append((list(tests), bench_online.converged(model, opt, loss_fn, sbatch)))
    finally:
        lanczos_package.lanczos = solve
    return out


def replay(solves, stop) -> tuple[list[int], float]:
    """Products and the largest relative error of a rule ``stop(value, residual, reference) -> bool``."""
    products, worst = [], 0.0
    for tests, ref in solves:
        hit = next((t for t in tests if stop(t[1], t[2], ref)), tests[-1])
        products.append(hit[0])
        worst = max(worst, abs(hit[1] - ref) / abs(ref))
    return products, worst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run-tol", type=float, default=1e-3, help="the recorded solves' Ritz-residual tolerance")
    a = p.parse_args()
    torch.set_num_threads(2)
    solves = record(a.steps, a.every, a.seed, a.run_tol)
    rules = {"residual <= 1e-2 |value| (default)": lambda v, r, ref: r <= 1e-2 * abs(v),
             "residual <= 3e-2 |value|": lambda v, r, ref: r <= 3e-2 * abs(v),
             "oracle: within 1e-3 of the converged value": lambda v, r, ref: abs(v - ref) <= 1e-3 * abs(ref)}
    print(f"{len(solves)} measurements, MLP seed {a.seed}, {a.steps} steps, every {a.every}")
    print("| stop rule | products: first, median, mean | largest relative error |\n|---|---|---|")
    for name, rule in rules.items():
        products, worst = replay(solves, rule)
        print(f"| {name} | {products[0]}, {statistics.median(products):g}, {statistics.fmean(products):.2f} "
              f"| {worst:.1e} |")


if __name__ == "__main__":
    main()
