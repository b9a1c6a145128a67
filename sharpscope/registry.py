"""What a run file may name. Nothing is imported or called from a file unless it is trusted.

Run files name the model factory, the loss and the optimizer class that rebuild a run offline
(``meta["model_factory"] = "package.module:function"``). Importing whatever a file names would let
a crafted file run code (``"os:system"``), so -- like ``torch.load(weights_only=True)`` -- a name
read from a file is resolved only if it is

1. sharpscope's own: the model families (``sharpscope.models:MLP``, ``CNN``, ``Transformer``,
   ``MoE``, their short names ``mlp``, ``cnn``, ...), the demo's ``sharpscope.demo:digits_mlp``,
   the Hugging Face factories and loss closures of :mod:`sharpscope.hf`
   (``sharpscope.hf:causal_lm_from_config``, ``sharpscope.hf:causal_lm_loss``, ...),
   ``torch.nn`` losses and ``torch.optim`` optimizers (permanent names: stored files keep working);
2. registered: :func:`register_model`, :func:`register_loss`, :func:`register_optimizer` in this
   process, or an entry point of an installed package in the groups ``sharpscope.models``,
   ``sharpscope.losses`` or ``sharpscope.optimizers`` (each entry point's value, ``"module:attr"``,
   is trusted), which reaches a fresh ``sharpscope spectrum`` process and Dask workers too;
3. allowed explicitly: ``allow=["mypkg.models:*"]`` (glob patterns over ``"module:attr"``;
   ``allow_factories=`` on :func:`~sharpscope.run_spectrum_job`, ``--allow-factory`` on the CLI).

Anything else is refused *before* its module is imported, with a one-line error saying how to
allow it.
"""
from __future__ import annotations

import fnmatch
import importlib
from functools import lru_cache
from importlib import metadata
from typing import Any, Callable, Iterable, Literal, TypeVar

import torch
from torch import nn

__all__ = ["register_model", "register_loss", "register_optimizer", "resolve_trusted", "is_trusted",
           "UntrustedNameError", "Kind"]

Kind = Literal["model", "loss", "optimizer"]
T = TypeVar("T")

_OWN_MODELS = ("sharpscope.models:MLP", "sharpscope.models:CNN", "sharpscope.models:Transformer",
               "sharpscope.models:MoE", "sharpscope.demo:digits_mlp", "sharpscope.hf:causal_lm_from_config",
               "sharpscope.hf:model_from_config")
# loss closures (factories called with no arguments, returning a sharpscope.BatchLoss)
_OWN_LOSSES = ("sharpscope.hf:causal_lm_loss", "sharpscope.hf:masked_lm_loss",
               "sharpscope.hf:sequence_classification_loss")
_SHORT_NAMES = {"mlp": "sharpscope.models:MLP", "cnn": "sharpscope.models:CNN",
                "transformer": "sharpscope.models:Transformer", "moe": "sharpscope.models:MoE"}
_GROUPS = {"model": "sharpscope.models", "loss": "sharpscope.losses", "optimizer": "sharpscope.optimizers"}
_REGISTERED: dict[str, dict[str, Any]] = {"model": {}, "loss": {}, "optimizer": {}}


class UntrustedNameError(ValueError):
    """A file names a factory, loss or optimizer that is not trusted (see the module docstring)."""


def _name_of(obj: Any) -> str:
    return f"{obj.__module__}:{obj.__qualname__}"


def _register(kind: Kind, obj: T, name: str | None) -> T:
    if not callable(obj):
        raise TypeError(f"register_{kind} needs a callable, got {type(obj).__name__}")
    _REGISTERED[kind][name or _name_of(obj)] = obj
    return obj


def register_model(fn: Callable | None = None, *, name: str | None = None):
    """Trust a model factory (a decorator, or a call). Run files name it as ``"module:qualname"``
    (or ``name``). For a fresh process (``sharpscope spectrum``, Dask workers) declare an entry point
    in the ``sharpscope.models`` group of your package instead, e.g. in pyproject.toml::

        [project.entry-points."sharpscope.models"]
        make_mlp = "mypkg.models:make_mlp"
    """
    if fn is None:
        return lambda f: _register("model", f, name)
    return _register("model", fn, name)


def register_loss(fn: Callable, *, name: str | None = None) -> Callable:
    """Trust a loss factory (``"module:qualname"``, called with no arguments to build the loss)."""
    return _register("loss", fn, name)


def register_optimizer(cls: type, *, name: str | None = None) -> type:
    """Trust an optimizer class (run files name it as ``"module.Class"``)."""
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise TypeError(f"register_optimizer needs a torch.optim.Optimizer subclass, got {cls!r}")
    _REGISTERED["optimizer"][f"{cls.__module__}.{cls.__qualname__}"] = cls
    if name:
        _REGISTERED["optimizer"][name] = cls
    return cls


@lru_cache(maxsize=None)
def _entry_point_values(kind: Kind) -> frozenset[str]:
    """``"module:attr"`` values of the installed entry points of ``kind``'s group (read once)."""
    try:
        return frozenset(ep.value.replace(" ", "") for ep in metadata.entry_points(group=_GROUPS[kind]))
    except Exception:  # noqa: BLE001 - a broken distribution must not stop the trusted built-ins
        return frozenset()


def _as_reference(kind: Kind, spec: str) -> str:
    """The ``"module:attr"`` form of a stored name (optimizers are stored as ``"module.Class"``)."""
    if kind == "optimizer" and ":" not in spec:
        module, _, attr = spec.rpartition(".")
        return f"{module}:{attr}"
    return _SHORT_NAMES.get(spec.lower(), spec) if kind == "model" else spec


def _builtin(kind: Kind, reference: str) -> bool:
    module = reference.partition(":")[0]
    if kind == "model":
        return reference in _OWN_MODELS
    if kind == "loss":
        return module in ("torch.nn", "torch.nn.modules.loss") or reference in _OWN_LOSSES
    return module == "torch.optim" or module.startswith("torch.optim.") or module == "sharpscope.optim"


def _import(reference: str) -> Any:
    module_name, _, attr = reference.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _check(kind: Kind, reference: str, obj: Any) -> Any:
    """Built-in names must resolve to what their kind promises (a loss, an optimizer class)."""
    builtin = _builtin(kind, reference)
    if builtin and kind == "loss" and reference not in _OWN_LOSSES and not (
            isinstance(obj, type) and issubclass(obj, nn.modules.loss._Loss)):
        raise ValueError(f"{reference!r} is not a torch.nn loss")
    if builtin and kind == "optimizer" and not (isinstance(obj, type) and (
            issubclass(obj, torch.optim.Optimizer) or obj.__module__ == "sharpscope.optim")):
        raise ValueError(f"{reference!r} is not an optimizer class")
    if not callable(obj):
        raise ValueError(f"{reference!r} is not callable")
    return obj


def is_trusted(kind: Kind, spec: Any, allow: Iterable[str] = (), where: str = "the run file") -> str:
    """Check, without importing anything, that a stored name is trusted (module docstring); returns its
    ``"module:attr"`` reference, or raises UntrustedNameError with how to allow it."""
    if not isinstance(spec, str) or not spec:
        raise UntrustedNameError(f"{where} names the {kind} {spec!r}: expected a 'module:function' string")
    reference = _as_reference(kind, spec)
    if reference in _REGISTERED[kind] or spec in _REGISTERED[kind]:
        return reference
    if (_builtin(kind, reference) or reference in _entry_point_values(kind)
            or any(fnmatch.fnmatchcase(reference, p) for p in allow)):
        return reference
    module = reference.partition(":")[0] or reference
    raise UntrustedNameError(
        f"{where} names the {kind} {spec!r}, which is not trusted: sharpscope imports only its own models, "
        f"torch losses and optimizers, registered names (ss.register_{kind}, or the '{_GROUPS[kind]}' entry "
        f"point) and names you allow: allow_factories=['{module}:*'] (command line: --allow-factory '{module}:*')")


def resolve_trusted(kind: Kind, spec: str, allow: Iterable[str] = (), where: str = "the run file") -> Any:
    """The object a stored ``spec`` names, if trusted (module docstring); else UntrustedNameError,
    raised before anything is imported. ``where`` names the source in the message."""
    reference = is_trusted(kind, spec, allow, where)
    registered = _REGISTERED[kind].get(reference, _REGISTERED[kind].get(spec))
    if registered is not None:
        return registered
    if reference.count(":") != 1:
        raise ValueError(f"{where} names the {kind} {spec!r}: expected 'module:attr'")
    try:
        obj = _import(reference)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"{where} names the {kind} {spec!r}, which cannot be imported: {err}") from None
    return _check(kind, reference, obj)
