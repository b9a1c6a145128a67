"""The determinism check folded into the first product of a solve: where the product's strategy evaluates every
batch at the parameters (cached graphs, reverse mode) its values are the check's first evaluation, so a solve
evaluates the data once more instead of twice -- and the check refuses what it refused before."""
import pytest
import torch
from torch import nn

import sharpscope as ss
from conftest import make_data, make_mlp

CE = nn.CrossEntropyLoss()


def _counted(model: nn.Module) -> list:
    calls = []
    model.register_forward_hook(lambda m, i, o: calls.append(1))
    return calls


@pytest.mark.parametrize("mode", ["cached", "reverse"])
def test_a_one_product_solve_evaluates_the_data_twice_not_three_times(mode):
    model, data = make_mlp(0), [make_data("mlp", 1, n=6), make_data("mlp", 2, n=10)]
    H = ss.hessian_operator(model, CE, data, hvp_mode=mode)
    v = torch.randn(H.shape[0], dtype=torch.float64)
    H.matvec(v)  # the first solve also runs the derivative check (finite differences: more evaluations)
    calls = _counted(model)
    out = H.matvec(v)  # a solve of its own: the product's forward pass and one more evaluation per batch
    assert len(calls) == 2 * len(data)
    torch.testing.assert_close(out, ss.dense_hessian(model, CE, data) @ v)


class RandomOnSmallBatches(nn.Module):
    """Dropout on batches of fewer than 8 samples only: the second batch of the data below."""

    def forward(self, x):
        return nn.functional.dropout(x, 0.5, training=True) if x.shape[0] < 8 else x


def _stochastic_on_batch_1() -> tuple[nn.Module, list]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), RandomOnSmallBatches(), nn.Linear(12, 4)).double()
    return model, [make_data("mlp", 1, n=10), make_data("mlp", 2, n=6)]


@pytest.mark.parametrize("mode", ["auto", "cached", "reverse"])
@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_a_random_batch_is_refused_by_the_folded_check_for_vectors_and_blocks(mode, kind):
    model, data = _stochastic_on_batch_1()
    make = ss.hessian_operator if kind == "hessian" else ss.ggn_operator
    op = make(model, CE, data, hvp_mode=mode)
    with pytest.raises(ss.StochasticForwardError, match="two evaluations of batch 1 differ"):
        op.matvec(torch.randn(op.shape[0], dtype=torch.float64))
    op = make(model, CE, data, hvp_mode=mode, batched=True)
    with pytest.raises(ss.StochasticForwardError, match="two evaluations of batch 1 differ"):
        op.matmat(torch.randn(op.shape[0], 5, dtype=torch.float64))


def test_the_measured_modes_fold_the_check_too():
    """``auto`` whose graphs exceed the budget times reverse and forward: the reverse trial records the values."""
    model, data = _stochastic_on_batch_1()
    H = ss.hessian_operator(model, CE, data, graph_memory_budget=0)
    with pytest.raises(ss.StochasticForwardError, match="batch 1"):
        H.matvec(torch.randn(H.shape[0], dtype=torch.float64))


def test_a_forward_pass_that_fails_on_a_batch_is_still_one_line():
    model = make_mlp(0)
    x, y = make_data("mlp", 1, n=8)
    data = [(x, y), (torch.randn(8, 5, dtype=torch.float64), y)]  # the second batch has 5 features, not 6
    for mode in ("cached", "reverse"):
        H = ss.hessian_operator(model, CE, data, hvp_mode=mode)
        with pytest.raises(ValueError, match=r"cannot be evaluated on batch 1 \(inputs"):
            H.matvec(torch.randn(H.shape[0], dtype=torch.float64))


def test_a_loss_that_does_not_depend_on_the_parameters_is_still_refused():
    model, (x, y) = make_mlp(0), make_data("mlp", 1)
    loss = ss.batch_loss(outputs=lambda m, b: m(b["x"]), loss_of_outputs=lambda o, b: CE(o.detach(), b["y"]))
    G = ss.ggn_operator(model, loss, {"x": x, "y": y}, hvp_mode="cached")
    with pytest.raises(ValueError, match="does not depend on the parameters"):
        G.matvec(torch.randn(G.shape[0], dtype=torch.float64))
