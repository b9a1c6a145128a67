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
them. Nothing is downloaded and no remote code runs: a config (a run file's, so anyone's) is built only from
an allow-list -- a built-in model type, the fields its config class defines (sub-configs checked the same
way), attention and experts implementations built into torch (``eager``, ``sdpa``, ``flex_attention``;
``flash_attention_*`` may fall back to kernels from the Hub) -- and anything else is refused in one line
naming the field (``use_pretrained_backbone``, ``backbone``, ``trust_remote_code``, ``auto_map``,
``quantization_config``, an ``attn_implementation`` naming a Hub repo, the ``timm`` model types, ...); the
label ``_name_or_path`` (where the weights came from) is dropped. The build itself runs in Hugging Face Hub
offline mode, so a field this list let through still could not download anything.
"""
from __future__ import annotations

from functools import lru_cache
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


# A config from a run file is built only from what this allow-list accepts (_checked_config): the fields its
# config class defines, recursively for sub-configs; attention / experts implementations built into torch;
# no model type that builds a third-party model by name. Known fields that would download or run code get
# their reason in the one-line refusal.
_ATTENTION = ("eager", "sdpa", "flex_attention")  # flash_attention_* may fall back to kernels from the Hub
_EXPERTS = ("eager", "grouped_mm", "batched_mm")
_IMPLEMENTATIONS = {"attn_implementation": _ATTENTION, "experts_implementation": _EXPERTS}
_LABELS = ("_name_or_path", "name_or_path")  # where the weights came from: never needed to build, dropped
_ALSO = frozenset({"model_type", "transformers_version", "torch_dtype", "output_attentions", *_IMPLEMENTATIONS, *_LABELS})
_NOT_BUILT = {"timm_backbone": "builds a timm model by name (which timm may fetch from the Hub)",
              "timm_wrapper": "builds a timm model by name (which timm may fetch from the Hub)"}
_REASONS = {
    "use_pretrained_backbone": "loads pretrained backbone weights from the Hub",
    "use_timm_backbone": "builds a timm backbone by name (which may reach the Hub)",
    "backbone": "names a backbone to fetch (a Hub repo or a timm model)",
    "backbone_kwargs": "configures a backbone fetched by name",
    "trust_remote_code": "runs code from the Hub",
    "auto_map": "names remote code to run",
    "custom_pipelines": "names remote code to run",
    "quantization_config": "loads a quantization backend",
    "fusion_config": "patches the model with fused kernels",
    "use_kernels": "loads kernels from the Hub",
    "kernel_config": "loads kernels from the Hub",
    "distributed_config": "sets up a distributed backend",
    "transformers_weights": "names a weights file to load",
    "target_lang": "downloads language adapters",
}


@lru_cache(maxsize=None)
def _config_fields(cls: type) -> frozenset[str]:
    """The fields a config class defines (its dataclass fields and what its default ``to_dict()`` holds)."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    try:
        names |= set(cls().to_dict())
    except Exception:  # noqa: BLE001 - a config class without defaults: its declared fields only
        pass
    return frozenset(names | _ALSO)


def _refuse(path: str, why: str) -> ValueError:
    return ValueError(f"the Hugging Face config's {path} {why}: sharpscope builds Hugging Face models from their config "
                      "alone (random weights, no download, no remote code); remove it from the run's model_kwargs")


def _checked_config(config: Any, path: str = "config") -> dict:
    """``config`` if the allow-list above accepts it (labels dropped); else one ValueError line naming the field."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if not isinstance(config, Mapping) or not isinstance(config.get("model_type"), str):
        raise ValueError("config must be a model config as a JSON object with its 'model_type' (model.config.to_dict())")
    model_type = config["model_type"]
    if model_type in _NOT_BUILT:
        raise _refuse(f"model_type {model_type!r}", _NOT_BUILT[model_type])
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"{path}: {model_type!r} is not a model type of this transformers "
                         f"({_transformers().__version__}); remote model types are not built")
    cls = CONFIG_MAPPING[model_type]
    fields, sub_configs = _config_fields(cls), dict(getattr(cls, "sub_configs", None) or {})
    out = {}
    for key, value in config.items():
        where = f"{path}.{key}"
        if not isinstance(key, str) or key not in fields:
            raise _refuse(f"field {where!r}", _REASONS.get(key, f"is not a field of {cls.__name__}"))
        if key in _LABELS:
            continue
        if key in _IMPLEMENTATIONS:
            for v in (value.values() if isinstance(value, Mapping) else [value]):
                if v is not None and v not in _IMPLEMENTATIONS[key]:
                    raise _refuse(f"{where} {v!r}", f"is not one of the implementations built into torch "
                                                    f"({', '.join(_IMPLEMENTATIONS[key])}); others come from the Hub")
        if key in sub_configs and isinstance(value, Mapping):
            sub = sub_configs[key]
            own_type = getattr(sub, "model_type", "") or None
            value = _checked_config({**value, "model_type": value.get("model_type", own_type)}
                                    if own_type else value, where)
        out[key] = value
    return out


class _Offline:
    """Hugging Face Hub offline mode for the duration of a build: whatever the allow-list missed cannot reach the
    network (huggingface_hub refuses every request while ``constants.HF_HUB_OFFLINE`` is set)."""

    def __enter__(self):
        from huggingface_hub import constants

        self._constants, self._was = constants, constants.HF_HUB_OFFLINE
        constants.HF_HUB_OFFLINE = True
        return self

    def __exit__(self, *exc) -> None:
        self._constants.HF_HUB_OFFLINE = self._was


def _config(config: Mapping[str, Any]):
    transformers = _transformers()
    checked = _checked_config(config)
    rest = {k: v for k, v in checked.items() if k != "model_type"}
    try:
        with _Offline():
            return transformers.AutoConfig.for_model(checked["model_type"], **rest)
    except (KeyError, ValueError) as err:
        raise ValueError(f"cannot build a Hugging Face config of model_type {checked['model_type']!r}: {err}") from None


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
    no remote code (the config's fields are checked first, see the module docstring); ``architecture``
    (the class name) is checked, ``dtype`` (e.g. ``"float32"``) applied."""
    transformers = _transformers()
    built = _config(config)
    with _Offline():
        model = transformers.AutoModelForCausalLM.from_config(built, trust_remote_code=False)
    return _finish(model, architecture, dtype)


def model_from_config(config: Mapping[str, Any], architecture: str, dtype: str | None = None) -> nn.Module:
    """Any Hugging Face model class of ``transformers`` (``architecture``, e.g. ``"BertForMaskedLM"``) from
    its JSON config, randomly initialized; only ``PreTrainedModel`` subclasses of the config's own class are built."""
    transformers = _transformers()
    cls = getattr(transformers, architecture, None) if isinstance(architecture, str) and architecture.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ValueError(f"{architecture!r} is not a transformers model class")
    built = _config(config)
    if not isinstance(built, cls.config_class):
        raise ValueError(f"{architecture} takes a {cls.config_class.__name__}, not the config's {type(built).__name__}")
    with _Offline():
        model = cls(built)
    return _finish(model, None, dtype)


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
    and the loss, so that ``sharpscope spectrum`` rebuilds and measures the run. Config entries that are not
    fields of the config's class (a Hub config's leftovers, e.g. GPT-2's ``n_ctx``) are left out with a
    warning: :func:`causal_lm_from_config` builds only from fields."""
    import warnings

    config = model.config.to_dict()
    fields = _config_fields(type(model.config))
    extra = sorted(k for k in config if k not in fields)
    if extra:
        warnings.warn(f"causal_lm_meta: the model's config holds entries its class {type(model.config).__name__} does not "
                      f"define ({', '.join(extra)}): left out of the run's meta (not part of the rebuilt architecture)",
                      stacklevel=2)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return {"model_factory": "sharpscope.hf:causal_lm_from_config",
            "model_kwargs": {"config": {k: v for k, v in config.items() if k not in extra},
                             "architecture": type(model).__name__, "dtype": dtype},
            "loss": "sharpscope.hf:causal_lm_loss"}
