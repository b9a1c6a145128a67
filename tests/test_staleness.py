"""Operators that know when they are stale, and that refuse a random forward pass or data order."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import sharpscope as ss
from conftest import make_cnn, make_data, make_mlp

CE = nn.CrossEntropyLoss()
MODES = ["auto", "cached", "reverse", "forward"]


def _train(model, data, steps=5, lr=0.5):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        CE(model(data[0]), data[1]).backward()
        opt.step()


def _top(model, data, k=2):
    return torch.linalg.eigvalsh(ss.dense_hessian(model, CE, data)).flip(0)[:k]


@pytest.mark.parametrize("mode", MODES)
def test_an_operator_reused_after_optimizer_steps_measures_the_new_model(mode):
    model, data = make_mlp(0), make_data("mlp", 0)
    H = ss.hessian_operator(model, CE, data, hvp_mode=mode)
    before = ss.lanczos(H, k=2).eigenvalues
    torch.testing.assert_close(before, _top(model, data), rtol=1e-8, atol=0)
    _train(model, data)
    after = ss.lanczos(H, k=2)
    assert after.all_converged
    torch.testing.assert_close(after.eigenvalues, _top(model, data), rtol=1e-8, atol=0)
    assert not torch.allclose(after.eigenvalues, before)


@pytest.mark.parametrize("mode", ["cached", "reverse"])
def test_an_operator_follows_a_cnn_with_batchnorm_after_steps(mode):
    model, data = make_cnn(1), make_data("cnn", 1)
    H = ss.hessian_operator(model, CE, data, hvp_mode=mode)
    ss.lanczos(H, k=1)
    _train(model, data, lr=0.1)  # BatchNorm running stats move too; batch mode does not read them
    torch.testing.assert_close(ss.lanczos(H, k=1).eigenvalues, _top(model, data, 1), rtol=1e-8, atol=0)


def test_a_swapped_parameter_and_dtype_casts_are_followed():
    model, data = make_mlp(2), make_data("mlp", 2)
    H = ss.hessian_operator(model, CE, data)
    ss.lanczos(H, k=1)
    model[0].weight = nn.Parameter(2 * model[0].weight.detach())  # a new Parameter object
    truth = _top(model, data, 1)
    torch.testing.assert_close(ss.lanczos(H, k=1).eigenvalues, truth, rtol=1e-8, atol=0)
    model.float()  # float64 data follow the model to float32
    res = ss.lanczos(H, k=1)
    assert H.dtype == torch.float32
    torch.testing.assert_close(res.eigenvalues, truth, rtol=1e-4, atol=0)
    H32 = ss.hessian_operator(model, CE, (data[0].float(), data[1]))
    ss.lanczos(H32, k=1)
    model.double()  # .to(float64) after use: float32 data follow the model to float64
    torch.testing.assert_close(ss.lanczos(H32, k=1).eigenvalues, truth, rtol=1e-8, atol=0)


def test_a_half_precision_model_is_measured_not_zero():
    model, data = make_mlp(3), make_data("mlp", 3)
    truth = _top(model, data, 1)
    H = ss.hessian_operator(model.float(), CE, (data[0].float(), data[1]))
    ss.lanczos(H, k=1)
    model.bfloat16()
    res = ss.lanczos(H, k=1, tol=1e-2)
    assert H.dtype == torch.bfloat16
    torch.testing.assert_close(res.eigenvalues, truth, rtol=0.1, atol=0)


@pytest.mark.parametrize("mode", ["cached", "reverse"])
def test_writes_through_data_are_followed_between_solves_and_refused_inside_one(mode):
    """``p.data.mul_`` bumps no version counter (the per-product fingerprint cannot see it): the value summary
    checked at the start and end of each solve does."""
    model, data = make_mlp(7), make_data("mlp", 7)
    H = ss.hessian_operator(model, CE, data, hvp_mode=mode)
    before = ss.lanczos(H, k=2).eigenvalues
    version = model[0].weight._version
    model[0].weight.data.mul_(3.0)  # e.g. weight clipping or an EMA copy written through .data
    assert model[0].weight._version == version
    after = ss.lanczos(H, k=2).eigenvalues
    torch.testing.assert_close(after, _top(model, data), rtol=1e-8, atol=0)
    assert not torch.allclose(after, before)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    P = ss.preconditioned_hessian_operator(model, CE, data, opt)
    ss.lanczos(P, k=1)
    model[2].bias.data.add_(0.5)
    d = P.d_sqrt
    torch.testing.assert_close(ss.lanczos(P, k=1).eigenvalues, _top(model, data, 1) * d[0] ** 2, rtol=1e-8, atol=0)

    def write_through_data(*_):
        model[2].weight.data.mul_(1.01)

    with pytest.raises(ss.StaleOperatorError, match="changed during a solve without a version change"):
        ss.lanczos(H, k=2, callback=write_through_data)


def test_a_change_inside_one_solve_raises():
    model, data = make_mlp(4), make_data("mlp", 4)
    H = ss.hessian_operator(model, CE, data)

    def step_the_model(*_):
        with torch.no_grad():
            model[0].weight.add_(0.01)

    with pytest.raises(ss.StaleOperatorError, match=r"changed during a solve \(parameter 0.weight was modified in place\)"):
        ss.lanczos(H, k=2, callback=step_the_model)
    original = H._matvec

    def stepping(v):
        out = original(v)
        with torch.no_grad():
            model[2].bias.mul_(1.1)
        return out

    H._matvec = stepping
    for estimate in (lambda: ss.hutchinson_trace(H, 4), lambda: ss.hutchpp_trace(H, 9),
                     lambda: ss.spectral_density(H, 2, 5), lambda: H.check_symmetry()):
        with pytest.raises(ss.StaleOperatorError, match="parameter 2.bias was modified in place"):
            estimate()


def test_the_preconditioned_operator_follows_the_optimizer():
    model, data = make_mlp(5), make_data("mlp", 5)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def steps(n):
        for _ in range(n):
            opt.zero_grad()
            CE(model(data[0]), data[1]).backward()
            opt.step()

    def truth():
        d = ss.preconditioned_hessian_operator(model, CE, data, opt).d_sqrt
        dense = d[:, None] * ss.dense_hessian(model, CE, data) * d[None, :]
        return torch.linalg.eigvalsh(dense).flip(0)[:2]

    steps(3)
    P = ss.preconditioned_hessian_operator(model, CE, data, opt)
    torch.testing.assert_close(ss.lanczos(P, k=2).eigenvalues, truth(), rtol=1e-8, atol=0)
    steps(4)
    torch.testing.assert_close(ss.lanczos(P, k=2).eigenvalues, truth(), rtol=1e-8, atol=0)

    def step_the_optimizer(*_):
        steps(1)

    with pytest.raises(ss.StaleOperatorError):
        ss.lanczos(P, k=2, callback=step_the_optimizer)


def test_input_noise_and_a_random_sampler_are_refused():
    class Noisy(nn.Module):
        def forward(self, x):
            return x + 0.1 * torch.randn_like(x)

    torch.manual_seed(0)
    model = nn.Sequential(Noisy(), nn.Linear(6, 4)).double()
    with pytest.raises(ss.StochasticForwardError, match="random"):
        ss.lanczos(ss.hessian_operator(model, CE, make_data("mlp", 0)), k=1)
    x, y = make_data("cnn", 0, n=16)
    dataset = torch.utils.data.TensorDataset(x, y)
    for sampler in (torch.utils.data.SubsetRandomSampler(range(16)),
                    torch.utils.data.WeightedRandomSampler(torch.ones(16), 16)):
        loader = torch.utils.data.DataLoader(dataset, batch_size=4, sampler=sampler)
        with pytest.raises(ValueError, match=f"draws its batches with a {type(sampler).__name__}"):
            ss.hessian_operator(make_cnn(0), CE, loader)


def test_a_random_data_order_from_an_unknown_iterable_is_caught_by_the_repeat():
    x, y = make_data("cnn", 0, n=16)
    gen = torch.Generator().manual_seed(0)

    class Shuffled:
        def __iter__(self):
            idx = torch.randperm(16, generator=gen)
            return iter([(x[idx[i:i + 4]], y[idx[i:i + 4]]) for i in range(0, 16, 4)])

    with pytest.raises(ss.StochasticForwardError, match="differ"):
        ss.lanczos(ss.hessian_operator(make_cnn(0), CE, Shuffled()), k=1)


def test_the_staleness_check_reads_no_tensor_data():
    """The fingerprint is metadata only: a product's cost does not grow with it (no copies, no syncs)."""
    model, data = make_mlp(6), make_data("mlp", 6)
    H = ss.hessian_operator(model, CE, data)
    fp = H.fn.fingerprint()
    assert fp == H.fn.fingerprint()
    assert all(isinstance(x, (str, int, bool, torch.dtype, torch.device)) for e in fp.params for x in e)
