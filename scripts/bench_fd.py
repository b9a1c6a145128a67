#!/usr/bin/env python
"""Finite-difference Hessian products against double backward: top-k error and time per product.

For the test models of tests/conftest.py (tanh MLP, a GELU twin, CNN with BatchNorm, attention; 16
samples) and the digits MLP (64-128-128-10, tanh, 1,797 samples, 20 SGD steps), in float64 and float32:
the top-``k`` eigenvalues by ``ss.lanczos`` with ``hvp_mode="finite-difference"`` and with
``hvp_mode="reverse"`` (double backward), each against the exact ones (the dense float64 Hessian for the
test models; a float64 double-backward solve at ``tol=1e-10`` for the digits MLP), and the median time of
one product in each mode (and ``"cached"``, the default's graph reuse) after warm-up.

    python scripts/bench_fd.py [--k 5] [--products 10] [--threads 1] [--markdown OUT.md]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

import torch  # noqa: E402
from torch import nn  # noqa: E402

import sharpscope as ss  # noqa: E402
from conftest import MODELS, make_data  # noqa: E402
from sharpscope.data import digits  # noqa: E402
from sharpscope.demo import digits_mlp  # noqa: E402

CE = nn.CrossEntropyLoss()


def gelu_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.GELU(), nn.Linear(12, 12), nn.GELU(), nn.Linear(12, 4)).double()


def trained_digits() -> tuple[nn.Module, tuple]:
    x, y = digits(torch.float64)
    torch.manual_seed(0)
    model = digits_mlp().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(20):
        opt.zero_grad()
        CE(model(x), y).backward()
        opt.step()
    return model, (x, y)


def per_product(op, n: int) -> float:
    v = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(op.dtype)
    times = []
    with op.pinned():  # one solve: products of the operator's mode, set up once (a cached graph)
        for i in range(n + 2):
            start = time.perf_counter()
            op.matvec(v)
            if i >= 2:
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a.double() - b.double()).abs() / b.double().abs()).max())


def problems():
    for kind in ("mlp", "gelu", "cnn", "attention"):
        model = gelu_mlp(0) if kind == "gelu" else MODELS[kind](0)
        data = make_data("mlp" if kind == "gelu" else kind, 0)
        yield f"{kind} (test model)", model, data, None
    model, data = trained_digits()
    yield "digits MLP 64-128-128-10", model, data, "lanczos"


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--products", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--markdown", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", RuntimeWarning)  # the attention model's SDPA fallback notice
    lines = ["| model | dtype | params | top-k rel. error, finite differences | top-k rel. error, double backward | "
             "ms per product: FD / double backward / cached | FD / double backward |", "|---|---|---|---|---|---|---|"]
    for name, model, data, how in problems():
        if how is None:
            exact = torch.linalg.eigvalsh(ss.dense_hessian(model, CE, data)).flip(0)[: args.k]
        else:
            exact = ss.lanczos(ss.hessian_operator(model, CE, data, hvp_mode="reverse"), k=args.k, tol=1e-10).eigenvalues
        for dtype in (torch.float64, torch.float32):
            m = model.to(dtype)
            d = (data[0].to(dtype), data[1])
            tol = 1e-6 if dtype == torch.float64 else 1e-4
            ops = {mode: ss.hessian_operator(m, CE, d, hvp_mode=mode) for mode in ("finite-difference", "reverse", "cached")}
            errs = {mode: rel(ss.lanczos(ops[mode], k=args.k, tol=tol).eigenvalues, exact)
                    for mode in ("finite-difference", "reverse")}
            ms = {mode: 1e3 * per_product(op, args.products) for mode, op in ops.items()}
            n = ops["reverse"].shape[0]
            lines.append(f"| {name} | {str(dtype).replace('torch.', '')} | {n} | {errs['finite-difference']:.1e} | "
                         f"{errs['reverse']:.1e} | {ms['finite-difference']:.2f} / {ms['reverse']:.2f} / {ms['cached']:.2f} | "
                         f"{ms['finite-difference'] / ms['reverse']:.2f} |")
        model.double()
    text = "\n".join(lines)
    print(text)
    if args.markdown is not None:
        args.markdown.write_text(text + "\n")
    return text


if __name__ == "__main__":
    main()
