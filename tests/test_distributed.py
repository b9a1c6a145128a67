"""Data-parallel operators over torch.distributed: 2 gloo processes (tests/_dist_worker.py), started once
for the module; each test checks one scenario's outcome on both ranks."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import sharpscope as ss
from conftest import make_data, make_mlp

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

WORKER = Path(__file__).with_name("_dist_worker.py")
SCENARIOS = ["operators", "closure", "ddp", "failures", "recorder", "fsdp", "timeout"]
LIMIT = 240  # seconds for the whole 2-process run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(WORKER.parent.parent))
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(r), "2", str(port), str(out), *SCENARIOS],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=LIMIT)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"the 2-process run did not finish within {LIMIT} s")
    results = []
    for r in range(2):
        path = out / f"rank{r}.json"
        assert path.exists(), f"rank {r} wrote nothing:\n{logs[r][-3000:]}"
        results.append(json.loads(path.read_text()))
    return results, out


def _both(ranks, scenario):
    results, _ = ranks
    outs = [r.get(scenario) for r in results]
    for r, o in enumerate(outs):
        assert o is not None, f"rank {r} did not run {scenario}"
        assert "crash" not in o, f"rank {r} crashed in {scenario}:\n{o['crash']}"
    return outs


def _close(a, b, rtol):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    torch.testing.assert_close(a, b, rtol=rtol, atol=0)


def test_distributed_top5_equals_single_process_on_the_concatenated_data(ranks):
    r0, r1 = _both(ranks, "operators")
    dist_vals, ref, converged = r0["hessian"]
    assert converged
    _close(dist_vals, ref, 1e-10)  # shards of 8 and 13 samples (the second as two batches)
    assert r0["hessian"] == r1["hessian"] and r0["hessian_digest"] == r1["hessian_digest"]  # bitwise on both ranks
    assert r0["samples"] == [8, 21] and r1["samples"] == [13, 21]
    for key in ("ggn", "precond", "block"):
        _close(r0[key][0], r0[key][1], 1e-9)
        assert r0[key] == r1[key]
    _close(r0["fd"][0], r0["fd"][1], 1e-6)


def test_distributed_estimators_gradient_and_loss(ranks):
    r0, r1 = _both(ranks, "operators")
    _close(r0["trace"][0], r0["trace"][1], 1e-10)
    assert r0["trace"] == r1["trace"] and r0["estimates_digest"] == r1["estimates_digest"]
    grad_diff, loss_diff = r0["gradient_loss"]
    assert grad_diff < 1e-14 and abs(loss_diff) < 1e-14
    assert r0["symmetric"] and r1["symmetric"]


def test_a_loss_closure_over_dict_shards_with_fractional_weights(ranks):
    for out in _both(ranks, "closure"):
        dist_top, ref_top, total = out["closure"]
        _close(dist_top, ref_top, 1e-10)
        assert total == 10.5  # 0.5 x (8 + 6 + 7) samples


def test_a_ddp_model_is_unwrapped(ranks):
    r0, r1 = _both(ranks, "ddp")
    _close(r0["ddp"][0], r0["ddp"][1], 1e-10)
    assert r0["ddp"] == r1["ddp"]


def test_a_rank_that_raises_makes_every_rank_raise_its_message(ranks):
    r0, r1 = _both(ranks, "failures")
    for out in (r0, r1):
        cls, message, seconds = out["raise"]
        assert cls == "ValueError" and message.startswith("rank 1/2: ") and "rank-one boom" in message
        assert "\n" not in message and seconds < 30  # well within the 60 s process-group timeout
        cls, message, _ = out["stochastic"]
        assert cls == "StochasticForwardError" and message.startswith("rank 1/2: ")
        cls, message, _ = out["stale"]
        assert cls == "StaleOperatorError" and message.startswith("rank 1/2: ") and "0.bias" in message
        assert out["after"] is None  # the group is usable afterwards


def test_bad_worlds_are_refused_at_construction(ranks):
    r0, r1 = _both(ranks, "failures")
    for out in (r0, r1):
        cls, message, _ = out["shapes"]
        assert cls == "ValueError" and "ranks hold different models" in message and "(13, 6)" in message
        for key in ("empty", "empty_batch"):
            cls, message, _ = out[key]
            assert cls == "ValueError" and "rank 1/2 holds no data" in message and "\n" not in message
        cls, message, _ = out["ntk"]
        assert cls == "ValueError" and message.startswith("ntk_operator has no data-parallel form")


def test_the_recorder_writes_one_file_from_rank_0(ranks):
    r0, r1 = _both(ranks, "recorder")
    assert r0["recorder"] == [True, 4, 2] and r1["recorder"] == [False, 4, 0]
    from sharpscope.runs.store import open_run

    _, out = ranks
    assert [p.name for p in out.glob("*.h5")] == ["run.h5"]
    with open_run(out / "run.h5") as run:
        assert list(run.steps) == [0, 2, 4]


def test_an_fsdp2_model_by_finite_differences(ranks):
    r0, r1 = _both(ranks, "fsdp")
    vals, ref, kind, _ = r0["fsdp"]
    assert kind == "ShardedHessianOperator"
    _close(vals, ref, 1e-6)
    assert r0["fsdp"] == r1["fsdp"] and r0["fsdp_digest"] == r1["fsdp_digest"]
    assert r0["fsdp_exact"] and r1["fsdp_exact"]  # the shards restored bit-exactly
    assert r0["fsdp_grads"] and r1["fsdp_grads"]
    assert "does not support FSDP2" in r0["fsdp_ggn"][1]


def test_a_rank_that_stops_calling_is_a_timeout_not_a_hang(ranks):
    r0, _ = _both(ranks, "timeout")
    cls, message, seconds = r0["timeout"]
    assert cls == "DistributedError" and "another rank stopped calling" in message and seconds < 30


def test_distributed_needs_an_initialized_group():
    assert not torch.distributed.is_initialized()
    for make in (lambda: ss.hessian_operator(make_mlp(0), nn.CrossEntropyLoss(), make_data("mlp", 0), distributed=True),
                 lambda: ss.ggn_operator(make_mlp(0), nn.CrossEntropyLoss(), make_data("mlp", 0), distributed=True)):
        with pytest.raises(ValueError, match="distributed=True needs an initialized process group") as err:
            make()
        assert "\n" not in str(err.value)
    with pytest.raises(TypeError, match="distributed must be"):
        ss.hessian_operator(make_mlp(0), nn.CrossEntropyLoss(), make_data("mlp", 0), distributed="yes")


def test_the_torchrun_script_runs(tmp_path):
    out = tmp_path / "ddp.json"
    script = WORKER.parent.parent / "scripts" / "ddp_sharpness.py"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(_free_port()), str(script), "--steps", "2", "--k", "2", "--products", "1", "--fd",
                           "--json", str(out)], env=env, capture_output=True, text=True, timeout=LIMIT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["world"] == 2 and result["backend"] == "gloo" and result["shards"] == [899, 898]
    single = torch.tensor(result["single"]["eigenvalues"], dtype=torch.float64)
    _close(result["distributed"]["eigenvalues"], single, 1e-10)
    _close(result["distributed_fd"]["eigenvalues"], single, 1e-6)
    assert "| distributed |" in proc.stdout
