#!/usr/bin/env python
"""Process CPU time of products of small operators in every mode, as one JSON line (for scripts/ab_compare.py).

On a small MLP (2,762 parameters, two batches of 32) the product is short, so the Python around it -- mode
dispatch, fallbacks, checks, block planning -- shows: per mode of the Hessian (cached, reverse, forward,
finite differences) and for the cached GGN and NTK, the time of one ``matvec`` and of one 8-column ``matmat``
(``batched=True``: a fixed path, not the timed choice) inside one solve, and of a one-product solve (the
per-solve checks, graphs and the product). ``--calls``: instead of times, the Python function calls per
product counted by ``cProfile`` (a deterministic measure of the code around the product, immune to a loaded
machine).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/ab_compare.py --base HEAD~1 --repeats 5 -- \\
        .venv/bin/python scripts/bench_products.py
"""
from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import time
from functools import partial

import torch

import sharpscope as ss


class _Clock:
    """``process_time`` in ms, or (``calls``) the function calls cProfile counts."""

    def __init__(self, calls: bool) -> None:
        self.calls = calls

    def measure(self, fn, repeats: int) -> float:
        if not self.calls:
            start = time.process_time()
            for _ in range(repeats):
                fn()
            return (time.process_time() - start) * 1e3 / repeats
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(repeats):
            fn()
        profile.disable()
        return pstats.Stats(profile).total_calls / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", action="store_true", help="Python function calls per product, not times")
    clock = _Clock(parser.parse_args().calls)
    unit = "calls" if clock.calls else "ms"
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 10)).double()
    x, y = torch.randn(64, 32, dtype=torch.float64), torch.randint(0, 10, (64,))
    data = [(x[:32], y[:32]), (x[32:], y[32:])]
    ce = torch.nn.CrossEntropyLoss()
    makers = {f"hess_{m}": (lambda m=m: ss.hessian_operator(model, ce, data, hvp_mode=m, batched=True))
              for m in ("cached", "reverse", "forward", "finite-difference")}
    makers["ggn_cached"] = lambda: ss.ggn_operator(model, ce, data, hvp_mode="cached", batched=True)
    makers["ntk_cached"] = lambda: ss.ntk_operator(model, [x[:32], x[32:]], hvp_mode="cached", batched=True)
    out = {}
    for name, make in makers.items():
        op = make()
        v = torch.randn(op.shape[0], dtype=torch.float64)
        V = torch.randn(op.shape[0], 8, dtype=torch.float64)
        with op.pinned():
            for _ in range(5):
                op.matvec(v)
                op.matmat(V)
            out[f"{name}_matvec_{unit}"] = clock.measure(partial(op.matvec, v), 100)
            out[f"{name}_matmat8_{unit}"] = clock.measure(partial(op.matmat, V), 20)
        # a solve each: the determinism check, the graphs and the first product
        out[f"{name}_solve1_{unit}"] = clock.measure(partial(op.matvec, v), 20)
    out[f"total_{unit}"] = sum(out.values())
    print(json.dumps(out))


if __name__ == "__main__":
    main()
