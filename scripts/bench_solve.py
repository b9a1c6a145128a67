#!/usr/bin/env python
"""One solve, timed: ``lanczos(H, k=5)`` (or an estimator) on bench_eigs.py's problems, as one JSON line.

For A/B comparisons between commits (scripts/ab_compare.py runs this under two source trees): it
builds the problem from bench_eigs.py's definitions in-process (same seed, same model after 5 SGD
steps), makes the operator, runs the solve once untimed (warm-up: lazy imports, first-call set-up)
and then ``--repeats`` times, and prints the median wall time of construction + solve, the HVP
count (and the process CPU time of a solve, ``cpu_seconds``: steadier than wall time on a shared machine
with ``OMP_NUM_THREADS=1``), the median time of one product of the operator's chosen mode inside one solve (``op.pinned()``), of
one product outside any solve (``direct_hvp_seconds``: a solve of its own), and, where the package has it,
of the value summary each solve takes twice (``digest_seconds``).

    .venv/bin/python scripts/bench_solve.py --problem mlp [--what lanczos|hutchpp|slq] [--quick] [--reuse]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_eigs import build_model, make_problem, problem_spec  # noqa: E402

import sharpscope as ss  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problem", choices=["mlp", "cnn"], default="mlp")
    parser.add_argument("--what", choices=["lanczos", "hutchpp", "slq"], default="lanczos")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reuse", action="store_true", help="one operator for every solve (the operator is built "
                        "once, outside the timing; each solve still rebuilds what it caches)")
    args = parser.parse_args()
    problem = make_problem(problem_spec(args.problem, args.quick))
    model = build_model(problem["spec"])
    model.load_state_dict(problem["state"])
    data, loss_fn = (problem["x"], problem["y"]), torch.nn.CrossEntropyLoss()

    shared = ss.hessian_operator(model, loss_fn, data) if args.reuse else None

    def solve() -> tuple[float, int, float]:
        start, cpu = time.perf_counter(), time.process_time()
        H = shared if shared is not None else ss.hessian_operator(model, loss_fn, data)
        if args.what == "lanczos":
            mv = ss.lanczos(H, k=5).num_matvecs
        elif args.what == "hutchpp":
            mv = ss.hutchpp_trace(H, 99).num_matvecs
        else:
            mv = ss.spectral_density(H, 4, 40).num_matvecs
        return time.perf_counter() - start, mv, time.process_time() - cpu

    solve()
    runs = [solve() for _ in range(args.repeats)]
    H = ss.hessian_operator(model, loss_fn, data)
    v = torch.randn(H.shape[0])
    products, direct = [], []
    with H.pinned():  # one solve: the product of the chosen mode (a cached graph serves the block)
        H.matvec(v)
        for _ in range(5):
            t = time.perf_counter()
            H.matvec(v)
            products.append(time.perf_counter() - t)
    for _ in range(3):  # a product outside any solve: a solve of its own (it builds what it needs)
        t = time.perf_counter()
        H.matvec(v)
        direct.append(time.perf_counter() - t)
    seconds, hvp = statistics.median(t for t, _, _ in runs), statistics.median(products)
    hvps = runs[0][1]
    out = {"seconds": seconds, "cpu_seconds": statistics.median(c for _, _, c in runs), "hvps": hvps,
           "hvp_seconds": hvp, "overhead": seconds / (hvps * hvp), "direct_hvp_seconds": statistics.median(direct)}
    digest = getattr(H.fn, "value_digest", None)  # the per-solve check of the parameter values (twice a solve)
    if digest is not None:
        times = []
        for _ in range(5):
            t = time.perf_counter()
            digest()
            times.append(time.perf_counter() - t)
        out.update(digest_seconds=statistics.median(times), digest_per_hvp=statistics.median(times) / hvp)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
