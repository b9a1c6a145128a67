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
    with ss.Recorder(tmp_path / "r.h5", model, opt, probe=(x, y), schedule="on_demand",
                     loss_fn=nn.CrossEntropyLoss(), sharpness_every=2, summary_writer=writer) as rec:
        for _ in range(4):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            rec.step()
    assert [(t, s) for t, _, s in writer.calls] == [("sharpscope/sharpness", 2), ("sharpscope/sharpness", 4)]
    assert writer.calls[-1][1] == pytest.approx(rec.sharpness_log[-1][1])


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
    callback = lightning_callback(str(tmp_path / "pl.h5"), every=2, probe=(x[:16], y[:16]))
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
    callback = ss.huggingface_callback(str(tmp_path / "hf.h5"), probe=(x[:16], y[:16]), every=2)
    trainer = transformers.Trainer(model=Net(), args=args, train_dataset=data, callbacks=[callback])
    trainer.train()
    with ss.open_run(tmp_path / "hf.h5") as run:
        assert run.steps == [0, 2, 4, 6]
        assert "net.0.weight" in run.params(6)
        assert set(run.optimizer_state(6)["net.0.weight"]) >= {"exp_avg", "exp_avg_sq"}  # the Trainer's AdamW
        steps, losses = run.scalars("loss")
        assert steps.tolist() == [1, 2, 3, 4, 5, 6] and np.isfinite(losses).all()  # logging_steps=1
