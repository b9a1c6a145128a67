"""Online sharpness (sharpscope/online.py): values against dense float64 ground truth, one operator that follows
the model between measurements, the cost recorded and logged."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

import sharpscope as ss
from conftest import MODELS, make_data, recorder_setup, train_step
from sharpscope.online import OnlineSharpness
from sharpscope.preconditioning import effective_step_sizes

CE = nn.CrossEntropyLoss()


def _dense_top(model, data, opt) -> float:
    """Top eigenvalue of D^1/2 H D^1/2 in float64, D from the optimizer's step sizes (independent of the operator)."""
    named = [(n, p) for n, p in model.named_parameters()]
    d = torch.cat([s.reshape(-1) for s in effective_step_sizes(opt, named)]) / opt.defaults["lr"]
    H = ss.dense_hessian(model, CE, data)
    P = d.sqrt()[:, None] * H * d.sqrt()[None, :]
    return float(torch.linalg.eigvalsh(P)[-1])


@pytest.mark.parametrize("kind", ["mlp", "cnn", "attention"])  # cnn: BatchNorm; attention: SDPA + LayerNorm
@pytest.mark.parametrize("seed", [0, 1])
def test_online_values_match_the_dense_top_eigenvalue(kind, seed):
    """Every logged value is within the stated tolerance (``tol`` relative) of the dense float64 top eigenvalue
    of the preconditioned Hessian (Adam), along training, on one reused operator."""
    model, data = MODELS[kind](seed), make_data(kind, seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    online = OnlineSharpness(model, CE, data, opt)
    for step in range(1, 7):
        train_step(model, opt, data)
        if step % 2:
            continue
        m = online.measure(step)
        dense = _dense_top(model, data, opt)
        assert m.skipped is None and m.converged
        assert abs(m.value - dense) <= online.tol * abs(dense), (step, m.value, dense)
        assert m.metrics["sharpness/eos_ratio"] == pytest.approx(m.value / online.operator.threshold)


def test_the_stated_tolerance_is_met_where_the_gap_is_small():
    """A variant: two nearly equal top eigenvalues (relative gap 1e-3), where the Ritz vector converges slowly;
    the value still meets the tolerance against the exact eigenvalue. A linear model under MSE with
    ``X = sqrt(N/2) Q diag(sqrt(s)) U^T`` has exactly the Hessian ``U diag(s) U^T``."""
    g = torch.Generator().manual_seed(0)
    n, N = 200, 400
    s = torch.rand(n, generator=g, dtype=torch.float64) * 0.9
    s[:2] = torch.tensor([1.0, 0.999], dtype=torch.float64)
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    Q, _ = torch.linalg.qr(torch.randn(N, n, generator=g, dtype=torch.float64))
    x = (N / 2) ** 0.5 * Q @ torch.diag(s.sqrt()) @ U.T
    model = nn.Linear(n, 1, bias=False).double()
    data = (x, torch.zeros(N, 1, dtype=torch.float64))
    online = OnlineSharpness(model, nn.MSELoss(), data, None)
    m = online.measure(0)
    assert abs(m.value - 1.0) <= online.tol and m.value <= 1.0 + 1e-12 and m.num_matvecs < n / 4


def test_one_operator_follows_the_model_between_measurements():
    """The operator is built once; a change between measurements -- a write through ``.data`` (no version
    change), a forward hook (no parameter change at all), an in-place update as an optimizer makes -- is seen by
    the next one."""
    model, data = MODELS["mlp"](0), make_data("mlp", 0)
    online = OnlineSharpness(model, CE, data, None)
    dense = lambda: float(torch.linalg.eigvalsh(ss.dense_hessian(model, CE, data))[-1])  # noqa: E731
    first = online.measure(0)
    op = online.operator
    assert abs(first.value - dense()) <= online.tol * dense()
    previous = dense()
    changes = [lambda: model[4].weight.data.mul_(3.0),                              # no version bump
               lambda: model[4].register_forward_hook(lambda mod, inp, out: 3 * out),  # no parameter change
               lambda: torch.no_grad()(model[0].weight.mul_)(2.0)]                         # in place, as an optimizer
    for i, change in enumerate(changes, 1):
        change()
        m = online.measure(i)
        assert online.operator is op
        exact = dense()
        assert abs(exact - previous) > 3 * online.tol * abs(previous)  # a stale value would fail the next line
        assert abs(m.value - exact) <= online.tol * exact
        previous = exact


def test_reuse_saves_the_derivative_check():
    """The first measurement pays the first-product derivative check (4 gradient evaluations); the next ones,
    on the same operator, only the per-solve graph and determinism check (folded: two forward passes)."""
    model, data = MODELS["mlp"](0), make_data("mlp", 0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    online = OnlineSharpness(model, CE, data, opt)
    per = []
    for step in range(3):
        train_step(model, opt, data)
        calls.clear()
        online.measure(step)
        per.append(len(calls))
    assert online.operator.base.derivative_check == "passed"
    # cached mode: the graph's forward pass (which is also the determinism check's first evaluation) + the
    # check's second evaluation per solve, + 4 for the derivative check on the first
    assert per == [1 + 1 + 4, 1 + 1, 1 + 1]


def test_the_recorder_logs_what_online_tracking_costs(tmp_path, caplog):
    model, opt, data = recorder_setup(0)
    with caplog.at_level(logging.INFO, logger="sharpscope"):
        with ss.Recorder(tmp_path / "r.h5", model, opt, batch=data, schedule="on_demand", loss_fn=CE,
                         sharpness_every=2) as rec:
            for _ in range(6):
                rec.step(loss=train_step(model, opt, data))
    cost = rec.online_cost
    assert cost.measurements == 3 and cost.seconds > 0 and cost.products_first >= cost.products_median > 0
    with ss.open_run(tmp_path / "r.h5") as run:
        steps, seconds = run.scalars("online_seconds")
        _, products = run.scalars("online_products")
    assert steps.tolist() == [2, 4, 6] and (seconds > 0).all()
    assert products.tolist() == [m.num_matvecs for m in rec.online.history]
    assert cost.products_total == int(np.sum(products))
    [line] = [r.getMessage() for r in caplog.records if "online sharpness:" in r.getMessage()]
    assert "3 measurements" in line and "of training" in line and f"first {cost.products_first}" in line


def test_sharpness_tol_is_checked_and_passed_through(tmp_path):
    model, opt, data = recorder_setup(0)
    with pytest.raises(ValueError, match="relative Ritz residual"):
        ss.Recorder(tmp_path / "a.h5", model, opt, batch=data, loss_fn=CE, sharpness_every=2, sharpness_tol=0)
    rec = ss.Recorder(tmp_path / "b.h5", model, opt, batch=data, loss_fn=CE, sharpness_every=2, sharpness_tol=1e-6)
    assert rec.online.tol == 1e-6 and np.isnan(rec._loss)
    rec.close()
