"""Which role each tensor plays, inferred from which of its dimensions grow with width.

Roles: ``embedding`` (fan-in fixed, fan-out grows: input layer, ``nn.Embedding``), ``hidden`` (both
grow), ``readout`` (fan-in grows, fan-out fixed), ``vector`` (biases and norm gains of width n: read as
``embedding``), ``router`` (an MoE router, width -> #experts: read as ``readout``), ``expert`` (an MoE
expert's matrices: read as ``hidden``), ``fixed`` (nothing grows: a = b = c = 0) and ``unknown`` (the
model *is* the base width and no third width says what grows: every multiplier and lr factor is 1
there, so only what depends on the role itself -- Muon's split, ``zero_readout`` -- needs it).

The growing dimensions are those that differ from ``base_model`` (or, with ``delta_model``, a third
width as in ``mup.make_base_shapes``, those that differ between the two). ``roles`` overrides by plain
name or glob.
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Mapping, Sequence

from torch import nn

from .tables import BASE_ROLE, base_role
from .tensors import Layout, Slot, layout_of, shapes, slots

__all__ = ["Assignment", "assign", "infer_roles", "moe_overrides"]


@dataclass(frozen=True)
class Assignment:
    """Everything parametrize decides for one tensor."""

    name: str
    role: str
    width_mult: float
    base_std: float | None     # None: constant init (bias / gain)
    base_value: float
    layout: Layout


def infer_roles(model: nn.Module, base_model: nn.Module, *, delta_model: nn.Module | None = None,
                roles: Mapping[str, str] | None = None) -> dict[str, str]:
    """Role of every tensor (plain names), from which of its dimensions differ from ``base_model``.

    With ``delta_model`` (a third width, as in ``mup.make_base_shapes``) the growing dimensions are
    those that differ between ``base_model`` and ``delta_model``. ``roles`` overrides by exact name
    or glob pattern (``{"*.router.weight": "router"}``).
    """
    return {a.name: a.role for a in assign(model, base_model, delta_model, roles, 1.0, False)}


def assign(model: nn.Module, base_model: nn.Module, delta_model: nn.Module | None,
           roles: Mapping[str, str] | None, init_scale: float, zero_readout: bool) -> list[Assignment]:
    """The role, width multiplier and base-width init of every tensor of ``model``."""
    model_slots = slots(model)
    now, base = shapes(model), shapes(base_model)
    _check_compatible(now, base, "base model")
    ref = base
    if delta_model is not None:
        ref = shapes(delta_model)
        _check_compatible(now, ref, "delta model")
    for role in (roles or {}).values():
        base_role(role)
    _check_ties(model_slots)
    _check_known_layers(model_slots, roles)
    at_base = delta_model is None and all(now[n] == base[n] for n in now)
    used: set = set()
    out = []
    for s in model_slots:
        shape = now[s.name]
        grows = [x != y for x, y in zip(base[s.name], ref[s.name])] if delta_model is not None else \
            [x != y for x, y in zip(shape, base[s.name])]
        layout = layout_of(s.module, s.attr) or Layout("matrix" if len(shape) >= 2 else "vector")
        role = _override(s.name, roles, used) or ("unknown" if at_base else _infer_one(s, shape, grows, layout))
        out.append(_make_assignment(s, role, shape, base[s.name], grows, layout, init_scale, zero_readout))
    unused = sorted(set(roles or {}) - used)
    if unused:
        raise ValueError(f"roles= names/patterns that match no tensor: {unused}")
    return out


def moe_overrides(model: nn.Module, roles: Mapping[str, str] | None, expert_input: str, router: str) -> dict:
    """Role overrides for the MoE alternatives: each expert's input projection (the first matrix of every
    ``experts.<i>`` module) as ``embedding``, the router as ``hidden``. The user's ``roles`` win."""
    out: dict[str, str] = {}
    seen_experts: set[str] = set()
    for s in slots(model):
        if _override(s.name, roles, set()) is not None or s.tensor.ndim < 2:
            continue
        parts = s.module_name.split(".")
        if expert_input == "embedding" and _is_expert(s):
            i = len(parts) - 1 - parts[::-1].index("experts")
            expert = ".".join(parts[: i + 2])
            if expert not in seen_experts:
                seen_experts.add(expert)
                out[s.name] = "embedding"
        if router == "hidden" and _is_router(s):
            out[s.name] = "hidden"
    return out


def _is_router(slot: Slot) -> bool:
    last = slot.module_name.rsplit(".", 1)[-1]
    return getattr(slot.module, "sharpscope_role", None) == "router" or (
        last in ("router", "gate") and isinstance(slot.module, nn.Linear))


def _is_expert(slot: Slot) -> bool:
    return "experts" in slot.module_name.split(".")


def _shape_role(name: str, shape: Sequence[int], grows: Sequence[bool], layout: Layout) -> str:
    if layout.kind == "vector" or len(shape) < 2:
        return "vector" if any(grows) else "fixed"
    extra = [i for i, g in enumerate(grows) if g and i not in (layout.fan_in, layout.fan_out)]
    if extra:
        raise ValueError(f"cannot infer the role of {name!r} (shape {tuple(shape)}): axes {extra} change with "
                         "width but are neither its fan-in nor its fan-out; pass roles={name: ...}")
    fi, fo = grows[layout.fan_in], grows[layout.fan_out]
    return {(True, True): "hidden", (False, True): "embedding", (True, False): "readout"}.get((fi, fo), "fixed")


def _width_mult(role: str, shape: Sequence[int], base: Sequence[int], grows: Sequence[bool],
                layout: Layout) -> float:
    base_row = BASE_ROLE[role]
    if base_row == "fixed":
        return 1.0
    if layout.kind == "matrix" and len(shape) >= 2:
        axis = layout.fan_out if base_row == "embedding" else layout.fan_in
        return shape[axis] / base[axis]
    ratios = {shape[i] / base[i] for i, g in enumerate(grows) if g}
    return ratios.pop() if len(ratios) == 1 else 1.0


def _base_std(shape: Sequence[int], layout: Layout, init_scale: float) -> float:
    r""":math:`\sigma_0`: ``init_scale`` over the square root of the base fan-in (itself for an embedding)."""
    if layout.init == "unit":
        return init_scale
    fan_in = math.prod(s for i, s in enumerate(shape) if i != layout.fan_out)
    return init_scale / math.sqrt(fan_in)


def _check_compatible(now: dict, base: dict, what: str) -> None:
    missing, extra = sorted(set(base) - set(now)), sorted(set(now) - set(base))
    if missing or extra:
        raise ValueError(f"incompatible {what}: tensors differ by name (only in the model: {extra[:5]}, "
                         f"only in the {what}: {missing[:5]})")
    for name, shape in now.items():
        if len(shape) != len(base[name]):
            raise ValueError(f"incompatible {what}: {name!r} has shape {shape} in the model but "
                             f"{base[name]} in the {what}")


def _check_known_layers(model_slots: list[Slot], roles: Mapping[str, str] | None) -> None:
    unsupported = [s for s in model_slots if layout_of(s.module, s.attr) is None and not _override(s.name, roles, set())]
    if unsupported:
        listed = ", ".join(f"{s.name} ({type(s.module).__name__})" for s in unsupported[:8])
        raise ValueError(f"unsupported layers: {listed}{' ...' if len(unsupported) > 8 else ''}; sharpscope "
                         "knows Linear, Conv1d/2d/3d, Embedding, norms, MultiheadAttention and HF Conv1D; pass "
                         "roles={name: role} for these (their tensors are then read as (fan_out, fan_in, ...))")


def _override(name: str, roles: Mapping[str, str] | None, used: set) -> str | None:
    if not roles:
        return None
    if name in roles:
        used.add(name)
        return roles[name]
    for pattern, role in roles.items():
        if fnmatch.fnmatchcase(name, pattern):
            used.add(pattern)
            return role
    return None


def _infer_one(s: Slot, shape, grows, layout: Layout) -> str:
    role = _shape_role(s.name, shape, grows, layout)
    if _is_router(s) and role != "vector" and layout.kind == "matrix":
        if role not in ("readout", "fixed"):
            raise ValueError(f"{s.name!r} looks like an MoE router but is {role}-shaped {tuple(shape)}: a router "
                             "maps width -> a fixed number of experts; pass roles={name: ...}")
        return "router" if role == "readout" else role
    if _is_expert(s) and role == "hidden":
        return "expert"
    return role


def _make_assignment(s: Slot, role: str, shape, base_shape, grows, layout: Layout, init_scale: float,
                     zero_readout: bool) -> Assignment:
    mult = _width_mult(role, shape, base_shape, grows, layout)
    if layout.kind == "vector" or len(shape) < 2:
        value = 1.0 if layout.init == "one" else 0.0
        return Assignment(s.name, role, mult, None, value, layout)
    if zero_readout and BASE_ROLE[role] == "readout" and role != "router":
        return Assignment(s.name, role, mult, None, 0.0, layout)
    return Assignment(s.name, role, mult, _base_std(base_shape, layout, init_scale), 0.0, layout)


def _check_ties(model_slots: list[Slot]) -> None:
    seen: dict[int, str] = {}
    for s in model_slots:
        if id(s.tensor) in seen:
            raise ValueError(f"tied parameters are not supported: {seen[id(s.tensor)]!r} and {s.name!r} share one "
                             "tensor (their roles' multipliers would conflict); untie them first")
        seen[id(s.tensor)] = s.name
