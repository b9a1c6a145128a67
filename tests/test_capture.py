"""The Recorder: schedules, online sharpness against offline, optimizer state captured (Muon + AdamW)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import sharpscope as ss
from conftest import recorder_setup, train_step
from sharpscope.runs.capture import Recorder, log_schedule
from sharpscope.runs.store import open_run

CE = nn.CrossEntropyLoss()


def test_offline_spectrum_equals_online(tmp_path):
    """Online sharpness with Adam is the preconditioned sharpness (the EoS ratio over 38/lr), and equals the
    offline one on the stored checkpoint; the raw Hessian is not what Adam sees, so it is not logged."""
    model, opt, data = recorder_setup(1)
    with Recorder(tmp_path / "run.h5", model, opt, batch=data, every=4, loss_fn=CE, sharpness_every=4) as rec:
        for _ in range(8):
            rec.step(loss=train_step(model, opt, data))
    run = open_run(tmp_path / "run.h5")
    online_steps, online = run.scalars("sharpness_preconditioned")
    ratio_steps, ratio = run.scalars("eos_ratio")
    assert list(online_steps) == list(ratio_steps) == [4, 8] and len(run.scalars("sharpness")[0]) == 0
    with open_run(tmp_path / "run.h5") as run:
        fresh, fresh_opt, _ = recorder_setup(1)
        fresh.load_state_dict({**run.params(8), **run.buffers(8)})
        fresh_opt.load_state_dict(opt.state_dict())  # the live optimizer, still at step 8
        (x,), y = run.batch()
        P = ss.preconditioned_hessian_operator(fresh, CE, (x, y), fresh_opt)
        offline = ss.lanczos(P, k=1, tol=1e-8).eigenvalues[0].item()
    assert offline == pytest.approx(online[-1], rel=1e-4)
    assert ratio[-1] == pytest.approx(online[-1] / (2 * 1.9 / (0.1 * 1e-2)))
    assert rec.metrics_log[-1] == (8, {"sharpness/preconditioned": online[-1], "sharpness/eos_ratio": ratio[-1]})


def test_online_sharpness_with_plain_sgd_is_the_raw_hessian(tmp_path):
    """SGD with one lr: D = I, so the preconditioned sharpness is the Hessian's and the ratio is lambda/(2/lr)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = (torch.randn(32, 8), torch.randint(0, 3, (32,)))
    with Recorder(tmp_path / "run.h5", model, opt, batch=data, schedule="on_demand", loss_fn=CE, sharpness_every=2) as rec:
        for _ in range(2):
            rec.step(loss=train_step(model, opt, data))
    raw = ss.lanczos(ss.hessian_operator(model, CE, data), k=1, tol=1e-8).eigenvalues[0].item()
    step, metrics = rec.metrics_log[-1]
    assert step == 2 and set(metrics) == {"sharpness/preconditioned", "sharpness/eos_ratio", "sharpness/hessian"}
    assert metrics["sharpness/hessian"] == metrics["sharpness/preconditioned"] == pytest.approx(raw, rel=1e-4)
    assert metrics["sharpness/eos_ratio"] == pytest.approx(metrics["sharpness/hessian"] * 0.1 / 2)
    assert open_run(tmp_path / "run.h5").scalars("sharpness")[1][-1] == metrics["sharpness/hessian"]


def test_schedules(tmp_path):
    model, opt, data = recorder_setup()
    with Recorder(tmp_path / "a.h5", model, opt, schedule=[2, 5]) as rec:
        for _ in range(6):
            rec.step()
        rec.capture()  # on demand, at step 6
    assert open_run(tmp_path / "a.h5").steps == [2, 5, 6]
    with Recorder(tmp_path / "b.h5", model, opt, schedule="on_demand") as rec:
        rec.step()
        rec.capture()
        rec.capture()  # same step twice: one checkpoint
    assert open_run(tmp_path / "b.h5").steps == [1]
    logs = [s for s in range(200) if log_schedule(per_decade=5)(s)]
    assert logs[:6] == [0, 1, 2, 3, 4, 6] and logs[-1] == 158
    with pytest.raises(ValueError, match="either every= or schedule="):
        Recorder(tmp_path / "c.h5", model, opt, every=2, schedule="log")


def test_muon_plus_adamw_state_is_captured(tmp_path):
    torch.manual_seed(0)
    model = ss.MLP(width=16, depth=1, in_features=8, out_features=4)
    groups = ss.parametrize(model, "mup", optimizer="muon", lr=0.02, base_width=16)
    opt = ss.build_optimizer(groups)
    x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
    with ss.Recorder(tmp_path / "muon.h5", model, opt, batch=(x, y), every=2) as rec:
        for _ in range(2):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            rec.step()
    with ss.open_run(tmp_path / "muon.h5") as run:
        state = run.optimizer_state(2)
    hidden = [n for n in state if n.startswith("hidden.0") and "weight" in n]
    assert hidden and set(state[hidden[0]]) == {"momentum_buffer"}  # Muon's matrix
    readout = [n for n in state if n.startswith("readout")]
    assert readout and {"exp_avg", "exp_avg_sq"} <= set(state[readout[0]])  # AdamW's
    live = {n: s for n, s in zip([n for n, _ in model.named_parameters()], [opt.state[p] for p in model.parameters()])}
    torch.testing.assert_close(state[hidden[0]]["momentum_buffer"], live[hidden[0]]["momentum_buffer"])
