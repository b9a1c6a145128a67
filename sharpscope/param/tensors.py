r"""A model's trainable tensors by plain name, the layer layouts sharpscope knows, and the forward multipliers.

A tensor's *plain name* is ``"<module path>.<attr>"`` whether or not a :class:`Multiplier` is registered
on it (``torch.nn.utils.parametrize`` moves the trainable tensor to
``<module path>.parametrizations.<attr>.original``; :func:`trainable_name` gives that name).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.nn.utils import parametrize as torch_parametrize

__all__ = ["Layout", "layout_of", "Slot", "slots", "shapes", "join", "Multiplier", "strip_multipliers",
           "set_multiplier", "trainable_name"]


@dataclass(frozen=True)
class Layout:
    """How a tensor's axes map to fan-out / fan-in, and its base-width init rule."""

    kind: Literal["matrix", "vector"]
    fan_out: int = 0
    fan_in: int = 1
    init: Literal["fan_in", "unit", "zero", "one"] = "fan_in"


_LINEAR = {"weight": Layout("matrix", 0, 1), "bias": Layout("vector", init="zero")}
_NORM = {"weight": Layout("vector", init="one"), "bias": Layout("vector", init="zero")}
_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._BatchNorm,
          nn.modules.instancenorm._InstanceNorm)


def layout_of(module: nn.Module, attr: str) -> Layout | None:
    """The layout of ``module.<attr>``, or None for a layer sharpscope does not know."""
    if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return _LINEAR.get(attr)
    if isinstance(module, nn.Embedding):
        return {"weight": Layout("matrix", 1, 0, "unit")}.get(attr)
    if isinstance(module, _NORMS):
        return _NORM.get(attr)
    if isinstance(module, nn.MultiheadAttention):
        if attr.endswith("proj_weight"):
            return Layout("matrix", 0, 1)
        if attr in ("in_proj_bias", "bias_k", "bias_v"):
            return Layout("vector", init="zero")
    if type(module).__name__ == "Conv1D":  # Hugging Face's GPT-2 linear layer: weight is (in, out)
        return {"weight": Layout("matrix", 1, 0), "bias": Layout("vector", init="zero")}.get(attr)
    return None


@dataclass
class Slot:
    """One trainable tensor of the model."""

    name: str              # plain name: "<module path>.<attr>"
    module_name: str
    module: nn.Module
    attr: str
    tensor: torch.Tensor   # the trainable tensor w (``.original`` when parametrized)


def slots(model: nn.Module) -> list[Slot]:
    """Every parameter of ``model`` under its plain name (registered parametrizations seen through)."""
    out = []
    for mname, module in model.named_modules():
        if isinstance(module, torch_parametrize.ParametrizationList) or isinstance(module, Multiplier):
            continue
        for attr, p in module.named_parameters(recurse=False):
            if attr != "parametrizations":
                out.append(Slot(join(mname, attr), mname, module, attr, p))
        plist = getattr(module, "parametrizations", None)
        if plist is not None:
            for attr in plist:
                out.append(Slot(join(mname, attr), mname, module, attr, plist[attr].original))
    return [s for s in out if "parametrizations." not in s.name]


def join(prefix: str, attr: str) -> str:
    """``prefix.attr`` (``attr`` at the top level)."""
    return f"{prefix}.{attr}" if prefix else attr


def shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape by plain name."""
    return {s.name: tuple(s.tensor.shape) for s in slots(model)}


class Multiplier(nn.Module):
    r"""``torch.nn.utils.parametrize`` map :math:`w \mapsto m\, w` (the :math:`n^{-a}` of the abc family).

    The trainable tensor stays ``module.parametrizations.<attr>.original`` (what ``named_parameters()``
    and ``state_dict()`` show); ``module.<attr>`` is the scaled weight the forward pass uses.
    """

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = float(value)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.value

    def extra_repr(self) -> str:
        return f"value={self.value:.6g}"


def strip_multipliers(model: nn.Module) -> None:
    """Remove the multipliers sharpscope registered (refuse any other parametrization)."""
    for mname, module in list(model.named_modules()):
        plist = getattr(module, "parametrizations", None)
        if plist is None or isinstance(module, torch_parametrize.ParametrizationList):
            continue
        for attr in list(plist):
            if all(isinstance(p, Multiplier) for p in plist[attr]):
                torch_parametrize.remove_parametrizations(module, attr, leave_parametrized=False)
            else:
                raise ValueError(f"{join(mname, attr)!r} already has a parametrization "
                                 f"({type(plist[attr][0]).__name__}) that sharpscope did not register: not supported")


def set_multiplier(module: nn.Module, attr: str, value: float) -> None:
    """Register the forward multiplier ``value`` on ``module.<attr>``."""
    torch_parametrize.register_parametrization(module, attr, Multiplier(value))


def trainable_name(name: str, a: float) -> str:
    """The trainable tensor's name once a multiplier is registered on it (every role whose a is nonzero)."""
    if a == 0:
        return name
    prefix, _, attr = name.rpartition(".")
    return join(prefix, f"parametrizations.{attr}.original")
