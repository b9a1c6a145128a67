"""Block Lanczos (lanczos(op, k, block_size=b)) against dense float64 eigendecompositions: exact
multiplicities, eigenvectors, residuals, product counting, start blocks and the one-line refusals."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import sharpscope as ss
from conftest import MODELS, make_data, with_spectrum

CE = nn.CrossEntropyLoss()
# 2.0 three times just above a close 1.9 and a dense bulk: single-vector Lanczos converges to
# [2.0, 2.0, 1.9, 1.8] here (a copy of 2.0 missed: the documented limitation); blocks of 3 see all three
REPEATED = [2.0] * 3 + [1.9] + list(np.linspace(0, 1.8, 296))


def _truth(op, k, which="LA"):
    evals = torch.linalg.eigvalsh(op.A)
    if which == "SA":
        return evals[:k]
    if which == "LM":
        return evals[evals.abs().argsort(descending=True)][:k]
    return evals.flip(0)[:k]


def test_single_vector_misses_a_copy_that_blocks_find():
    op = with_spectrum(REPEATED, seed=5)
    single = ss.lanczos(op, k=4, tol=1e-6)
    assert single.all_converged and single.eigenvalues[2].item() == pytest.approx(1.9)  # the limitation
    for b in (3, 4):
        res = ss.lanczos(op, k=4, tol=1e-6, block_size=b)
        torch.testing.assert_close(res.eigenvalues, _truth(op, 4), rtol=1e-10, atol=0)
        assert res.all_converged


@pytest.mark.parametrize("eigs,k,b", [
    (REPEATED, 4, 3),
    ([3.0] * 4 + [2.0] * 2 + list(np.linspace(0, 1, 194)), 6, 4),     # two repeated values, multiplicity <= b
    ([1.0, 0.5] * 2 + list(np.linspace(-2.0, 0.4, 196)), 4, 2),       # two pairs, b = 2
    ([5.0] * 5 + [4.0] + [0.0] * 194, 6, 2),                          # multiplicity > b, exhausted space
])
def test_exact_multiplicities_eigenvectors_and_residuals(eigs, k, b):
    op = with_spectrum(eigs, seed=7)
    res = ss.lanczos(op, k=k, block_size=b, return_eigenvectors=True, tol=1e-8)
    assert res.all_converged
    torch.testing.assert_close(res.eigenvalues, _truth(op, k), rtol=1e-10, atol=1e-12)
    V, lam = res.eigenvectors, res.eigenvalues
    assert V.shape == (op.shape[0], k) and V.dtype == torch.float64
    torch.testing.assert_close(V.T @ V, torch.eye(k, dtype=torch.float64), rtol=0, atol=1e-12)
    true = (op.A @ V - V * lam).norm(dim=0)
    torch.testing.assert_close(true, res.residuals, rtol=1e-3, atol=1e-13)  # reported = true residuals
    assert (true <= 1e-8 * lam.abs().max()).all()
    # the returned vectors span the true eigenspaces of the repeated values
    evals, evecs = torch.linalg.eigh(op.A)
    for value in set(np.round(lam.numpy(), 9)):
        true_space = evecs[:, (evals - value).abs() < 1e-9]
        ours = V[:, (lam - value).abs() < 1e-9]
        if ours.shape[1] == true_space.shape[1]:
            P = true_space @ true_space.T
            assert (P @ ours - ours).abs().max() < 1e-7


@pytest.mark.parametrize("which", ["SA", "LM"])
def test_which_in_block_mode(which):
    eigs = [-4.0, -4.0, -3.5] + list(np.linspace(-3.0, 3.9, 197))
    op = with_spectrum(eigs, seed=2)
    res = ss.lanczos(op, k=3, which=which, block_size=2)
    torch.testing.assert_close(res.eigenvalues, _truth(op, 3, which), rtol=1e-10, atol=0)


def test_products_are_counted_column_by_column_and_capped():
    op = with_spectrum(REPEATED, seed=5)
    calls = []
    matmat = op.matmat

    def counted(V):
        calls.append(V.shape[1])
        return matmat(V)

    op.matmat = counted
    before = op.num_matvecs
    res = ss.lanczos(op, k=4, block_size=3)
    assert res.num_matvecs == sum(calls) == op.num_matvecs - before
    assert set(calls) <= {1, 2, 3} and calls.count(3) >= len(calls) - 1  # full blocks but for an exhausted step
    capped = ss.lanczos(op, k=4, block_size=3, max_matvecs=10)
    assert capped.num_matvecs == 9 and not capped.all_converged  # a 4th block would exceed 10 products
    restarted = ss.lanczos(op, k=4, block_size=3, max_basis=12)
    assert restarted.num_restarts > 0 and restarted.all_converged
    torch.testing.assert_close(restarted.eigenvalues, _truth(op, 4), rtol=1e-10, atol=0)


def test_start_blocks_and_determinism():
    op = with_spectrum(REPEATED, seed=5)
    a, b = ss.lanczos(op, k=4, block_size=3, seed=3), ss.lanczos(op, k=4, block_size=3, seed=3)
    assert torch.equal(a.eigenvalues, b.eigenvalues) and a.num_matvecs == b.num_matvecs
    top = ss.lanczos(op, k=4, block_size=4, return_eigenvectors=True)
    warm = ss.lanczos(op, k=4, block_size=4, v0=top.eigenvectors)
    assert warm.num_matvecs <= 8 and warm.all_converged
    torch.testing.assert_close(warm.eigenvalues, top.eigenvalues, rtol=1e-10, atol=0)
    one = ss.lanczos(op, k=4, block_size=3, v0=top.eigenvectors[:, 0])  # one vector: the rest random
    torch.testing.assert_close(one.eigenvalues, top.eigenvalues, rtol=1e-10, atol=0)
    dependent = torch.stack([top.eigenvectors[:, 0]] * 3, dim=1)  # rank 1: completed by random columns
    torch.testing.assert_close(ss.lanczos(op, k=4, block_size=3, v0=dependent).eigenvalues, top.eigenvalues,
                               rtol=1e-10, atol=0)


@pytest.mark.parametrize("kind", ["hessian", "ggn", "ntk"])
def test_block_lanczos_on_curvature_operators(model_kind, kind):
    model, (x, y) = MODELS[model_kind](0), make_data(model_kind, 0)
    if kind == "hessian":
        op, dense = ss.hessian_operator(model, CE, (x, y)), ss.dense_hessian(model, CE, (x, y))
    elif kind == "ggn":
        op, dense = ss.ggn_operator(model, CE, (x, y)), ss.dense_ggn(model, CE, (x, y))
    else:
        J = ss.dense_jacobian(model, x)
        op, dense = ss.ntk_operator(model, x), J @ J.T
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = ss.lanczos(op, k=6, block_size=3, return_eigenvectors=True)
    ref = torch.linalg.eigvalsh(dense).flip(0)[:6]
    assert ((res.eigenvalues - ref).abs() / ref.abs().max()).max() <= 1e-6
    assert res.all_converged and res.num_matvecs % 3 == 0


def test_float32_operator_in_block_mode():
    op = with_spectrum(REPEATED, seed=5, dtype=torch.float32)
    res = ss.lanczos(op, k=4, block_size=3, tol=1e-4, return_eigenvectors=True)
    assert res.eigenvectors.dtype == torch.float32
    assert ((res.eigenvalues - torch.tensor([2.0, 2.0, 2.0, 1.9], dtype=torch.float64)).abs() < 1e-4).all()


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(block_size=0), ValueError, "block_size must be an integer from 1 to the operator's dimension n=300"),
    (dict(block_size=-2), ValueError, "block_size must be an integer from 1"),
    (dict(block_size=301), ValueError, "block_size must be an integer from 1 to the operator's dimension n=300"),
    (dict(block_size=2.0), ValueError, "block_size must be an integer"),
    (dict(block_size=2, backend="numpy"), ValueError, "block_size=2 needs backend='torch' and basis='device'"),
    (dict(block_size=2, basis="host"), ValueError, "needs backend='torch' and basis='device'"),
    (dict(block_size=4, max_matvecs=3), ValueError, "max_matvecs=3 is smaller than one block of block_size=4"),
    (dict(block_size=4, max_basis=8), ValueError, "max_basis=8 is too small for k=2 and block_size=4"),
    (dict(block_size=2, v0=torch.ones(300, 3)), ValueError, "v0 must be a finite nonzero vector"),
    (dict(block_size=2, v0=torch.zeros(300)), ValueError, "v0 must be a finite nonzero vector"),
    (dict(k=300, block_size=2), ValueError, "k=300 must be smaller than the operator's dimension n=300"),
])
def test_bad_block_arguments_are_one_line_errors(kwargs, error, match):
    op = with_spectrum(REPEATED, seed=5)
    kwargs = {"k": 2, **kwargs}
    with pytest.raises(error, match=match) as info:
        ss.lanczos(op, **kwargs)
    assert "\n" not in str(info.value)


def test_block_size_equal_to_the_dimension_is_exact():
    op = with_spectrum(np.linspace(-1, 1, 12), seed=1)
    res = ss.lanczos(op, k=3, block_size=12)
    torch.testing.assert_close(res.eigenvalues, _truth(op, 3), rtol=0, atol=1e-12)
    assert res.num_matvecs == 12 and res.all_converged
