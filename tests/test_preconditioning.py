"""The preconditioned Hessian D^1/2 H D^1/2 against the preconditioner written out from the optimizer's
state (SGD with per-layer lrs and momentum, Adam, Adafactor) and dense float64 Hessians."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import sharpscope as ss
from conftest import check_top_k, make_data, make_mlp

CE = nn.CrossEntropyLoss()


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_preconditioned_top_k_matches_dense(optimizer):
    model, (x, y) = make_mlp(11), make_data("mlp", 11)
    if optimizer == "sgd":  # per-layer learning rates, as muP gives
        opt = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.4},
                               {"params": model[2].parameters()},
                               {"params": model[4].parameters(), "lr": 0.025}], lr=0.1, momentum=0.9)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.9, 0.99), eps=1e-8)
    for _ in range(3):
        opt.zero_grad()
        CE(model(x), y).backward()
        opt.step()
    P = ss.preconditioned_hessian_operator(model, CE, (x, y), opt)
    # the preconditioner written out independently from the optimizer's state
    steps = []
    for group in opt.param_groups:
        for p in group["params"]:
            if optimizer == "sgd":
                steps.append(torch.full_like(p, group["lr"]).reshape(-1))
            else:
                st = opt.state[p]
                t = float(st["step"])
                b1, b2 = group["betas"]
                denom = (1 - b1 ** t) * ((st["exp_avg_sq"] / (1 - b2 ** t)).sqrt() + group["eps"])
                steps.append((group["lr"] / denom).reshape(-1))
    d = torch.sqrt(torch.cat(steps) / opt.defaults["lr"])
    dense = d[:, None] * ss.dense_hessian(model, CE, (x, y)) * d[None, :]
    check_top_k(ss.lanczos(P, k=10), dense, 10, 1e-6)
    if optimizer == "sgd":
        assert P.threshold == pytest.approx((2 + 2 * 0.9) / 0.1)
    else:
        assert P.threshold == pytest.approx(38 / 1e-2)


def test_adafactor_preconditioned_operator():
    model, (x, y) = make_mlp(12), make_data("mlp", 12)
    opt = torch.optim.Adafactor(model.parameters(), lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        CE(model(x), y).backward()
        opt.step()
    P = ss.preconditioned_hessian_operator(model, CE, (x, y), opt)
    steps = []
    for p in model.parameters():  # torch.optim.Adafactor's step, written out (no update clipping)
        st = opt.state[p]
        t = float(st["step"])
        alpha = max(1e-3, (p.detach().norm() / p.numel() ** 0.5).item()) * min(0.05, t ** -0.5)
        if p.ndim > 1:
            v = st["row_var"] @ st["col_var"] / st["row_var"].mean(dim=-2, keepdim=True)
        else:
            v = st["variance"]
        eps1 = torch.finfo(p.dtype).eps
        steps.append((alpha / v.clamp(min=eps1 ** 2).sqrt()).reshape(-1))
    d = torch.sqrt(torch.cat(steps) / 0.05)
    dense = d[:, None] * ss.dense_hessian(model, CE, (x, y)) * d[None, :]
    torch.testing.assert_close(P.to_dense(), dense)
    assert P.threshold == pytest.approx(2 / 0.05)
