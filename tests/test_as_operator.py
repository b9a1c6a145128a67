"""ss.as_operator: dense matrices, product functions and scipy operators become operators usable by lanczos,
the estimators and the exports; bad input is refused with a one-line error."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse
import torch
from scipy.sparse.linalg import aslinearoperator

import sharpscope as ss
from conftest import with_spectrum

EIGS = np.concatenate([[9.0, 8.5, 8.4], np.linspace(-3.0, 2.0, 117)])


def _matrix(dtype=torch.float64) -> torch.Tensor:
    return with_spectrum(EIGS, seed=1, dtype=dtype).A


def _check_top(op, k=3):
    res = ss.lanczos(op, k=k, return_eigenvectors=True)
    torch.testing.assert_close(res.eigenvalues, torch.tensor(EIGS[:k], dtype=torch.float64), rtol=1e-9, atol=0)
    return res


def test_dense_matrix_everywhere_operators_go():
    A = _matrix()
    op = ss.as_operator(A)
    assert isinstance(op, ss.SymmetricOperator) and op.shape == (120, 120) and op.dtype == torch.float64
    res = _check_top(op)
    torch.testing.assert_close(A @ res.eigenvectors, res.eigenvectors * res.eigenvalues, atol=1e-6, rtol=0)
    V = torch.randn(120, 7, dtype=torch.float64)
    before = op.num_matvecs
    torch.testing.assert_close(op.matmat(V), A @ V, rtol=0, atol=0)
    assert op.num_matvecs - before == 7
    torch.testing.assert_close(op @ V[:, 0], A @ V[:, 0], rtol=0, atol=0)
    exact = float(torch.trace(A))
    assert abs(ss.hutchinson_trace(op, 50).estimate - exact) < 5 * ss.hutchinson_trace(op, 50).stderr
    np.testing.assert_allclose(op.to_scipy() @ np.ones(120), (A @ torch.ones(120, dtype=torch.float64)).numpy())
    assert op.check_symmetry().passed


def test_dense_casts_and_arrays():
    A = _matrix()
    op32 = ss.as_operator(A, dtype=torch.float32)
    assert op32.dtype == torch.float32 and op32.device == torch.device("cpu")
    assert abs(ss.lanczos(op32, k=1, tol=1e-4).eigenvalues[0].item() - 9.0) < 1e-4
    _check_top(ss.as_operator(A.numpy()))
    ints = ss.as_operator(torch.tensor([[2, 1], [1, 2]]))
    assert ints.dtype == torch.get_default_dtype()
    assert ss.as_operator(A, shape=(120, 120)).shape == (120, 120)


def test_matvec_function():
    A = _matrix()
    calls = []

    def mv(v):
        calls.append(tuple(v.shape))
        return A @ v

    op = ss.as_operator(mv, shape=120, dtype=torch.float64)
    _check_top(op)
    calls.clear()
    out = op.matmat(torch.eye(120, dtype=torch.float64)[:, :4])
    torch.testing.assert_close(out, A[:, :4])
    assert calls == [(120,)] * 4  # a vector function gets vectors, one per column


def test_matmat_function_gets_whole_blocks():
    A = _matrix()
    calls = []

    def mm(V):
        calls.append(tuple(V.shape))
        return A @ V

    op = ss.as_operator(mm, shape=(120, 120), dtype=torch.float64, matmat=True)
    torch.testing.assert_close(op.matmat(torch.eye(120, dtype=torch.float64)[:, :5]), A[:, :5])
    assert calls == [(120, 5)]
    torch.testing.assert_close(op.matvec(torch.ones(120, dtype=torch.float64)), A.sum(1))
    assert calls[-1] == (120, 1)
    _check_top(op)
    calls.clear()
    res = ss.lanczos(op, k=3, block_size=3)
    torch.testing.assert_close(res.eigenvalues, torch.tensor(EIGS[:3], dtype=torch.float64), rtol=1e-9, atol=0)
    assert calls and all(c == (120, 3) for c in calls)


def test_scipy_operators():
    A = _matrix().numpy()
    _check_top(ss.as_operator(aslinearoperator(A)))
    sparse = scipy.sparse.diags([np.arange(1.0, 51.0)], [0]).tocsr()
    op = ss.as_operator(sparse)
    assert op.dtype == torch.float64
    torch.testing.assert_close(ss.lanczos(op, k=2).eigenvalues, torch.tensor([50.0, 49.0], dtype=torch.float64))


def test_an_operator_is_returned_as_it_is():
    op = ss.as_operator(_matrix())
    assert ss.as_operator(op) is op
    with pytest.raises(ValueError, match="does not convert"):
        ss.as_operator(op, dtype=torch.float32)


@pytest.mark.parametrize("bad,kwargs,error,match", [
    (torch.zeros(3, 4), {}, ValueError, r"square 2-D matrix, got shape \(3, 4\)"),
    (torch.zeros(3), {}, ValueError, r"square 2-D matrix, got shape \(3,\)"),
    (torch.zeros(2, 2, 2), {}, ValueError, "square 2-D matrix"),
    (torch.triu(torch.ones(5, 5, dtype=torch.float64)), {}, ValueError, "not symmetric"),
    (torch.eye(3, dtype=torch.complex64), {}, TypeError, "real symmetric"),
    (torch.full((2, 2), float("nan")), {}, ValueError, "NaN or inf"),
    (torch.eye(3), {"shape": 4}, ValueError, "does not match"),
    (lambda v: v, {}, ValueError, "needs shape=n"),
    (lambda v: v, {"shape": (3, 4)}, ValueError, "shape must be n or"),
    (lambda v: v, {"shape": 3, "dtype": torch.int64}, TypeError, "floating point"),
    ("matrix", {}, TypeError, "got str"),
])
def test_refusals_are_one_line(bad, kwargs, error, match):
    with pytest.raises(error, match=match) as info:
        ss.as_operator(bad, **kwargs)
    assert "\n" not in str(info.value)


def test_asymmetry_is_caught_even_when_small_but_not_rounding():
    A = _matrix()
    ss.as_operator(A + 1e-15 * torch.randn(120, 120, dtype=torch.float64))  # rounding-level asymmetry passes
    with pytest.raises(ValueError, match="not symmetric"):
        ss.as_operator(A + 1e-6 * torch.randn(120, 120, dtype=torch.float64))


def test_function_returning_the_wrong_shape():
    op = ss.as_operator(lambda v: v[:-1], shape=4)
    with pytest.raises(ValueError, match=r"returned shape \(3,\) for an input of shape \(4,\)"):
        op.matvec(torch.ones(4))
