"""The Fisher operator (issue 23: a new operator is one module of per-batch functions) against dense float64
references: per-sample gradients for the empirical Fisher, the GGN for the Monte-Carlo Fisher of cross-entropy."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import sharpscope as ss
from conftest import MODELS, make_data

CE = nn.CrossEntropyLoss()


def _empirical_fisher(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``(1/N) sum_i g_i g_i^T`` with ``g_i`` the gradient of sample ``i``'s own loss, one backward each."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(x.shape[0]):
        loss = CE(model(x[i: i + 1]), y[i: i + 1])
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    G = torch.stack(rows)
    return G.T @ G / x.shape[0]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("kind", ["mlp", "attention"])
@pytest.mark.parametrize("mode", ["reverse", "cached", "forward"])
def test_the_empirical_fisher_is_the_mean_outer_product_of_per_sample_gradients(kind, seed, mode):
    model = MODELS[kind](seed)
    x, y = make_data(kind, seed)
    F = ss.fisher_operator(model, CE, (x, y), hvp_mode=mode)
    ref = _empirical_fisher(model, x, y)
    assert torch.allclose(F.to_dense(), ref, rtol=1e-9, atol=1e-12 * float(ref.abs().max()))
    top = ss.lanczos(F, k=2, tol=1e-10).eigenvalues
    assert torch.allclose(top, torch.linalg.eigvalsh(ref).flip(0)[:2], rtol=1e-8)


def test_the_empirical_fisher_over_batches_weighs_them_by_size():
    model = MODELS["mlp"](0)
    x, y = make_data("mlp", 0, n=20)
    F = ss.fisher_operator(model, CE, [(x[:12], y[:12]), (x[12:], y[12:])], hvp_mode="cached")
    assert torch.allclose(F.to_dense(), _empirical_fisher(model, x, y), rtol=1e-9, atol=1e-14)


def test_the_empirical_fisher_by_finite_differences():
    model = MODELS["mlp"](1)
    x, y = make_data("mlp", 1)
    F = ss.fisher_operator(model, CE, (x, y), hvp_mode="finite-difference")
    ref = _empirical_fisher(model, x, y)
    assert float((F.to_dense() - ref).norm() / ref.norm()) < 1e-6


def test_a_batched_block_equals_one_column_at_a_time():
    model = MODELS["mlp"](0)
    x, y = make_data("mlp", 0)
    V = torch.randn(sum(p.numel() for p in model.parameters()), 5, dtype=torch.float64)
    for kind in ("empirical", "mc"):
        F = ss.fisher_operator(model, CE, (x, y), kind=kind, mc_samples=3, hvp_mode="cached")
        cols = torch.stack([F @ V[:, j] for j in range(5)], dim=1)
        assert torch.allclose(F.matmat(V), cols, rtol=1e-10, atol=1e-14)


def _relative_gap(F: torch.Tensor, G: torch.Tensor) -> float:
    return float((F - G).norm() / G.norm())


@pytest.mark.parametrize("kind", ["mlp", "attention"])
def test_the_monte_carlo_fisher_converges_to_the_ggn_of_cross_entropy(kind):
    model = MODELS[kind](0)
    x, y = make_data(kind, 0)
    G = ss.ggn_operator(model, CE, (x, y)).to_dense()
    few = _relative_gap(ss.fisher_operator(model, CE, (x, y), kind="mc", mc_samples=4).to_dense(), G)
    many = _relative_gap(ss.fisher_operator(model, CE, (x, y), kind="mc", mc_samples=4000).to_dense(), G)
    assert many < 0.05 and many < few / 5  # error ~ 1/sqrt(M): 4000 draws against 4, about 30x smaller


def test_monte_carlo_labels_are_drawn_once_per_operator_from_the_seed():
    model = MODELS["mlp"](0)
    x, y = make_data("mlp", 0)
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    F = ss.fisher_operator(model, CE, (x, y), kind="mc", mc_samples=2, seed=3, hvp_mode="reverse")
    first = F @ v
    assert torch.equal(F @ v, first)  # the same labels on every product and solve
    assert torch.equal(ss.fisher_operator(model, CE, (x, y), kind="mc", mc_samples=2, seed=3) @ v, first)
    assert not torch.allclose(ss.fisher_operator(model, CE, (x, y), kind="mc", mc_samples=2, seed=4) @ v, first)
    assert F.check_symmetry().passed


def test_bad_fisher_requests_are_one_line():
    model = MODELS["mlp"](0)
    x, y = make_data("mlp", 0)
    for kwargs, match in (({"kind": "true"}, "kind must be"), ({"kind": "mc", "mc_samples": 0}, "mc_samples"),):
        with pytest.raises(ValueError, match=match) as err:
            ss.fisher_operator(model, CE, (x, y), **kwargs)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="needs nn.CrossEntropyLoss") as err:
        ss.fisher_operator(model, nn.MSELoss(), (x, torch.randn(16, 4, dtype=torch.float64)), kind="mc")
    assert "\n" not in str(err.value)
