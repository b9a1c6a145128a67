"""The Krylov basis sized to the question (issue 24): the default follows k, ``max_memory=`` sizes it from bytes, and
results report the basis's size and bytes; against dense float64 eigendecompositions."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import sharpscope as ss
import sharpscope._memory as memory
from conftest import MODELS, check_top_k, make_data, with_spectrum

N = 400
SPECTRUM = [10.0, 9.0, 8.5, 8.0, 7.0] + [5.0 * (1 - i / N) for i in range(N - 5)]


def _op(dtype=torch.float64):
    op = with_spectrum(SPECTRUM, seed=3, dtype=dtype)
    return op, op.A.double()


@pytest.mark.parametrize("k", [1, 3, 10])
def test_the_default_basis_follows_k_and_reports_its_bytes(k):
    op, dense = _op()
    res = ss.lanczos(op, k=k, tol=1e-8)
    check_top_k(res, dense, k, 1e-10)
    assert res.basis_size == 2 * k + 8
    assert res.basis_bytes == (2 * k + 9) * N * 8  # rows 0..max_basis of n float64 entries


def test_the_default_basis_costs_few_products_for_several_fold_less_memory():
    # the bound on the test models: products within ~15% of the old default max(2k + 20, 60)
    model, data = MODELS["cnn"](0), make_data("cnn", 0)
    H = ss.hessian_operator(model, nn.CrossEntropyLoss(), data)
    old_mv = new_mv = 0
    for k in (1, 2, 5, 10):
        old = ss.lanczos(H, k=k, tol=1e-6, max_basis=max(2 * k + 20, 60))
        new = ss.lanczos(H, k=k, tol=1e-6)
        assert old.all_converged and new.all_converged
        assert (new.eigenvalues - old.eigenvalues).abs().max() <= 1e-9 * old.eigenvalues.abs().max()
        assert new.num_matvecs <= 1.2 * old.num_matvecs, (k, new.num_matvecs, old.num_matvecs)
        assert old.basis_bytes >= 2 * new.basis_bytes
        old_mv, new_mv = old_mv + old.num_matvecs, new_mv + new.num_matvecs
    assert new_mv <= 1.15 * old_mv, (new_mv, old_mv)


def test_max_memory_in_bytes_sets_the_basis():
    op, dense = _op()
    row = N * 8
    res = ss.lanczos(op, k=3, tol=1e-8, max_memory=12 * row + row // 2)
    assert res.basis_size == 11  # 12 rows fit: max_basis + 1 of them
    assert res.basis_bytes == 12 * row
    assert res.num_restarts > 0
    check_top_k(res, dense, 3, 1e-10)


def test_max_memory_as_a_fraction_of_the_free_memory(monkeypatch):
    op, dense = _op()
    row = N * 8
    monkeypatch.setattr(memory, "_host_available", lambda: 24 * row)
    res = ss.lanczos(op, k=3, tol=1e-8, max_memory=0.5)
    assert res.basis_size == 11 and res.basis_bytes == 12 * row
    check_top_k(res, dense, 3, 1e-10)


@pytest.mark.parametrize("basis, row, fixed", [("device-bf16", N * 2, 2 * N * 4 + 2 * N * 2), ("host", N * 4, 0)])
def test_max_memory_counts_the_storage_of_the_basis(basis, row, fixed):
    # bfloat16 rows are 2 bytes an entry plus two float32 working vectors, and the first k rows (the kept wanted
    # Ritz vectors) 4 bytes an entry; a host basis of a CPU operator keeps no working copies. tol 1e-2: the
    # bfloat16 certificate then needs no refinement step, whose vectors (up to 11 k) could outgrow the basis
    op, dense = _op(torch.float32)
    budget = fixed + 16 * row
    res = ss.lanczos(op, k=2, tol=1e-2, basis=basis, max_memory=budget)
    assert res.basis_size == 15 and res.basis_bytes == budget
    check_top_k(res, dense, 2, 1e-4)


def test_max_memory_never_exceeds_the_products():
    op, _ = _op()
    res = ss.lanczos(op, k=2, tol=1e-6, max_memory=1 << 40, max_matvecs=50)
    assert res.basis_size == 50


def test_a_basis_too_small_for_k_is_one_line_naming_the_fix():
    op, _ = _op()
    with pytest.raises(ValueError, match=r"max_memory=16000 bytes holds 4 basis vectors .* give at least 25600 bytes"
                                         r", or basis='device-bf16'") as err:
        ss.lanczos(op, k=5, max_memory=16000)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("bad", [0, -5, 1.5, 0.0, "1G", True])
def test_bad_max_memory_is_one_line(bad):
    op, _ = _op()
    with pytest.raises(ValueError, match="max_memory") as err:
        ss.lanczos(op, k=2, max_memory=bad)
    assert "\n" not in str(err.value)


def test_max_basis_and_max_memory_together_are_refused():
    op, _ = _op()
    with pytest.raises(ValueError, match="give max_basis .* or max_memory .*, not both"):
        ss.lanczos(op, k=2, max_basis=10, max_memory=1 << 20)


def test_block_mode_reports_its_basis():
    op, dense = _op()
    res = ss.lanczos(op, k=3, tol=1e-8, block_size=2)
    check_top_k(res, dense, 3, 1e-10)
    assert res.basis_size == 2 * 3 + 8
    assert res.basis_bytes >= (res.basis_size + 2) * N * 8


def test_a_bfloat16_basis_takes_the_default_sized_to_k():
    # it kept max(2k + 20, 60) while its thick restarts stored rounded Ritz vectors; since they keep the wanted
    # ones in float32 rows and certify explicit residuals (tests/test_basis_bf16.py) it takes 2k + 8 and restarts
    op, dense = _op(torch.float32)
    res = ss.lanczos(op, k=2, tol=1e-4, basis="device-bf16")
    assert res.basis_size == 2 * 2 + 8 and res.num_restarts > 0 and res.all_converged
    check_top_k(res, dense, 2, 1e-4)
