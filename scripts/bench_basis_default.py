#!/usr/bin/env python
"""The default Lanczos basis against the old one: products, basis vectors and eigenvalue agreement per problem and k.

For each problem, k and tol, two solves on one operator, in one process (products are deterministic for a seed,
so this is a count, not a timing):

* **old**: ``max_basis = max(2k + 20, 60)``, the default before issue 24 (capped by the dimension as every basis);
* **new**: ``max_basis`` left out, the current default (:func:`sharpscope.lanczos.config.default_basis_size`), or
  ``--candidate EXPR`` (a formula of ``k``, e.g. ``"2*k+8"``) to try another size.

``--basis device-bf16`` runs both solves with a bfloat16 basis (``--basis device`` is the default), whose
default (:func:`~sharpscope.lanczos.config.default_basis_size`, the same for every basis) and certificate (explicit
residuals, :mod:`sharpscope.lanczos.refine`) then count; ``--reference`` adds a float32 solve at the new
default to each row (its products, and the bfloat16 eigenvalues' difference to it).

Printed per row: products old/new and their ratio, basis vectors old/new, restarts, and the largest difference of
the k eigenvalues relative to the top one, ``max_i |new_i - old_i| / |old_0|``, with both solves' convergence;
then the totals: the products' ratio summed over rows, the worst row, and the basis vectors' ratio (the memory
ratio, since the basis holds ``max_basis + 1`` vectors of ``n`` entries).

Problems: the models of scripts/bench_eigs.py (``mlp``: 3072-128-128-10 on 64 samples, its ``--quick`` size,
410k parameters; ``cnn``: the 2-conv CNN on 256 samples, 25k), after 5 SGD steps from seed 0, in float32; and the
test suite's float64 models (tests/conftest.py: ``t-mlp`` 6-12-12-4 tanh, ``t-cnn`` conv + BatchNorm,
``t-attention``), each on its 16 samples, Hessian operator with the defaults; and the operators of
tests/test_backends.py (``b-diagonal``, ``b-dense``, ``b-multiplicity``, ``b-mlp-hessian``; float32).

Run: python scripts/bench_basis_default.py [--problems mlp,cnn,t-mlp,t-cnn,t-attention] [--k 1,2,5,10,20]
                                           [--tol 1e-3,1e-6] [--candidate EXPR] [--device cuda]
                                           [--basis device-bf16] [--reference] [--summary-json]
                                           [--markdown PATH] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import sharpscope as ss  # noqa: E402
from sharpscope.lanczos.config import default_basis_size  # noqa: E402


def old_default(k: int) -> int:
    """The default basis before issue 24."""
    return max(2 * k + 20, 60)


def build(problem: str, device: str = "cpu", float32: bool = False) -> ss.SymmetricOperator:
    """The Hessian operator of a problem (module docstring), its model and data on ``device`` (the test models
    in float32 with ``float32``: a bfloat16 basis needs a float32 operator)."""
    if problem.startswith("b-"):
        sys.path.insert(0, str(ROOT / "tests"))
        import test_backends

        return test_backends.OPERATORS[problem.removeprefix("b-")]()
    if problem in ("mlp", "cnn"):
        import bench_eigs

        spec = bench_eigs.problem_spec(problem, quick=problem == "mlp")
        made = bench_eigs.make_problem(spec)
        model = bench_eigs.build_model(spec)
        model.load_state_dict(made["state"])
        data = (made["x"], made["y"])
    else:
        sys.path.insert(0, str(ROOT / "tests"))
        import conftest

        kind = problem.removeprefix("t-")
        model, data = conftest.MODELS[kind](0), conftest.make_data(kind, 0)
        if float32:
            model, data = model.float(), tuple(t.float() if t.is_floating_point() else t for t in data)
    return ss.hessian_operator(model.to(device), nn.CrossEntropyLoss(), tuple(t.to(device) for t in data))


def solve(H, k: int, tol: float, max_basis: int | None, basis: str = "device") -> dict:
    res = ss.lanczos(H, k=k, tol=tol, max_basis=max_basis, basis=basis, progress=False)
    return {"products": res.num_matvecs, "basis": res.basis_size, "basis_bytes": res.basis_bytes,
            "restarts": res.num_restarts, "eigenvalues": res.eigenvalues.tolist(), "converged": res.all_converged}


def run(problems: list[str], ks: list[int], tols: list[float], candidate: str | None,
        device: str = "cpu", basis: str = "device", reference: bool = False) -> list[dict]:
    rows = []
    for problem in problems:
        H = build(problem, device, float32=basis == "device-bf16")
        n = H.shape[0]
        for k in ks:
            if k >= n:
                continue
            for tol in tols:
                new_basis = None if candidate is None else int(eval(candidate, {"max": max, "min": min}, {"k": k}))
                old = solve(H, k, tol, old_default(k), basis)
                new = solve(H, k, tol, new_basis, basis)
                diff = max(abs(a - b) for a, b in zip(new["eigenvalues"], old["eigenvalues"]))
                rows.append({"problem": problem, "n": n, "k": k, "tol": tol, "old": old, "new": new,
                             "rel_diff": diff / abs(old["eigenvalues"][0])})
                if reference:
                    ref = solve(H, k, tol, None)
                    rows[-1]["ref"] = ref
                    rows[-1]["ref_diff"] = max(abs(a - b) for a, b in zip(new["eigenvalues"], ref["eigenvalues"])) \
                        / abs(ref["eigenvalues"][0])
                print(line(rows[-1]), flush=True)
    return rows


HEADER = ("| problem | n | k | tol | products old | products new | ratio | basis old | basis new | restarts old/new "
          "| max rel. eigenvalue diff | converged old/new |\n|---|---|---|---|---|---|---|---|---|---|---|---|")


def line(r: dict) -> str:
    o, w = r["old"], r["new"]
    ref = f" float32: {r['ref']['products']} products, diff {r['ref_diff']:.1e} |" if "ref" in r else ""
    return (f"| {r['problem']} | {r['n']} | {r['k']} | {r['tol']:g} | {o['products']} | {w['products']} "
            f"| {w['products'] / o['products']:.2f} | {o['basis']} | {w['basis']} | {o['restarts']}/{w['restarts']} "
            f"| {r['rel_diff']:.1e} | {o['converged']}/{w['converged']} |{ref}")


def summary(rows: list[dict]) -> str:
    old = sum(r["old"]["products"] for r in rows)
    new = sum(r["new"]["products"] for r in rows)
    worst = max(rows, key=lambda r: r["new"]["products"] / r["old"]["products"])
    vec_old = sum(r["old"]["basis"] + 1 for r in rows)
    vec_new = sum(r["new"]["basis"] + 1 for r in rows)
    bytes_ratio = max(r["old"]["basis_bytes"] / r["new"]["basis_bytes"] for r in rows if r["new"]["basis_bytes"])
    return (f"products: {old} old, {new} new, ratio {new / old:.3f} over {len(rows)} solves; worst row "
            f"{worst['problem']} k={worst['k']} tol={worst['tol']:g}: {worst['new']['products']} vs "
            f"{worst['old']['products']} ({worst['new']['products'] / worst['old']['products']:.2f}x)\n"
            f"basis vectors (rows held): {vec_old} old, {vec_new} new, {vec_old / vec_new:.2f}x fewer on average "
            f"(largest basis_bytes ratio {bytes_ratio:.1f}x)\n"
            f"largest eigenvalue difference: {max(r['rel_diff'] for r in rows):.1e} of the top eigenvalue; "
            f"all converged: {all(r['old']['converged'] and r['new']['converged'] for r in rows)}")


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--problems", default="mlp,cnn,t-mlp,t-cnn,t-attention",
                   help="comma-separated, of mlp, cnn, t-mlp, t-cnn, t-attention (default: all)")
    p.add_argument("--k", default="1,2,5,10,20", help="comma-separated k values (default 1,2,5,10,20)")
    p.add_argument("--tol", default="1e-3,1e-6", help="comma-separated tolerances (default 1e-3,1e-6)")
    p.add_argument("--candidate", default=None,
                   help="a formula of k for the new basis instead of the default (e.g. '2*k+8')")
    p.add_argument("--device", default="cpu", help="where the models and the solves run (default cpu)")
    p.add_argument("--basis", default="device", help="basis= of both solves (default device; or device-bf16)")
    p.add_argument("--reference", action="store_true", help="also a float32 solve at the new default per row")
    p.add_argument("--summary-json", action="store_true",
                   help="end with one JSON line of products per solve (for scripts/ab_compare.py)")
    p.add_argument("--markdown", type=Path, default=None, help="also write the table and totals here")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = p.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    new = args.candidate or f"default ({default_basis_size(1)} at k=1, {default_basis_size(20)} at k=20)"
    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else \
        f"{platform.processor() or 'cpu'}, {os.cpu_count()} cores"
    header = (f"date: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}; {where}; torch {torch.__version__} "
              f"({torch.get_num_threads()} threads); basis={args.basis!r}; old: max(2k+20, 60); new: {new}")
    print(f"{header}\n\n{HEADER}", flush=True)
    rows = run(args.problems.split(","), [int(k) for k in args.k.split(",")],
               [float(t) for t in args.tol.split(",")], args.candidate, args.device, args.basis, args.reference)
    print("\n" + summary(rows))
    if args.markdown:
        args.markdown.write_text(f"{header}\n\n{HEADER}\n" + "\n".join(line(r) for r in rows) + "\n\n"
                                 + summary(rows).replace("\n", "\n\n") + "\n")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if args.summary_json:
        products = {f"{r['problem']}/k{r['k']}/{r['tol']:g}/{side}": r[side]["products"]
                    for r in rows for side in ("old", "new")}
        print(json.dumps({"products_old": sum(r["old"]["products"] for r in rows),
                          "products_new": sum(r["new"]["products"] for r in rows), **products}))
    return rows


if __name__ == "__main__":
    main()
