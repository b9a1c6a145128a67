"""Backends of the Lanczos basis algebra: numpy (the array/CuPy code path on the CPU) and bfloat16 or
host storage against the torch backend; the kernels' NumPy references against float64; CUDA kernels
against their references under the ``gpu`` marker."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import sharpscope as ss
from sharpscope.lanczos.backends import reference, resolve_backend
from sharpscope.lanczos.backends.bf16 import bf16_bits_to_float32, float32_to_bf16_bits
from conftest import Dense, make_data, make_mlp, with_spectrum


def _with_spectrum(eigs, seed=0, dtype=torch.float32) -> Dense:
    return with_spectrum(eigs, seed, dtype)


def _mlp_hessian():
    model, (x, y) = make_mlp(3).float(), make_data("mlp", 3)
    return ss.hessian_operator(model, nn.CrossEntropyLoss(), (x.float(), y))


TOP = np.concatenate([[9.0, 8.5, 8.4, 8.39], np.linspace(-3.0, 2.0, 196)])
OPERATORS = {
    "diagonal": lambda: Dense(torch.diag(torch.linspace(0.0, 1.0, 300)) + torch.diag(
        torch.cat([torch.tensor([3.0, 2.5, 2.0]), torch.zeros(297)]))),
    "dense": lambda: _with_spectrum(TOP, seed=1),
    "restarts": lambda: _with_spectrum(TOP, seed=1),
    "multiplicity": lambda: _with_spectrum([5.0, 5.0, 5.0, 4.0] + [0.0] * 296, seed=3),
    "mlp-hessian": _mlp_hessian,
}
KWARGS = {"restarts": dict(max_basis=10), "multiplicity": dict(k=5)}


@pytest.mark.parametrize("name", sorted(OPERATORS))
@pytest.mark.parametrize("backend,basis,rtol", [("numpy", "device", 1e-5), ("numpy", "host", 1e-5),
                                                ("numpy", "device-bf16", 1e-3), ("torch", "device-bf16", 1e-3),
                                                ("torch", "host", 0.0)])
def test_backend_matches_torch(name, backend, basis, rtol):
    op = OPERATORS[name]()
    kw = {"k": 4, "tol": 1e-6, **KWARGS.get(name, {})}
    ref = ss.lanczos(op, **kw, return_eigenvectors=True)
    res = ss.lanczos(op, **kw, backend=backend, basis=basis, return_eigenvectors=True)
    rel = ((res.eigenvalues - ref.eigenvalues).abs() / ref.eigenvalues.abs().max()).max().item()
    assert rel <= rtol, (rel, res.eigenvalues, ref.eigenvalues)
    assert res.all_converged  # the reported Ritz residuals still certify convergence at tol
    assert res.eigenvectors.shape == ref.eigenvectors.shape and res.eigenvectors.dtype == torch.float32
    if isinstance(op, Dense):  # true residuals of the returned vectors: bf16 rows limit them to ~4e-3
        V = res.eigenvectors
        true = (op.A @ V - V * res.eigenvalues.float()).norm(dim=0) / res.eigenvalues.abs().max()
        assert true.max() <= (1e-2 if basis == "device-bf16" else 1e-4)


def test_numpy_backend_float64_and_bad_choices():
    op = _with_spectrum(TOP, seed=2, dtype=torch.float64)
    ref, res = ss.lanczos(op, k=3), ss.lanczos(op, k=3, backend="numpy")
    torch.testing.assert_close(res.eigenvalues, ref.eigenvalues, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="backend must be one of"):
        ss.lanczos(op, k=3, backend="jax")
    with pytest.raises(ValueError, match="basis must be one of"):
        ss.lanczos(op, k=3, basis="gpu")
    with pytest.raises(ValueError, match="float32"):
        ss.lanczos(op, k=3, basis="device-bf16")
    with pytest.raises(ValueError, match="CUDA device"):
        ss.lanczos(op, k=3, backend="cupy")
    assert resolve_backend("auto", torch.device("cpu")) == "torch"


def test_bf16_emulation_matches_torch_rounding():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(10000, generator=g) * 10.0 ** torch.randint(-30, 30, (10000,), generator=g),
                   torch.tensor([0.0, -0.0, 1.00390625, 1.01171875, 3.4e38, float("inf"), -float("inf")])])
    ours = float32_to_bf16_bits(x.numpy())
    theirs = x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(bf16_bits_to_float32(ours), x.to(torch.bfloat16).float().numpy())
    nan = float32_to_bf16_bits(np.array([np.nan], np.float32))
    assert np.isnan(bf16_bits_to_float32(nan)).all()


@pytest.mark.parametrize("storage", ["float32", "bf16"])
def test_kernel_references_against_float64(storage):
    rng = np.random.default_rng(1)
    rows, n = 37, 5003
    Q32 = rng.standard_normal((rows, n)).astype(np.float32) / np.sqrt(n)
    Q = float32_to_bf16_bits(Q32) if storage == "bf16" else Q32
    Qd = bf16_bits_to_float32(Q).astype(np.float64) if storage == "bf16" else Q32.astype(np.float64)
    w = rng.standard_normal(n).astype(np.float32)
    h = rng.standard_normal(rows).astype(np.float32)
    tol = dict(rtol=1e-4, atol=1e-4 * np.abs(w).max())
    np.testing.assert_allclose(reference.project(Q, w), Qd @ w, **tol)
    w1 = w.copy()
    reference.update(Q, w1, h)
    np.testing.assert_allclose(w1, w - Qd.T @ h, **tol)
    w2 = w.copy()
    h2, sq = reference.update_project(Q, w2, h)
    np.testing.assert_allclose(h2, Qd @ (w - Qd.T @ h), **tol)
    assert float(sq) == pytest.approx(float(np.sum((w - Qd.T @ h) ** 2)), rel=1e-5)
    assert float(reference.sumsq(w)) == pytest.approx(float(np.sum(w.astype(np.float64) ** 2)), rel=1e-5)
    out = np.empty(n, dtype=Q.dtype)
    out32 = np.empty(n, dtype=np.float32)
    reference.scale_store(w, 0.5, out, out32)
    expected = (w.astype(np.float64) * 0.5)
    got = bf16_bits_to_float32(out) if storage == "bf16" else out
    np.testing.assert_allclose(got, expected, rtol=2.0 ** -8 if storage == "bf16" else 1e-7)


def test_orthogonalize_and_restart_on_numpy_and_torch_agree():
    from sharpscope.lanczos.backends import make_basis

    rng = np.random.default_rng(2)
    n, m = 400, 12
    V, _ = np.linalg.qr(rng.standard_normal((n, m + 1)))
    for basis in ("device", "device-bf16"):
        out = []
        for backend in ("torch", "numpy"):
            B = make_basis(backend, basis, m, n, torch.float32, torch.device("cpu"))
            for j in range(m + 1):
                B.set(j, torch.tensor(V[:, j], dtype=torch.float32))
            w = torch.tensor(rng.standard_normal(n) if not out else out[0][2], dtype=torch.float32)
            w0 = w.clone()
            h = B.orthogonalize(w, m)
            ortho = max(abs(float(torch.dot(B.get(i), w))) for i in range(m)) / float(w.norm())
            assert ortho <= (1e-5 if basis == "device" else 1e-2)
            Y = np.linalg.qr(rng.standard_normal((m, 4)))[0] if not out else out[0][3]
            B.restart(Y, m, 4)
            out.append((h, B.get(4).clone(), w0.numpy(), Y, B.ritz_vectors(np.eye(5), 5)))
        np.testing.assert_allclose(out[0][0], out[1][0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out[0][1], out[1][1])
        torch.testing.assert_close(out[0][4], out[1][4], rtol=1e-3, atol=1e-3)


# -- GPU: the kernels against their references, and cupy against torch --------------------------

def _cupy_or_skip():
    from sharpscope.lanczos.backends import cupy_status

    missing = cupy_status()
    if missing is not None:
        pytest.skip(missing)
    import cupy

    return cupy


@pytest.mark.gpu
@pytest.mark.parametrize("storage", ["float32", "bf16"])
@pytest.mark.parametrize("rows,n", [(1, 1), (3, 1000), (61, 100_003), (130, 4099)])
def test_kernels_match_references(storage, rows, n):
    cp = _cupy_or_skip()
    from sharpscope.lanczos.backends.kernels import load_kernels

    K = load_kernels()
    rng = np.random.default_rng(rows * n)
    Q32 = (rng.standard_normal((rows, n)) / np.sqrt(n)).astype(np.float32)
    Q = float32_to_bf16_bits(Q32) if storage == "bf16" else Q32
    w = rng.standard_normal(n).astype(np.float32)
    h = rng.standard_normal(rows).astype(np.float32)
    Qd, wd, hd = cp.asarray(Q), cp.asarray(w), cp.asarray(h)
    tol = dict(rtol=1e-4, atol=1e-5 * np.sqrt(n))
    np.testing.assert_allclose(K.project(Qd, wd).get(), reference.project(Q, w), **tol)
    w_ref, w_dev = w.copy(), wd.copy()
    reference.update(Q, w_ref, h)
    K.update(Qd, w_dev, hd)
    np.testing.assert_allclose(w_dev.get(), w_ref, **tol)
    w_ref, w_dev = w.copy(), wd.copy()
    h2_ref, sq_ref = reference.update_project(Q, w_ref, h)
    h2, sq = K.update_project(Qd, w_dev, hd)
    np.testing.assert_allclose(w_dev.get(), w_ref, **tol)
    np.testing.assert_allclose(h2.get(), h2_ref, **tol)
    assert float(sq) == pytest.approx(float(sq_ref), rel=1e-4)
    out = cp.empty(n, dtype=Q.dtype)
    out[...] = 0xFFFF if storage == "bf16" else np.nan  # poisoned
    K.scale_store(wd, 0.25, out)
    ref_out = np.empty(n, dtype=Q.dtype)
    reference.scale_store(w, 0.25, ref_out)
    np.testing.assert_array_equal(out.get(), ref_out)


@pytest.mark.gpu
@pytest.mark.parametrize("basis,rtol", [("device", 1e-5), ("device-bf16", 1e-3), ("host", 1e-5)])
def test_cupy_backend_matches_torch(basis, rtol):
    _cupy_or_skip()
    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA device")
    op = _with_spectrum(TOP, seed=1)
    op = Dense(op.A.cuda())
    ref = ss.lanczos(op, k=4)
    res = ss.lanczos(op, k=4, backend="cupy", basis=basis, return_eigenvectors=True)
    rel = ((res.eigenvalues - ref.eigenvalues).abs() / ref.eigenvalues.abs().max()).max().item()
    assert rel <= rtol and res.all_converged and res.eigenvectors.device.type == "cuda"
    assert resolve_backend("auto", torch.device("cuda")) == "cupy"


def test_the_load_time_kernel_check_passes_the_references_and_catches_a_wrong_kernel():
    from sharpscope.lanczos.backends import reference
    from sharpscope.lanczos.backends.selfcheck import KernelMismatch, check_kernels

    check_kernels(reference)  # the references against themselves, through the same code path

    class WrongUpdate:
        def __getattr__(self, name):
            return getattr(reference, name)

        def update(self, Q, w, h):
            reference.update(Q, w, -h)

    class WrongRounding(WrongUpdate):
        update = staticmethod(reference.update)

        def scale_store(self, w, scale, out, out_f32=None):
            reference.scale_store(w, scale, out, out_f32)
            if out.dtype == np.uint16:
                out ^= 1  # off by one unit in the last place

    with pytest.raises(KernelMismatch, match=r"kernel update \(float32\) disagrees"):
        check_kernels(WrongUpdate())
    with pytest.raises(KernelMismatch, match="does not round like the reference"):
        check_kernels(WrongRounding())


def test_a_bf16_basis_that_loses_orthogonality_is_solved_again_in_float32():
    # rank 3 with a repeated eigenvalue, k=5 and a tiny basis: exhausted Krylov spaces between thick
    # restarts, where the rounded kept Ritz vectors lose orthogonality (found in review)
    torch.manual_seed(1)
    n = 60
    U, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    ev = torch.zeros(n, dtype=torch.float64)
    ev[:3] = torch.tensor([5.0, 3.0, 3.0])
    A = ((U * ev) @ U.T).float()

    class LowRank(ss.SymmetricOperator):
        def _matvec(self, v):
            return A @ v

    for backend in ("torch", "numpy"):
        with pytest.warns(RuntimeWarning, match="lost orthogonality.*solved again with basis='device'"):
            res = ss.lanczos(LowRank(n, torch.float32, "cpu"), k=5, backend=backend, basis="device-bf16",
                             max_basis=8)
        direct = ss.lanczos(LowRank(n, torch.float32, "cpu"), k=5, backend=backend, max_basis=8)
        np.testing.assert_allclose(res.eigenvalues, direct.eigenvalues, atol=1e-5)
        assert res.all_converged and res.num_matvecs > direct.num_matvecs  # the lost products are counted
