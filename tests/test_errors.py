"""Bad input gets a clear error (type and message naming the problem), never a silent wrong number."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import sharpscope as ss
from conftest import make_data, make_mlp

CE = nn.CrossEntropyLoss()


def test_non_finite_loss():
    model, (x, y) = make_mlp(0), make_data("mlp", 0)
    x = x.clone()
    x[0, 0] = float("nan")
    H = ss.hessian_operator(model, CE, (x, y))
    with pytest.raises(FloatingPointError, match="loss is nan"):
        ss.lanczos(H, k=2)


def test_non_finite_parameters():
    model = make_mlp(0)
    with torch.no_grad():
        model[0].weight[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match=r"parameter 0\.weight contains NaN or inf"):
        ss.hessian_operator(model, CE, make_data("mlp", 0))


def test_k_not_smaller_than_dimension():
    H = ss.hessian_operator(nn.Linear(2, 2).double(), nn.MSELoss(),
                            (torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)))
    with pytest.raises(ValueError, match="k=6 must be smaller than the operator's dimension n=6"):
        ss.lanczos(H, k=6)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        ss.lanczos(H, k=0)
    with pytest.raises(ValueError, match="which must be"):
        ss.lanczos(H, k=1, which="BE")


def test_empty_data():
    with pytest.raises(ValueError, match="empty data"):
        ss.lanczos(ss.hessian_operator(make_mlp(0), CE, []), k=2)
    x = torch.empty(0, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match="empty batch"):
        ss.hessian_operator(make_mlp(0), CE, (x, torch.empty(0, dtype=torch.long))).matvec(torch.zeros(292))
    with pytest.raises(ValueError, match="no data"):
        ss.hessian_operator(make_mlp(0), CE, None)


def test_no_trainable_parameters():
    model = make_mlp(0).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        ss.hessian_operator(model, CE, make_data("mlp", 0))
    with pytest.raises(ValueError, match=r"no trainable parameter matches \['decoder'\]"):
        ss.hessian_operator(make_mlp(0), CE, make_data("mlp", 0), params=["decoder"])


def test_mismatched_targets():
    x, _ = make_data("mlp", 0)
    H = ss.hessian_operator(make_mlp(0), nn.MSELoss(), (x, torch.randn(16, dtype=torch.float64)))
    with pytest.raises(ValueError, match=r"mismatched target shape: model outputs \(16, 4\), targets \(16,\)"):
        H.matvec(torch.zeros(H.shape[0], dtype=torch.float64))
    with pytest.raises(ValueError, match="inputs have 16 samples but targets have 15"):
        ss.hessian_operator(make_mlp(0), CE, (x, torch.zeros(15, dtype=torch.long))).matvec(
            torch.zeros(292, dtype=torch.float64))


def test_shuffled_loader_and_bad_arguments():
    x, y = make_data("mlp", 0)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4, shuffle=True)
    with pytest.raises(ValueError, match="shuffle=False"):
        ss.hessian_operator(make_mlp(0), CE, loader)
    with pytest.raises(ValueError, match="hvp_mode must be one of"):
        ss.hessian_operator(make_mlp(0), CE, (x, y), hvp_mode="fast")
    with pytest.raises(ValueError, match="batchnorm must be"):
        ss.hessian_operator(make_mlp(0), CE, (x, y), batchnorm="train")
    H = ss.hessian_operator(make_mlp(0), CE, (x, y))
    with pytest.raises(ValueError, match="matvec expects a vector of length 292"):
        H.matvec(torch.zeros(3))
    with pytest.raises(ValueError, match="must return a scalar"):
        ss.hessian_operator(make_mlp(0), nn.CrossEntropyLoss(reduction="none"), (x, y)).matvec(torch.zeros(292))


def test_preconditioner_refusals():
    model, (x, y) = make_mlp(0), make_data("mlp", 0)
    adam = torch.optim.Adam(model.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="take at least one optimizer step"):
        ss.preconditioned_hessian_operator(model, CE, (x, y), adam)
    muon = torch.optim.Muon([p for p in model.parameters() if p.ndim == 2], lr=1e-3)
    with pytest.raises(ValueError, match="Muon's orthogonalized"):
        ss.stability_threshold(muon)
    other = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="not in the optimizer's param groups"):
        ss.preconditioned_hessian_operator(model, CE, (x, y), other)


def test_thresholds():
    p = [nn.Parameter(torch.zeros(2))]
    assert ss.stability_threshold(torch.optim.SGD(p, lr=0.1)) == pytest.approx(20.0)
    assert ss.stability_threshold(torch.optim.SGD(p, lr=0.1, momentum=0.9)) == pytest.approx(38.0)
    assert ss.stability_threshold(torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True)) == pytest.approx(3.8 / 0.28)
    assert ss.stability_threshold(torch.optim.Adam(p, lr=0.01)) == pytest.approx(3800.0)
    assert ss.stability_threshold(torch.optim.AdamW(p, lr=0.01, betas=(0.5, 0.99))) == pytest.approx(600.0)
