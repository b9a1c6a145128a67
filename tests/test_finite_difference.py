"""Finite-difference products (hvp_mode="finite-difference") against dense float64 references, and
auto mode switching to them on an op without a usable double backward."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import sharpscope as ss
from conftest import MODELS, CustomTanh, make_data, make_mlp
from sharpscope.finite_difference import fd_step

CE = nn.CrossEntropyLoss()
FD = "finite-difference"






def _mlp(act: type[nn.Module], seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), act(), nn.Linear(12, 12), act(), nn.Linear(12, 4)).double()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs() / b.abs()).max())


def _top(model, data, k=5):
    return torch.linalg.eigvalsh(ss.dense_hessian(model, CE, data)).flip(0)[:k]


@pytest.mark.parametrize("act", [nn.Tanh, nn.GELU])
def test_float64_top5_within_1e6_of_exact(act):
    model, data = _mlp(act, 1), make_data("mlp", 1)
    res = ss.lanczos(ss.hessian_operator(model, CE, data, hvp_mode=FD), k=5)
    assert res.all_converged
    assert _rel(res.eigenvalues, _top(model, data)) < 1e-6


@pytest.mark.parametrize("act", [nn.Tanh, nn.GELU])
def test_float32_top5_within_3e3_of_exact(act):
    model, data = _mlp(act, 2), make_data("mlp", 2)
    truth = _top(model, data)
    model.float()
    res = ss.lanczos(ss.hessian_operator(model, CE, (data[0].float(), data[1]), hvp_mode=FD), k=5, tol=1e-4)
    assert _rel(res.eigenvalues, truth) < 3e-3


def test_every_operator_and_model_by_finite_differences(model_kind):
    model, data = MODELS[model_kind](3), make_data(model_kind, 3, n=8)
    v = torch.randn(ss.hessian_operator(model, CE, data).shape[0], generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # SDPA fallback notice on the attention model
        Hd, Gd = ss.dense_hessian(model, CE, data), ss.dense_ggn(model, CE, data)
        H, G = ss.hessian_operator(model, CE, data, hvp_mode=FD), ss.ggn_operator(model, CE, data, hvp_mode=FD)
        torch.testing.assert_close(H.matvec(v), Hd @ v, rtol=0, atol=1e-7 * float((Hd @ v).abs().max()))
        torch.testing.assert_close(G.matvec(v), Gd @ v, rtol=0, atol=1e-7 * float((Gd @ v).abs().max()))
        x = data[0][:4]
        K, Kd = ss.ntk_operator(model, x, hvp_mode=FD), ss.ntk_gram(model, x)
        u = torch.randn(K.shape[0], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        torch.testing.assert_close(K.matvec(u), Kd @ u, rtol=0, atol=1e-7 * float((Kd @ u).abs().max()))
        V = torch.stack([v, 2 * v, -v], dim=1)
        torch.testing.assert_close(H.matmat(V), torch.stack([H.matvec(c) for c in V.T], dim=1), rtol=0, atol=0)
    assert H.hvp_mode == FD and H.num_matvecs == 1 + 3 + 3


def test_the_model_is_not_written_and_other_operators_stay_valid():
    model, data = make_mlp(4), make_data("mlp", 4)
    before = [(p._version, p.detach().clone()) for p in model.parameters()]
    cached = ss.hessian_operator(model, CE, data, hvp_mode="cached")
    v = torch.randn(cached.shape[0], dtype=torch.float64)
    with cached.pinned():  # one solve: its cached graph lives as long as the block (issue 21)
        first = cached.matvec(v)
        graphs = cached._graphs
        H = ss.hessian_operator(model, CE, data, hvp_mode=FD)
        ss.lanczos(H, k=3)
        ss.hutchinson_trace(H, 4)
        for p, (version, value) in zip(model.parameters(), before):
            assert p._version == version and torch.equal(p, value)  # bit-exact, not even a version bump
        torch.testing.assert_close(cached.matvec(v), first, rtol=0, atol=0)
        assert graphs is not None and cached._graphs is graphs  # the other operator's cached graph stays valid
    assert cached._graphs is None  # dropped when the solve ends


def test_a_staleness_change_is_still_seen_in_fd_mode():
    model, data = make_mlp(5), make_data("mlp", 5)
    H = ss.hessian_operator(model, CE, data, hvp_mode=FD)

    def step(*_):
        with torch.no_grad():
            model[0].bias.add_(0.01)

    with pytest.raises(ss.StaleOperatorError, match="0.bias was modified in place"):
        ss.lanczos(H, k=2, callback=step)


def _custom_tanh_model(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 12), CustomTanh(), nn.Linear(12, 12), CustomTanh(), nn.Linear(12, 4)).double()
    twin = _mlp(nn.Tanh, seed)  # the same function with torch's tanh: the smooth reference
    twin.load_state_dict(model.state_dict())
    return model, twin


def test_auto_switches_to_fd_on_a_once_differentiable_op_at_the_first_product():
    """The derivative check sees the wrong double backward at the first product: the solve runs by finite
    differences from there, no restart (issue 21; before, the symmetry probe caught it after a few products)."""
    model, twin = _custom_tanh_model()
    data = make_data("mlp", 0)
    H = ss.hessian_operator(model, CE, data)
    with pytest.warns(RuntimeWarning, match=r"differs from central differences of the gradient .* OnceDifferentiableTanh"
                                            r".*switching to hvp_mode='finite-difference'"):
        res = ss.lanczos(H, k=3)
    assert H.hvp_mode == FD and res.derivative_check == "switched"
    assert _rel(res.eigenvalues, _top(twin, data, 3)) < 1e-6
    direct = ss.lanczos(ss.hessian_operator(model, CE, data, hvp_mode=FD), k=3)
    assert res.num_matvecs == direct.num_matvecs == H.num_matvecs  # the first product is the FD product
    torch.testing.assert_close(res.eigenvalues, direct.eigenvalues, rtol=0, atol=0)
    ss.lanczos(H, k=3)  # later solves run in finite-difference mode from the start: no warning
    with pytest.raises(ss.DerivativeCheckError, match="OnceDifferentiableTanh"):  # an explicit mode never switches
        ss.lanczos(ss.hessian_operator(model, CE, data, hvp_mode="cached"), k=3)
    with pytest.raises(ss.NotSymmetricError, match="double backward"):  # unchecked: the symmetry probe raises
        ss.lanczos(ss.hessian_operator(model, CE, data, hvp_mode="reverse"), k=3)


def test_auto_switches_to_fd_on_a_symmetry_failure_and_restarts():
    """The second line of defence, where the derivative check could not decide: the symmetry probe within the
    first products switches auto to finite differences and the solve restarts, both attempts counted."""
    model, twin = _custom_tanh_model()
    data = make_data("mlp", 0)
    H = ss.hessian_operator(model, CE, data)
    H._derivatives = "inconclusive"  # as after a check that could not decide (a kink within the step)
    with pytest.warns(RuntimeWarning, match=r"failed the symmetry test after \d+ products .* @once_differentiable\); "
                                            "switching to hvp_mode='finite-difference'"):
        res = ss.lanczos(H, k=3)
    assert H.hvp_mode == FD and res.derivative_check == "switched"
    assert _rel(res.eigenvalues, _top(twin, data, 3)) < 1e-6
    direct = ss.lanczos(ss.hessian_operator(model, CE, data, hvp_mode=FD), k=3)
    assert res.num_matvecs > direct.num_matvecs  # the failed attempt's products are counted too
    assert res.num_matvecs == H.num_matvecs
    torch.testing.assert_close(res.eigenvalues, direct.eigenvalues, rtol=0, atol=0)


def test_auto_switches_through_the_ladder_when_torch_raises():
    class Nearest(nn.Module):  # cdist has no double backward and no forward AD
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(6, 5)
            self.centers = nn.Parameter(torch.randn(4, 5))

        def forward(self, x):
            return -torch.cdist(torch.tanh(self.lin(x)), self.centers)

    class Twin(Nearest):
        def forward(self, x):
            d = torch.tanh(self.lin(x))[:, None, :] - self.centers[None]
            return -d.pow(2).sum(-1).sqrt()

    torch.manual_seed(0)
    model, twin = Nearest().double(), Twin().double()
    twin.load_state_dict(model.state_dict())
    data = make_data("mlp", 0)
    H = ss.hessian_operator(model, CE, data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        res = ss.lanczos(H, k=3)
    last = [str(w.message) for w in caught if "finite-difference" in str(w.message)]
    assert len(last) == 1 and "\n" not in last[0] and "_cdist_forward" in last[0]
    assert _rel(res.eigenvalues, _top(twin, data, 3)) < 1e-6


class _NoisyBackward(torch.autograd.Function):
    """Identity forward, a randomly scaled backward: a deterministic loss with random gradients."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * (1 + 0.1 * torch.randn(()))


def test_a_failure_in_fd_mode_means_random_products():
    class Noisy(nn.Module):
        def forward(self, x):
            return _NoisyBackward.apply(x)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), Noisy(), nn.Linear(12, 4)).double()
    for mode in (FD, "auto"):
        H = ss.hessian_operator(model, CE, make_data("mlp", 0), hvp_mode=mode)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            with pytest.raises(ss.NotSymmetricError, match="finite-difference.*the products are random") as err:
                ss.lanczos(H, k=3)
        assert "\n" not in str(err.value)


def test_bad_input_is_one_line():
    frozen = make_mlp(0).requires_grad_(False)
    with pytest.raises(ValueError, match="finite-difference' perturbs trainable floating-point parameters") as err:
        ss.hessian_operator(frozen, CE, make_data("mlp", 0), hvp_mode=FD)
    assert "\n" not in str(err.value)

    class Counter(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.count = nn.Parameter(torch.zeros(3, dtype=torch.long), requires_grad=False)

        def forward(self, x):
            return x

    with pytest.raises(ValueError, match="integer or frozen"):
        ss.ggn_operator(Counter(), CE, make_data("mlp", 0), hvp_mode=FD)
    with pytest.raises(ValueError, match="hvp_mode must be one of"):
        ss.hessian_operator(make_mlp(0), CE, make_data("mlp", 0), hvp_mode="finite-differences")


def test_the_step_rule():
    u64, u32 = torch.finfo(torch.float64).eps / 2, torch.finfo(torch.float32).eps / 2
    assert fd_step(torch.float64, 10.0, 1.0) == pytest.approx(0.1 * (3 * u64) ** (1 / 3) * 10)
    assert fd_step(torch.float32, 0.01, 2.0) == pytest.approx(0.1 * (3 * u32) ** (1 / 3) / 2)  # the floor of 1
    H = ss.hessian_operator(make_mlp(0), CE, make_data("mlp", 0), hvp_mode=FD)
    assert torch.equal(H.matvec(torch.zeros(H.shape[0], dtype=torch.float64)), torch.zeros(H.shape[0], dtype=torch.float64))
