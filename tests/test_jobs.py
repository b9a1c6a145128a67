"""Offline spectrum jobs: local, process pool and a real Dask LocalCluster (with a worker killed mid-job)."""
from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest
import torch
from torch import nn

import sharpscope as ss
from sharpscope.cli import main
from sharpscope.demo import digits_data, digits_mlp
from sharpscope.optim import AdamAtan2
from sharpscope.runs.jobs import SpectrumSettings, run_spectrum_job
from sharpscope.runs.spectra import SpectraFile, spectra_path

CE = nn.CrossEntropyLoss()


def _record(path, steps=6, every=2, hidden=16, optimizer="adam"):
    torch.manual_seed(0)
    model = digits_mlp(hidden=hidden, depth=1)
    x, y = digits_data()
    x, y = x[:64], y[:64]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2) if optimizer == "adam" else \
        torch.optim.SGD(model.parameters(), lr=0.1)
    with ss.Recorder(path, model, opt, batch=(x, y), every=every, loss_fn=CE,
                     meta={"model_factory": "sharpscope.demo:digits_mlp",
                           "model_kwargs": {"hidden": hidden, "depth": 1}}) as rec:
        for _ in range(steps):
            opt.zero_grad()
            loss = CE(model(x), y)
            loss.backward()
            opt.step()
            rec.step(loss=loss)
    return model, (x, y)


def test_local_job_all_quantities_and_resume(tmp_path):
    path = tmp_path / "run.h5"
    model, data = _record(path)
    settings = SpectrumSettings(k=3, density_probes=2, density_steps=10, trace_matvecs=30)
    quantities = ["hessian", "precond", "ggn", "ntk", "trace", "density", "layers"]
    report = run_spectrum_job([path], quantities, settings, progress=False, steps=[2, 4, 6])
    assert report.failures == [] and report.computed == 3 and report.written == 21
    again = run_spectrum_job([path], quantities, settings, progress=False, steps=[2, 4, 6])
    assert again.computed == 0 and again.skipped == 21  # resumable: nothing recomputed
    with SpectraFile(spectra_path(path)) as sf:
        rows = sf.rows("hessian")
        assert [r["step"] for r in rows] == [2, 4, 6]
        final = rows[-1]["values"]
        direct = ss.lanczos(ss.hessian_operator(model, CE, data), k=3).eigenvalues.numpy()
        np.testing.assert_allclose(final, direct, rtol=1e-6)  # the model is at step 6 now
        pre = sf.rows("precond")[0]
        assert pre["info"]["threshold"] == pytest.approx(38 / 1e-2)
        layers = sf.rows("layers")[0]
        assert layers["info"]["layers"] == ["0", "2"] and len(layers["values"]) == 2
        dens = sf.rows("density")[0]
        assert sum(dens["info"]["nodes_per_probe"]) == len(dens["values"])
    assert main(["inspect", str(path)]) == 0


def test_process_pool_matches_local(tmp_path):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    _record(a)
    _record(b)
    run_spectrum_job([a], ["hessian", "trace"], SpectrumSettings(k=2, trace_matvecs=12), progress=False)
    run_spectrum_job([b], ["hessian", "trace"], SpectrumSettings(k=2, trace_matvecs=12), executor="process:2",
                     progress=False)
    with SpectraFile(spectra_path(a)) as fa, SpectraFile(spectra_path(b)) as fb:
        for ra, rb in zip(fa.rows(), fb.rows()):
            assert (ra["step"], ra["quantity"]) == (rb["step"], rb["quantity"])
            np.testing.assert_allclose(ra["values"], rb["values"], rtol=1e-9)


def test_dask_local_cluster_survives_a_killed_worker(tmp_path):
    distributed = pytest.importorskip("distributed")
    path = tmp_path / "run.h5"
    _record(path, steps=8, every=1, hidden=32)
    settings = SpectrumSettings(k=2, density_probes=4, density_steps=30)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        pids = client.run(os.getpid)
        victim = sorted(pids.values())[0]

        killed_at = []

        def kill_after_first_result():  # mid-job: once one checkpoint is stored, others are in flight
            deadline = time.time() + 60
            while not spectra_path(path).exists() and time.time() < deadline:
                time.sleep(0.01)
            os.kill(victim, signal.SIGKILL)
            killed_at.append(time.time())

        killer = threading.Thread(target=kill_after_first_result)
        killer.start()
        report = run_spectrum_job([path], ["hessian", "density"], settings, executor=cluster.scheduler_address,
                                  progress=False)
        finished_at = time.time()
        killer.join()
    assert killed_at and killed_at[0] < finished_at
    assert report.failures == [] and report.computed == 9
    with SpectraFile(spectra_path(path)) as sf:
        keys = [(r["step"], r["quantity"]) for r in sf.rows()]
    assert len(keys) == len(set(keys)) == 18  # nothing lost, nothing duplicated
    local = tmp_path / "local.h5"
    _record(local, steps=8, every=1, hidden=32)
    run_spectrum_job([local], ["hessian"], settings, progress=False, steps=[8])
    with SpectraFile(spectra_path(path)) as sf, SpectraFile(spectra_path(local)) as sl:
        np.testing.assert_allclose(sf.rows("hessian")[-1]["values"], sl.rows("hessian")[0]["values"], rtol=1e-9)


def test_bad_inputs(tmp_path, capsys):
    path = tmp_path / "run.h5"
    _record(path, steps=2)
    assert main(["spectrum", str(path), "--what", "hessian,wiggle", "--quiet"]) == 2
    assert "unknown quantities ['wiggle']" in capsys.readouterr().err
    assert main(["spectrum", str(path), "--executor", "gpu-farm", "--quiet"]) == 2
    assert "unknown executor" in capsys.readouterr().err
    torch.manual_seed(0)
    model = digits_mlp(hidden=16, depth=1)
    with ss.Recorder(tmp_path / "nofactory.h5", model, every=1) as rec:
        rec.step()
    with pytest.raises(ValueError, match="no model_factory"):
        run_spectrum_job([tmp_path / "nofactory.h5"], ["hessian"], progress=False)
    with ss.Recorder(tmp_path / "wrong.h5", model, batch=digits_data(), every=1, loss_fn=CE,
                     meta={"model_factory": "sharpscope.demo:digits_mlp", "model_kwargs": {"hidden": 8, "depth": 1}}) as rec:
        rec.step()
    report = run_spectrum_job([tmp_path / "wrong.h5"], ["hessian"], progress=False)
    assert report.computed == 0 and "has shape (16, 64) but the rebuilt model's has (8, 64)" in report.failures[0][2]
    assert not spectra_path(tmp_path / "wrong.h5").exists()


def test_job_rebuilds_a_parametrized_model(tmp_path):
    """A muP model (forward multipliers via torch.nn.utils.parametrize) is rebuilt from the run's meta."""
    torch.manual_seed(0)
    kwargs = {"width": 64, "depth": 2, "in_features": 64, "out_features": 10, "activation": "tanh"}
    model = ss.build_model("sharpscope.models:MLP", kwargs)
    groups = ss.parametrize(model, "mup", optimizer="adam", lr=1e-2, base_width=16)
    opt = ss.build_optimizer(groups, "adam")
    x, y = digits_data()
    x, y = x[:64], y[:64]
    with ss.Recorder(tmp_path / "mup.h5", model, opt, batch=(x, y), every=3, loss_fn=CE,
                     meta={"model_factory": "sharpscope.models:MLP", "model_kwargs": kwargs,
                           "parameterization": groups.record}) as rec:
        for _ in range(3):
            opt.zero_grad()
            loss = CE(model(x), y)
            loss.backward()
            opt.step()
            rec.step(loss=loss)
    report = run_spectrum_job([tmp_path / "mup.h5"], ["hessian", "precond"], SpectrumSettings(k=2), progress=False)
    # Adam's preconditioner is undefined before its first step: stored as not applicable, not a failure
    assert report.failures == [] and report.not_applicable == 1
    assert report.written == 4  # hessian at steps 0 and 3, precond at step 3, the empty precond at step 0
    with SpectraFile(spectra_path(tmp_path / "mup.h5")) as sf:
        first = sf.rows("precond")[0]
        assert first["step"] == 0 and len(first["values"]) == 0 and "step 0" in first["info"]["not_applicable"]
    again = run_spectrum_job([tmp_path / "mup.h5"], ["hessian", "precond"], SpectrumSettings(k=2), progress=False)
    assert again.computed == 0 and again.skipped == 4  # done, not retried
    with SpectraFile(spectra_path(tmp_path / "mup.h5")) as sf:
        offline = sf.rows("hessian")[-1]["values"]
    direct = ss.lanczos(ss.hessian_operator(model, CE, (x, y)), k=2).eigenvalues.numpy()
    np.testing.assert_allclose(offline, direct, rtol=1e-6)


def test_adam_atan2_state_is_captured_from_step_0_and_preconditions(tmp_path):
    """AdamAtan2's state (Adam's keys) is predicted before its first step, so every checkpoint stores it
    and the offline `precond` job reads it (not applicable at step 0, measured after)."""
    torch.manual_seed(0)
    kwargs = {"width": 32, "depth": 2, "in_features": 64, "out_features": 10, "activation": "tanh"}
    model = ss.build_model("sharpscope.models:MLP", kwargs)
    groups = ss.parametrize(model, "mup", optimizer="adam-atan2", lr=1e-2, base_width=16)
    opt = ss.build_optimizer(groups, "adam-atan2")
    assert isinstance(opt, AdamAtan2)
    x, y = digits_data()
    x, y = x[:64], y[:64]
    path = tmp_path / "atan2.h5"
    with ss.Recorder(path, model, opt, batch=(x, y), every=2, loss_fn=CE,
                     meta={"model_factory": "sharpscope.models:MLP", "model_kwargs": kwargs,
                           "parameterization": groups.record}) as rec:
        for _ in range(4):
            opt.zero_grad()
            loss = CE(model(x), y)
            loss.backward()
            opt.step()
            rec.step(loss=loss)
    names = [n for n, _ in model.named_parameters()]
    with ss.open_run(path) as run:
        states = {s: run.optimizer_state(s) for s in (0, 2, 4)}
    for step, state in states.items():
        assert set(state) == set(names), step
        assert all(set(st) == {"step", "exp_avg", "exp_avg_sq"} for st in state.values()), step
    first = states[0][names[0]]
    # before any step: the predicted slots exist and hold the store's "no state yet" (NaN), as Adam's
    assert all(torch.isnan(t).all() for t in first.values())
    for name, p in model.named_parameters():
        live = opt.state[p]
        assert float(states[4][name]["step"]) == 4
        torch.testing.assert_close(states[4][name]["exp_avg"], live["exp_avg"], rtol=0, atol=0)
        torch.testing.assert_close(states[4][name]["exp_avg_sq"], live["exp_avg_sq"], rtol=0, atol=0)
    report = run_spectrum_job([path], ["precond"], SpectrumSettings(k=2), progress=False)
    assert report.failures == [] and report.not_applicable == 1 and report.written == 3
    with SpectraFile(spectra_path(path)) as sf:
        rows = sf.rows("precond")
    assert [r["step"] for r in rows] == [0, 2, 4] and len(rows[0]["values"]) == 0
    assert all(len(r["values"]) == 2 and np.all(np.isfinite(r["values"])) for r in rows[1:])
    assert rows[-1]["info"]["threshold"] == pytest.approx(38 / 1e-2)
    # the job's value at step 4 is the live preconditioned operator's
    direct = ss.lanczos(ss.preconditioned_hessian_operator(model, CE, (x, y), opt), k=2).eigenvalues.numpy()
    np.testing.assert_allclose(rows[-1]["values"], direct, rtol=1e-5)


def test_losses_logged_apart_from_the_checkpoints_do_not_hide_them(tmp_path):
    """A framework callback (e.g. Hugging Face) steps the Recorder without a loss and logs the loss
    separately: every checkpoint is measured; a non-finite logged loss marks where the run diverged."""
    torch.manual_seed(0)
    model = digits_mlp(hidden=16, depth=1)
    x, y = digits_data()
    x, y = x[:64], y[:64]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "logged.h5"
    with ss.Recorder(path, model, opt, batch=(x, y), every=2, loss_fn=CE,
                     meta={"model_factory": "sharpscope.demo:digits_mlp", "model_kwargs": {"hidden": 16, "depth": 1}}) as rec:
        for step in range(6):
            opt.zero_grad()
            loss = CE(model(x), y)
            loss.backward()
            opt.step()
            rec.step()
            rec.log_loss(float("nan") if step == 4 else float(loss))  # "diverged" at step 5
    report = run_spectrum_job([path], ["hessian"], SpectrumSettings(k=1), progress=False)
    assert report.computed == 3 and report.diverged == 1  # steps 0, 2, 4 measured; 6 is past the divergence


def test_a_failed_dask_future_is_submitted_once_more(tmp_path, monkeypatch):
    """A cluster-side error (not raised by the task) costs one resubmission, not the checkpoint; an error
    that repeats is a failure; executors without a cluster report the first failure."""
    import concurrent.futures

    from sharpscope.runs import jobs

    path = tmp_path / "run.h5"
    _record(path, steps=4, every=2)
    calls: list[int] = []

    def flaky_executor(spec):
        def submit(fn, path, step, *args):
            fut = concurrent.futures.Future()
            calls.append(step)
            if step == 2 and calls.count(2) == 1 or step == 4:  # step 2 fails once, step 4 always
                fut.set_exception(RuntimeError("<asyncio.locks.Event object> is bound to a different event loop"))
            else:
                fut.set_result(fn(path, step, *args))
            return fut
        return submit, lambda: None, iter

    monkeypatch.setattr(jobs, "executor_from_spec", flaky_executor)
    report = run_spectrum_job([path], ["hessian"], SpectrumSettings(k=2), executor="dask://fake:1", progress=False)
    assert sorted(calls) == [0, 2, 2, 4, 4] and report.computed == 2
    assert [(s, m.split(":")[0]) for _, s, m in report.failures] == [(4, "RuntimeError")]
    calls.clear()
    report = run_spectrum_job([tmp_path / "run.h5"], ["hessian"], SpectrumSettings(k=2, seed=1), executor="process:1",
                              progress=False)
    assert sorted(calls) == [0, 2, 4] and report.computed == 1 and len(report.failures) == 2
