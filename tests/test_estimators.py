"""The estimators (Hutchinson and Hutch++ traces, SLQ spectral density) against dense float64 traces and
moments, and exact Gauss quadrature per probe."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import sharpscope as ss
from conftest import operator_and_dense, with_spectrum


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_trace_estimators_within_three_standard_errors(model_kind, seed):
    op, dense = operator_and_dense("hessian", model_kind, seed)
    exact = torch.trace(dense).item()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        hutch = ss.hutchinson_trace(op, num_probes=100, seed=seed)
        plus = ss.hutchpp_trace(op, num_matvecs=99, seed=seed)
    assert abs(hutch.estimate - exact) <= 3 * hutch.stderr, (hutch.estimate, hutch.stderr, exact)
    assert abs(plus.estimate - exact) <= 3 * plus.stderr + 1e-12, (plus.estimate, plus.stderr, exact)
    assert hutch.num_matvecs == 100 and plus.num_matvecs == 99


def test_hutchpp_beats_hutchinson_on_a_decaying_spectrum():
    eigs = [50.0 / (i + 1) ** 2 for i in range(300)]
    op = with_spectrum(eigs, seed=8)
    err = lambda f: np.mean([abs(f(s).estimate - sum(eigs)) for s in range(10)])  # noqa: E731
    assert err(lambda s: ss.hutchpp_trace(op, 60, seed=s)) < 0.5 * err(lambda s: ss.hutchinson_trace(op, 60, seed=s))


def test_slq_quadrature_is_exact_per_probe():
    """Gauss quadrature from m Lanczos steps integrates degree <= 2m - 1 exactly: for each probe z,
    sum_i tau_i^2 theta_i^p = z^T A^p z / z^T z (p = 1, 2, 3 with m = 4 steps)."""
    op, dense = operator_and_dense("hessian", "mlp", 4)
    dens = ss.spectral_density(op, num_probes=3, num_steps=4, seed=5)
    gen = torch.Generator().manual_seed(5)
    for nodes, weights in zip(dens.nodes, dens.weights):
        z = (2 * torch.randint(0, 2, (1, op.shape[0]), generator=gen, dtype=torch.int8) - 1).double()[0]
        for power in (1, 2, 3):
            exact = (z @ torch.linalg.matrix_power(dense, power) @ z / (z @ z)).item()
            assert np.sum(weights * nodes ** power) == pytest.approx(exact, rel=1e-9, abs=1e-14)


@pytest.mark.parametrize("kind", ["ggn", "hessian"])
def test_spectral_density_moments(model_kind, kind):
    """First two moments tr(A)/n and tr(A^2)/n: within 5% for the (PSD) GGN; for the indefinite Hessian at
    init tr(H) is small against ||H||_F, so the Monte-Carlo error is judged against 3 standard errors."""
    op, dense = operator_and_dense(kind, model_kind, 4)
    n = dense.shape[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        dens = ss.spectral_density(op, num_probes=100, num_steps=12, seed=0)
    assert dens.num_matvecs == 100 * 12
    for power in (1, 2):
        exact = torch.trace(torch.linalg.matrix_power(dense, power)).item() / n
        per_probe = np.array([np.sum(w * t ** power) for t, w in zip(dens.nodes, dens.weights)])
        stderr = per_probe.std(ddof=1) / np.sqrt(len(per_probe))
        if kind == "ggn" and model_kind != "attention":
            assert dens.moment(power) == pytest.approx(exact, rel=0.05)
        assert abs(dens.moment(power) - exact) <= 3 * stderr
    grid = np.linspace(-1, 1, 4001) * (np.abs(np.concatenate(dens.nodes)).max() * 1.5)
    mass = np.trapezoid(dens.pdf(grid), grid)
    assert mass == pytest.approx(1.0, abs=1e-3)
    assert all(abs(w.sum() - 1) < 1e-8 for w in dens.weights)


def test_spectral_density_nodes_cover_extremes():
    eigs = np.linspace(-1, 4, 200)
    dens = ss.spectral_density(with_spectrum(eigs, seed=9), num_probes=3, num_steps=40)
    nodes = np.concatenate(dens.nodes)
    assert nodes.max() == pytest.approx(4.0, abs=1e-4) and nodes.min() == pytest.approx(-1.0, abs=1e-4)
