"""Batched products (op.matmat): equal to the products taken one at a time (float64, to 1e-12) for the
Hessian, GGN and NTK in every hvp_mode on the MLP, the CNN with BatchNorm and the attention block; memory
chunks, the measured auto choice, counting, staleness and the fallbacks."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import sharpscope as ss
from conftest import MODELS, make_data

CE = nn.CrossEntropyLoss()


def _operator(kind: str, model_kind: str, seed: int = 0, data=None, **kwargs):
    """An operator on one batch of the test data, or on ``data`` (a list of batches; not the NTK)."""
    model = MODELS[model_kind](seed)
    data = make_data(model_kind, seed) if data is None else data
    if kind == "hessian":
        return ss.hessian_operator(model, CE, data, **kwargs)
    if kind == "ggn":
        return ss.ggn_operator(model, CE, data, **kwargs)
    return ss.ntk_operator(model, data[0], **kwargs)


def _block(op, m: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randn(op.shape[0], m, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _one_at_a_time(op, V):
    return torch.stack([op.matvec(V[:, i]) for i in range(V.shape[1])], dim=1)


@pytest.mark.parametrize("mode", ["reverse", "forward", "cached"])
@pytest.mark.parametrize("kind", ["hessian", "ggn", "ntk"])
def test_batched_equals_one_at_a_time(model_kind, kind, mode):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # attention: the fused SDPA kernel's fallback
        batched = _operator(kind, model_kind, hvp_mode=mode, batched=True)
        looped = _operator(kind, model_kind, hvp_mode=mode, batched=False)
        V = _block(batched)
        ref = _one_at_a_time(looped, V)
        before = batched.num_matvecs
        out = batched.matmat(V)
        loop_out = looped.matmat(V)
    assert batched.num_matvecs - before == V.shape[1]
    assert batched._batched_failed is None and batched.matmat_choice == "batched"  # really batched
    assert batched.hvp_mode == mode
    scale = ref.abs().max()
    assert (out - ref).abs().max() <= 1e-12 * scale
    assert (loop_out - ref).abs().max() <= 1e-12 * scale


@pytest.mark.parametrize("mode", ["reverse", "forward", "cached"])
def test_several_data_batches(mode):
    data = [make_data("cnn", 1, n=6), make_data("cnn", 2, n=10)]
    for kind in ("hessian", "ggn"):
        op = _operator(kind, "cnn", data=data, hvp_mode=mode, batched=True)
        V = _block(op, 4)
        ref = _one_at_a_time(_operator(kind, "cnn", data=data, hvp_mode=mode, batched=False), V)
        assert (op.matmat(V) - ref).abs().max() <= 1e-12 * ref.abs().max()
    model = MODELS["cnn"](0)
    K = ss.ntk_operator(model, [data[0][0], data[1][0]], hvp_mode=mode, batched=True)
    V = _block(K, 4)
    ref = _one_at_a_time(ss.ntk_operator(model, [data[0][0], data[1][0]], hvp_mode=mode, batched=False), V)
    assert (K.matmat(V) - ref).abs().max() <= 1e-12 * ref.abs().max()


def test_chunks_fit_the_memory_budget(monkeypatch):
    H = _operator("hessian", "mlp", hvp_mode="reverse", batched=True)
    widths = []
    original = type(H)._apply_graphs_batched

    def spy(self, graphs, rows):
        widths.append(rows.shape[0])
        return original(self, graphs, rows)

    monkeypatch.setattr(type(H), "_apply_graphs_batched", spy)
    V = _block(H, 9)
    ref = _one_at_a_time(_operator("hessian", "mlp", hvp_mode="reverse", batched=False), V)
    H.matmat(V)  # measures one batch's graph
    per_column = H._column_bytes
    assert per_column > 0
    H.graph_memory_budget = 4 * per_column  # room for 4 columns at a time
    widths.clear()
    out = H.matmat(V)
    assert widths == [4, 4] and (out - ref).abs().max() <= 1e-12 * ref.abs().max()  # the 9th alone, unbatched


def test_reverse_mode_shares_each_graph_across_the_block(monkeypatch):
    data = [make_data("mlp", 1, n=6), make_data("mlp", 2, n=10)]
    for batched in (False, True):
        H = ss.hessian_operator(MODELS["mlp"](0), CE, data, hvp_mode="reverse", batched=batched)
        H.matvec(_block(H, 1)[:, 0])  # the determinism check and the first product
        if batched:
            H._max_columns()
        builds = []
        original = H._build_graph
        monkeypatch.setattr(H, "_build_graph", lambda batch, _o=original: builds.append(1) or _o(batch))
        H.matmat(_block(H, 6))
        assert len(builds) == 2  # one per data batch, not one per column and batch


def test_auto_choice_is_measured_and_every_trial_is_a_real_product():
    op = _operator("hessian", "cnn", hvp_mode="cached")
    assert op.batched is None and op.matmat_choice is None
    V = _block(op, 16)
    ref = _one_at_a_time(_operator("hessian", "cnn", hvp_mode="cached", batched=False), V)
    out = op.matmat(V)  # chunks of 4: batched, one at a time, batched, one at a time
    assert op.matmat_choice in ("batched", "one-at-a-time") and len(op._batch_trials) == 4
    assert [b for b, _ in op._batch_trials] == [True, False, True, False]
    assert (out - ref).abs().max() <= 1e-12 * ref.abs().max()
    assert op.num_matvecs == 16
    forced = _operator("hessian", "cnn", batched=False)
    forced.matmat(V)
    assert forced.matmat_choice == "one-at-a-time" and forced._batch_trials == []


def test_narrow_blocks_are_not_measured_and_reproducible_bitwise():
    """Under batched=None a block of fewer than 8 columns goes one at a time until a wider block has
    measured: the same bits as batched=False, run after run."""
    for kind in ("hessian", "ggn", "ntk"):
        auto, fixed = _operator(kind, "mlp"), _operator(kind, "mlp", batched=False)
        for m in (2, 4, 7):
            V = _block(auto, m, seed=m)
            assert torch.equal(auto.matmat(V), fixed.matmat(V))
        assert auto.matmat_choice is None and auto._batch_trials == []


def test_a_batching_failure_falls_back_to_one_column_at_a_time(monkeypatch):
    def broken(self, graphs, rows):
        raise RuntimeError("Batching rule not implemented for aten::something")

    monkeypatch.setattr(ss.HessianOperator, "_apply_graphs_batched", broken)
    V = _block(_operator("hessian", "mlp"), 4)
    ref = _one_at_a_time(_operator("hessian", "mlp", batched=False), V)
    forced = _operator("hessian", "mlp", hvp_mode="cached", batched=True)
    with pytest.warns(RuntimeWarning, match="batched products unsupported"):
        out = forced.matmat(V)
    assert (out - ref).abs().max() <= 1e-12 * ref.abs().max()
    auto = _operator("hessian", "mlp", hvp_mode="cached")
    V = _block(auto, 8)
    ref = _one_at_a_time(_operator("hessian", "mlp", batched=False), V)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # silent under auto
        assert (auto.matmat(V) - ref).abs().max() <= 1e-12 * ref.abs().max()
    assert auto.matmat_choice == "one-at-a-time" and "Batching rule" in auto._batched_failed


def test_staleness_is_checked_for_blocks():
    model, (x, y) = MODELS["mlp"](0), make_data("mlp", 0)
    H = ss.hessian_operator(model, CE, (x, y), batched=True)
    V = _block(H, 3)
    H.matmat(V)
    with pytest.raises(ss.StaleOperatorError, match="values changed during a solve"):  # and at the block's end
        with H.pinned():
            with torch.no_grad():
                model[0].weight.add_(0.01)
            with pytest.raises(ss.StaleOperatorError, match="changed during a solve"):
                H.matmat(V)
    out = H.matmat(V)  # outside a solve: rebuilt on the model as it is now
    fresh = ss.hessian_operator(model, CE, (x, y), batched=False)
    assert (out - _one_at_a_time(fresh, V)).abs().max() <= 1e-12 * out.abs().max()


def test_wrappers_of_matvec_see_every_product_and_other_operators_loop():
    H = _operator("hessian", "mlp", batched=True)
    seen = []
    original = H._matvec
    H._matvec = lambda v: seen.append(1) or original(v)
    H.matmat(_block(H, 3))
    assert len(seen) == 3  # a replaced _matvec (a counter, an instrument) is not bypassed
    model, (x, y) = MODELS["mlp"](0), make_data("mlp", 0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    P = ss.preconditioned_hessian_operator(model, CE, (x, y), opt, batched=True)
    V = _block(P, 3)
    before = P.base.num_matvecs
    out = P.matmat(V)
    assert P.base.matmat_choice == "batched" and P.base.num_matvecs - before == 3  # one block product of H
    torch.testing.assert_close(out, _one_at_a_time(P, V), rtol=1e-12, atol=0)
    S = 2.0 * _operator("hessian", "mlp", batched=True)
    torch.testing.assert_close(S.matmat(V), 2.0 * _one_at_a_time(_operator("hessian", "mlp"), V), rtol=1e-12, atol=0)


def test_bad_batched_argument():
    with pytest.raises(ValueError, match="batched must be None"):
        _operator("hessian", "mlp", batched="yes")
