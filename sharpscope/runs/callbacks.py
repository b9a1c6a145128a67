"""Thin framework adapters over :class:`sharpscope.Recorder` (optional extras; imported lazily).

* :func:`lightning_callback` -- a PyTorch Lightning ``Callback``: one ``Recorder.step`` per optimizer
  step (``on_train_batch_end`` after an accumulation boundary), closed at the end of fitting. Online
  sharpness metrics go through ``pl_module.log`` (``trainer.callback_metrics``: progress bar,
  ``ModelCheckpoint(monitor=...)``, ``EarlyStopping``) and to every ``trainer.loggers`` at the step
  they were measured (written directly: Lightning's ``log_every_n_steps`` would drop most of them).
* :func:`huggingface_callback` -- a ``transformers.TrainerCallback``: ``on_step_end`` steps the
  Recorder, ``on_train_end`` closes it. The Recorder is created on ``on_train_begin``, when the
  Trainer's model and optimizer exist. At a step with online sharpness it asks the Trainer to log
  (``control.should_log``) and adds the metrics to that log (``on_log``): ``trainer.state.log_history``,
  ``trainer_state.json`` and the callbacks after it; ``callback.attach(trainer)`` puts it before the
  ``report_to`` integrations (TensorBoard, W&B, ...) so that they receive the metrics too.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

from .capture import Recorder

__all__ = ["lightning_callback", "huggingface_callback"]


class _Pending:
    """A Recorder ``log_fn`` that keeps the last metrics for the framework to log, and calls the user's own."""

    def __init__(self, user: Callable[[dict, int], Any] | None) -> None:
        self.user, self.metrics, self.step = user, {}, None

    def __call__(self, metrics: dict, step: int) -> None:
        self.metrics, self.step = dict(metrics), step
        if self.user is not None:
            self.user(metrics, step)

    def take(self) -> tuple[dict, int | None]:
        metrics, step = self.metrics, self.step
        self.metrics, self.step = {}, None
        return metrics, step


def lightning_callback(path: str, **recorder_kwargs: Any):
    """A Lightning callback recording ``trainer.lightning_module`` and its first optimizer."""
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
            self._pending = _Pending(recorder_kwargs.get("log_fn"))

        def on_train_start(self, trainer, pl_module) -> None:
            kwargs = {**recorder_kwargs, "log_fn": self._pending}
            self.recorder = Recorder(path, pl_module, trainer.optimizers[0] if trainer.optimizers else None, **kwargs)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if self.recorder is None:
                return
            if trainer.global_step > self.recorder.step_count:  # an optimizer step happened
                loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
                self.recorder.step(loss=loss)
                _lightning_log(trainer, pl_module, *self._pending.take())

        def on_train_end(self, trainer, pl_module) -> None:
            if self.recorder is not None:
                self.recorder.close()

    return SharpscopeCallback()


def huggingface_callback(path: str, **recorder_kwargs: Any):
    """A ``transformers.TrainerCallback`` recording the Trainer's model and (unwrapped) optimizer. The
    Trainer logs its loss (averaged over ``logging_steps``) after the step's hooks, so checkpoints hold
    no loss; the logged losses go to the run's ``loss`` scalar log, which the report falls back to."""
    try:
        from transformers import TrainerCallback
    except ImportError:
        raise ImportError("huggingface_callback needs transformers installed") from None

    class SharpscopeTrainerCallback(TrainerCallback):
        def __init__(self) -> None:
            self.recorder: Recorder | None = None
            self._pending = _Pending(recorder_kwargs.get("log_fn"))

        def attach(self, trainer):
            """Add this callback to ``trainer`` before its ``report_to`` integrations (which then log the
            sharpness metrics too); returns the trainer."""
            return _attach_first(self, trainer)

        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            # the Trainer hands over accelerate's wrapper; its state lives in the torch optimizer inside
            inner = getattr(optimizer, "optimizer", optimizer)
            self.recorder = Recorder(path, model, inner, **_huggingface_defaults(model, recorder_kwargs, self._pending))

        def on_step_end(self, args, state, control, **kwargs):
            if self.recorder is not None:
                self.recorder.step()  # the Trainer logs its loss after this hook: see on_log
                if self._pending.metrics:
                    control.should_log = True  # the metrics are logged at the step they were measured

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.recorder is not None and logs and "loss" in logs:
                self.recorder.log_loss(float(logs["loss"]), state.global_step)
            _trainer_log(state, logs, self._pending.take()[0])

        def on_train_end(self, args, state, control, **kwargs):
            if self.recorder is not None:
                self.recorder.close()

    return SharpscopeTrainerCallback()


def _lightning_log(trainer, pl_module, metrics: dict, step: int | None) -> None:
    """Sharpness metrics through Lightning: ``pl_module.log`` (callback_metrics: monitors, progress bar; not
    the loggers, which ``log_every_n_steps`` would thin out) and every logger at the step measured."""
    if not metrics:
        return
    for name, value in metrics.items():
        pl_module.log(name, value, on_step=True, on_epoch=False, logger=False, batch_size=1)
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)


def _attach_first(callback, trainer):
    """Insert ``callback`` right after the Trainer's DefaultFlowCallback, before the report_to integrations."""
    callbacks = trainer.callback_handler.callbacks
    if callback in callbacks:
        callbacks.remove(callback)
    flow = [i for i, cb in enumerate(callbacks) if type(cb).__name__ == "DefaultFlowCallback"]
    callbacks.insert(flow[0] + 1 if flow else 0, callback)
    return trainer


def _trainer_log(state, logs: dict | None, metrics: dict) -> None:
    """Add the metrics to a Trainer log event: ``logs`` (seen by the callbacks after this one: the console,
    the integrations when attached first) and the Trainer's own record, appended before ``on_log``."""
    if not metrics or logs is None:
        return
    logs.update(metrics)
    if state.log_history and state.log_history[-1].get("step") == state.global_step:
        state.log_history[-1].update(metrics)


def _huggingface_defaults(model, recorder_kwargs: Mapping[str, Any], log_fn: Callable) -> dict[str, Any]:
    """The Recorder's arguments for a Trainer's model: for a Hugging Face causal LM whose meta names no
    factory, :func:`sharpscope.hf.causal_lm_meta` (so that ``sharpscope spectrum`` rebuilds the run), and
    :func:`sharpscope.hf.causal_lm_loss` as the loss of a Mapping batch when none is given."""
    from ..hf import causal_lm_loss, causal_lm_meta, is_causal_lm

    kwargs = {**recorder_kwargs, "log_fn": log_fn}
    if is_causal_lm(model):
        if kwargs.get("loss_fn") is None and isinstance(kwargs.get("batch"), Mapping):
            kwargs["loss_fn"] = causal_lm_loss()
        meta = dict(kwargs.get("meta") or {})
        if not meta.get("model_factory"):
            defaults = causal_lm_meta(model)
            if kwargs.get("loss_fn") is not None:  # the Recorder records the loss given (its trusted name)
                defaults.pop("loss")
            kwargs["meta"] = {**defaults, **meta}
    return kwargs
