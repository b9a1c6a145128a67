"""Lanczos (top-k, restarts, multiplicities, host synchronizations, Ritz schedule, reorthogonalization) against dense float64 eigendecompositions."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import sharpscope as ss
from conftest import check_top_k, make_data, make_mlp, operator_and_dense, with_spectrum

CE = nn.CrossEntropyLoss()


@pytest.mark.parametrize("kind", ["hessian", "ggn", "ntk"])
@pytest.mark.parametrize("seed", [0, 1])
def test_top_k_float64_and_eigenvectors(model_kind, kind, seed):
    op, dense = operator_and_dense(kind, model_kind, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = ss.lanczos(op, k=10, return_eigenvectors=True, seed=seed)
    check_top_k(res, dense, 10, 1e-6)
    evals, evecs = torch.linalg.eigh(dense)
    evals, evecs = evals.flip(0), evecs.flip(1)
    gaps = torch.cat([evals[:1] - evals[1:2], torch.minimum(evals[:-2] - evals[1:-1], evals[1:-1] - evals[2:])])[:10]
    for i in range(10):
        if gaps[i] > 1e-3 * evals[0].abs():  # eigenvectors are defined only for separated eigenvalues
            cos = torch.dot(res.eigenvectors[:, i], evecs[:, i]).abs().item()
            assert cos >= 1 - 1e-6, f"eigenvector {i}: |cos| = {cos}"


@pytest.mark.parametrize("kind", ["hessian", "ggn", "ntk"])
def test_top_k_float32(model_kind, kind):
    op, dense = operator_and_dense(kind, model_kind, 3, dtype=torch.float32)
    assert op.dtype == torch.float32
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = ss.lanczos(op, k=10, tol=1e-4)
    ref = torch.linalg.eigvalsh(dense).flip(0)[:10]
    rel = ((res.eigenvalues - ref).abs() / ref.abs().max()).max().item()
    assert rel <= 1e-4, rel


def test_lanczos_which_and_restarts_on_known_spectrum():
    eigs = np.concatenate([[9.0, 8.5, 8.4, 8.39], np.linspace(-3.0, 2.0, 196)])
    op = with_spectrum(eigs, seed=1)
    la = ss.lanczos(op, k=4, which="LA")
    torch.testing.assert_close(la.eigenvalues, torch.tensor([9.0, 8.5, 8.4, 8.39], dtype=torch.float64))
    sa = ss.lanczos(op, k=3, which="SA")
    torch.testing.assert_close(sa.eigenvalues, torch.as_tensor(np.sort(eigs)[:3]))
    lm = ss.lanczos(with_spectrum([-10.0, 5.0, 1.0, 0.5] + [0.1] * 60, seed=2), k=2, which="LM")
    torch.testing.assert_close(lm.eigenvalues, torch.tensor([-10.0, 5.0], dtype=torch.float64))
    small = ss.lanczos(op, k=4, max_basis=10, return_eigenvectors=True)  # forces thick restarts
    assert small.num_restarts > 0 and small.all_converged
    torch.testing.assert_close(small.eigenvalues, la.eigenvalues, rtol=1e-9, atol=0)
    resid = (op.A @ small.eigenvectors - small.eigenvectors * small.eigenvalues).norm(dim=0)
    assert (resid <= 1e-5 * 9.0).all()


@pytest.mark.parametrize("reorth", ["partial", "full"])
def test_no_ghosts_and_multiplicities_found(reorth):
    """An exhausted Krylov space (here: 3 distinct eigenvalues) continues from a fresh orthogonal vector,
    so a repeated eigenvalue is found with its multiplicity; converged values are never duplicated."""
    eigs = [5.0, 5.0, 5.0, 4.0] + [0.0] * 296
    res = ss.lanczos(with_spectrum(eigs, seed=3), k=5, reorth=reorth)
    torch.testing.assert_close(res.eigenvalues, torch.tensor([5.0, 5.0, 5.0, 4.0, 0.0], dtype=torch.float64),
                               rtol=0, atol=1e-12)
    # a strongly clustered spectrum, long run: ghosts would appear as extra copies of 100.0
    clustered = [100.0] + list(np.linspace(0.0, 1.0, 499))
    res = ss.lanczos(with_spectrum(clustered, seed=4), k=3, tol=1e-10, reorth=reorth)
    torch.testing.assert_close(res.eigenvalues, torch.tensor([100.0, 1.0, clustered[-2]], dtype=torch.float64))


def test_deterministic_for_a_seed_and_warm_start():
    op = with_spectrum(list(np.linspace(0, 1, 150)) + [3.0, 2.0], seed=5)
    a, b = ss.lanczos(op, k=2, seed=7), ss.lanczos(op, k=2, seed=7)
    assert torch.equal(a.eigenvalues, b.eigenvalues) and a.num_matvecs == b.num_matvecs
    top = ss.lanczos(op, k=1, return_eigenvectors=True)
    warm = ss.lanczos(op, k=1, v0=top.eigenvectors[:, 0])
    assert warm.num_matvecs < top.num_matvecs
    torch.testing.assert_close(warm.eigenvalues, top.eigenvalues)


def test_unconverged_is_reported_not_hidden():
    op = with_spectrum(list(np.linspace(0, 1, 400)) + [1.001], seed=6)
    res = ss.lanczos(op, k=3, max_matvecs=8)
    assert res.num_matvecs == 8 and not res.all_converged


@pytest.mark.parametrize("bad", [0, -3, 2.5])
def test_max_matvecs_must_be_positive(bad):
    op = with_spectrum(np.linspace(0, 1, 50), seed=6)
    with pytest.raises(ValueError, match="max_matvecs must be a positive integer"):
        ss.lanczos(op, k=2, max_matvecs=bad)


_SYNCING = ("tolist", "item", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__", "__array__")


def _reads_per_step(monkeypatch, op, **kwargs):
    """Host reads of tensor values between consecutive products of one solve (each is a host
    synchronization on CUDA), per step."""
    events: list[str] = []
    for name in _SYNCING:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kw):
            events.append(_name)
            return _original(self, *args, **kw)

        monkeypatch.setattr(torch.Tensor, name, counted)
    product = op._matvec
    op._matvec = lambda v: (events.append("product"), product(v))[1]
    res = ss.lanczos(op, **kwargs)
    monkeypatch.undo()
    steps = " ".join(events).split("product")
    assert len(steps) == res.num_matvecs + 1 and steps[0].split() == []  # nothing read before the first product
    return res, [len(step.split()) for step in steps[1:]]


def test_one_host_synchronization_per_step(monkeypatch):
    """A step that needs no reorthogonalization reads its scalars (alpha, beta, the symmetry probe) in ONE
    transfer; a partial reorthogonalization adds one (the norms before and after the Gram-Schmidt pass)."""
    op = with_spectrum([2.0, 1.5] + list(np.linspace(0, 1, 298)), seed=3)
    # a basis that never restarts (the default 2k + 8 would; after a restart every step reorthogonalizes)
    res, reads = _reads_per_step(monkeypatch, op, k=1, tol=1e-8, max_basis=60)
    assert res.all_converged and res.num_reorthogonalizations == 0 and res.num_restarts == 0
    assert max(reads) == 1, reads
    op = with_spectrum(np.concatenate([[9.0, 8.5, 8.4, 8.39], np.linspace(-3.0, 2.0, 196)]), seed=1)
    res, reads = _reads_per_step(monkeypatch, op, k=4, max_basis=60)
    assert res.num_reorthogonalizations > 0 and res.num_restarts == 0
    assert reads.count(2) == res.num_reorthogonalizations and max(reads) == 2, reads


@pytest.mark.parametrize("k,tol", [(1, 1e-6), (3, 1e-6), (5, 1e-10)])
def test_ritz_problem_solved_only_when_the_test_can_pass(monkeypatch, k, tol):
    """No Ritz test before k Ritz values exist, then at intervals predicted from the residuals' decay: far
    fewer tests than products, and at most 2 products more than testing after every product."""
    from sharpscope.lanczos.state import CheckSchedule

    op = with_spectrum(list(np.linspace(0, 1, 300)) + [1.3, 1.25, 1.2, 1.19, 1.18], seed=11)
    checks: list[int] = []
    res = ss.lanczos(op, k=k, tol=tol, callback=lambda mv, theta, resid: checks.append(mv))
    assert res.all_converged and checks[0] >= k and checks[-1] == res.num_matvecs
    assert len(checks) < 0.75 * res.num_matvecs
    monkeypatch.setattr(CheckSchedule, "due", lambda self, num_mv, j: j >= self.k)
    every: list[int] = []
    ref = ss.lanczos(op, k=k, tol=tol, callback=lambda mv, theta, resid: every.append(mv))
    assert len(every) == ref.num_matvecs - k + 1
    assert ref.num_matvecs <= res.num_matvecs <= ref.num_matvecs + 2
    torch.testing.assert_close(res.eigenvalues, ref.eigenvalues, rtol=1e-9, atol=0)


def test_bfloat16_model_gets_a_float32_basis():
    model = make_mlp(13).to(torch.bfloat16)
    x, y = make_data("mlp", 13)
    H = ss.hessian_operator(model, CE, (x.to(torch.bfloat16), y))
    assert H.dtype == torch.bfloat16
    res = ss.lanczos(H, k=2, tol=1e-2)
    ref = torch.linalg.eigvalsh(ss.dense_hessian(model.double(), CE, (x, y))).flip(0)[:2]
    assert ((res.eigenvalues - ref).abs() / ref[0]).max() < 0.05  # bf16 products: ~1e-2 accuracy


def test_partial_reorthogonalization_survives_noisy_float32_products():
    """Float32 autograd products of a wide, sharp network carry rounding far above eps * ||A||: the
    omega recurrence must use the measured noise (found by a sweep: SP MLP, width 512, after 10 steps
    of SGD at lr 0.5 on digits; with the textbook eps-level noise term orthogonality was lost)."""
    from sharpscope.data import digits

    torch.manual_seed(0)
    model = ss.MLP(width=512, depth=2, in_features=64, out_features=10, activation="tanh")
    groups = ss.parametrize(model, "sp", optimizer="sgd", lr=0.5, base_width=64)
    opt = ss.build_optimizer(groups)
    x, y = digits()
    for _ in range(10):
        opt.zero_grad()
        CE(model(x), y).backward()
        opt.step()
    H = ss.hessian_operator(model, CE, (x[:512], y[:512]))
    partial = ss.lanczos(H, k=1)
    full = ss.lanczos(H, k=1, reorth="full")
    assert partial.all_converged and partial.num_reorthogonalizations < full.num_reorthogonalizations
    assert partial.eigenvalues[0].item() == pytest.approx(full.eigenvalues[0].item(), rel=1e-5)
