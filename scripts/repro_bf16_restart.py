#!/usr/bin/env python
"""A restarted bfloat16 Krylov basis against float64 ground truth: the two cases of the bug, with ablations.

Cases (k = 4, tol 1e-6): the test suite's MLP Hessian in float32 (``make_mlp(3)``, 292 parameters; ground truth
the float64 Hessian of the same float32 weights) and a dense 200 x 200 float32 operator with the spectrum
(9, 8.5, 8.4, 8.39, 196 values in [-3, 2]) (ground truth: the float32 matrix in float64). Each with
``basis="device-bf16"`` at ``max_basis`` 60 (the old default; no restart), 32, 16 and 10, and the float32 basis.

Printed per solve: products, restarts, how many pairs are reported converged, the largest eigenvalue error
relative to the top eigenvalue, the largest reported residual and the largest true residual of the returned
vectors (``||A y - theta y||`` in float64), both relative to the top eigenvalue.

Ablations (this tree only): ``--no-head`` stores the kept wanted Ritz vectors in bfloat16 like the other rows,
``--no-omega-floor`` starts Simon's omega at eps after a reorthogonalization, ``--no-refine`` stops the
certificate after its explicit residuals (no LOBPCG step).

Run: python scripts/repro_bf16_restart.py [--no-head] [--no-omega-floor] [--no-refine] [--seeds 0]
The last line is a JSON object of numbers (for scripts/ab_compare.py).
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT / "tests"))

import sharpscope as ss  # noqa: E402

CLUSTER = np.concatenate([[9.0, 8.5, 8.4, 8.39], np.linspace(-3.0, 2.0, 196)])


def cases() -> dict:
    spec = importlib.util.spec_from_file_location("bf16_conftest", ROOT / "tests" / "conftest.py")
    tc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tc)
    (x, y) = tc.make_data("mlp", 3)
    op = ss.hessian_operator(tc.make_mlp(3).float(), nn.CrossEntropyLoss(), (x.float(), y))
    H64 = ss.hessian_operator(tc.make_mlp(3).float().double(), nn.CrossEntropyLoss(), (x.float().double(), y))
    D = torch.stack([H64.matvec(e) for e in torch.eye(H64.shape[0], dtype=torch.float64)])
    dense = tc.with_spectrum(CLUSTER, 1, torch.float32)
    return {"mlp": (op, (D + D.T) / 2), "dense": (dense, dense.A.double())}


def measure(op, D: torch.Tensor, seed: int, **kw) -> dict:
    res = ss.lanczos(op, k=4, tol=1e-6, seed=seed, return_eigenvectors=True, progress=False, **kw)
    lam = torch.linalg.eigvalsh(D).flip(0)[:4]
    V, theta = res.eigenvectors.double(), res.eigenvalues
    top = float(lam[0].abs())
    true = (D @ V - V * theta).norm(dim=0)
    return {"products": res.num_matvecs, "restarts": res.num_restarts, "converged": int(res.converged.sum()),
            "eig_err": float((theta - lam).abs().max()) / top, "reported": float(res.residuals.max()) / top,
            "true": float(true.max()) / top}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--no-head", action="store_true")
    p.add_argument("--no-omega-floor", action="store_true")
    p.add_argument("--no-refine", action="store_true")
    p.add_argument("--seeds", default="0", help="comma-separated start-vector seeds (default 0)")
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.no_head:
        importlib.import_module("sharpscope.lanczos.solver").float_head_rows = lambda basis, k: 0
    if args.no_omega_floor:
        importlib.import_module("sharpscope.lanczos.state").ROUNDED_ORTHOGONALITY = 0.0
    if args.no_refine:
        state = importlib.import_module("sharpscope.lanczos.state")
        full = state.refine
        state.refine = lambda op, Y, *a, **kw: full(op, Y, *a[:4], Y.shape[1], *a[5:], **kw)  # budget: the check
    print("| case | basis | max_basis | seed | products | restarts | converged | eigenvalue error | reported res. "
          "| true res. |\n|---|---|---|---|---|---|---|---|---|---|")
    summary = {}
    for name, (op, D) in cases().items():
        for basis, mb in [("device", None), ("device-bf16", 60), ("device-bf16", 32), ("device-bf16", 16),
                          ("device-bf16", 10)]:
            for seed in [int(s) for s in args.seeds.split(",")]:
                r = measure(op, D, seed, basis=basis, max_basis=mb)
                print(f"| {name} | {basis} | {mb or 'default'} | {seed} | {r['products']} | {r['restarts']} "
                      f"| {r['converged']}/4 | {r['eig_err']:.1e} | {r['reported']:.1e} | {r['true']:.1e} |",
                      flush=True)
                for key in ("products", "true", "eig_err"):
                    summary[f"{name}/{basis}/{mb}/{seed}/{key}"] = r[key]
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
