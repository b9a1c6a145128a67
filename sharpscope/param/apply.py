r"""Putting a model into an abc-parameterization, and re-applying a stored one.

:func:`parametrize` re-initializes every trainable tensor (:math:`w_0 \sim \mathcal N(0, \sigma_0^2 m^{-2b})`,
biases 0, norm gains :math:`m^{-b}`), registers the forward multipliers :math:`m^{-a}` and returns one
optimizer param group per tensor with lr :math:`\eta\, m^{-c}`, plus a JSON-able record that
:func:`parametrize_from_record` re-applies to a freshly built model. Beyond the tables: residual
branches times :math:`(L/L_0)^{-1/2}` with ``depth_scaling`` (the lr inside them times the same for
the scale-invariant optimizers: Adam, Adafactor, Muon), attention logits :math:`1/\sqrt d` (SP, NTK)
or :math:`\sqrt{d_0}/d` (muP, MF: the 1/d rule of Tensor Programs V, equal to SP at the base head
dimension :math:`d_0`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from types import MappingProxyType
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from .roles import Assignment, assign, moe_overrides
from .tables import (
    DEFAULT_ADAM_EPS,
    EPS_OPTIMIZERS,
    EXPERT_INPUT_ROLES,
    LR_SCALINGS,
    MUON_ADJUST,
    ROUTER_SCALINGS,
    SCALE_INVARIANT,
    MuonAdjust,
    Parameterization,
    eps_exponent,
    family,
    lr_exponent,
    resolve,
    uses_muon,
)
from .tensors import Slot, set_multiplier, slots, strip_multipliers, trainable_name

__all__ = ["ParametrizeOptions", "ParamGroups", "parametrize", "parametrize_from_record", "RECORD_FORMAT"]

RECORD_FORMAT = "sharpscope.parameterization/1"


@dataclass(frozen=True)
class ParametrizeOptions:
    r"""How :func:`parametrize` scales a model: every keyword it takes besides the models.

    Attributes:
        optimizer: ``"sgd"``, ``"adam"``, ``"adamw"``, ``"adafactor"``, ``"muon"`` or ``"adam-atan2"``
            (selects the c table; adam-atan2 uses Adam's).
        lr: the base learning rate :math:`\eta` (tuned at the base width).
        base_width: build the base model with ``model.with_width(base_width)`` (sharpscope.models).
        lr_scaling: ``"global"`` (c = 0), ``"full_alignment"`` or ``"no_alignment"``; default (None):
            global for SP/NTK, full alignment (the muP table) for muP/MF.
        roles: overrides by plain tensor name or glob (``{"head.weight": "readout"}``).
        depth_scaling: depth-muP, residual branches times :math:`(L/L_0)^{-1/2}` (models exposing
            ``residual_branches()`` and ``branch_multiplier``; L = ``model.depth``, the number of blocks).
        base_depth: :math:`L_0` (default 1: the absolute :math:`1/\sqrt{L}` of Noci et al.).
        attention: ``"auto"`` (the parameterization's rule), ``"1/d"`` or ``"1/sqrt(d)"``.
        init_scale: :math:`\sigma_0 = \text{init\_scale}/\sqrt{\text{fan-in}_0}`.
        zero_readout: initialize the readout weights to 0 (a MoE router keeps its init).
        muon_adjust_lr_fn: torch Muon's ``adjust_lr_fn`` the groups are meant for (changes Muon's c).
        eps_scaling: give every Adam/AdamW group (under Muon: every AdamW group) its own epsilon
            :math:`\epsilon\, m^{-e}`, e = :func:`~sharpscope.param.eps_exponent`, stored as the group's
            ``eps`` (and ``eps_exponent``) and in the record; optimizers without Adam's epsilon (SGD,
            Adafactor, Muon's own groups, adam-atan2) are left as they are.
        base_eps: the base epsilon :math:`\epsilon` (at the base width; default torch's 1e-8), put in every
            Adam/AdamW group (scaled per group with ``eps_scaling``, the same everywhere without).
            :func:`sharpscope.optim.build_optimizer` ``(groups, eps=...)`` replaces it.
        expert_input: role of each MoE expert's input projection: ``"hidden"`` (its fan-in and fan-out
            grow) or ``"embedding"``.
        router: MoE router scaling: ``"readout"`` (the readout row), ``"no_alignment"`` (the readout row
            with its lr exponent lowered by 1/2: lr times :math:`m^{1/2}`) or ``"hidden"`` (the hidden row).
        seed: seed of the generator the re-initialization draws from.
    """

    optimizer: str = "adam"
    lr: float = 1e-3
    base_width: int | None = None
    lr_scaling: str | None = None
    roles: Mapping[str, str] | None = None
    depth_scaling: bool = False
    base_depth: int | None = None
    attention: str = "auto"
    init_scale: float = 1.0
    zero_readout: bool = False
    muon_adjust_lr_fn: MuonAdjust = "original"
    eps_scaling: bool = False
    base_eps: float | None = None
    expert_input: str = "hidden"
    router: str = "readout"
    seed: int = 0

    def __post_init__(self) -> None:
        family(self.optimizer)
        if self.lr_scaling and self.lr_scaling not in LR_SCALINGS:
            raise ValueError(f"unknown lr_scaling {self.lr_scaling!r}; choose one of {', '.join(LR_SCALINGS)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.base_eps is not None and not float(self.base_eps) > 0:
            raise ValueError(f"base_eps must be a positive number, got {self.base_eps!r}")
        if self.attention not in ("auto", "1/d", "1/sqrt(d)"):
            raise ValueError(f"unknown attention scaling {self.attention!r}: 'auto', '1/d' or '1/sqrt(d)'")
        if self.muon_adjust_lr_fn not in MUON_ADJUST:
            raise ValueError(f"unknown muon_adjust_lr_fn {self.muon_adjust_lr_fn!r}: 'original' or 'match_rms_adamw'")
        if self.expert_input not in EXPERT_INPUT_ROLES:
            raise ValueError(f"unknown expert_input {self.expert_input!r}; choose one of {', '.join(EXPERT_INPUT_ROLES)}")
        if self.router not in ROUTER_SCALINGS:
            raise ValueError(f"unknown router scaling {self.router!r}; choose one of {', '.join(ROUTER_SCALINGS)}")
        if self.roles is not None:
            object.__setattr__(self, "roles", MappingProxyType(dict(self.roles)))

    @property
    def eps(self) -> float:
        """The base epsilon the Adam groups get (torch's default unless ``base_eps``)."""
        return DEFAULT_ADAM_EPS if self.base_eps is None else float(self.base_eps)


_OPTION_NAMES = frozenset(f.name for f in fields(ParametrizeOptions))


class ParamGroups(list):
    """Optimizer param groups (a list of dicts, ready for ``torch.optim.X(groups)``) with ``.record``.

    Each group holds one tensor and the keys ``params``, ``lr`` and the metadata ``name`` (plain
    name), ``role``, ``width_mult``, ``multiplier``, ``lr_exponent``, ``init``, ``optimizer``
    (``"muon"`` or ``"adamw"`` under Muon, else the optimizer's name). ``.record`` is the JSON-able
    description that :func:`parametrize_from_record` re-applies.
    """

    record: dict

    def __init__(self, groups: Iterable[dict], record: dict) -> None:
        super().__init__(groups)
        self.record = record


def parametrize(model: nn.Module, parameterization: str | Parameterization = "mup", *,
                base_model: nn.Module | None = None, delta_model: nn.Module | None = None,
                options: ParametrizeOptions | None = None, **settings: Any) -> ParamGroups:
    r"""Put ``model`` into an abc-parameterization in place and return its optimizer param groups.

    Re-initializes every trainable tensor from a generator seeded with ``seed``, registers the forward
    multipliers :math:`m^{-a}` (``torch.nn.utils.parametrize``; for every role whose a is nonzero, so
    tensor names do not depend on the width) and sets each group's lr to :math:`\eta\, m^{-c}`.

    Args:
        model: the model to parameterize (in place).
        parameterization: ``"sp"``, ``"ntk"``, ``"mup"``, ``"mf"`` or a :class:`Parameterization`.
        base_model: a copy of the model at the base width (for any model; ``base_width=`` builds it for
            sharpscope.models families).
        delta_model: optionally the model at a third width, which tells which dimensions grow (needed
            when ``model`` is the base width itself).
        options: a :class:`ParametrizeOptions`; keywords given as well replace its fields.
        **settings: the fields of :class:`ParametrizeOptions` by keyword (``optimizer=``, ``lr=``,
            ``base_width=``, ``lr_scaling=``, ``eps_scaling=``, ``seed=``, ...).

    Returns:
        :class:`ParamGroups` (one group per tensor) with ``.record``.

    Example:
        >>> from sharpscope.models import MLP
        >>> model = MLP(width=256, in_features=8, out_features=4)
        >>> groups = parametrize(model, "mup", optimizer="adam", lr=1e-2, base_width=64)
        >>> opt = torch.optim.Adam(groups, lr=1e-2)
    """
    p, o = resolve(parameterization), _options(options, settings)
    lr_scaling = o.lr_scaling or p.default_lr_scaling
    strip_multipliers(model)
    base_model, delta_model = _base_models(model, o.base_width, base_model, delta_model)
    roles = {**(o.roles or {}), **moe_overrides(model, o.roles, o.expert_input, o.router)}
    assignments = assign(model, base_model, delta_model, roles or None, o.init_scale, o.zero_readout)
    _need_roles(assignments, family(o.optimizer), o.zero_readout)
    depth = _depth_setup(model, o.depth_scaling, o.base_depth)
    attention = _attention_setup(model, base_model, p, o.attention)
    by_name = {s.name: s for s in slots(model)}
    _reinit(by_name, assignments, p, o.seed)
    trained = [a for a in assignments if by_name[a.name].tensor.requires_grad]
    pairs = [_group(a, by_name[a.name].tensor, p, o, lr_scaling, depth) for a in trained]
    groups, entries = [g for g, _ in pairs], [e for _, e in pairs]
    frozen = [a.name for a in assignments if not by_name[a.name].tensor.requires_grad]
    return ParamGroups(groups, _record(p, o, lr_scaling, model, attention, depth, groups, entries, frozen))


def _options(options: ParametrizeOptions | None, settings: Mapping[str, Any]) -> ParametrizeOptions:
    """:func:`parametrize`'s options: ``options`` with the keyword ``settings`` in place of its fields."""
    unknown = sorted(set(settings) - _OPTION_NAMES)
    if unknown:
        raise TypeError(f"parametrize() got unexpected keyword arguments {unknown}; its settings are the fields of "
                        f"ParametrizeOptions: {', '.join(sorted(_OPTION_NAMES))}")
    if options is None:
        return ParametrizeOptions(**settings)
    if not isinstance(options, ParametrizeOptions):
        raise TypeError(f"options= must be a ParametrizeOptions, got {type(options).__name__}")
    return replace(options, **settings)


def _group(a: Assignment, tensor: torch.Tensor, p: Parameterization, o: ParametrizeOptions, lr_scaling: str,
           depth: dict) -> tuple[dict, dict]:
    """One tensor's param group and its entry in the record."""
    e, fam = p.exponents(a.role), family(o.optimizer)
    c = lr_exponent(p, a.role, o.optimizer, lr_scaling, ndim=tensor.ndim, muon_adjust_lr_fn=o.muon_adjust_lr_fn)
    if o.router == "no_alignment" and a.role == "router" and lr_scaling != "global":
        c = lr_exponent(p, a.role, o.optimizer, "no_alignment", ndim=tensor.ndim)
    in_branch = id(tensor) in depth["branch_ids"]
    depth_lr = depth["lr_factor"][fam] if in_branch else 1.0
    group_lr = o.lr * a.width_mult ** (-c) * depth_lr
    opt_name = ("muon" if uses_muon(a.role, tensor.ndim) else "adamw") if fam == "muon" else o.optimizer.lower()
    init = {"kind": "normal", "std": a.base_std * a.width_mult ** (-e.b)} if a.base_std is not None else \
        {"kind": "constant", "value": a.base_value * a.width_mult ** (-e.b)}
    meta = {"name": a.name, "role": a.role, "width_mult": a.width_mult, "multiplier": a.width_mult ** (-e.a),
            "lr_exponent": c, "init": init, "optimizer": opt_name, "in_residual_branch": in_branch}
    if (o.eps_scaling or o.base_eps is not None) and opt_name in EPS_OPTIMIZERS:
        ee = eps_exponent(p, a.role) if o.eps_scaling else 0.0
        meta.update(eps=float(o.eps * a.width_mult ** (-ee)), eps_exponent=ee)
    entry = {**meta, "lr": group_lr, "shape": list(tensor.shape), "trainable_name": trainable_name(a.name, e.a)}
    return {"params": [tensor], "lr": group_lr, **meta}, entry


def _record(p: Parameterization, o: ParametrizeOptions, lr_scaling: str, model: nn.Module, attention: dict,
            depth: dict, groups: Sequence[dict], entries: list[dict], frozen: list[str]) -> dict:
    """The JSON-able description of the result (:data:`RECORD_FORMAT`)."""
    has_eps = any("eps" in g for g in groups)
    return {"format": RECORD_FORMAT, "parameterization": p.to_dict(), "optimizer": o.optimizer.lower(),
            "lr": float(o.lr), "lr_scaling": lr_scaling, "base_width": o.base_width,
            "width": getattr(model, "width", None), "init_scale": o.init_scale, "zero_readout": o.zero_readout,
            "muon_adjust_lr_fn": o.muon_adjust_lr_fn, "eps_scaling": bool(o.eps_scaling),
            "eps": o.eps if has_eps else None, "expert_input": o.expert_input, "router": o.router,
            "seed": o.seed, "attention": attention,
            "depth": {k: v for k, v in depth.items() if k != "branch_ids"},
            "frozen": frozen, "params": entries}


def _need_roles(assignments: Sequence[Assignment], fam: str, zero_readout: bool) -> None:
    """At the base width with no third width, roles are unknown: fine for multipliers and lrs (all 1),
    not for what depends on the role itself."""
    unknown = [a.name for a in assignments if a.role == "unknown"]
    if not unknown:
        return
    wants = "Muon (which matrices are hidden)" if fam == "muon" else "zero_readout (which layer reads out)" \
        if zero_readout else None
    if wants:
        raise ValueError(f"{wants} needs the layer roles, but the model has the base model's shapes, so no role "
                         f"can be inferred ({unknown[0]}, ...): pass delta_model= (the model at another width) "
                         "or roles={name: role}")


def _base_models(model: nn.Module, base_width, base_model, delta_model):
    if base_model is not None and base_width is not None:
        raise ValueError("give base_width= or base_model=, not both")
    if base_model is not None:
        return base_model, delta_model
    if base_width is None:
        raise ValueError("parametrize needs base_width= (for sharpscope.models families) or base_model= "
                         "(a copy of the model at the base width)")
    if not hasattr(model, "with_width"):
        raise ValueError(f"{type(model).__name__} has no with_width(): pass base_model= (the same model built "
                         f"at the base width) instead of base_width={base_width}")
    if not (isinstance(base_width, int) and base_width > 0):
        raise ValueError(f"base_width must be a positive integer, got {base_width!r}")
    with torch.device("meta"):
        base = model.with_width(base_width)
        delta = model.with_width(2 * max(base_width, getattr(model, "width", base_width)))
    return base, delta


def _reinit(by_name: dict[str, Slot], assignments: Sequence[Assignment], p: Parameterization, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for a in assignments:
        slot, e = by_name[a.name], p.exponents(a.role)
        if not slot.tensor.requires_grad:
            continue
        if a.base_std is not None:
            z = torch.randn(slot.tensor.shape, generator=gen, dtype=torch.float64)
            value = z * (a.base_std * a.width_mult ** (-e.b))
        else:
            value = torch.full(slot.tensor.shape, a.base_value * a.width_mult ** (-e.b), dtype=torch.float64)
        with torch.no_grad():
            slot.tensor.copy_(value.to(slot.tensor.dtype))
        if e.a != 0:
            set_multiplier(slot.module, slot.attr, a.width_mult ** (-e.a))


def _depth_setup(model: nn.Module, enabled: bool, base_depth: int | None) -> dict:
    off = {"enabled": False, "branch_ids": set(), "lr_factor": {f: 1.0 for f in ("sgd",) + SCALE_INVARIANT}}
    has = hasattr(model, "residual_branches") and hasattr(model, "branch_multiplier")
    if not enabled:
        if has:
            model.branch_multiplier = 1.0
        return off
    if not has:
        raise ValueError(f"depth_scaling needs a residual model exposing residual_branches() and "
                         f"branch_multiplier (sharpscope.models with residual=True); {type(model).__name__} does not")
    branches = list(model.residual_branches())
    if not branches:
        raise ValueError(f"depth_scaling: {type(model).__name__} has no residual branches "
                         "(build it with residual=True)")
    depth, l0 = int(getattr(model, "depth", len(branches))), base_depth or 1
    mult = (depth / l0) ** -0.5
    model.branch_multiplier = mult
    ids = {id(t) for b in branches for t in b.parameters()}
    return {"enabled": True, "depth": depth, "base_depth": l0, "branch_multiplier": mult, "branch_ids": ids,
            "lr_factor": {"sgd": 1.0, **{f: mult for f in SCALE_INVARIANT}}}


def _attention_setup(model: nn.Module, base_model: nn.Module, p: Parameterization, attention: str) -> dict:
    rule = p.attention if attention == "auto" else attention
    base_modules = dict(base_model.named_modules())
    scales = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            d, d0 = module.head_dim, base_modules[name].head_dim
            if rule == "1/d" and d != d0:
                raise ValueError(f"{name!r} (nn.MultiheadAttention) fixes its logit scale at 1/sqrt(head_dim) but its "
                                 f"head_dim grows with width ({d0} -> {d}); muP needs 1/head_dim: use "
                                 "sharpscope.models' attention or keep the head dimension fixed")
        elif hasattr(module, "set_logit_scale") and hasattr(module, "head_dim"):
            d, d0 = module.head_dim, base_modules[name].head_dim
            scale = 1.0 / math.sqrt(d) if rule == "1/sqrt(d)" else math.sqrt(d0) / d
            module.set_logit_scale(scale)
            scales[name] = scale
    return {"rule": rule, "logit_scales": scales}


def parametrize_from_record(model: nn.Module, record: Mapping[str, Any]) -> ParamGroups:
    """Re-apply a stored parameterization to a freshly built model, *without* re-initializing it.

    Registers the same multipliers (so ``named_parameters()`` and ``state_dict()`` keys match the
    run's), the same attention and residual-branch scales, and returns groups with the stored lrs.
    """
    if record.get("format") != RECORD_FORMAT:
        raise ValueError(f"not a sharpscope parameterization record (format {record.get('format')!r}, "
                         f"expected {RECORD_FORMAT!r})")
    strip_multipliers(model)
    by_name = {s.name: s for s in slots(model)}
    groups = []
    for entry in record["params"]:
        slot = by_name.get(entry["name"])
        if slot is None or list(slot.tensor.shape) != list(entry["shape"]):
            found = None if slot is None else list(slot.tensor.shape)
            raise ValueError(f"model does not match the record: {entry['name']!r} has shape {found}, record says "
                             f"{entry['shape']}")
        if entry["trainable_name"] != entry["name"]:
            set_multiplier(slot.module, slot.attr, entry["multiplier"])
        meta = {k: entry[k] for k in ("name", "role", "width_mult", "multiplier", "lr_exponent", "init",
                                      "optimizer", "in_residual_branch", "eps", "eps_exponent") if k in entry}
        groups.append({"params": [slot.tensor], "lr": entry["lr"], **meta})
    modules = dict(model.named_modules())
    for name, scale in record["attention"]["logit_scales"].items():
        modules[name].set_logit_scale(scale)
    if hasattr(model, "branch_multiplier"):
        model.branch_multiplier = record["depth"].get("branch_multiplier", 1.0) if record["depth"]["enabled"] else 1.0
    return ParamGroups(groups, dict(record))
