"""The embedded default job: curvature of a small MLP trained briefly on scikit-learn's digits.

Run with ``./scripts/demo.sh`` (or ``sharpscope demo``): trains a 64-128-128-10 tanh MLP with
full-batch SGD (100 steps at lr 0.5 by default) on the 1,797 bundled 8x8 digits (no download), then reports the
top Hessian eigenvalues (with Ritz residuals), the edge-of-stability threshold 2/lr, the Hessian
trace (Hutch++) and the spectral density (stochastic Lanczos quadrature), and saves a plot. With
``--probe probes/quickstart.toml`` (what demo.sh passes) it then runs that probe: muP vs SP across
widths, spectra, and the super-consistency report.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

from .data import digits as digits_data
from .estimators import hutchpp_trace, spectral_density
from .lanczos import lanczos
from .operators import hessian_operator
from .preconditioning import stability_threshold


def digits_mlp(hidden: int = 128, depth: int = 2) -> nn.Module:
    """The demo's model factory (``"sharpscope.demo:digits_mlp"``): a tanh MLP 64 -> hidden^depth -> 10."""
    layers: list[nn.Module] = []
    width = 64
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.Tanh()]
        width = hidden
    return nn.Sequential(*layers, nn.Linear(width, 10))


def run_demo(out: Path, steps: int = 100, lr: float = 0.5, k: int = 5, seed: int = 0) -> dict:
    """Train, measure, print the table, save ``demo.json`` and ``demo_density.png`` under ``out``."""
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k}")
    if steps < 0 or not lr > 0:
        raise ValueError(f"need steps >= 0 and lr > 0, got steps={steps}, lr={lr}")
    torch.manual_seed(seed)
    x, y = digits_data()
    model = digits_mlp()
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
    H = hessian_operator(model, loss_fn, (x, y))
    t0 = time.perf_counter()
    top = lanczos(H, k=k, seed=seed)
    t_top = time.perf_counter() - t0
    trace = hutchpp_trace(H, num_matvecs=99, seed=seed)
    density = spectral_density(H, num_probes=8, num_steps=60, seed=seed)
    summary = {
        "model": "MLP 64-128-128-10 (tanh)", "parameters": H.shape[0], "data": "sklearn digits, 1797 samples",
        "train_steps": steps, "lr": lr, "final_loss": H.loss(), "hvp_mode": H.hvp_mode,
        "top_eigenvalues": top.eigenvalues.tolist(), "ritz_residuals": top.residuals.tolist(),
        "converged": top.converged.tolist(), "lanczos_matvecs": top.num_matvecs, "lanczos_seconds": t_top,
        "edge_of_stability_2_over_lr": stability_threshold(opt),
        "trace_hutchpp": trace.estimate, "trace_stderr": trace.stderr,
        "density_moment1": density.moment(1), "density_moment2": density.moment(2),
    }
    _print(summary)
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo.json").write_text(json.dumps(summary, indent=2))
    _plot(density, top.eigenvalues.tolist(), summary["edge_of_stability_2_over_lr"], out / "demo_density.png")
    print(f"\nsaved {out / 'demo_density.png'} and {out / 'demo.json'}")
    return summary


def _print(s: dict) -> None:
    print(f"{s['model']}, {s['parameters']:,} parameters, {s['data']}")
    print(f"full-batch SGD lr={s['lr']} for {s['train_steps']} steps: loss {s['final_loss']:.4f}\n")
    print(f"top-{len(s['top_eigenvalues'])} Hessian eigenvalues ({s['lanczos_matvecs']} HVPs, "
          f"{s['lanczos_seconds']:.2f} s, hvp_mode={s['hvp_mode']}):")
    print(f"  {'#':>2}  {'eigenvalue':>12}  {'Ritz residual':>13}  converged")
    for i, (lam, r, c) in enumerate(zip(s["top_eigenvalues"], s["ritz_residuals"], s["converged"]), 1):
        print(f"  {i:>2}  {lam:>12.6f}  {r:>13.2e}  {'yes' if c else 'NO'}")
    print(f"\nsharpness / (2/lr) = {s['top_eigenvalues'][0]:.4f} / {s['edge_of_stability_2_over_lr']:.4f} "
          f"= {s['top_eigenvalues'][0] / s['edge_of_stability_2_over_lr']:.3f}")
    print(f"trace (Hutch++, 99 HVPs): {s['trace_hutchpp']:.4f} +- {s['trace_stderr']:.4f}")
    print(f"spectral density (SLQ): tr(H)/n ~ {s['density_moment1']:.3e}, tr(H^2)/n ~ {s['density_moment2']:.3e}")


def _plot(density, top: list[float], threshold: float, path: Path) -> None:
    """The SLQ density with the top eigenvalues, and the edge of stability 2/lr drawn on the same axis (the
    x range reaches it, wherever the spectrum ends)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    density.plot(ax=ax, color="#0072B2", label="SLQ density (Gaussian-smoothed)")
    for i, lam in enumerate(top):
        ax.axvline(lam, color="#D55E00", lw=0.9, ls="--", label="top eigenvalues (Lanczos)" if i == 0 else None)
    ax.axvline(threshold, color="0.1", lw=1.6, ls=":", label=f"edge of stability 2/lr = {threshold:.2f}")
    lo, hi = ax.get_xlim()
    ax.set_xlim(lo, max(hi, threshold + 0.05 * (threshold - lo)))
    ax.set_title(f"Hessian spectrum, MLP on digits: top eigenvalue {top[0]:.2f} = {top[0] / threshold:.2f} x 2/lr",
                 loc="left", fontsize=11)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8.5, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def demo_command(args: argparse.Namespace) -> int:
    """``sharpscope demo`` (its parser is in :mod:`sharpscope.cli`)."""
    if args.probe is not None and not args.probe.exists():
        raise FileNotFoundError(f"{args.probe}: no such probe file")
    run_demo(args.out, args.steps, args.lr, args.k, args.seed)
    if args.probe is not None:
        from .sweep import load_probe, run_sweep, summary_rows

        name = load_probe(args.probe).name
        print(f"\nrunning the {name} probe ({args.probe}): widths x parameterizations, then spectra and report")
        result = run_sweep(args.probe, args.out / name)
        for row in summary_rows(result):
            print(f"  {row['run']:<24} {row['quantity']:<8} step {row['first_step']:>4}: {row['first']:8.3f}   "
                  f"step {row['last_step']:>4}: {row['last']:8.3f}")
        from .analysis.report import summary_lines, verdict_lines

        print("summary:")
        for line in summary_lines(result.report.parent / "metrics.json"):
            print(f"  {line}")
        print("verdicts:")
        for line in verdict_lines(result.report.parent / "metrics.json"):
            print(f"  {line}")
        print(f"report: {result.report} (also report.md, metrics.json, figures/)")
    return 0
