"""Thin framework adapters over :class:`sharpscope.Recorder` (optional extras; imported lazily).

* :func:`lightning_callback` -- a PyTorch Lightning ``Callback``: one ``Recorder.step`` per optimizer
  step (``on_train_batch_end`` after an accumulation boundary), closed at the end of fitting.
* :func:`huggingface_callback` -- a ``transformers.TrainerCallback``: ``on_step_end`` steps the
  Recorder, ``on_train_end`` closes it. The Recorder is created on ``on_train_begin``, when the
  Trainer's model and optimizer exist.
"""
from __future__ import annotations

import warnings
from typing import Any

from .capture import Recorder

__all__ = ["lightning_callback", "huggingface_callback"]


def _renamed(recorder_kwargs: dict[str, Any]) -> dict[str, Any]:
    """``probe=`` is the old name of the Recorder's ``batch=``: warn now, when the callback is made."""
    if "probe" in recorder_kwargs:
        recorder_kwargs = dict(recorder_kwargs)
        if recorder_kwargs.get("batch") is not None:
            raise ValueError("give batch= only (probe= is its old name)")
        warnings.warn("probe= is now batch= (the stored data batch)", DeprecationWarning, stacklevel=3)
        recorder_kwargs["batch"] = recorder_kwargs.pop("probe")
    return recorder_kwargs


def lightning_callback(path: str, **recorder_kwargs: Any):
    """A Lightning callback recording ``trainer.lightning_module`` and its first optimizer."""
    recorder_kwargs = _renamed(recorder_kwargs)
    try:
        from lightning.pytorch.callbacks import Callback
    except ImportError:
        try:
            from pytorch_lightning.callbacks import Callback
        except ImportError:
            raise ImportError("lightning_callback needs PyTorch Lightning: pip install 'sharpscope[lightning]'") from None

    class SharpscopeCallback(Callback):
        def __init__(self) -> None:
            self.recorder: Recorder | None = None

        def on_train_start(self, trainer, pl_module) -> None:
            self.recorder = Recorder(path, pl_module, trainer.optimizers[0] if trainer.optimizers else None,
                                     **recorder_kwargs)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if self.recorder is None:
                return
            if trainer.global_step > self.recorder.step_count:  # an optimizer step happened
                loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
                self.recorder.step(loss=loss)

        def on_train_end(self, trainer, pl_module) -> None:
            if self.recorder is not None:
                self.recorder.close()

    return SharpscopeCallback()


def huggingface_callback(path: str, **recorder_kwargs: Any):
    """A ``transformers.TrainerCallback`` recording the Trainer's model and (unwrapped) optimizer. The
    Trainer logs its loss (averaged over ``logging_steps``) after the step's hooks, so checkpoints hold
    no loss; the logged losses go to the run's ``loss`` scalar log, which the report falls back to."""
    recorder_kwargs = _renamed(recorder_kwargs)
    try:
        from transformers import TrainerCallback
    except ImportError:
        raise ImportError("huggingface_callback needs transformers installed") from None

    class SharpscopeTrainerCallback(TrainerCallback):
        def __init__(self) -> None:
            self.recorder: Recorder | None = None

        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            # the Trainer hands over accelerate's wrapper; its state lives in the torch optimizer inside
            inner = getattr(optimizer, "optimizer", optimizer)
            self.recorder = Recorder(path, model, inner, **recorder_kwargs)

        def on_step_end(self, args, state, control, **kwargs):
            if self.recorder is not None:
                self.recorder.step()  # the Trainer logs its loss after this hook: see on_log

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.recorder is not None and logs and "loss" in logs:
                self.recorder.log_loss(float(logs["loss"]), state.global_step)

        def on_train_end(self, args, state, control, **kwargs):
            if self.recorder is not None:
                self.recorder.close()

    return SharpscopeTrainerCallback()
