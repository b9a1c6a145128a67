"""Faults: data-parallel operators over different models (issue 21, "What was found" 7).

Two gloo ranks with the same shapes and different weights were accepted and gave an eigenvalue of neither
model (7abbbde compared names, shapes and dtypes only). The ranks now compare their parameters' dot products
with two seeded random vectors and the loss's description, at construction and at the start of every solve.
This module is also the worker: ``python test_data_parallel.py RANK WORLD PORT OUT`` runs every scenario on one
rank (one 2-process launch for the module) and writes the outcomes to OUT/rank<r>.json.
"""
from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
LIMIT = 180  # seconds for the whole 2-process run
RANK = 0
CE = nn.CrossEntropyLoss()


# -- the worker (one rank) ------------------------------------------------------------------------
def _outcome(fn):
    try:
        value = fn()
        return ["ok", value if isinstance(value, (list, str, int, float)) else type(value).__name__]
    except Exception as err:  # noqa: BLE001 - the outcome is the test's subject
        return [type(err).__name__, str(err)]


def _setup():
    from conftest import make_data, make_mlp

    model, (x, y) = make_mlp(0), make_data("mlp", 0, n=20)
    shard = (x[:10], y[:10]) if RANK == 0 else (x[10:], y[10:])
    return model, shard, (x, y)


def _top(op, k=2):
    import sharpscope as ss

    return ss.lanczos(op, k=k).eigenvalues.tolist()


def s_different_weights():
    """The issue's case: same shapes, rank 1's weights perturbed (also a single swapped pair)."""
    import sharpscope as ss

    model, shard, _ = _setup()
    if RANK == 1:
        with torch.no_grad():
            model[2].weight.mul_(1.001)
    out = {"perturbed": _outcome(lambda: _top(ss.hessian_operator(model, CE, shard, distributed=True)))}
    model, shard, _ = _setup()
    if RANK == 1:
        w = model[0].weight.data
        w[0, 0], w[1, 1] = w[1, 1].item(), w[0, 0].item()  # sum and norm unchanged
    out["swapped"] = _outcome(lambda: ss.ggn_operator(model, CE, shard, distributed=True))
    return out


def s_changed_between_solves():
    """Agreement at every solve: rank 1 swaps two entries through .data (or reassigns its loss's weight) after
    a first solve; the next solve is refused on both ranks, and a later change undone solves again."""
    import sharpscope as ss

    model, shard, full = _setup()
    H = ss.hessian_operator(model, CE, shard, distributed=True)
    out = {"first": _outcome(lambda: _top(H))}
    saved = model[2].weight.detach().clone()
    if RANK == 1:
        w = model[2].weight.data
        w[0, 0], w[3, 5] = w[3, 5].item(), w[0, 0].item()
    out["swap"] = _outcome(lambda: _top(H))
    with torch.no_grad():
        model[2].weight.data.copy_(saved)
    out["restored"] = _outcome(lambda: _top(H))
    out["reference"] = _top(ss.hessian_operator(model, CE, full))
    weighted = nn.CrossEntropyLoss(weight=torch.ones(4, dtype=torch.float64))
    G = ss.ggn_operator(model, weighted, shard, distributed=True)
    _top(G)
    if RANK == 1:
        weighted.weight = torch.tensor([1.0, 2.0, 1.0, 1.0], dtype=torch.float64)
    out["loss_weight"] = _outcome(lambda: _top(G))
    return out


def s_loss():
    """The loss description, reduction included, must match."""
    import sharpscope as ss

    model, shard, _ = _setup()
    reduction = nn.CrossEntropyLoss(reduction="sum" if RANK == 1 else "mean")
    out = {"reduction": _outcome(lambda: ss.hessian_operator(model, reduction, shard, distributed=True))}
    smoothing = nn.CrossEntropyLoss(label_smoothing=0.1 * RANK)
    out["smoothing"] = _outcome(lambda: ss.hessian_operator(model, smoothing, shard, distributed=True))
    return out


def s_preconditioner():
    """Optimizer states with two second-moment entries swapped on rank 1: sum and norm agree, D does not."""
    import sharpscope as ss

    model, shard, full = _setup()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    opt.zero_grad()
    CE(model(full[0]), full[1]).backward()
    opt.step()
    state = opt.state[model[0].weight]["exp_avg_sq"]
    if RANK == 1:
        state[0, 0], state[2, 3] = state[2, 3].item(), state[0, 0].item()
    return {"construction": _outcome(lambda: ss.preconditioned_hessian_operator(model, CE, shard, opt,
                                                                                 distributed=True))}


def s_derivative_check():
    """The first-product check on every rank, its verdict agreed: a wrong double backward switches both."""
    import warnings

    import sharpscope as ss
    from faults.test_derivatives import DetachedTanh, _pair

    wrong, twin = _pair(DetachedTanh)
    _, shard, full = _setup()
    H = ss.hessian_operator(wrong, CE, shard, distributed=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = ss.lanczos(H, k=2)
    ref = ss.lanczos(ss.hessian_operator(twin, CE, full), k=2)
    return {"verdict": res.derivative_check, "values": res.eigenvalues.tolist(), "reference": ref.eigenvalues.tolist()}


SCENARIOS = {name[2:]: fn for name, fn in list(globals().items()) if name.startswith("s_")}


def main() -> None:
    global RANK
    import torch.distributed as dist

    sys.path[:0] = [str(HERE.parent), str(HERE.parent.parent)]  # the tests' models, this worktree's sharpscope
    torch.set_num_threads(1)
    RANK, world, port, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=RANK, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    results = {}
    for name, fn in SCENARIOS.items():
        try:
            results[name] = fn()
        except Exception:  # noqa: BLE001 - reported to the test
            results[name] = {"crash": traceback.format_exc()}
        (out / f"rank{RANK}.json").write_text(json.dumps(results))
        dist.barrier()
    dist.destroy_process_group()


# -- the tests ----------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("needs torch.distributed with gloo")
    out = tmp_path_factory.mktemp("dp-faults")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, __file__, str(r), "2", str(port), str(out)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    logs = []
    try:
        logs = [p.communicate(timeout=LIMIT)[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"the 2-process run did not finish within {LIMIT} s")
    results = []
    for r in range(2):
        path = out / f"rank{r}.json"
        assert path.exists(), f"rank {r} wrote nothing:\n{logs[r][-3000:]}"
        results.append(json.loads(path.read_text()))
    return results


def _both(ranks, scenario):
    outs = [r.get(scenario) for r in ranks]
    for r, o in enumerate(outs):
        assert o is not None and "crash" not in o, f"rank {r}: {o}"
    return outs


def _refused(outcome, *needles):
    kind, message = outcome
    assert kind == "ValueError" and "\n" not in message, outcome
    for needle in needles:
        assert needle in message, (needle, message)


def test_same_shapes_different_weights_are_refused(ranks):
    for out in _both(ranks, "different_weights"):
        _refused(out["perturbed"], "rank 1/2's parameter values differ from rank 0's", "dot products")
        _refused(out["swapped"], "rank 1/2's parameter values differ")


def test_a_change_on_one_rank_between_solves_is_refused_at_the_next_solve(ranks):
    for out in _both(ranks, "changed_between_solves"):
        assert out["first"][0] == "ok" and out["restored"][0] == "ok"
        torch.testing.assert_close(torch.tensor(out["restored"][1]), torch.tensor(out["reference"]), rtol=1e-10, atol=0)
        _refused(out["swap"], "rank 1/2's parameter values differ")
        _refused(out["loss_weight"], "rank 1/2's loss is", "weight=tensor(4,)")


def test_a_different_loss_is_refused(ranks):
    for out in _both(ranks, "loss"):
        _refused(out["reduction"], "reduction='sum'", "rank 0's is", "reduction='mean'", "its reduction included")
        _refused(out["smoothing"], "label_smoothing=0.1")


def test_a_swapped_optimizer_state_is_refused(ranks):
    for out in _both(ranks, "preconditioner"):
        _refused(out["construction"], "rank 1/2's optimizer step sizes differ", "same optimizer state")


def test_the_derivative_check_is_agreed_across_ranks(ranks):
    for out in _both(ranks, "derivative_check"):
        assert out["verdict"] == "switched"
        torch.testing.assert_close(torch.tensor(out["values"]), torch.tensor(out["reference"]), rtol=1e-6, atol=0)


if __name__ == "__main__":
    main()
