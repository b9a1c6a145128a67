"""Faults: reused operators answering for a model that no longer exists (issue 21, "What was found" 2).

Each case builds an operator, solves once, changes what the forward pass or the loss reads in a way no
fingerprint lists (a hook, a submodule, a plain attribute, a loss's weight, two entries swapped through
``.data``, a closure's global), solves again on the same operator and compares with a dense float64 reference
computed on the changed model. Before the fix (7abbbde) ``auto`` and ``cached`` returned the first answer;
caches now serve one solve (docs/operators-semantics.md).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.sparse.linalg import eigsh
from torch import nn
from torch.nn.utils import parametrize

import sharpscope as ss

MODES = ["auto", "cached"]
LOGIT_SCALE = torch.ones(4, dtype=torch.float64)  # a global tensor a loss closure reads (changed in place)


class Probe(nn.Module):
    """A tanh MLP whose forward pass reads a plain tensor attribute, a Python float and a buffer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.act, self.l2 = nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)
        self.scale = torch.tensor(1.0)
        self.gain = 1.0
        self.register_buffer("shift", torch.linspace(-0.5, 0.5, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(self.act(self.l1(x) * self.scale * self.gain + self.shift))


class Doubling(nn.Module):
    """A parametrization ``W -> c W`` whose factor is a plain attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.c = 1.0

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.c * w


def _data():
    g = torch.Generator().manual_seed(7)
    return torch.randn(24, 6, generator=g, dtype=torch.float64), torch.randint(0, 4, (24,), generator=g)


def _swap_two_entries(t: torch.Tensor, i=(0, 0), j=(3, 2)) -> None:
    a, b = t.data[i].item(), t.data[j].item()  # through .data: no version bump; sum and norm unchanged
    t.data[i], t.data[j] = b, a


def _closure_loss(kind: str):
    if kind == "closure-global":
        return ss.batch_loss(lambda m, b: nn.functional.cross_entropy(m(b[0]) * LOGIT_SCALE, b[1]))
    if kind == "closure-float":
        factor = {"value": 1.0}
        loss = ss.batch_loss(lambda m, b: factor["value"] * nn.functional.cross_entropy(m(b[0]), b[1]))
        loss.factor = factor
        return loss
    if kind == "weighted":
        return nn.CrossEntropyLoss(weight=torch.ones(4, dtype=torch.float64))
    return nn.CrossEntropyLoss()


def _set_closure_float(model, loss):
    loss.factor["value"] = 2.5  # a Python float the closure captured, changed


def _parametrized_factor(model, loss):  # registered before the first solve (_setup); its factor changes
    model.l1.parametrizations.weight[0].c = 1.7


# (name, loss kind, change). The first seven are the cases; the others are variants of the class.
CASES = [
    ("forward hook added", "ce", lambda m, _: m.l1.register_forward_hook(lambda mod, i, o: 2 * o)),
    ("submodule swapped", "ce", lambda m, _: setattr(m, "act", nn.Sigmoid())),
    ("tensor attribute reassigned", "ce", lambda m, _: setattr(m, "scale", torch.tensor(2.0, dtype=torch.float64))),
    ("float attribute reassigned", "ce", lambda m, _: setattr(m, "gain", 1.5)),
    ("loss weight reassigned", "weighted", lambda _, loss: setattr(loss, "weight", torch.tensor(
        [1.0, 2.0, 3.0, 4.0], dtype=torch.float64))),
    (".data swap of two entries", "ce", lambda m, _: _swap_two_entries(m.l1.weight)),
    ("closure's global tensor changed in place", "closure-global", lambda m, _: LOGIT_SCALE.mul_(2.0)),
    # variants
    ("buffer entries swapped through .data", "ce", lambda m, _: _swap_two_entries(m.shift, (0,), (7,))),
    ("closure's captured float changed", "closure-float", _set_closure_float),
    ("parametrization's factor changed", "ce", _parametrized_factor),
    ("forward pre-hook added", "ce", lambda m, _: m.l2.register_forward_pre_hook(lambda mod, args: (args[0] ** 2,))),
    ("loss setting changed", "ce", lambda _, loss: setattr(loss, "label_smoothing", 0.2)),
]


@pytest.fixture(autouse=True)
def _reset_global():
    LOGIT_SCALE.fill_(1.0)
    yield
    LOGIT_SCALE.fill_(1.0)


def _setup(name, loss_kind):
    model = Probe().double()
    if name.startswith("parametrization"):
        parametrize.register_parametrization(model.l1, "weight", Doubling())
    return model, _closure_loss(loss_kind), _data()


def _top(model, loss, data, k=2):
    return torch.linalg.eigvalsh(ss.dense_hessian(model, loss, data)).flip(0)[:k]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name,loss_kind,change", CASES, ids=[c[0] for c in CASES])
def test_a_reused_operator_measures_the_changed_model(name, loss_kind, change, mode):
    model, loss, data = _setup(name, loss_kind)
    H = ss.hessian_operator(model, loss, data, hvp_mode=mode)
    first = ss.lanczos(H, k=2).eigenvalues
    torch.testing.assert_close(first, _top(model, loss, data), rtol=1e-8, atol=0)
    change(model, loss)
    truth = _top(model, loss, data)
    assert not torch.allclose(truth, first, rtol=1e-6, atol=0)  # the change matters: this test can fail
    again = ss.lanczos(H, k=2)
    assert again.all_converged
    torch.testing.assert_close(again.eigenvalues, truth, rtol=1e-8, atol=0)


@pytest.mark.parametrize("mode", MODES)
def test_direct_products_after_a_change_are_of_the_changed_model(mode):
    """A loop of ``op @ v`` outside any solve: each product is a solve of its own."""
    model, loss, data = _setup("hook", "ce")
    H = ss.hessian_operator(model, loss, data, hvp_mode=mode)
    v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(H @ v, ss.dense_hessian(model, loss, data) @ v, rtol=1e-10, atol=0)
    model.act = nn.Sigmoid()
    torch.testing.assert_close(H @ v, ss.dense_hessian(model, loss, data) @ v, rtol=1e-10, atol=0)
    V = torch.stack([v, 2 * v], dim=1)
    model.l1.register_forward_hook(lambda mod, i, o: o + 0.3)
    torch.testing.assert_close(H @ V, ss.dense_hessian(model, loss, data) @ V, rtol=1e-10, atol=0)


@pytest.mark.parametrize("mode", MODES)
def test_scipy_eigsh_on_to_scipy_follows_the_model_and_a_pinned_block_shares_one_graph(mode):
    model, loss, data = _setup("swap", "ce")
    H = ss.hessian_operator(model, loss, data, hvp_mode=mode)
    v0 = np.ones(H.shape[0])
    with H.pinned():  # the documented way to run a scipy solver as one solve: one graph for all its products
        first = np.sort(eigsh(H.to_scipy(), k=2, which="LA", v0=v0, tol=1e-12, return_eigenvectors=False))[::-1]
        assert H._graphs is not None
    np.testing.assert_allclose(first, _top(model, loss, data).numpy(), rtol=1e-8)
    assert H._graphs is None  # dropped when the block ends
    model.act = nn.Sigmoid()
    again = np.sort(eigsh(H.to_scipy(), k=2, which="LA", v0=v0, tol=1e-12, return_eigenvectors=False))[::-1]
    np.testing.assert_allclose(again, _top(model, loss, data).numpy(), rtol=1e-8)


@pytest.mark.parametrize("mode", MODES)
def test_estimators_ggn_and_ntk_follow_the_changed_model(mode):
    model, loss, data = _setup("hook", "ce")
    H = ss.hessian_operator(model, loss, data, hvp_mode=mode)
    G = ss.ggn_operator(model, loss, data, hvp_mode=mode)
    K = ss.ntk_operator(model, data[0][:6], hvp_mode=mode)
    n = H.shape[0]
    ss.hutchpp_trace(H, 3 * n)
    ss.lanczos(G, k=2), ss.lanczos(K, k=2)
    model.l1.register_forward_hook(lambda mod, i, o: 1.5 * o)
    exact = float(torch.trace(ss.dense_hessian(model, loss, data)))
    assert abs(ss.hutchpp_trace(H, 3 * n).estimate - exact) <= 1e-9 * abs(exact)  # 3n products: exact
    torch.testing.assert_close(ss.lanczos(G, k=2).eigenvalues,
                               torch.linalg.eigvalsh(ss.dense_ggn(model, loss, data)).flip(0)[:2], rtol=1e-8, atol=0)
    ntk = ss.ntk_gram(model, data[0][:6])
    torch.testing.assert_close(ss.lanczos(K, k=2).eigenvalues, torch.linalg.eigvalsh(ntk).flip(0)[:2], rtol=1e-8, atol=0)


def test_the_preconditioned_operator_follows_a_hook():
    model, loss, data = _setup("hook", "ce")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    P = ss.preconditioned_hessian_operator(model, loss, data, opt)
    ss.lanczos(P, k=1)
    model.l1.register_forward_hook(lambda mod, i, o: 0.5 * o)
    d = P.d_sqrt
    truth = torch.linalg.eigvalsh(d[:, None] * ss.dense_hessian(model, loss, data) * d[None, :]).flip(0)[:1]
    torch.testing.assert_close(ss.lanczos(P, k=1).eigenvalues, truth, rtol=1e-8, atol=0)


def test_data_changed_in_place_between_solves_is_measured():
    """The operator's batches are the caller's tensors: an in-place edit of them is a new operator too."""
    model, loss, data = _setup("data", "ce")
    H = ss.hessian_operator(model, loss, data, hvp_mode="cached")
    ss.lanczos(H, k=2)
    data[0].mul_(1.7)
    torch.testing.assert_close(ss.lanczos(H, k=2).eigenvalues, _top(model, loss, data), rtol=1e-8, atol=0)


def test_a_stochastic_hook_added_between_solves_is_refused():
    """The determinism check is a proof about the model too: it is made again at every solve."""
    model, loss, data = _setup("noise", "ce")
    H = ss.hessian_operator(model, loss, data)
    ss.lanczos(H, k=1)
    model.l1.register_forward_hook(lambda mod, i, o: o + 0.01 * torch.randn_like(o))
    with pytest.raises(ss.StochasticForwardError, match="differ"):
        ss.lanczos(H, k=1)


def test_inside_a_solve_a_versioned_change_still_raises():
    """The per-product fingerprint and the value summary stay the checks inside one solve."""
    model, loss, data = _setup("inside", "ce")
    H = ss.hessian_operator(model, loss, data, hvp_mode="cached")

    def step(*_):
        with torch.no_grad():
            model.l2.bias.add_(0.01)

    with pytest.raises(ss.StaleOperatorError, match="l2.bias was modified in place"):
        ss.lanczos(H, k=2, callback=step)
    with pytest.raises(ss.StaleOperatorError, match="without a version change"):
        with H.pinned():
            H @ torch.ones(H.shape[0], dtype=torch.float64)
            model.l1.weight.data.mul_(1.01)
