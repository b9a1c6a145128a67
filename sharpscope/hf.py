"""Hugging Face models and batches: built-in loss closures and model factories that run files may name.

``transformers`` is an optional extra (``pip install 'sharpscope[huggingface]'``), imported only when a
factory below builds a model. The losses need only torch.

Losses (:func:`~sharpscope.batch_loss` closures over dict batches, each with the outputs/loss split the
GGN and the NTK need; trusted names for run files, ``meta["loss"]``):

==========================================  =========================================================
``sharpscope.hf:causal_lm_loss``            next-token cross-entropy: the logits at positions
                                            ``0..T-2`` predict ``labels[:, 1:]`` (HF's shift), label
                                            ``-100`` ignored, mean over the predicted tokens; weight:
                                            their number (a token-weighted mean over batches)
``sharpscope.hf:masked_lm_loss``            the same without the shift (masked LM, token classification)
``sharpscope.hf:sequence_classification_loss``  cross-entropy of ``(B, C)`` logits against ``(B,)``
                                            labels (float labels: MSE for one output, else
                                            BCE-with-logits, as HF's ``problem_type``); weight ``B``
==========================================  =========================================================

Each is ``model(**batch).loss`` of the matching Hugging Face head, computed from the logits in the
logits' dtype (Hugging Face casts the logits to float32 first, which would make a float64 model's
Hessian float32-accurate; half-precision logits are still upcast to float32, as there).

Model factories (trusted names for ``meta["model_factory"]``): :func:`causal_lm_from_config` and
:func:`model_from_config` build a model from its JSON config (``model.config.to_dict()``) with random
weights (the checkpoint is loaded over them); :func:`causal_lm_meta` is the Recorder meta that names
them. Nothing is downloaded and no remote code runs.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from .closures import BatchLoss, batch_loss

__all__ = ["causal_lm_loss", "masked_lm_loss", "sequence_classification_loss", "causal_lm_from_config",
           "model_from_config", "causal_lm_meta", "is_causal_lm", "IGNORE_INDEX"]

IGNORE_INDEX = -100


def _labels(batch: Any, who: str) -> torch.Tensor:
    if not isinstance(batch, Mapping) or "labels" not in batch:
        keys = list(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise ValueError(f"{who} needs a dict batch with 'labels' (token ids to predict, {IGNORE_INDEX} where "
                         f"ignored), got {keys}")
    return batch["labels"]


def _model_inputs(batch: Mapping) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


def _logits(out: Any) -> torch.Tensor:
    logits = out.logits if hasattr(out, "logits") else out["logits"] if isinstance(out, Mapping) else out
    if logits.dtype in (torch.float16, torch.bfloat16):  # as Hugging Face: half-precision logits upcast
        logits = logits.float()
    return logits


def _token_ce(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).to(logits.device),
                           ignore_index=ignore_index)


def causal_lm_loss(ignore_index: int = IGNORE_INDEX) -> BatchLoss:
    """Next-token cross-entropy of a causal LM on ``{"input_ids", "attention_mask", "labels", ...}`` batches:
    ``model(**batch).loss`` (logits ``0..T-2`` predict ``labels[:, 1:]``; ``ignore_index`` ignored),
    weighted by the number of predicted tokens. Outputs: the logits (``use_cache=False``)."""
    def outputs(model: nn.Module, batch: Mapping) -> torch.Tensor:
        return _logits(model(**_model_inputs(batch), use_cache=False))

    def loss_of_outputs(logits: torch.Tensor, batch: Mapping) -> torch.Tensor:
        return _token_ce(logits[..., :-1, :], _labels(batch, "causal_lm_loss")[..., 1:], ignore_index)

    def weight(batch: Mapping) -> torch.Tensor:
        return (_labels(batch, "causal_lm_loss")[..., 1:] != ignore_index).sum()

    return batch_loss(weight=weight, outputs=outputs, loss_of_outputs=loss_of_outputs,
                      name="sharpscope.hf:causal_lm_loss" if ignore_index == IGNORE_INDEX else None)


def masked_lm_loss(ignore_index: int = IGNORE_INDEX) -> BatchLoss:
    """Token cross-entropy without a shift (masked LM, token classification): ``model(**batch).loss`` of
    those heads, weighted by the number of labels that are not ``ignore_index``."""
    def outputs(model: nn.Module, batch: Mapping) -> torch.Tensor:
        return _logits(model(**_model_inputs(batch)))

    def loss_of_outputs(logits: torch.Tensor, batch: Mapping) -> torch.Tensor:
        return _token_ce(logits, _labels(batch, "masked_lm_loss"), ignore_index)

    def weight(batch: Mapping) -> torch.Tensor:
        return (_labels(batch, "masked_lm_loss") != ignore_index).sum()

    return batch_loss(weight=weight, outputs=outputs, loss_of_outputs=loss_of_outputs,
                      name="sharpscope.hf:masked_lm_loss" if ignore_index == IGNORE_INDEX else None)


def sequence_classification_loss() -> BatchLoss:
    """``model(**batch).loss`` of a sequence-classification head: cross-entropy for integer labels, MSE
    for float labels and one output, BCE-with-logits for float labels and several (HF's ``problem_type``
    rule); weight: the number of sequences."""
    def outputs(model: nn.Module, batch: Mapping) -> torch.Tensor:
        return _logits(model(**_model_inputs(batch)))

    def loss_of_outputs(logits: torch.Tensor, batch: Mapping) -> torch.Tensor:
        labels = _labels(batch, "sequence_classification_loss").to(logits.device)
        if not labels.is_floating_point():
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        if logits.shape[-1] == 1:
            return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype).reshape(logits.shape[:-1]))
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))

    def weight(batch: Mapping) -> int:
        return int(_labels(batch, "sequence_classification_loss").shape[0])

    return batch_loss(weight=weight, outputs=outputs, loss_of_outputs=loss_of_outputs,
                      name="sharpscope.hf:sequence_classification_loss")


# -- models -------------------------------------------------------------------------------------------------
def _transformers():
    try:
        import transformers
    except ImportError:
        raise ImportError("sharpscope.hf's model factories need transformers: pip install 'sharpscope[huggingface]'") from None
    return transformers


def _config(config: Mapping[str, Any]):
    transformers = _transformers()
    if not isinstance(config, Mapping) or not isinstance(config.get("model_type"), str):
        raise ValueError("config must be a model config as a JSON object with its 'model_type' (model.config.to_dict())")
    rest = {k: v for k, v in config.items() if k != "model_type"}
    try:
        return transformers.AutoConfig.for_model(config["model_type"], **rest)
    except (KeyError, ValueError) as err:
        raise ValueError(f"cannot build a Hugging Face config of model_type {config['model_type']!r}: {err}") from None


def _finish(model: nn.Module, architecture: str | None, dtype: str | None) -> nn.Module:
    if architecture is not None and type(model).__name__ != architecture:
        raise ValueError(f"the config builds a {type(model).__name__}, not the recorded {architecture}")
    if dtype is not None:
        want = getattr(torch, str(dtype).removeprefix("torch."), None)
        if not isinstance(want, torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}")
        model = model.to(want)
    return model


def causal_lm_from_config(config: Mapping[str, Any], architecture: str | None = None,
                          dtype: str | None = None) -> nn.Module:
    """A causal LM (``AutoModelForCausalLM``) from its JSON config, randomly initialized, no download and
    no remote code; ``architecture`` (the class name) is checked, ``dtype`` (e.g. ``"float32"``) applied."""
    transformers = _transformers()
    model = transformers.AutoModelForCausalLM.from_config(_config(config), trust_remote_code=False)
    return _finish(model, architecture, dtype)


def model_from_config(config: Mapping[str, Any], architecture: str, dtype: str | None = None) -> nn.Module:
    """Any Hugging Face model class of ``transformers`` (``architecture``, e.g. ``"BertForMaskedLM"``) from
    its JSON config, randomly initialized; only ``PreTrainedModel`` subclasses are built."""
    transformers = _transformers()
    cls = getattr(transformers, architecture, None) if isinstance(architecture, str) else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ValueError(f"{architecture!r} is not a transformers model class")
    return _finish(cls(_config(config)), None, dtype)


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` is one of the causal-LM classes of ``transformers`` (AutoModelForCausalLM's)."""
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:
        return False
    names = set()
    for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update([value] if isinstance(value, str) else value)
    return type(model).__name__ in names


def causal_lm_meta(model: nn.Module) -> dict:
    """Recorder meta for a Hugging Face causal LM: the trusted factory, its kwargs (config, class, dtype)
    and the loss, so that ``sharpscope spectrum`` rebuilds and measures the run."""
    config = model.config.to_dict()
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return {"model_factory": "sharpscope.hf:causal_lm_from_config",
            "model_kwargs": {"config": config, "architecture": type(model).__name__, "dtype": dtype},
            "loss": "sharpscope.hf:causal_lm_loss"}
