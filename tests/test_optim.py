"""Adam-atan2: its update against a formula written out here, scale invariance, lr exponents, its
linearized preconditioner against finite differences and a dense float64 reference, its thresholds."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import sharpscope as ss
from conftest import make_data, make_mlp
from sharpscope.models import MLP
from sharpscope.optim import AdamAtan2, build_optimizer
from sharpscope.param import lr_exponent, parametrize
from sharpscope.preconditioning import effective_step_sizes
from sharpscope.stability import eos_threshold

CE = nn.CrossEntropyLoss()


def _train(model, opt, x, y, steps, scale=1.0):
    for _ in range(steps):
        opt.zero_grad()
        (scale * CE(model(x), y)).backward()
        opt.step()


def test_update_matches_the_formula():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(7, dtype=torch.float64))
    opt = AdamAtan2([w], lr=0.05, betas=(0.8, 0.95), weight_decay=0.1, a=1.5, b=0.7)
    ref, m, v = w.detach().clone(), torch.zeros(7, dtype=torch.float64), torch.zeros(7, dtype=torch.float64)
    for t in range(1, 6):
        grad = torch.randn(7, dtype=torch.float64) * 10.0 ** -t          # gradients spanning 5 decades
        w.grad = grad.clone()
        opt.step()
        m, v = 0.8 * m + 0.2 * grad, 0.95 * v + 0.05 * grad ** 2
        ref = ref * (1 - 0.05 * 0.1) - 0.05 * 1.5 * torch.atan2(m / (1 - 0.8 ** t), 0.7 * (v / (1 - 0.95 ** t)).sqrt())
        torch.testing.assert_close(w.detach(), ref, rtol=1e-13, atol=1e-15)
    st = opt.state[w]
    assert set(st) == {"step", "exp_avg", "exp_avg_sq"} and st["step"].dtype == torch.float32  # Adam's state
    assert float(st["step"]) == 5


def test_scale_invariant_where_adam_is_not():
    """g -> 1e-10 g leaves Adam-atan2's trajectory unchanged; Adam's eps then dominates its update."""
    x, y = make_data("mlp", 2)

    def run(cls, scale, **kw):
        model = make_mlp(2)
        _train(model, cls(model.parameters(), lr=1e-2, **kw), x, y, 5, scale)
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    torch.testing.assert_close(run(AdamAtan2, 1e-10), run(AdamAtan2, 1.0), rtol=1e-9, atol=1e-12)
    assert not torch.allclose(run(torch.optim.Adam, 1e-10, eps=1e-8), run(torch.optim.Adam, 1.0, eps=1e-8),
                              rtol=1e-3)


def test_zero_gradient_history_gives_no_step_and_a_defined_preconditioner():
    model = make_mlp(0)
    x, y = make_data("mlp", 0)
    opt = AdamAtan2(model.parameters(), lr=0.1)
    before = model[0].bias.detach().clone()
    opt.zero_grad()
    CE(model(x), y).backward()
    model[0].bias.grad.zero_()              # a parameter whose gradient is exactly 0 (a dead unit)
    opt.step()
    assert torch.equal(model[0].bias.detach(), before)
    steps = effective_step_sizes(opt, list(model.named_parameters()))
    assert torch.all(steps[1] == 0) and torch.all(torch.isfinite(torch.cat([s.reshape(-1) for s in steps])))


@pytest.mark.parametrize("param", ["sp", "mup"])
def test_lr_exponents_are_adams_and_build_optimizer(param):
    for role in ("embedding", "hidden", "readout", "router", "vector"):
        for scaling in ("full_alignment", "no_alignment"):
            assert lr_exponent(param, role, "adam-atan2", scaling) == lr_exponent(param, role, "adam", scaling)
    model = MLP(width=128, depth=1)
    groups = parametrize(model, param, optimizer="adam-atan2", lr=3e-3, base_width=32, lr_scaling="full_alignment")
    adam = parametrize(MLP(width=128, depth=1), param, optimizer="adam", lr=3e-3, base_width=32,
                       lr_scaling="full_alignment")
    assert [g["lr"] for g in groups] == [g["lr"] for g in adam]
    opt = build_optimizer(groups)
    assert isinstance(opt, AdamAtan2) and opt.defaults["lr"] == 3e-3
    with pytest.raises(TypeError):
        build_optimizer(groups, eps=1e-8)   # no epsilon to set


def test_preconditioner_is_the_tangent_of_the_update():
    """s_i = d(lr a atan2(m_hat, b sqrt(v_hat))) / d m_i at the current state, by central differences."""
    model, (x, y) = make_mlp(5), make_data("mlp", 5)
    opt = AdamAtan2(model.parameters(), lr=0.02, betas=(0.9, 0.99), a=1.3, b=0.8)
    _train(model, opt, x, y, 4)
    named = list(model.named_parameters())
    steps = effective_step_sizes(opt, named)
    for (_, p), s in zip(named, steps):
        st, g = opt.state[p], opt.param_groups[0]
        t = float(st["step"])

        def update(m):
            x = g["b"] * (st["exp_avg_sq"] / (1 - 0.99 ** t)).sqrt()
            return g["lr"] * g["a"] * torch.atan2(m / (1 - 0.9 ** t), x)

        h = 1e-6 * st["exp_avg"].abs().clamp(min=1e-12)
        fd = (update(st["exp_avg"] + h) - update(st["exp_avg"] - h)) / (2 * h)
        torch.testing.assert_close(s, fd, rtol=1e-6, atol=0)


def test_preconditioned_top_k_matches_dense_and_threshold():
    model, (x, y) = make_mlp(11), make_data("mlp", 11)
    opt = AdamAtan2([{"params": model[0].parameters(), "lr": 2e-2}, {"params": model[2].parameters()},
                     {"params": model[4].parameters(), "lr": 5e-3}], lr=1e-2, betas=(0.9, 0.99))
    _train(model, opt, x, y, 3)
    P = ss.preconditioned_hessian_operator(model, CE, (x, y), opt)
    steps = []     # written out independently from the optimizer's state
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state[p]
            t = float(st["step"])
            bc1 = 1 - 0.9 ** t
            sq = (st["exp_avg_sq"] / (1 - 0.99 ** t)).sqrt()
            m_hat = st["exp_avg"] / bc1
            steps.append((group["lr"] * group["a"] * sq / (bc1 * (sq ** 2 + m_hat ** 2))).reshape(-1))
    d = torch.sqrt(torch.cat(steps) / 1e-2)
    dense = d[:, None] * ss.dense_hessian(model, CE, (x, y)) * d[None, :]
    res = ss.lanczos(P, k=10)
    ref = torch.linalg.eigvalsh(dense).flip(0)[:10]
    assert ((res.eigenvalues - ref).abs() / ref.abs().max()).max().item() <= 1e-6 and res.all_converged
    assert P.threshold == pytest.approx(38 / 1e-2) == ss.stability_threshold(opt)
    assert eos_threshold("adam-atan2", 1e-2) == pytest.approx(38 / 1e-2)
    assert eos_threshold("adam-atan2", 1e-2, beta1=0.5) == pytest.approx(6 / 1e-2)


def test_small_first_moment_limit_is_adam_without_eps():
    """Where |m_hat| << b sqrt(v_hat) the preconditioner is Adam's with eps = 0 and lr x a/b."""
    w = nn.Parameter(torch.zeros(4, dtype=torch.float64))
    atan, adam = AdamAtan2([w], lr=0.1, a=2.0, b=0.5), torch.optim.Adam([w], lr=0.1, eps=0.0)
    st = {"step": torch.tensor(10.0), "exp_avg": torch.full((4,), 1e-9, dtype=torch.float64),
          "exp_avg_sq": torch.tensor([1.0, 4.0, 9.0, 0.25], dtype=torch.float64)}
    atan.state[w], adam.state[w] = dict(st), dict(st)
    s_atan = effective_step_sizes(atan, [("w", w)])[0]
    s_adam = effective_step_sizes(adam, [("w", w)])[0]
    torch.testing.assert_close(s_atan, s_adam * 2.0 / 0.5, rtol=1e-12, atol=0)
    assert math.isclose(ss.stability_threshold(atan), ss.stability_threshold(adam))


def test_state_dict_round_trip_and_rebuild_like_a_run_file():
    """As runs/rebuild.optimizer_at does: class(groups, lr=...), then the stored state."""
    model, (x, y) = make_mlp(3), make_data("mlp", 3)
    opt = AdamAtan2(model.parameters(), lr=1e-2)
    _train(model, opt, x, y, 2)
    again = AdamAtan2([{**{k: v for k, v in g.items() if k != "params"}, "params": g["params"]}
                       for g in opt.param_groups], lr=1e-2)
    again.load_state_dict(opt.state_dict())
    for a, b in zip(effective_step_sizes(opt, list(model.named_parameters())),
                    effective_step_sizes(again, list(model.named_parameters()))):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
