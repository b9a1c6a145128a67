#!/usr/bin/env python
"""Process CPU time of products of small operators in every mode, as one JSON line (for scripts/ab_compare.py).

On a small MLP (2,762 parameters, two batches of 32) the product is short, so the Python around it -- mode
dispatch, fallbacks, checks, block planning -- shows: per mode of the Hessian (cached, reverse, forward,
finite differences) and for the cached GGN and NTK, the time of one ``matvec`` and of one 8-column ``matmat``
(``batched=True``: a fixed path, not the timed choice) inside one solve, and of a one-product solve (the
per-solve checks, graphs and the product).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/ab_compare.py --base HEAD~1 --repeats 5 -- \\
        .venv/bin/python scripts/bench_products.py
"""
from __future__ import annotations

import json
import time

import torch

import sharpscope as ss


def main() -> None:
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
            start = time.process_time()
            for _ in range(100):
                op.matvec(v)
            out[f"{name}_matvec_ms"] = (time.process_time() - start) * 1e3 / 100
            start = time.process_time()
            for _ in range(20):
                op.matmat(V)
            out[f"{name}_matmat8_ms"] = (time.process_time() - start) * 1e3 / 20
        start = time.process_time()
        for _ in range(20):  # a solve each: the determinism check, the graphs and the first product
            op.matvec(v)
        out[f"{name}_solve1_ms"] = (time.process_time() - start) * 1e3 / 20
    out["total_ms"] = sum(out.values())
    print(json.dumps(out))


if __name__ == "__main__":
    main()
