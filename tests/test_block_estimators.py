"""Hutchinson, Hutch++ and SLQ with their probes in blocks (through op.matmat) give the estimates of one
probe at a time (the algorithms of earlier versions, written out below) for the same seed, up to
floating-point rounding: the same Rademacher probes in the same order, only the summation order differs."""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

import sharpscope as ss
from conftest import MODELS, make_data, with_spectrum

CE = nn.CrossEntropyLoss()


# -- the one-probe-at-a-time algorithms (sharpscope 0.x before block estimators) ----------------
def _probe(n, gen, op):
    z = torch.randint(0, 2, (1, n), generator=gen, dtype=torch.int8)
    return (2 * z - 1).to(dtype=op.dtype, device=op.device)[0]


def hutchinson_one_at_a_time(op, num_probes, seed):
    gen = torch.Generator().manual_seed(seed)
    samples = np.array([float(torch.dot(z, op.matvec(z))) for z in (_probe(op.shape[0], gen, op)
                                                                      for _ in range(num_probes))])
    return samples.mean(), samples


def hutchpp_one_at_a_time(op, num_matvecs, seed):
    n, third = op.shape[0], num_matvecs // 3
    gen = torch.Generator().manual_seed(seed)
    z = torch.randint(0, 2, (third, n), generator=gen, dtype=torch.int8)
    S = (2 * z - 1).to(op.dtype).T
    Qs, _ = torch.linalg.qr(torch.stack([op.matvec(S[:, i]) for i in range(third)], 1))
    exact = float(torch.trace(Qs.T @ torch.stack([op.matvec(Qs[:, i]) for i in range(third)], 1)))
    z = torch.randint(0, 2, (third, n), generator=gen, dtype=torch.int8)
    G = (2 * z - 1).to(op.dtype).T
    G = G - Qs @ (Qs.T @ G)
    samples = np.array([float(torch.dot(G[:, i], op.matvec(G[:, i]))) for i in range(third)])
    return exact + samples.mean(), samples


def slq_one_at_a_time(op, num_probes, num_steps, seed):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num_probes):
        alpha, beta = ss.estimators.lanczos_tridiagonal(op, _probe(op.shape[0], gen, op), num_steps)
        theta, S = scipy.linalg.eigh_tridiagonal(alpha, beta)
        out.append((theta, S[0, :] ** 2))
    return out


def _hessian(model_kind="cnn", batched=None):
    model, (x, y) = MODELS[model_kind](0), make_data(model_kind, 0)
    return ss.hessian_operator(model, CE, (x, y), batched=batched)


@pytest.mark.parametrize("batched", [True, False, None])
@pytest.mark.parametrize("block_size", [None, 1, 7])
def test_hutchinson_in_blocks_is_the_one_probe_estimate(batched, block_size):
    op = _hessian(batched=batched)
    ref, ref_samples = hutchinson_one_at_a_time(_hessian(batched=False), 40, seed=3)
    before = op.num_matvecs
    est = ss.hutchinson_trace(op, 40, seed=3, block_size=block_size)
    assert est.num_matvecs == op.num_matvecs - before == 40
    np.testing.assert_allclose(est.samples, ref_samples, rtol=1e-12, atol=1e-12 * np.abs(ref_samples).max())
    assert est.estimate == pytest.approx(ref, rel=1e-12, abs=1e-12 * np.abs(ref_samples).max())
    assert est.stderr == pytest.approx(ref_samples.std(ddof=1) / math.sqrt(40), rel=1e-10)


@pytest.mark.parametrize("batched", [True, False])
def test_hutchpp_in_blocks_is_the_one_probe_estimate(batched):
    op = _hessian("mlp", batched=batched)
    ref, ref_samples = hutchpp_one_at_a_time(_hessian("mlp", batched=False), 99, seed=2)
    est = ss.hutchpp_trace(op, 99, seed=2)
    assert est.num_matvecs == op.num_matvecs == 99
    np.testing.assert_allclose(est.samples, ref_samples, rtol=1e-9, atol=1e-10 * np.abs(ref_samples).max())
    assert est.estimate == pytest.approx(ref, rel=1e-10)


@pytest.mark.parametrize("block_size", [None, 1, 3])
def test_slq_in_lockstep_is_the_one_probe_quadrature(block_size):
    op = _hessian("attention", batched=True)
    ref = slq_one_at_a_time(_hessian("attention", batched=False), 5, 12, seed=4)
    dens = ss.spectral_density(op, num_probes=5, num_steps=12, seed=4, block_size=block_size)
    assert dens.num_matvecs == op.num_matvecs == 60
    for (theta, w), nodes, weights in zip(ref, dens.nodes, dens.weights):
        np.testing.assert_allclose(nodes, theta, rtol=0, atol=1e-9 * np.abs(theta).max())
        np.testing.assert_allclose(weights, w, rtol=0, atol=1e-9)


def test_slq_probes_whose_krylov_space_is_exhausted_stop_alone():
    """A = I + 4 u u^T, u = (e_1 - e_2) / sqrt(2): a probe with z_1 = z_2 is an eigenvector (its Krylov space
    is exhausted after 1 step), the others after 2; each stops where it stops one at a time, the others
    going on in a narrower block."""
    n = 50
    u = torch.zeros(n, dtype=torch.float64)
    u[0], u[1] = 2 ** -0.5, -(2 ** -0.5)
    A = torch.eye(n, dtype=torch.float64) + 4 * torch.outer(u, u)
    op = ss.as_operator(A)
    widths = []
    mm = op.matmat
    op.matmat = lambda V: widths.append(V.shape[1]) or mm(V)
    dens = ss.spectral_density(op, num_probes=8, num_steps=5, seed=1)
    ref = slq_one_at_a_time(ss.as_operator(A), 8, 5, seed=1)
    lengths = [len(theta) for theta, _ in ref]
    assert sorted(set(lengths)) == [1, 2]  # both kinds of probe among the 8
    assert widths == [8, lengths.count(2)] and dens.num_matvecs == sum(lengths)
    for (theta, w), nodes, weights in zip(ref, dens.nodes, dens.weights):
        np.testing.assert_allclose(nodes, theta, atol=1e-12)
        np.testing.assert_allclose(weights, w, atol=1e-12)


def test_probes_go_through_matmat_in_blocks():
    op = with_spectrum(np.linspace(0, 1, 60), seed=2)
    widths = []
    mm = op.matmat
    op.matmat = lambda V: widths.append(V.shape[1]) or mm(V)
    ss.hutchinson_trace(op, 70, block_size=32)
    assert widths == [32, 32, 6]
    widths.clear()
    ss.hutchpp_trace(op, 30)
    assert widths == [10, 10, 10]
    widths.clear()
    ss.spectral_density(op, num_probes=5, num_steps=4, block_size=2)
    assert widths == [2] * 4 + [2] * 4 + [1] * 4


@pytest.mark.parametrize("bad", [0, -1, 2.5])
def test_bad_block_size(bad):
    op = with_spectrum(np.linspace(0, 1, 20), seed=2)
    with pytest.raises(ValueError, match="block_size must be a positive integer"):
        ss.hutchinson_trace(op, 10, block_size=bad)
    with pytest.raises(ValueError, match="block_size must be a positive integer"):
        ss.spectral_density(op, 2, 4, block_size=bad)
