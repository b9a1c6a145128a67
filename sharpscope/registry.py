"""What a run file may name. Nothing is imported or called from a file unless the user trusted it.

Run files name the model factory, the loss and the optimizer class that rebuild a run offline
(``meta["model_factory"] = "package.module:function"``). Importing whatever a file names would let
a crafted file run code (``"os:system"``), so -- like ``torch.load(weights_only=True)`` -- a name
read from a file must first be a *name*, then be *trusted*, and then resolve to what it promises.

A name is ``"module:function"``: ``module`` a dotted module name of ASCII identifiers, ``function``
one ASCII identifier that is not a dunder. Attribute chains are never followed
(``"mymodels:torch.os.system"`` is not a name). Optimizer classes are stored as ``"module.Class"``
(split at the last dot). The name must be bound at the top level of the module (its ``vars()``) to a
function or a class: never a module, an instance or a C builtin.

Trust comes only from the user's own act, never from what a file holds (a probe file a run names, a
checksum beside it):

1. sharpscope's own names: the model families (``sharpscope.models:MLP``, ``CNN``, ``Transformer``,
   ``MoE``, their short names ``mlp``, ...), ``sharpscope.demo:digits_mlp``, the Hugging Face
   factories and loss closures of :mod:`sharpscope.hf`, ``torch.nn`` losses and ``torch.optim``
   optimizers (permanent names: stored files keep working);
2. registration: :func:`register_model`, :func:`register_loss`, :func:`register_optimizer` in this
   process, or an entry point of an installed package in the groups ``sharpscope.models``,
   ``sharpscope.losses`` or ``sharpscope.optimizers`` (each entry point's value is trusted exactly);
3. allow-patterns the user gives (``allow_factories=`` on :func:`~sharpscope.run_spectrum_job`,
   ``--allow-factory`` on the command line; ``sharpscope sweep PROBE.toml`` gives the probe's own
   factory and loss to the spectrum jobs it launches):

   ==========================  ===================================================================
   ``mymodels:make``           exactly that name
   ``mymodels:*``              every public function or class *defined in* ``mymodels``
   ``mymodels.*:*``            ... defined in any submodule of ``mymodels`` (any depth; not
                               ``mymodels`` itself)
   ``mymodels.*:make``         ``make`` of any submodule, defined in one of them
   ==========================  ===================================================================

   Patterns match module names only, never across the ``:``; ``*`` matches public identifiers
   (no leading ``_``); ``?``, ``[...]``, ``**`` and ``*`` inside a name are refused, and so are
   wildcards over sharpscope, torch and the standard library (they hold general-purpose functions:
   ``torch.hub:load`` runs code from the network). A wildcard trusts only what its modules
   *define* (``obj.__module__``): ``from os import system`` inside ``mymodels`` does not make
   ``mymodels:system`` trusted under ``mymodels:*``.

Anything else is refused *before* its module is imported, with a one-line error saying how to allow it.
The user-facing rules are in ``docs/trust.md``.
"""
from __future__ import annotations

import importlib
import inspect
import keyword
import re
import sys
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata
from typing import Any, Callable, Iterable, Literal, TypeVar

import torch
from torch import nn

__all__ = ["register_model", "register_loss", "register_optimizer", "resolve_trusted", "is_trusted",
           "allow_patterns", "allowances", "UntrustedNameError", "Kind"]

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
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# packages over which no wildcard is accepted: their general-purpose functions would become factories
_NO_WILDCARDS = frozenset({"sharpscope", "torch", "builtins", *sys.stdlib_module_names})
_PATTERN_FORMS = ("an allow pattern is 'module:function', 'module:*' (every public function or class defined in "
                  "module) or 'package.*:*' (defined in its submodules)")


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


# -- names ----------------------------------------------------------------------------------------------------
def _is_identifier(text: str) -> bool:
    """An ASCII identifier that is not a keyword (no unicode look-alikes, no NFKC folding)."""
    return bool(_IDENTIFIER.fullmatch(text)) and not keyword.iskeyword(text)


def _is_module_name(text: str) -> bool:
    return all(_is_identifier(part) for part in text.split("."))


def _split(reference: str) -> tuple[str, str] | None:
    """``(module, function)`` of a well-formed name (module docstring), else None."""
    module, sep, name = reference.partition(":")
    if not sep or not _is_module_name(module) or not _is_identifier(name) or name.startswith("__"):
        return None
    return module, name


@dataclass(frozen=True)
class _Pattern:
    """One allow-pattern: a module (or, ``submodules``, every module below a package) and a name (None: ``*``)."""

    text: str
    module: str
    submodules: bool
    name: str | None

    def allows_module(self, module: str) -> bool:
        return module.startswith(self.module + ".") if self.submodules else module == self.module

    def allows(self, module: str, name: str) -> bool:
        return self.allows_module(module) and (name == self.name if self.name else not name.startswith("_"))

    @property
    def exact(self) -> bool:
        return not self.submodules and self.name is not None


@lru_cache(maxsize=256)
def _parse_pattern(text: str) -> _Pattern:
    module, sep, name = text.partition(":")
    submodules = module.endswith(".*")
    base = module[:-2] if submodules else module
    if not sep or not _is_module_name(base) or not (name == "*" or (_is_identifier(name) and not name.startswith("__"))):
        raise ValueError(f"allow pattern {text!r} is not accepted: {_PATTERN_FORMS}; '?', '[...]', '**' and '*' inside "
                         "a name are not patterns here")
    wildcard = submodules or name == "*"
    if wildcard and base.partition(".")[0] in _NO_WILDCARDS:
        raise ValueError(f"allow pattern {text!r} is not accepted: no wildcard over {base.partition('.')[0]} (it holds "
                         "general-purpose functions such as torch.hub:load or sharpscope.models:build_model); name the one "
                         f"function you trust, e.g. '{base}:function'")
    return _Pattern(text, base, submodules, None if name == "*" else name)


def allow_patterns(patterns: Iterable[str]) -> list[str]:
    """Check allow-patterns (module docstring) and return them as a list; a bad one is one ValueError line."""
    if isinstance(patterns, str):
        patterns = [patterns]
    out = []
    for p in patterns:
        if not isinstance(p, str):
            raise ValueError(f"allow pattern {p!r} is not a string: {_PATTERN_FORMS}")
        _parse_pattern(p)
        out.append(p)
    return out


def allowances(*names: str | None) -> list[str]:
    """The allow-list that trusts exactly ``names`` (a probe file's factory and loss, given on the command line):
    ``module:function`` names kept, built-in short names and ``torch.nn`` loss names (which need no allowance)
    left out. A name that is neither is one ValueError line."""
    out = []
    for name in names:
        if not name or (isinstance(name, str) and ":" not in name and (name.lower() in _SHORT_NAMES or _is_identifier(name))):
            continue
        if not isinstance(name, str) or _split(name) is None:
            raise ValueError(f"{name!r} is not a 'module:function' name (a module and one function or class defined at "
                             "its top level; attribute chains are not followed): spectrum jobs could not rebuild its runs")
        out.append(name)
    return out


# -- trust ----------------------------------------------------------------------------------------------------
@lru_cache(maxsize=None)
def _entry_point_values(kind: Kind) -> dict[str, metadata.EntryPoint]:
    """The installed entry points of ``kind``'s group by value, ``"module:attr"`` (read once)."""
    try:
        return {ep.value.replace(" ", ""): ep for ep in metadata.entry_points(group=_GROUPS[kind])}
    except Exception:  # noqa: BLE001 - a broken distribution must not stop the trusted built-ins
        return {}


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


def _trust(kind: Kind, spec: Any, allow: Iterable[str], where: str) -> tuple[str, str, list[_Pattern], list[_Pattern]]:
    """``(reference, source, the patterns that allow it, all patterns)``; source is registered | entry point |
    built-in | allowed."""
    patterns = [_parse_pattern(p) for p in allow_patterns(allow)]
    if not isinstance(spec, str) or not spec:
        raise UntrustedNameError(f"{where} names the {kind} {spec!r}: expected a 'module:function' string")
    reference = _as_reference(kind, spec)
    if reference in _REGISTERED[kind] or spec in _REGISTERED[kind]:
        return reference, "registered", [], patterns
    if reference in _entry_point_values(kind):
        return reference, "entry point", [], patterns
    split = _split(reference)
    if split is None:  # no allowance can make it one
        raise UntrustedNameError(f"{where} names the {kind} {spec!r}, which is not a 'module:function' name: a name in a "
                                 "file is a module and one function or class at its top level (ASCII identifiers, no "
                                 "dunder); attribute chains are never followed")
    if _builtin(kind, reference):
        return reference, "built-in", [], patterns
    matching = [p for p in patterns if p.allows(*split)]
    if matching:
        return reference, "allowed", matching, patterns
    raise UntrustedNameError(
        f"{where} names the {kind} {spec!r}, which is not trusted: sharpscope imports only its own models, torch losses "
        f"and optimizers, registered names (ss.register_{kind}, or the '{_GROUPS[kind]}' entry point) and names you "
        f"allow, if you trust them: allow_factories=['{reference}'] (command line: --allow-factory '{reference}')")


def is_trusted(kind: Kind, spec: Any, allow: Iterable[str] = (), where: str = "the run file", *,
               check_object: bool = False) -> str:
    """Check that a stored name is trusted (module docstring); returns its ``"module:attr"`` reference, or raises
    UntrustedNameError with how to allow it. Nothing is imported, except with ``check_object`` for a name an
    allow-pattern trusts: its module is imported (the user allowed it) to check what the name is (a function or
    class; for a wildcard, defined in an allowed module), which is not called."""
    reference, source, matching, patterns = _trust(kind, spec, allow, where)
    if check_object and source == "allowed":
        _check(kind, reference, _top_level(reference, where, kind, spec), matching, patterns, where, spec)
    return reference


def _top_level(reference: str, where: str, kind: Kind, spec: str) -> Any:
    module_name, name = reference.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"{where} names the {kind} {spec!r}, which cannot be imported: {err}") from None
    if name not in vars(module):
        raise ValueError(f"{where} names the {kind} {spec!r}, which cannot be imported: module {module_name!r} has no "
                         f"top-level {name!r}")
    return vars(module)[name]


def _check(kind: Kind, reference: str, obj: Any, matching: list[_Pattern], patterns: list[_Pattern], where: str,
           spec: str) -> Any:
    """What a name resolves to must be what its kind promises: a function or class (a loss, an optimizer class
    for the built-ins); one that only wildcards allow must itself be allowed where it is defined
    (``obj.__module__`` and ``obj.__name__``), so that a re-export reaches nothing the user did not allow."""
    if matching and not any(p.exact for p in matching):
        defined_in, own_name = getattr(obj, "__module__", None), getattr(obj, "__name__", None)
        if not (isinstance(defined_in, str) and isinstance(own_name, str)
                and any(p.allows(defined_in, own_name) for p in patterns)):
            raise UntrustedNameError(
                f"{where} names the {kind} {spec!r}, which is defined in {defined_in!r}, outside the modules "
                f"{', '.join(repr(p.text) for p in patterns)} allow (a wildcard trusts only what its modules define): "
                f"allow exactly that name (--allow-factory '{reference}') only if you mean to run it")
    if not (inspect.isfunction(obj) or inspect.isclass(obj)):
        raise UntrustedNameError(f"{where} names the {kind} {spec!r}, which is a {type(obj).__name__}, not a function or "
                                 "class defined in Python: a name a file carries resolves only to one of those")
    builtin = _builtin(kind, reference)
    if builtin and kind == "loss" and reference not in _OWN_LOSSES and not (
            isinstance(obj, type) and issubclass(obj, nn.modules.loss._Loss)):
        raise ValueError(f"{reference!r} is not a torch.nn loss")
    if builtin and kind == "optimizer" and not (isinstance(obj, type) and (
            issubclass(obj, torch.optim.Optimizer) or obj.__module__ == "sharpscope.optim")):
        raise ValueError(f"{reference!r} is not an optimizer class")
    return obj


def resolve_trusted(kind: Kind, spec: str, allow: Iterable[str] = (), where: str = "the run file") -> Any:
    """The object a stored ``spec`` names, if trusted (module docstring); else UntrustedNameError, raised
    before anything is imported (or, for a wildcard's object defined elsewhere, before it is called).
    ``where`` names the source in the message."""
    reference, source, matching, patterns = _trust(kind, spec, allow, where)
    if source == "registered":
        return _REGISTERED[kind].get(reference, _REGISTERED[kind].get(spec))
    if source == "entry point":  # the installed package's own declaration, trusted exactly as it reads
        try:
            obj = _entry_point_values(kind)[reference].load()
        except (ImportError, AttributeError) as err:
            raise ValueError(f"{where} names the {kind} {spec!r}, whose entry point cannot be loaded: {err}") from None
        if inspect.ismodule(obj) or not callable(obj):
            raise ValueError(f"the '{_GROUPS[kind]}' entry point {reference!r} is not a function or class")
        return obj
    return _check(kind, reference, _top_level(reference, where, kind, spec), matching, patterns, where, spec)
