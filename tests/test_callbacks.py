"""Framework adapters and the TensorBoard hook, when their packages are importable."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import sharpscope as ss
from sharpscope.runs.callbacks import lightning_callback


class _Writer:
    """Duck-typed SummaryWriter: records add_scalar calls."""

    def __init__(self) -> None:
        self.calls = []

    def add_scalar(self, tag, value, step):
        self.calls.append((tag, value, step))


def test_online_sharpness_goes_to_summary_writer(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    writer = _Writer()
    with ss.Recorder(tmp_path / "r.h5", model, opt, batch=(x, y), schedule="on_demand",
                     loss_fn=nn.CrossEntropyLoss(), sharpness_every=2, summary_writer=writer) as rec:
        for _ in range(4):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            rec.step()
    tags = ["sharpscope/sharpness/preconditioned", "sharpscope/sharpness/eos_ratio", "sharpscope/sharpness/hessian"]
    assert [(t, s) for t, _, s in writer.calls] == [(t, 2) for t in tags] + [(t, 4) for t in tags]
    assert writer.calls[-1][1] == pytest.approx(rec.sharpness_log[-1][1])  # SGD, one lr: D = I


def test_lightning_callback_records_every_optimizer_step(tmp_path):
    L = pytest.importorskip("lightning.pytorch")

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    torch.manual_seed(0)
    x, y = torch.randn(64, 4), torch.randint(0, 2, (64,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    callback = lightning_callback(str(tmp_path / "pl.h5"), every=2, batch=(x[:16], y[:16]))
    trainer = L.Trainer(max_epochs=2, callbacks=[callback], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(Module(), loader)
    with ss.open_run(tmp_path / "pl.h5") as run:
        assert run.steps == [0, 2, 4, 6, 8]
        assert "net.0.weight" in run.params(8)
        assert set(run.optimizer_state(8)["net.0.weight"]) == {"step", "exp_avg", "exp_avg_sq"}


def test_huggingface_callback_needs_transformers():
    try:
        import transformers  # noqa: F401
    except ImportError:
        from sharpscope.runs.callbacks import huggingface_callback

        with pytest.raises(ImportError, match="transformers"):
            huggingface_callback("x.h5")


def test_huggingface_callback_records_the_trainers_steps(tmp_path):
    transformers = pytest.importorskip("transformers")
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 4, generator=gen), torch.randint(0, 3, (40,), generator=gen)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))

        def forward(self, inputs, labels=None):
            logits = self.net(inputs)
            return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}

    data = [{"inputs": a, "labels": b} for a, b in zip(x, y)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "hf"), per_device_train_batch_size=8,
                                          max_steps=6, logging_steps=1, save_strategy="no", report_to=[],
                                          use_cpu=True, learning_rate=1e-2, disable_tqdm=True)
    callback = ss.huggingface_callback(str(tmp_path / "hf.h5"), batch=(x[:16], y[:16]), every=2)
    trainer = transformers.Trainer(model=Net(), args=args, train_dataset=data, callbacks=[callback])
    trainer.train()
    with ss.open_run(tmp_path / "hf.h5") as run:
        assert run.steps == [0, 2, 4, 6]
        assert "net.0.weight" in run.params(6)
        assert set(run.optimizer_state(6)["net.0.weight"]) >= {"exp_avg", "exp_avg_sq"}  # the Trainer's AdamW
        steps, losses = run.scalars("loss")
        assert steps.tolist() == [1, 2, 3, 4, 5, 6] and np.isfinite(losses).all()  # logging_steps=1


# -- logging where users look ------------------------------------------------------------------------
def _tiny_problem(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    return model, x, y


def _train(model, opt, x, y, rec, steps):
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        rec.step()


def test_log_fn_gets_the_preconditioned_sharpness_and_its_ratio(tmp_path):
    model, x, y = _tiny_problem()
    opt = torch.optim.Adam([{"params": model[0].parameters(), "lr": 1e-2}, {"params": model[2].parameters(), "lr": 3e-3}],
                           lr=1e-2)
    calls = []
    with ss.Recorder(tmp_path / "r.h5", model, opt, batch=(x, y), schedule="on_demand", loss_fn=nn.CrossEntropyLoss(),
                     sharpness_every=2, log_fn=lambda metrics, step: calls.append((step, metrics))) as rec:
        _train(model, opt, x, y, rec, 4)
    assert [s for s, _ in calls] == [2, 4]
    metrics = calls[-1][1]
    assert set(metrics) == {"sharpness/preconditioned", "sharpness/eos_ratio"}  # Adam: no raw-Hessian ratio
    P = ss.preconditioned_hessian_operator(model, nn.CrossEntropyLoss(), (x, y), opt)  # per-group lrs inside D
    top = ss.lanczos(P, k=1, tol=1e-8).eigenvalues[0].item()
    assert metrics["sharpness/preconditioned"] == pytest.approx(top, rel=1e-4)
    assert metrics["sharpness/eos_ratio"] == pytest.approx(top / P.threshold, rel=1e-4)
    assert P.threshold == pytest.approx(3.8 / (0.1 * 1e-2))


@pytest.mark.filterwarnings("ignore:RMSprop's state is not known")
def test_an_optimizer_without_a_threshold_logs_the_raw_sharpness_only(tmp_path):
    model, x, y = _tiny_problem(1)
    opt = torch.optim.RMSprop(model.parameters(), lr=1e-3)
    calls = []
    with pytest.warns(RuntimeWarning, match="raw Hessian's, without an edge-of-stability ratio"):
        with ss.Recorder(tmp_path / "r.h5", model, opt, batch=(x, y), schedule="on_demand", loss_fn=nn.CrossEntropyLoss(),
                         sharpness_every=1, log_fn=lambda m, s: calls.append(m)) as rec:
            _train(model, opt, x, y, rec, 2)
    raw = ss.lanczos(ss.hessian_operator(model, nn.CrossEntropyLoss(), (x, y)), k=1, tol=1e-8).eigenvalues[0].item()
    assert [set(m) for m in calls] == [{"sharpness/hessian"}] * 2
    assert calls[-1]["sharpness/hessian"] == pytest.approx(raw, rel=1e-4)


def test_lightning_logs_sharpness_to_csv_and_tensorboard(tmp_path):
    L = pytest.importorskip("lightning.pytorch")
    pytest.importorskip("tensorboard")
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))

        def forward(self, x):  # the Recorder measures the module: loss_fn(module(x), y)
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    torch.manual_seed(0)
    x, y = torch.randn(64, 4), torch.randint(0, 2, (64,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    callback = lightning_callback(str(tmp_path / "pl.h5"), schedule="on_demand", batch=(x[:16], y[:16]),
                                  loss_fn=nn.CrossEntropyLoss(), sharpness_every=3)
    loggers = [CSVLogger(tmp_path, name="csv"), TensorBoardLogger(tmp_path, name="tb")]
    trainer = L.Trainer(max_epochs=2, callbacks=[callback], logger=loggers, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")  # log_every_n_steps 50
    trainer.fit(Module(), loader)
    measured = callback.recorder.metrics_log
    assert [s for s, _ in measured] == [3, 6]
    assert trainer.callback_metrics["sharpness/eos_ratio"].item() == pytest.approx(measured[-1][1]["sharpness/eos_ratio"])
    import csv

    rows = list(csv.DictReader(open(loggers[0].log_dir + "/metrics.csv")))
    logged = [(int(r["step"]), float(r["sharpness/preconditioned"]), float(r["sharpness/eos_ratio"]))
              for r in rows if r.get("sharpness/preconditioned")]
    assert logged == [(s, pytest.approx(m["sharpness/preconditioned"]), pytest.approx(m["sharpness/eos_ratio"]))
                      for s, m in measured]
    events = EventAccumulator(loggers[1].log_dir)
    events.Reload()
    scalars = events.Scalars("sharpness/eos_ratio")
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in scalars] == [(s, m["sharpness/eos_ratio"]) for s, m in measured]


def _gpt2_trainer(tmp_path, callback, report_to="none", steps=4):
    """A tiny GPT-2 (from a config, no download) in a real Trainer on random tokens (float32, CPU)."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    from test_hf import lm_batch

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=8, bos_token_id=0,
                                     eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    rows = lm_batch(20, pad=2, n=16)
    data = [{k: v[i] for k, v in rows.items()} for i in range(16)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "hf"), per_device_train_batch_size=4, max_steps=steps,
                                          logging_steps=100, save_strategy="no", report_to=report_to, use_cpu=True,
                                          learning_rate=1e-3, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    callback.attach(trainer)
    return trainer


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the math-SDPA fallback notice
def test_huggingface_trainer_run_of_a_causal_lm_is_measured_offline(tmp_path):
    """A GPT-2 trained by a real Trainer (report_to="none"): online sharpness in the Trainer's log, the run
    file holds the dict batch and names the built-in factory and loss, and ``sharpscope spectrum`` measures it.
    The Trainer's linear schedule reaches lr 0 after the last step: no sharpness is logged there (a zero
    step has no edge of stability), online or offline."""
    from test_hf import lm_batch

    from sharpscope.cli import main
    from sharpscope.runs.spectra import SpectraFile, spectra_path

    batch = lm_batch(30, pad=3)
    callback = ss.huggingface_callback(str(tmp_path / "lm.h5"), batch=batch, every=2, sharpness_every=2)
    trainer = _gpt2_trainer(tmp_path, callback)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "sharpness/preconditioned" in h]
    assert [h["step"] for h in logged] == [2]
    assert logged[0]["sharpness/eos_ratio"] == pytest.approx(logged[0]["sharpness/preconditioned"] / (3.8 / (0.1 * 1e-3)))
    assert logged[0]["sharpness/preconditioned"] > 0
    [(skipped_step, reason)] = callback.recorder.sharpness_skipped
    assert skipped_step == 4 and "learning rate of the optimizer is 0" in reason
    assert not any("sharpness/eos_ratio" in h and h["step"] == 4 for h in trainer.state.log_history)
    with ss.open_run(tmp_path / "lm.h5") as run:
        assert run.steps == [0, 2, 4]
        assert run.meta["model_factory"] == "sharpscope.hf:causal_lm_from_config"
        assert run.meta["loss"] == "sharpscope.hf:causal_lm_loss"
        stored = run.batch()
        assert isinstance(stored, dict) and all(torch.equal(stored[k], batch[k]) for k in batch)
        online_steps, online = run.scalars("sharpness_preconditioned")
        # two groups (with and without weight decay); the lr the next step uses, after the scheduler
        assert run.lrs(2) == [pytest.approx(5e-4)] * 2 and run.lrs(4) == [0.0, 0.0]
    assert online_steps.tolist() == [2]
    assert main(["spectrum", str(tmp_path / "lm.h5"), "--what", "precond,hessian,ggn,ntk", "--k", "2",
                 "--steps", "2,4", "--quiet"]) == 0
    with SpectraFile(spectra_path(tmp_path / "lm.h5")) as sf:
        rows = {(r["step"], r["quantity"]): r for r in sf.rows()}
    assert set(rows) == {(s, q) for s in (2, 4) for q in ("precond", "hessian", "ggn", "ntk")}
    # offline, the optimizer is rebuilt with the checkpoint's lrs: the same preconditioned sharpness
    assert rows[2, "precond"]["values"][0] == pytest.approx(online[-1], rel=1e-3)  # float32, other start vector
    assert rows[2, "precond"]["info"]["threshold"] == pytest.approx(3.8 / (0.1 * 1e-3))
    assert len(rows[4, "precond"]["values"]) == 0 and "learning rate is 0" in rows[4, "precond"]["info"]["not_applicable"]
    for step in (2, 4):
        assert all(np.isfinite(rows[step, q]["values"]).all() and len(rows[step, q]["values"]) == 2
                   for q in ("hessian", "ggn", "ntk"))
        assert rows[step, "hessian"]["values"][0] >= rows[step, "ggn"]["values"][0] * 0.5  # same scale


def test_undefined_preconditioned_sharpness_is_skipped_with_its_reason(tmp_path):
    """Adam before its first step (no second moment) and after a schedule reached lr 0: nothing is logged
    (no fake 0), the reason is kept and warned; the steps in between are logged as usual."""
    model, x, y = _tiny_problem(2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    schedule = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0, end_factor=0.0, total_iters=3)
    calls = []
    with ss.Recorder(tmp_path / "r.h5", model, opt, batch=(x, y), schedule="on_demand", loss_fn=nn.CrossEntropyLoss(),
                     sharpness_every=1, log_fn=lambda m, s: calls.append((s, m))) as rec:
        with pytest.warns(RuntimeWarning, match="not logged at step 0: Adam has no second-moment state"):
            assert np.isnan(rec.measure_sharpness())
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            schedule.step()
            if opt.param_groups[0]["lr"] == 0:
                with pytest.warns(RuntimeWarning, match="not logged at step 3: every learning rate of the optimizer is 0"):
                    rec.step()
            else:
                rec.step()
    assert [s for s, _ in calls] == [1, 2] and all(np.isfinite(list(m.values())).all() and m["sharpness/eos_ratio"] > 0
                                                   for _, m in calls)
    assert [s for s, _ in rec.sharpness_skipped] == [0, 3]
    steps, values = ss.open_run(tmp_path / "r.h5").scalars("eos_ratio")
    assert steps.tolist() == [1, 2] and np.isfinite(values).all()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_huggingface_integrations_get_the_metrics_when_attached_first(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from test_hf import lm_batch

    callback = ss.huggingface_callback(str(tmp_path / "lm.h5"), batch=lm_batch(31), schedule="on_demand", sharpness_every=2)
    trainer = _gpt2_trainer(tmp_path, callback, report_to=["tensorboard"], steps=3)  # lr > 0 at step 2
    names = [type(cb).__name__ for cb in trainer.callback_handler.callbacks]
    assert names.index("SharpscopeTrainerCallback") < names.index("TensorBoardCallback")
    trainer.train()
    import glob

    events = EventAccumulator(glob.glob(str(tmp_path / "hf" / "**" / "events.out.tfevents.*"), recursive=True)[0])
    events.Reload()
    measured = callback.recorder.metrics_log
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in events.Scalars("train/sharpness/eos_ratio")] == \
        [(s, m["sharpness/eos_ratio"]) for s, m in measured] and measured[0][0] == 2
