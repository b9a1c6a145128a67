"""How fast the Monte-Carlo Fisher of cross-entropy approaches the GGN: the relative Frobenius gap
``||F_M - G|| / ||G||`` for M draws per sample, on the tests' float64 tanh MLP (6-12-12-4, 16 samples). It
should fall as 1/sqrt(M) (CHANGELOG, "Operators as a package").

    .venv/bin/python scripts/fisher_mc_convergence.py
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import sharpscope as ss  # noqa: E402


def main() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 4)).double()
    g = torch.Generator().manual_seed(1000)
    x, y = torch.randn(16, 6, generator=g, dtype=torch.float64), torch.randint(0, 4, (16,), generator=g)
    loss = nn.CrossEntropyLoss()
    G = ss.ggn_operator(model, loss, (x, y)).to_dense()
    for draws in (1, 4, 40, 400, 4000):
        F = ss.fisher_operator(model, loss, (x, y), kind="mc", mc_samples=draws).to_dense()
        print(f"M = {draws:5d}: relative gap {float((F - G).norm() / G.norm()):.4f}")


if __name__ == "__main__":
    main()
