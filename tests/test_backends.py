"""Backends of the Lanczos basis algebra: numpy (the array/CuPy code path on the CPU) and bfloat16 or
host storage against the torch backend; the kernels' NumPy references against float64 and their
bit-exact rules; under the ``gpu`` marker the CUDA kernels against their references and every backend
x basis x operator x estimator on CUDA against float64 CPU references (the same comparison code runs
on the CPU without the marker)."""
from __future__ import annotations

import copy
import functools
import os

import numpy as np
import pytest
import torch
from torch import nn

import sharpscope as ss
from conftest import Dense, make_data, make_mlp, with_spectrum
from sharpscope.lanczos.backends import reference, resolve_backend
from sharpscope.lanczos.backends.bf16 import bf16_bits_to_float32, float32_to_bf16_bits


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
    # a bfloat16 basis certifies explicit residuals of the vectors it returns (tests/test_basis_bf16.py), which
    # can stay short of tol 1e-6 where a pair sits at the edge of a dense bulk: the 4th of "diagonal" (1.0, next
    # 0.9967); before, it reported every pair converged while the returned vectors' residuals were ~2e-3
    assert res.all_converged or (basis == "device-bf16" and name == "diagonal" and res.converged[:3].all())
    assert res.eigenvectors.shape == ref.eigenvectors.shape and res.eigenvectors.dtype == torch.float32
    if isinstance(op, Dense):  # true residuals of the returned vectors, also from a bfloat16 basis
        V = res.eigenvectors
        true = (op.A @ V - V * res.eigenvalues.float()).norm(dim=0) / res.eigenvalues.abs().max()
        assert true.max() <= 1e-4


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

def _gpu_unavailable(reason: str):
    """Skip with the reason (one line), or fail where a GPU is required (scripts/gpu_check.sh sets
    SHARPSCOPE_GPU_REQUIRED=1 on a GPU machine, where a skipped GPU test would hide a failure)."""
    if os.environ.get("SHARPSCOPE_GPU_REQUIRED") == "1":
        pytest.fail(f"SHARPSCOPE_GPU_REQUIRED=1 but {reason}")
    pytest.skip(reason)


def _cupy_or_skip():
    from sharpscope.lanczos.backends import cupy_status

    if not torch.cuda.is_available():
        _gpu_unavailable("torch sees no CUDA device")
    missing = cupy_status()
    if missing is not None:
        _gpu_unavailable(missing)
    import cupy

    return cupy


@pytest.mark.gpu
@pytest.mark.parametrize("storage", ["float32", "bf16"])
@pytest.mark.parametrize("rows,n", [(1, 1), (3, 1000), (61, 100_003), (130, 4099), (200, 1031)])
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
    h2_ref, sq_ref = reference.update_project(Q, w.copy(), h)
    for staged in (None, True, False):  # automatic (tile in shared memory up to 93/185 rows), forced
        w_dev = wd.copy()
        h2, sq = K.update_project(Qd, w_dev, hd, staged=staged)
        np.testing.assert_allclose(w_dev.get(), w_ref, **tol)
        np.testing.assert_allclose(h2.get(), h2_ref, **tol)
        assert float(sq) == pytest.approx(float(sq_ref), rel=1e-4)
    out = cp.empty(n, dtype=Q.dtype)
    out[...] = 0xFFFF if storage == "bf16" else np.nan  # poisoned
    K.scale_store(wd, 0.25, out)
    ref_out = np.empty(n, dtype=Q.dtype)
    reference.scale_store(w, 0.25, ref_out)
    np.testing.assert_array_equal(out.get().view(np.uint16 if storage == "bf16" else np.uint32),
                                  ref_out.view(np.uint16 if storage == "bf16" else np.uint32))


@pytest.mark.gpu
def test_the_kernels_load_and_store_the_h200_special_values_bit_for_bit():
    cp = _cupy_or_skip()
    from sharpscope.lanczos.backends.kernels import load_kernels
    from sharpscope.lanczos.backends.selfcheck import H200_INPUTS, H200_REFERENCE, check_scale_store

    K = load_kernels()  # the full load-time check has passed
    out = cp.full(H200_INPUTS.size, 0xFFFF, dtype=cp.uint16)
    K.scale_store(cp.asarray(H200_INPUTS), 1.0, out)
    assert out.get().tolist() == H200_REFERENCE
    check_scale_store(K, cp, np.random.default_rng(0).standard_normal(100_003).astype(np.float32))
    with pytest.raises(TypeError, match="float32 basis or bfloat16 bits"):
        K.project(cp.zeros((2, 3), dtype=cp.float64), cp.zeros(3, dtype=cp.float32))


def test_the_cupy_backend_is_refused_with_a_one_line_reason_without_cuda():
    from sharpscope.lanczos.backends import cupy_status

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    reason = cupy_status("cuda")
    assert reason is not None and "\n" not in reason


# -- every backend x basis x operator x estimator against float64 CPU references -------------------
# The estimators other than Lanczos (Hutchinson, Hutch++, SLQ) do not use the Krylov-basis backends:
# they run per operator and device. On the CPU the same comparisons run with the torch and numpy
# backends (numpy is the array code path of the cupy backend).

GRID_OPERATORS = ("hessian", "ggn", "ntk", "preconditioned")
CE = nn.CrossEntropyLoss()
GPU = pytest.mark.gpu
DEVICE_BACKENDS = [pytest.param("cuda", "torch", marks=GPU, id="cuda-torch"),
                   pytest.param("cuda", "cupy", marks=GPU, id="cuda-cupy"),
                   pytest.param("cpu", "torch", id="cpu-torch"), pytest.param("cpu", "numpy", id="cpu-numpy")]
DEVICES = [pytest.param("cuda", marks=GPU, id="cuda"), pytest.param("cpu", id="cpu")]


def _need_device(device: str, backend: str = "torch") -> None:
    if device == "cuda":
        if not torch.cuda.is_available():
            _gpu_unavailable("torch sees no CUDA device")
        if backend == "cupy":
            _cupy_or_skip()


@functools.lru_cache(maxsize=None)
def _grid_reference(kind: str):
    """``(model, data, optimizer-derived d_sqrt or None, float64 CPU operator, its dense matrix)``."""
    model, (x, y) = make_mlp(5), make_data("mlp", 5)
    if kind == "preconditioned":
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        for _ in range(3):
            opt.zero_grad()
            CE(model(x), y).backward()
            opt.step()
        ref = ss.preconditioned_hessian_operator(model, CE, (x, y), opt)
    elif kind == "ntk":
        ref = ss.ntk_operator(model, x)
    else:
        ref = (ss.hessian_operator if kind == "hessian" else ss.ggn_operator)(model, CE, (x, y))
    return model, (x, y), ref, ref.to_dense()


def _grid_operator(kind: str, device: str):
    """The float32 operator on ``device`` of the same curvature as :func:`_grid_reference`'s."""
    model64, (x, y), ref, _ = _grid_reference(kind)
    model = copy.deepcopy(model64).float().to(device)
    x, y = x.float().to(device), y.to(device)
    if kind == "ntk":
        return ss.ntk_operator(model, x)
    if kind == "ggn":
        return ss.ggn_operator(model, CE, (x, y))
    H = ss.hessian_operator(model, CE, (x, y))
    if kind == "hessian":
        return H
    return ss.PreconditionedOperator(H, ref.d_sqrt.float().to(device), ref.threshold)


def check_lanczos_against_dense(op, dense: torch.Tensor, backend: str, basis: str, k: int = 3) -> float:
    """Top-``k`` eigenvalues of ``op`` by ``lanczos`` against ``eigvalsh`` of the float64 dense matrix;
    returns the relative error (and checks convergence and the eigenvectors' device)."""
    res = ss.lanczos(op, k=k, backend=backend, basis=basis, return_eigenvectors=True)
    want = np.sort(np.linalg.eigvalsh(dense.numpy()))[::-1][:k]
    got = res.eigenvalues.double().cpu().numpy()
    assert res.all_converged, (backend, basis, res)
    assert res.eigenvectors.device.type == op.device.type
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize("kind", GRID_OPERATORS)
@pytest.mark.parametrize("basis", ["device", "device-bf16", "host"])
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_lanczos_grid_against_float64_cpu(device, backend, basis, kind):
    _need_device(device, backend)
    _, _, _, dense = _grid_reference(kind)
    rel = check_lanczos_against_dense(_grid_operator(kind, device), dense, backend, basis)
    assert rel <= (1e-3 if basis == "device-bf16" else 1e-4), rel


@pytest.mark.parametrize("kind", GRID_OPERATORS)
@pytest.mark.parametrize("estimator", ["hutchinson", "hutch++", "slq"])
@pytest.mark.parametrize("device", DEVICES)
def test_estimator_grid_against_float64_cpu(device, estimator, kind):
    """The same estimator (same seed, so the same probes) on the float32 operator on ``device`` and on
    the float64 CPU operator."""
    _need_device(device)
    _, _, ref, dense = _grid_reference(kind)
    op = _grid_operator(kind, device)
    scale = float(np.abs(np.linalg.eigvalsh(dense.numpy())).sum())  # bounds every |trace|
    if estimator == "hutchinson":
        got, want = ss.hutchinson_trace(op, 20), ss.hutchinson_trace(ref, 20)
        np.testing.assert_allclose(got.samples, want.samples, rtol=1e-4, atol=1e-5 * scale)
    elif estimator == "hutch++":
        got, want = ss.hutchpp_trace(op, 30), ss.hutchpp_trace(ref, 30)
        assert abs(got.estimate - want.estimate) <= 1e-4 * scale, (got, want)
    else:
        got, want = ss.spectral_density(op, 2, 12), ss.spectral_density(ref, 2, 12)
        for power in (1, 2, 3):  # exact moments of the quadrature (power < 2 x steps)
            norm = float(np.abs(np.linalg.eigvalsh(dense.numpy())).max()) ** power
            assert abs(got.moment(power) - want.moment(power)) <= 1e-4 * norm, power
    assert got.num_matvecs == want.num_matvecs


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
    with pytest.raises(KernelMismatch, match="rounds special values unlike the reference"):
        check_kernels(WrongRounding())


# -- the bit-exact scaled store (the H200 case) -------------------------------------------------------

class _H200ScaleStore:
    """The scale_store kernel of the H200 run (2026-11-28) emulated on the CPU: the product in float32
    flushed to zero (CuPy's -ftz=true), the GPU's canonical NaN 0x7FFFFFFF, the old NaN encoding
    ``(bits >> 16) | 0x40``; every other operation is the reference's."""

    def __getattr__(self, name):
        return getattr(reference, name)

    def scale_store(self, w, scale, out, out_f32=None):
        with np.errstate(all="ignore"):
            q = (w * np.float32(scale)).astype(np.float32)
        bits = q.view(np.uint32).copy()
        bits[np.isnan(q)] = 0x7FFFFFFF
        sub = (bits & 0x7F800000) == 0
        bits[sub] &= np.uint32(0x80000000)
        if out.dtype != np.uint16:
            out[...] = bits.view(np.float32)
            return
        nan = (bits & 0x7FFFFFFF) > 0x7F800000
        enc = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
        enc[nan] = ((bits[nan] >> 16) | 0x40).astype(np.uint16)
        out[...] = enc
        if out_f32 is not None:
            out_f32[...] = bits.view(np.float32)


def test_the_h200_special_values_reference_is_pinned_and_the_h200_kernel_is_rejected():
    from sharpscope.lanczos.backends.selfcheck import H200_INPUTS, KernelMismatch, check_kernels

    inputs = np.array([np.inf, -np.inf, np.nan, -np.nan, np.finfo(np.float32).max, 1 + 2 ** -8, 1 + 3 * 2 ** -8,
                       1e-40, -1e-40, 0.0, -0.0], dtype=np.float32)
    np.testing.assert_array_equal(inputs.view(np.uint32), H200_INPUTS.view(np.uint32))
    out = np.full(inputs.size, 0xFFFF, dtype=np.uint16)
    reference.scale_store(inputs, 1.0, out)
    # NaNs keep their sign as the quiet NaN 0x7FC0 | sign, +-1e-40 (subnormal) round to +-1 ulp of bfloat16
    assert out.tolist() == [32640, 65408, 32704, 65472, 32640, 16256, 16258, 1, 32769, 0, 32768]
    with pytest.raises(KernelMismatch) as caught:  # the H200 log's message, word for word
        check_kernels(_H200ScaleStore())
    assert str(caught.value) == (
        "kernel scale_store (bfloat16) rounds special values unlike the reference: "
        "[32640, 65408, 32767, 32767, 32640, 16256, 16258, 0, 32768, 0, 32768] vs "
        "[32640, 65408, 32704, 65472, 32640, 16256, 16258, 1, 32769, 0, 32768]")


def test_a_kernel_that_differs_only_past_the_h200_values_is_caught_bit_for_bit():
    from sharpscope.lanczos.backends.selfcheck import KernelMismatch, check_scale_store

    class PayloadNaN:  # right on the H200 inputs, but keeps a NaN's payload in the float32 row
        def scale_store(self, w, scale, out, out_f32=None):
            reference.scale_store(w, scale, out, out_f32)
            if out.dtype == np.float32:
                bits = out.view(np.uint32)
                keep = np.isnan(w) & np.isnan(out)
                bits[keep] = w.view(np.uint32)[keep]

    with pytest.raises(KernelMismatch, match=r"scale_store \(float32\) differs from its reference bit for bit"):
        check_scale_store(PayloadNaN())
    check_scale_store(reference, np, np.random.default_rng(3).standard_normal(1000).astype(np.float32))


def test_the_scaled_store_rules_against_independent_oracles():
    from sharpscope.lanczos.backends.bf16 import scale_bits
    from sharpscope.lanczos.backends.selfcheck import SPECIAL_BITS, SPECIAL_SCALES

    rng = np.random.default_rng(4)
    x = np.concatenate([SPECIAL_BITS, rng.integers(0, 2 ** 32, 20000, dtype=np.uint64).astype(np.uint32),
                        rng.integers(0, 2 ** 24, 5000, dtype=np.uint32)]).view(np.float32)  # + subnormals
    for scale in SPECIAL_SCALES:
        bits = scale_bits(x, scale)
        with np.errstate(all="ignore"):  # the exact product in float64, rounded once to float32
            exact = (x.astype(np.float64) * float(np.float32(scale))).astype(np.float32)
        nan = np.isnan(exact)
        np.testing.assert_array_equal(bits[~nan], exact.view(np.uint32)[~nan])
        sign = (x.view(np.uint32) ^ np.array(np.float32(scale)).view(np.uint32)) & np.uint32(0x80000000)
        np.testing.assert_array_equal(bits[nan], sign[nan] | np.uint32(0x7FC00000))
        q = bits.view(np.float32)
        ours = float32_to_bf16_bits(q)
        theirs = torch.from_numpy(q.copy()).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        np.testing.assert_array_equal(ours[~nan], theirs[~nan])  # torch: integer round-to-nearest-even
        np.testing.assert_array_equal(ours[nan], (sign[nan] >> 16).astype(np.uint16) | np.uint16(0x7FC0))


def test_auto_keeps_torch_unless_the_device_is_listed_and_cuda_versions_must_match(monkeypatch):
    from sharpscope.lanczos import backends
    from sharpscope.lanczos.backends import auto_prefers_cupy, cuda_version_mismatch, one_line

    assert backends.AUTO_CUPY_DEVICES == ()  # no measurement has shown the kernels winning yet
    assert not auto_prefers_cupy("NVIDIA H200")
    assert auto_prefers_cupy("NVIDIA H200", ("h200",)) and not auto_prefers_cupy("NVIDIA A100", ("H200",))
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert cuda_version_mismatch("13.0", 13000) is None and cuda_version_mismatch("12.8", 12040) is None
    assert cuda_version_mismatch(None, 12000) is None  # a CPU build of torch
    reason = cuda_version_mismatch("13.0", 12090)
    assert reason == ("CuPy's CUDA 12.9 does not match torch's CUDA 13.0; install the CuPy wheel for CUDA 13: "
                      "pip install -e .[cupy-cuda13]")
    assert cuda_version_mismatch("12.4", 13000).endswith("[cupy-cuda12]")
    assert one_line(RuntimeError("nvrtc: error\nline 2\nline 3")) == "RuntimeError: nvrtc: error [+2 more lines]"


@pytest.mark.gpu
def test_auto_on_cuda_is_torch_until_the_device_is_listed(monkeypatch):
    _cupy_or_skip()
    from sharpscope.lanczos import backends

    assert resolve_backend("auto", torch.device("cuda")) == "torch"
    monkeypatch.setattr(backends, "AUTO_CUPY_DEVICES", (torch.cuda.get_device_name(),))
    assert resolve_backend("auto", torch.device("cuda")) == "cupy"


@pytest.mark.gpu
@pytest.mark.parametrize("basis,rtol", [("device", 1e-5), ("device-bf16", 1e-3), ("host", 1e-5)])
def test_cupy_backend_matches_torch_through_restarts(basis, rtol):
    _cupy_or_skip()
    op = Dense(_with_spectrum(TOP, seed=1).A.cuda())
    ref = ss.lanczos(op, k=4, max_basis=10)
    res = ss.lanczos(op, k=4, max_basis=10, backend="cupy", basis=basis, return_eigenvectors=True)
    rel = ((res.eigenvalues - ref.eigenvalues).abs() / ref.eigenvalues.abs().max()).max().item()
    assert rel <= rtol and res.all_converged and res.eigenvectors.device.type == "cuda"


def test_a_bf16_basis_that_loses_orthogonality_is_solved_again_in_float32(monkeypatch):
    # rank 3 with a repeated eigenvalue, k=5 and a tiny basis: exhausted Krylov spaces between thick
    # restarts, where the rounded kept Ritz vectors lost orthogonality (found in review). Now the kept wanted
    # vectors stay float32 (backends.base.float_head_rows) and partial reorthogonalization starts omega at the
    # rounded rows' level (state.ROUNDED_ORTHOGONALITY), which keep this case orthogonal (test_basis_bf16.py);
    # without both the fallback must still catch it
    from sharpscope.lanczos import solver, state

    monkeypatch.setattr(state, "ROUNDED_ORTHOGONALITY", 0.0)
    monkeypatch.setattr(solver, "float_head_rows", lambda basis, k: 0)
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
