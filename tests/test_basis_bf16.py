"""A bfloat16 Krylov basis that restarts: what it reports converged is converged, against float64 ground truth.

Before the fix a thick restart stored the kept Ritz vectors rounded to bfloat16 while the projected matrix kept
their exact Ritz values, and the returned vectors were combinations of rounded rows: on the test suite's MLP
Hessian (k = 4, tol 1e-6) a 32-row basis reported every pair converged with eigenvalues 7e-3 off, and on a dense
operator with the cluster (8.5, 8.4, 8.39) a 16-row one returned vectors with residuals of 3e-2. Here every
returned pair is checked in float64: reported residual = the true one, converged => within tol (or the float32
products' rounding), eigenvalue within the Kato-Temple bound of the dense eigenvalue.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import sharpscope as ss
from conftest import Dense, make_data, make_mlp, with_spectrum
from sharpscope.lanczos.config import default_basis_size
from sharpscope.lanczos.refine import ROUNDING

EPS32 = float(torch.finfo(torch.float32).eps)
CLUSTER = np.concatenate([[9.0, 8.5, 8.4, 8.39], np.linspace(-3.0, 2.0, 196)])


def _mlp_case():
    """The float32 MLP Hessian of the backend tests and the float64 Hessian of the same (float32) weights."""
    model, (x, y) = make_mlp(3).float(), make_data("mlp", 3)
    op = ss.hessian_operator(model, nn.CrossEntropyLoss(), (x.float(), y))
    H64 = ss.hessian_operator(make_mlp(3).float().double(), nn.CrossEntropyLoss(), (x.float().double(), y))
    D = torch.stack([H64.matvec(e) for e in torch.eye(H64.shape[0], dtype=torch.float64)])
    return op, (D + D.T) / 2


def _cluster_case(seed: int = 1):
    A32 = with_spectrum(CLUSTER, seed=seed).A.float()
    return Dense(A32), A32.double()


CASES = {"mlp": _mlp_case, "cluster": _cluster_case}


def check_against_dense(res, D: torch.Tensor, tol: float) -> None:
    """The float64 checks of the module docstring (``which="LA"``)."""
    lam, _ = torch.linalg.eigh(D)
    lam = lam.flip(0)
    norm = float(lam.abs().max())
    V, theta = res.eigenvectors.double(), res.eigenvalues
    true = (D @ V - V * theta).norm(dim=0)
    # reported residuals are the returned vectors' (up to the float32 products' difference to float64)
    assert torch.all(true <= res.residuals * 1.01 + 1e-6 * norm), (true, res.residuals)
    allowed = torch.clamp(tol * theta.abs(), min=ROUNDING * EPS32 * norm)
    for i in torch.nonzero(res.converged).flatten().tolist():
        assert true[i] <= 1.5 * allowed[i], (i, true[i], allowed[i])
        gap = float(min(abs(lam[j] - theta[i]) for j in range(len(lam)) if j != i))
        assert abs(theta[i] - lam[i]) <= true[i] ** 2 / gap + 1e-6 * norm, (i, theta[i], lam[i], true[i], gap)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("max_basis", [16, 32])
def test_restarted_bf16_basis_reports_only_true_convergence(case, max_basis):
    op, D = CASES[case]()
    for seed in range(3):
        res = ss.lanczos(op, k=4, tol=1e-6, seed=seed, basis="device-bf16", max_basis=max_basis,
                         return_eigenvectors=True, progress=False)
        check_against_dense(res, D, 1e-6)
        assert res.all_converged, (case, max_basis, seed, res.residuals)


@pytest.mark.parametrize("tol", [1e-3, 1e-5])
def test_bf16_basis_on_another_spectrum_and_tolerance(tol):
    # a variant: another rotation of the cluster, a basis of 12 rows (many restarts), both backends
    op, D = _cluster_case(seed=7)
    for backend in ("torch", "numpy"):
        res = ss.lanczos(op, k=4, tol=tol, basis="device-bf16", max_basis=12, backend=backend,
                         return_eigenvectors=True, progress=False)
        check_against_dense(res, D, tol)
        assert res.all_converged


def test_bf16_certificate_counts_its_products_and_keeps_the_cap():
    op, D = _mlp_case()

    class Counting(ss.SymmetricOperator):
        calls = 0

        def _matvec(self, v):
            Counting.calls += 1
            return op.matvec(v)

    counted = Counting(op.shape[0], torch.float32, "cpu")
    res = ss.lanczos(counted, k=4, tol=1e-6, basis="device-bf16", max_basis=16, return_eigenvectors=True,
                     progress=False)
    assert res.num_matvecs == Counting.calls
    Counting.calls = 0
    short = ss.lanczos(counted, k=4, tol=1e-6, basis="device-bf16", max_basis=16, max_matvecs=30,
                       return_eigenvectors=True, progress=False)
    assert short.num_matvecs == Counting.calls <= 30 and not short.all_converged
    check_against_dense(short, D, 1e-6)  # unconverged, with true residuals
    with pytest.raises(ValueError, match="max_matvecs=7 is too few for basis='device-bf16' with k=4.*>= 8"):
        ss.lanczos(counted, k=4, basis="device-bf16", max_matvecs=7)


def test_bf16_default_basis_follows_k_and_holds_less_than_float32():
    op, D = _mlp_case()
    assert [default_basis_size(k) for k in (1, 5)] == [10, 18]
    # basis_bytes counts the certificate's float32 vectors too (refine.py): at tol 1e-6 its LOBPCG steps hold
    # as much as the float32 basis at k = 1 (11 vectors), at 1e-3 one step needs less
    for tol, ratio in ((1e-3, 0.9), (1e-6, 1.0)):
        res = ss.lanczos(op, k=1, tol=tol, basis="device-bf16", return_eigenvectors=True, progress=False)
        f32 = ss.lanczos(op, k=1, tol=tol, return_eigenvectors=True, progress=False)
        assert res.basis_size == f32.basis_size == 10 and res.all_converged
        assert res.basis_bytes <= ratio * f32.basis_bytes, (tol, res.basis_bytes, f32.basis_bytes)
        check_against_dense(res, D, tol)
