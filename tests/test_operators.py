"""Curvature operators against dense float64 ground truth (torch.func.hessian / jacrev)."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import sharpscope as ss
from conftest import MODELS, CustomTanh, assert_hvp_matches_central_differences, make_data, make_mlp

CE = nn.CrossEntropyLoss()


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # SDPA fallback notice on the attention model
        return fn(*args, **kwargs)


@pytest.mark.parametrize("mode", ["reverse", "forward", "cached"])
def test_hessian_and_ggn_match_dense(model_kind, mode):
    model = MODELS[model_kind](1)
    data = make_data(model_kind, 1)
    H = ss.hessian_operator(model, CE, data, hvp_mode=mode)
    G = ss.ggn_operator(model, CE, data, hvp_mode=mode)
    Hd = ss.dense_hessian(model, CE, data)
    Gd = ss.dense_ggn(model, CE, data)
    torch.testing.assert_close(_quiet(H.to_dense), Hd, rtol=0, atol=1e-11 * Hd.abs().max().item())
    torch.testing.assert_close(_quiet(G.to_dense), Gd, rtol=0, atol=1e-11 * Gd.abs().max().item())
    assert H.num_matvecs == H.shape[0]


@pytest.mark.parametrize("mode", ["reverse", "forward", "cached"])
def test_ntk_matches_dense_gram(model_kind, mode):
    model = MODELS[model_kind](2)
    x, _ = make_data(model_kind, 2, n=6)
    K = ss.ntk_operator(model, x, hvp_mode=mode)
    J = ss.dense_jacobian(model, x)
    Kd = J @ J.T
    assert K.shape == (6 * 4, 6 * 4)
    torch.testing.assert_close(_quiet(K.to_dense), Kd, rtol=0, atol=1e-11 * Kd.abs().max().item())
    torch.testing.assert_close(ss.ntk_gram(model, x), Kd)


def test_every_input_format_agrees():
    model, data = make_mlp(3), make_data("mlp", 3)
    H = ss.hessian_operator(model, CE, data)
    Hd = ss.dense_hessian(model, CE, data)
    v = torch.randn(H.shape[0], dtype=torch.float64)
    V = torch.randn(H.shape[0], 3, dtype=torch.float64)
    torch.testing.assert_close(H.matvec(v), Hd @ v)
    torch.testing.assert_close(H @ v, Hd @ v)
    torch.testing.assert_close(H @ V, Hd @ V)
    torch.testing.assert_close(torch.as_tensor(H.to_scipy() @ v.numpy()), Hd @ v)
    torch.testing.assert_close((2.0 * H) @ v, 2.0 * (Hd @ v))
    assert H.shape == (292, 292) and H.dtype == torch.float64 and H.device == torch.device("cpu")


def test_multi_batch_equals_concatenated_batch():
    model = make_mlp(4)
    x, y = make_data("mlp", 4, n=21)
    whole = ss.hessian_operator(model, CE, (x, y)).to_dense()
    parts = [(x[:5], y[:5]), (x[5:13], y[5:13]), (x[13:], y[13:])]  # unequal sizes: weighted by n_b / N
    torch.testing.assert_close(ss.hessian_operator(model, CE, parts).to_dense(), whole)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=False)
    torch.testing.assert_close(ss.hessian_operator(model, CE, loader, hvp_mode="reverse").to_dense(), whole)
    torch.testing.assert_close(ss.ggn_operator(model, CE, parts).to_dense(),
                               ss.ggn_operator(model, CE, (x, y)).to_dense())


def test_parameter_subset_is_the_dense_sub_block():
    model, data = make_mlp(5), make_data("mlp", 5)
    Hd = ss.dense_hessian(model, CE, data)
    H = ss.hessian_operator(model, CE, data, params=["2"])  # the middle Linear: "2.weight", "2.bias"
    start = 6 * 12 + 12
    stop = start + 12 * 12 + 12
    assert H.shape[0] == stop - start
    torch.testing.assert_close(H.to_dense(), Hd[start:stop, start:stop])


def test_frozen_parameters_are_excluded():
    model, data = make_mlp(6), make_data("mlp", 6)
    Hd = ss.dense_hessian(model, CE, data)
    for p in model[0].parameters():
        p.requires_grad_(False)
    H = ss.hessian_operator(model, CE, data)
    torch.testing.assert_close(H.to_dense(), Hd[84:, 84:])


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 5)
        self.mix = nn.Linear(5, 5)
        self.out = nn.Linear(5, 7, bias=False)
        self.out.weight = self.emb.weight  # tied

    def forward(self, tokens):
        return self.out(torch.tanh(self.mix(self.emb(tokens))))


def test_tied_weights_counted_once_and_exact():
    torch.manual_seed(0)
    model = TiedLM().double()
    tokens = torch.randint(0, 7, (12,))
    targets = torch.randint(0, 7, (12,))
    H = ss.hessian_operator(model, CE, (tokens, targets))
    assert H.shape[0] == 7 * 5 + 5 * 5 + 5  # the tied matrix appears once

    def loss_of(flat):  # the tie written out by hand: an independent reference
        E = flat[:35].view(7, 5)
        W, b = flat[35:60].view(5, 5), flat[60:]
        return CE(torch.tanh(E[tokens] @ W.T + b) @ E.T, targets)

    flat = torch.cat([model.emb.weight.reshape(-1), model.mix.weight.reshape(-1), model.mix.bias])
    torch.testing.assert_close(H.to_dense(), torch.func.hessian(loss_of)(flat.detach()))


def test_batchnorm_modes_and_running_stats_untouched():
    model = MODELS["cnn"](7)
    data = make_data("cnn", 7)
    bn = model[1]
    before = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
    model.train()
    Hb = ss.hessian_operator(model, CE, data)
    Hb.to_dense()
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    assert int(bn.num_batches_tracked) == before[2]
    assert model.training and bn.training  # flags restored
    bn.running_mean.add_(0.3)
    bn.running_var.mul_(2.0)
    He = ss.hessian_operator(model, CE, data, batchnorm="eval").to_dense()
    torch.testing.assert_close(He, ss.dense_hessian(model, CE, data, batchnorm="eval"))
    assert not torch.allclose(He, Hb.to_dense())


def test_dropout_is_off_during_curvature():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Dropout(0.5), nn.Linear(12, 4)).double().train()
    data = make_data("mlp", 8)
    H = ss.hessian_operator(model, CE, data)
    assert H.check_symmetry().passed
    model.eval()
    torch.testing.assert_close(H.to_dense(), ss.dense_hessian(model, CE, data))


def test_ggn_equals_hessian_for_linear_model_with_mse():
    torch.manual_seed(0)
    model = nn.Linear(5, 3).double()
    x, y = torch.randn(10, 5, dtype=torch.float64), torch.randn(10, 3, dtype=torch.float64)
    torch.testing.assert_close(ss.ggn_operator(model, nn.MSELoss(), (x, y)).to_dense(),
                               ss.hessian_operator(model, nn.MSELoss(), (x, y)).to_dense())


def test_ggn_spectrum_is_scaled_ntk_spectrum_for_mse():
    """MSE mean over N*C entries: H_L = 2/(N C) I, so G = (2/(N C)) J^T J shares its nonzero spectrum
    with (2/(N C)) J J^T = (2/(N C)) K."""
    model = make_mlp(9)
    x = make_data("mlp", 9, n=5)[0]
    y = torch.randn(5, 4, dtype=torch.float64)
    G = ss.ggn_operator(model, nn.MSELoss(), (x, y))
    K = ss.ntk_operator(model, x)
    scale = 2.0 / (5 * 4)
    top_g = ss.lanczos(G, k=8).eigenvalues
    top_k = ss.lanczos(K, k=8).eigenvalues
    torch.testing.assert_close(top_g, scale * top_k, rtol=1e-8, atol=0)


class AlwaysDropout(nn.Module):
    def forward(self, x):
        return nn.functional.dropout(x, 0.5, training=True)  # ignores eval(): truly stochastic


@pytest.mark.parametrize("mode", ["auto", "cached", "reverse", "forward"])
def test_a_stochastic_forward_is_refused_in_every_mode(mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), AlwaysDropout(), nn.Linear(12, 4)).double()
    H = ss.hessian_operator(model, CE, make_data("mlp", 0), hvp_mode=mode)
    with pytest.raises(ss.StochasticForwardError, match="two evaluations of batch 0 differ"):
        ss.lanczos(H, k=3)
    with pytest.raises(ss.NotSymmetricError):  # a subclass: except NotSymmetricError still catches it
        H.check_symmetry()
    K = ss.ntk_operator(model, make_data("mlp", 0)[0], hvp_mode=mode)
    with pytest.raises(ss.StochasticForwardError, match="first output"):
        ss.lanczos(K, k=2)






def test_a_missing_double_backward_is_caught_and_the_hint_names_it():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), CustomTanh(), nn.Linear(12, 12), CustomTanh(), nn.Linear(12, 4)).double()
    # hvp_mode="reverse": not checked against finite differences, so the symmetry tests are what sees it
    # ("cached" raises DerivativeCheckError at the first product: tests/faults/test_derivatives.py)
    H = ss.hessian_operator(model, CE, make_data("mlp", 0), hvp_mode="reverse")
    assert not H.check_symmetry().passed
    with pytest.raises(ss.NotSymmetricError, match="double backward is wrong or missing") as err:
        ss.lanczos(H, k=3)
    assert "random" in str(err.value)  # both causes named


def test_auto_mode_falls_back_to_recompute_when_graph_exceeds_budget():
    model, data = make_mlp(10), make_data("mlp", 10)
    H = ss.hessian_operator(model, CE, data, graph_memory_budget=10)
    v = torch.randn(H.shape[0], dtype=torch.float64)
    torch.testing.assert_close(H.matvec(v), ss.dense_hessian(model, CE, data) @ v)
    assert H.hvp_mode == "measuring" and H.graph_bytes > 10  # graphs dropped; modes being timed
    H2 = ss.hessian_operator(model, CE, data)
    H2.matvec(v)
    assert H2.hvp_mode == "cached"


def test_attention_falls_back_to_math_kernel_with_warning():
    model = MODELS["attention"](0).float()
    x, y = make_data("attention", 0)
    H = ss.hessian_operator(model, CE, (x.float(), y), hvp_mode="reverse")
    with pytest.warns(RuntimeWarning, match="math attention kernel"):
        H.matvec(torch.randn(H.shape[0]))


def test_attention_hessian_matches_finite_differences():
    """The attention block's operator against central differences of its gradient (independent of
    any second-order autodiff path)."""
    model = MODELS["attention"](1)
    data = make_data("attention", 1)
    H = _quiet(ss.hessian_operator, model, CE, data)
    g = torch.Generator().manual_seed(0)
    assert_hvp_matches_central_differences(H, torch.randn(H.shape[0], generator=g, dtype=torch.float64))


def test_auto_without_cache_measures_both_modes_and_keeps_the_faster():
    model, data = make_mlp(14), make_data("mlp", 14)
    H = ss.hessian_operator(model, CE, data, graph_memory_budget=0)
    Hd = ss.dense_hessian(model, CE, data)
    for i in range(6):
        v = torch.randn(H.shape[0], dtype=torch.float64)
        torch.testing.assert_close(H.matvec(v), Hd @ v)  # every trial product is a real one
        assert H.hvp_mode == ("measuring" if i < 3 else H.hvp_mode)
    assert H.hvp_mode in ("reverse", "forward") and len(H._trial_times) == 4
