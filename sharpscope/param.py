r"""abc-parameterizations (SP, NTK, muP, mean-field) and the per-layer learning rates each optimizer needs.

Every weight of layer role :math:`r` is stored as a trainable tensor :math:`w` and used as

.. math::  W = m^{-a_r}\, w, \qquad w_0 \sim \mathcal N\!\big(0,\ \sigma_0^2\, m^{-2 b_r}\big), \qquad
           \eta_r = \eta\, m^{-c_r},

with :math:`m = n / n_0` the *width multiplier* of that tensor (its width over the base width at
which :math:`\eta` and :math:`\sigma_0` were tuned), :math:`\sigma_0` the standard fan-in init at the
base width (:math:`1/\sqrt{\text{fan-in}_0}`; 1 for ``nn.Embedding``) and (a, b, c) the exponents
of Everett et al. 2024, "Scaling Exponents Across Parameterizations and Optimizers"
(arXiv 2407.05872), Table 1; Yang & Hu 2021 (Tensor Programs IV) for the abc family. Written
relative to the base width, all four parameterizations coincide at :math:`n = n_0` (the convention of
``microsoft/mup``), so a learning rate tuned there means the same thing in each.

Roles (inferred from which dimensions grow with width, by comparing shapes with a base model):

* ``embedding`` -- fan-in fixed, fan-out grows (input layer, ``nn.Embedding``);
* ``hidden``    -- fan-in and fan-out grow;
* ``readout``   -- fan-in grows, fan-out fixed (output layer);
* ``vector``    -- biases and norm gains of width n: treated as ``embedding`` (fan-in 1);
* ``router``    -- an MoE router (width -> #experts, fixed): treated as ``readout``;
* ``expert``    -- an MoE expert's n x (k n) matrices: treated as ``hidden``;
* ``fixed``     -- nothing grows with width (e.g. the readout bias): a = b = c = 0.
* ``unknown``   -- the model *is* the base width and no third width says what grows (``base_model=``
  with the same shapes, no ``delta_model=``): every multiplier and lr factor is 1 there whatever the
  role, so nothing needs it; asking for what does (Muon's split, ``zero_readout``) raises.

(a, b) per base role, Everett et al. Table 1 (embedding, hidden, readout):
SP (0,0) (0,1/2) (0,1/2); NTK (0,0) (1/2,0) (1/2,0); muP (-1/2,1/2) (0,1/2) (1/2,1/2);
MF (0,0) (1/2,0) (1,0).

Learning-rate exponents c under *full alignment* (embedding, hidden, readout)::

               SGD              Adam            Adafactor
    SP    (-1/2, 1/2, 1)    (0, 1, 1)       (0, 1/2, 1/2)
    NTK   (-1/2,-1/2, 0)    (0, 1/2, 1/2)   (0, 1/2, 1/2)
    muP   (0, 0, 0)         (1/2, 1, 1/2)   (0, 1/2, 0)
    MF    (-1, -1, -1)      (0, 1/2, 0)     (0, 1/2, 0)

These follow from requiring an O(1) change of every layer's output per step when the update is
fully aligned with the layer's input (:math:`\Delta W h \sim \text{fan-in} \cdot |\Delta W_{ij}|\,|h_j|`).
With :math:`f = 1` when the fan-in grows (hidden, readout) and 0 otherwise, and the backward
signal below the readout of size :math:`m^{-g}`, :math:`g = (a+b)_{readout}` (0 for the readout
itself): SGD :math:`c = f - 2a - g`; Adam :math:`c = f - a`; Adafactor (updates proportional to
RMS(w)) :math:`c = f - (a+b)`. This reproduces docs/science.md's table (section 1) entry by entry and is consistent
with the symmetry below; only the paper's abstract and section summaries were readable here, not
its Table 1, so the derivation is what was checked. *No alignment* (updates uncorrelated with the
layer input, :math:`\Delta W h \sim \sqrt{\text{fan-in}}`) lowers the hidden and readout exponents by 1/2.

**Symmetry** (Everett et al. Sec. 2): :math:`(a, b, c) \to (a+t, b-t, c')` with :math:`c' = c - 2t`
(SGD), :math:`c - t` (Adam; scale invariance of :math:`m/\sqrt v`), :math:`c` (Adafactor; updates
proportional to RMS(w)) leaves the function and the training trajectory unchanged in exact
arithmetic (Adam's epsilon and Adafactor's :math:`\epsilon_2` floor on RMS(w) break it at finite
precision). NTK = SP shifted by t = 1/2 on hidden and readout; MF = muP shifted by t = 1/2 everywhere.

**Muon** (Jordan et al. 2024; torch.optim.Muon): only 2-D ``hidden``/``expert`` matrices use Muon;
every other tensor uses AdamW with the Adam exponents. Muon's update is an orthogonalized
momentum :math:`O` (all singular values ~1) times :math:`\eta\,\rho(A, B)`, where torch's
``adjust_lr_fn`` gives :math:`\rho = \sqrt{\max(1, A/B)}` (``"original"``, the spectral-muP rule of
Yang, Simon & Bernstein 2023: :math:`\|\Delta W\|_* \sim \sqrt{\text{fan-out}/\text{fan-in}}` at a
width-independent lr) or :math:`0.2\sqrt{\max(A,B)}` (``"match_rms_adamw"``, grows like
:math:`\sqrt n`). So the hidden exponent is :math:`c = -a` with ``"original"`` and
:math:`c = 1/2 - a` with ``"match_rms_adamw"``, under either alignment (an orthogonal update
preserves the norm of any input, aligned or not). In muP (a = 0) this is a width-independent lr
with ``"original"``, which is docs/science.md's statement (section 1, Muon).

**Depth** (Bordelon et al. 2023; Yang et al. 2023, "Tensor Programs VI"): with ``depth_scaling``
each residual branch is multiplied by :math:`(L/L_0)^{-1/2}`; the learning rate of the parameters
inside the branches is unchanged for SGD and multiplied by :math:`(L/L_0)^{-1/2}` for the
scale-invariant optimizers (Adam, AdamW, Adafactor, Muon).

**Attention**: logits :math:`q\cdot k` are scaled by :math:`1/\sqrt{d}` (SP, NTK) or by
:math:`\sqrt{d_0}/d` (muP, MF: the 1/d rule of Tensor Programs V, equal to SP at the base head
dimension :math:`d_0`). With a fixed head dimension (heads grow with width) the two coincide.

**MoE** (Małaśnicki et al. 2025, "muP for Mixture of Experts", arXiv 2508.09752): the router is a
readout layer (width -> fixed #experts), each expert's matrices are hidden layers; experts and
top-k fixed. docs/science.md (section 1, MoE) says an expert's input projection n -> k n is
"embedding-like"; its fan-in n grows with width, so by the role definitions it is hidden, which is the default
(``expert_input="embedding"`` gives the other reading). ``router="no_alignment"`` raises the router's
lr by :math:`m^{1/2}` over a readout's: with SGD its logit gradient, an inner product of vectors not
yet aligned, is :math:`O(m^{1/2-g})`, and that lr restores an O(1) change of its logits (measured in
probes/moe_mup_alternatives.toml); ``router="hidden"`` gives it O(1) logits at init.

**Adam's epsilon** (``eps_scaling``): :func:`eps_exponent`; **Adam-atan2**: Adam's exponents
(:class:`sharpscope.optim.AdamAtan2`). Derivations and measurements: docs/parameterizations.md.
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, replace
from typing import Any, Iterable, Literal, Mapping, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize as torch_parametrize

__all__ = [
    "parametrize", "parametrize_from_record", "infer_roles", "lr_exponent", "eps_exponent", "uses_muon",
    "Parameterization", "Exponents", "ParamGroups", "Multiplier",
    "PARAMETERIZATIONS", "ROLES", "OPTIMIZERS", "LR_SCALINGS", "RECORD_FORMAT", "EPS_OPTIMIZERS",
    "EXPERT_INPUT_ROLES", "ROUTER_SCALINGS", "DEFAULT_ADAM_EPS",
]

RECORD_FORMAT = "sharpscope.parameterization/1"
ROLES = ("embedding", "hidden", "readout", "vector", "router", "expert", "fixed", "unknown")
BASE_ROLE = {"embedding": "embedding", "vector": "embedding", "hidden": "hidden", "expert": "hidden",
             "readout": "readout", "router": "readout", "fixed": "fixed", "unknown": "fixed"}
OPTIMIZERS = ("sgd", "adam", "adamw", "adafactor", "muon", "adam-atan2")
LR_SCALINGS = ("global", "full_alignment", "no_alignment")
_FAMILY = {"sgd": "sgd", "adam": "adam", "adamw": "adam", "adafactor": "adafactor", "muon": "muon",
           "adam-atan2": "adam"}
# optimizers (or, under Muon, the groups) whose update divides by sqrt(v) + eps: what eps_scaling scales
EPS_OPTIMIZERS = ("adam", "adamw")
DEFAULT_ADAM_EPS = 1e-8                      # torch.optim.Adam / AdamW
EXPERT_INPUT_ROLES = ("hidden", "embedding")
ROUTER_SCALINGS = ("readout", "no_alignment", "hidden")
_SCALE_INVARIANT = ("adam", "adafactor", "muon")
MuonAdjust = Literal["original", "match_rms_adamw"]


@dataclass(frozen=True)
class Exponents:
    """(a, b) and the full-alignment lr exponents c of one base role (embedding, hidden, readout)."""

    a: float
    b: float
    c_sgd: float
    c_adam: float
    c_adafactor: float

    def shifted(self, t: float) -> "Exponents":
        """Everett et al.'s symmetry: (a+t, b-t) with c - 2t (SGD), c - t (Adam), c (Adafactor)."""
        return Exponents(self.a + t, self.b - t, self.c_sgd - 2 * t, self.c_adam - t, self.c_adafactor)


_FIXED = Exponents(0.0, 0.0, 0.0, 0.0, 0.0)


@dataclass(frozen=True)
class Parameterization:
    """A named abc-parameterization: exponents per base role and its attention-logit rule."""

    name: str
    embedding: Exponents
    hidden: Exponents
    readout: Exponents
    attention: Literal["1/sqrt(d)", "1/d"] = "1/sqrt(d)"
    default_lr_scaling: Literal["global", "full_alignment", "no_alignment"] = "global"

    def exponents(self, role: str) -> Exponents:
        base = _base_role(role)
        return _FIXED if base == "fixed" else getattr(self, base)

    def shifted(self, role: str, t: float, name: str | None = None) -> "Parameterization":
        """Move one base role (or ``"all"``) along the symmetry by t; the dynamics do not change."""
        roles = ("embedding", "hidden", "readout") if role == "all" else (_base_role(role),)
        if "fixed" in roles:
            raise ValueError("the 'fixed' role has no width scaling to shift")
        changes = {r: getattr(self, r).shifted(t) for r in roles}
        return replace(self, name=name or f"{self.name}+shift({role},{t:g})", **changes)

    def to_dict(self) -> dict:
        return {"name": self.name, "attention": self.attention, "default_lr_scaling": self.default_lr_scaling,
                **{r: vars(getattr(self, r)).copy() for r in ("embedding", "hidden", "readout")}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Parameterization":
        return cls(d["name"], *(Exponents(**d[r]) for r in ("embedding", "hidden", "readout")),
                   attention=d["attention"], default_lr_scaling=d["default_lr_scaling"])


H = 0.5
PARAMETERIZATIONS: dict[str, Parameterization] = {
    "sp": Parameterization("sp", Exponents(0, 0, -H, 0, 0), Exponents(0, H, H, 1, H),
                           Exponents(0, H, 1, 1, H)),
    "ntk": Parameterization("ntk", Exponents(0, 0, -H, 0, 0), Exponents(H, 0, -H, H, H),
                            Exponents(H, 0, 0, H, H)),
    "mup": Parameterization("mup", Exponents(-H, H, 0, H, 0), Exponents(0, H, 0, 1, H),
                            Exponents(H, H, 0, H, 0), attention="1/d", default_lr_scaling="full_alignment"),
    "mf": Parameterization("mf", Exponents(0, 0, -1, 0, 0), Exponents(H, 0, -1, H, H),
                           Exponents(1, 0, -1, 0, 0), attention="1/d", default_lr_scaling="full_alignment"),
}


def _base_role(role: str) -> str:
    if role not in BASE_ROLE:
        raise ValueError(f"unknown role {role!r}; roles are {', '.join(ROLES)}")
    return BASE_ROLE[role]


def _family(optimizer: str) -> str:
    key = str(optimizer).lower()
    if key not in _FAMILY:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    return _FAMILY[key]


def _resolve(parameterization: str | Parameterization) -> Parameterization:
    if isinstance(parameterization, Parameterization):
        return parameterization
    key = str(parameterization).lower()
    if key not in PARAMETERIZATIONS:
        raise ValueError(f"unknown parameterization {parameterization!r}; choose one of "
                         f"{', '.join(PARAMETERIZATIONS)} (or pass a Parameterization)")
    return PARAMETERIZATIONS[key]


def uses_muon(role: str, ndim: int) -> bool:
    """Muon updates 2-D hidden/expert matrices only; everything else runs on AdamW."""
    return _base_role(role) == "hidden" and ndim == 2


def lr_exponent(parameterization: str | Parameterization, role: str, optimizer: str,
                lr_scaling: str = "full_alignment", *, ndim: int = 2,
                muon_adjust_lr_fn: MuonAdjust = "original") -> float:
    r"""The exponent c of :math:`\eta_r = \eta\, m^{-c}` for one tensor (see the module docstring).

    ``"global"`` gives 0 everywhere; ``"no_alignment"`` lowers hidden and readout exponents by 1/2
    (not Muon's hidden exponent: an orthogonal update preserves any input's norm).
    """
    p, fam = _resolve(parameterization), _family(optimizer)
    if lr_scaling not in LR_SCALINGS:
        raise ValueError(f"unknown lr_scaling {lr_scaling!r}; choose one of {', '.join(LR_SCALINGS)}")
    base = _base_role(role)
    if lr_scaling == "global" or base == "fixed":
        return 0.0
    e = p.exponents(role)
    if fam == "muon" and uses_muon(role, ndim):
        if muon_adjust_lr_fn not in ("original", "match_rms_adamw"):
            raise ValueError(f"unknown muon_adjust_lr_fn {muon_adjust_lr_fn!r}: 'original' or 'match_rms_adamw'")
        return -e.a + (0.5 if muon_adjust_lr_fn == "match_rms_adamw" else 0.0)
    c = {"sgd": e.c_sgd, "adam": e.c_adam, "adafactor": e.c_adafactor, "muon": e.c_adam}[fam]
    if lr_scaling == "no_alignment" and base in ("hidden", "readout"):
        c -= 0.5
    return c


def eps_exponent(parameterization: str | Parameterization, role: str) -> float:
    r"""The exponent e of Adam's per-layer epsilon :math:`\epsilon_r = \epsilon\, m^{-e}` (``eps_scaling``).

    e is the width exponent of the gradient entries of the trainable tensor w (:math:`W = m^{-a} w`):
    :math:`\partial L/\partial w = m^{-a}\,\delta\, h^\top` with the layer's input h O(1) and the backward
    signal at its output :math:`\delta` of size 1 at the readout (the loss gradient) and
    :math:`m^{-g}`, :math:`g = (a+b)_{readout}`, below it (the readout's weights carry it back; each
    hidden layer, :math:`a+b = 1/2`, keeps its size). So :math:`e = a_r + g` (embedding, vector, hidden,
    expert), :math:`e = a_r` (readout), 0 (fixed). An MoE router's logit gradient is the inner product
    of the :math:`m^{-g}` backward signal with the experts' O(1) outputs over n coordinates, unaligned
    at init: :math:`m^{1/2-g}`, so :math:`e = a_r + g - 1/2` (once aligned it grows to :math:`m^{1-g}`;
    an epsilon smaller than needed is harmless, a larger one is the failure). Under the symmetry
    :math:`(a+t, b-t)` the gradient of w scales by :math:`m^{-t}` and e moves by t, so the symmetry stays
    exact with a non-negligible eps. Checked against measured gradient RMS in tests/test_param.py.
    """
    p = _resolve(parameterization)
    base = _base_role(role)
    if base == "fixed":
        return 0.0
    e, g = p.exponents(role), p.readout.a + p.readout.b
    if role == "router":
        return float(e.a + g - 0.5)
    return float(e.a if base == "readout" else e.a + g)


# -- tensor layouts of the layers we understand ---------------------------------------------------------
@dataclass(frozen=True)
class _Layout:
    """How a tensor's axes map to fan-out / fan-in, and its base-width init rule."""

    kind: Literal["matrix", "vector"]
    fan_out: int = 0
    fan_in: int = 1
    init: Literal["fan_in", "unit", "zero", "one"] = "fan_in"


_LINEAR = {"weight": _Layout("matrix", 0, 1), "bias": _Layout("vector", init="zero")}
_NORM = {"weight": _Layout("vector", init="one"), "bias": _Layout("vector", init="zero")}
_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._BatchNorm,
          nn.modules.instancenorm._InstanceNorm)


def _layout(module: nn.Module, attr: str) -> _Layout | None:
    if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return _LINEAR.get(attr)
    if isinstance(module, nn.Embedding):
        return {"weight": _Layout("matrix", 1, 0, "unit")}.get(attr)
    if isinstance(module, _NORMS):
        return _NORM.get(attr)
    if isinstance(module, nn.MultiheadAttention):
        if attr.endswith("proj_weight"):
            return _Layout("matrix", 0, 1)
        if attr in ("in_proj_bias", "bias_k", "bias_v"):
            return _Layout("vector", init="zero")
    if type(module).__name__ == "Conv1D":  # Hugging Face's GPT-2 linear layer: weight is (in, out)
        return {"weight": _Layout("matrix", 1, 0), "bias": _Layout("vector", init="zero")}.get(attr)
    return None


# -- the model's tensors, by plain name (parametrizations see through) ------------------------------------
@dataclass
class _Slot:
    name: str              # plain name: "<module path>.<attr>"
    module_name: str
    module: nn.Module
    attr: str
    tensor: torch.Tensor   # the trainable tensor w (``.original`` when parametrized)


def _slots(model: nn.Module) -> list[_Slot]:
    out = []
    for mname, module in model.named_modules():
        if isinstance(module, torch_parametrize.ParametrizationList) or isinstance(module, Multiplier):
            continue
        for attr, p in module.named_parameters(recurse=False):
            if attr != "parametrizations":
                out.append(_Slot(_join(mname, attr), mname, module, attr, p))
        plist = getattr(module, "parametrizations", None)
        if plist is not None:
            for attr in plist:
                out.append(_Slot(_join(mname, attr), mname, module, attr, plist[attr].original))
    return [s for s in out if "parametrizations." not in s.name]


def _join(prefix: str, attr: str) -> str:
    return f"{prefix}.{attr}" if prefix else attr


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {s.name: tuple(s.tensor.shape) for s in _slots(model)}


def _is_router(slot: _Slot) -> bool:
    last = slot.module_name.rsplit(".", 1)[-1]
    return getattr(slot.module, "sharpscope_role", None) == "router" or (
        last in ("router", "gate") and isinstance(slot.module, nn.Linear))


def _is_expert(slot: _Slot) -> bool:
    return "experts" in slot.module_name.split(".")


def _moe_overrides(model: nn.Module, roles: Mapping[str, str] | None, expert_input: str, router: str) -> dict:
    """Role overrides for the MoE alternatives: each expert's input projection (the first matrix of every
    ``experts.<i>`` module) as ``embedding``, the router as ``hidden``. The user's ``roles`` win."""
    if expert_input not in EXPERT_INPUT_ROLES:
        raise ValueError(f"unknown expert_input {expert_input!r}; choose one of {', '.join(EXPERT_INPUT_ROLES)}")
    if router not in ROUTER_SCALINGS:
        raise ValueError(f"unknown router scaling {router!r}; choose one of {', '.join(ROUTER_SCALINGS)}")
    out: dict[str, str] = {}
    seen_experts: set[str] = set()
    for s in _slots(model):
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


def _shape_role(name: str, shape: Sequence[int], grows: Sequence[bool], layout: _Layout) -> str:
    if layout.kind == "vector" or len(shape) < 2:
        return "vector" if any(grows) else "fixed"
    extra = [i for i, g in enumerate(grows) if g and i not in (layout.fan_in, layout.fan_out)]
    if extra:
        raise ValueError(f"cannot infer the role of {name!r} (shape {tuple(shape)}): axes {extra} change with "
                         "width but are neither its fan-in nor its fan-out; pass roles={name: ...}")
    fi, fo = grows[layout.fan_in], grows[layout.fan_out]
    return {(True, True): "hidden", (False, True): "embedding", (True, False): "readout"}.get((fi, fo), "fixed")


def _width_mult(role: str, shape: Sequence[int], base: Sequence[int], grows: Sequence[bool],
                layout: _Layout) -> float:
    base_role = BASE_ROLE[role]
    if base_role == "fixed":
        return 1.0
    if layout.kind == "matrix" and len(shape) >= 2:
        axis = layout.fan_out if base_role == "embedding" else layout.fan_in
        return shape[axis] / base[axis]
    ratios = {shape[i] / base[i] for i, g in enumerate(grows) if g}
    return ratios.pop() if len(ratios) == 1 else 1.0


def _base_std(shape: Sequence[int], layout: _Layout, init_scale: float) -> float:
    if layout.init == "unit":
        return init_scale
    fan_in = math.prod(s for i, s in enumerate(shape) if i != layout.fan_out)
    return init_scale / math.sqrt(fan_in)


@dataclass(frozen=True)
class _Assignment:
    """Everything parametrize decides for one tensor."""

    name: str
    role: str
    width_mult: float
    base_std: float | None     # None: constant init (bias / gain)
    base_value: float
    layout: _Layout


def infer_roles(model: nn.Module, base_model: nn.Module, *, delta_model: nn.Module | None = None,
                roles: Mapping[str, str] | None = None) -> dict[str, str]:
    """Role of every tensor (plain names), from which of its dimensions differ from ``base_model``.

    With ``delta_model`` (a third width, as in ``mup.make_base_shapes``) the growing dimensions are
    those that differ between ``base_model`` and ``delta_model``. ``roles`` overrides by exact name
    or glob pattern (``{"*.router.weight": "router"}``).
    """
    return {a.name: a.role for a in _assign(model, base_model, delta_model, roles, 1.0, False)}


def _check_compatible(shapes: dict, base: dict, what: str) -> None:
    missing, extra = sorted(set(base) - set(shapes)), sorted(set(shapes) - set(base))
    if missing or extra:
        raise ValueError(f"incompatible {what}: tensors differ by name (only in the model: {extra[:5]}, "
                         f"only in the {what}: {missing[:5]})")
    for name, shape in shapes.items():
        if len(shape) != len(base[name]):
            raise ValueError(f"incompatible {what}: {name!r} has shape {shape} in the model but "
                             f"{base[name]} in the {what}")


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


def _assign(model: nn.Module, base_model: nn.Module, delta_model: nn.Module | None,
            roles: Mapping[str, str] | None, init_scale: float, zero_readout: bool) -> list[_Assignment]:
    slots = _slots(model)
    shapes, base = _shapes(model), _shapes(base_model)
    _check_compatible(shapes, base, "base model")
    ref = base
    if delta_model is not None:
        ref = _shapes(delta_model)
        _check_compatible(shapes, ref, "delta model")
    for role in (roles or {}).values():
        _base_role(role)
    _check_ties(slots)
    unsupported = [s for s in slots if _layout(s.module, s.attr) is None and not _override(s.name, roles, set())]
    if unsupported:
        listed = ", ".join(f"{s.name} ({type(s.module).__name__})" for s in unsupported[:8])
        raise ValueError(f"unsupported layers: {listed}{' ...' if len(unsupported) > 8 else ''}; sharpscope "
                         "knows Linear, Conv1d/2d/3d, Embedding, norms, MultiheadAttention and HF Conv1D; pass "
                         "roles={name: role} for these (their tensors are then read as (fan_out, fan_in, ...))")
    at_base = delta_model is None and all(shapes[n] == base[n] for n in shapes)
    used: set = set()
    out = []
    for s in slots:
        shape = shapes[s.name]
        grows = [x != y for x, y in zip(base[s.name], ref[s.name])] if delta_model is not None else \
            [x != y for x, y in zip(shape, base[s.name])]
        layout = _layout(s.module, s.attr) or _Layout("matrix" if len(shape) >= 2 else "vector")
        role = _override(s.name, roles, used) or ("unknown" if at_base else _infer_one(s, shape, grows, layout))
        out.append(_make_assignment(s, role, shape, base[s.name], grows, layout, init_scale, zero_readout))
    unused = sorted(set(roles or {}) - used)
    if unused:
        raise ValueError(f"roles= names/patterns that match no tensor: {unused}")
    return out


def _infer_one(s: _Slot, shape, grows, layout: _Layout) -> str:
    role = _shape_role(s.name, shape, grows, layout)
    if _is_router(s) and role != "vector" and layout.kind == "matrix":
        if role not in ("readout", "fixed"):
            raise ValueError(f"{s.name!r} looks like an MoE router but is {role}-shaped {tuple(shape)}: a router "
                             "maps width -> a fixed number of experts; pass roles={name: ...}")
        return "router" if role == "readout" else role
    if _is_expert(s) and role == "hidden":
        return "expert"
    return role


def _make_assignment(s: _Slot, role: str, shape, base_shape, grows, layout: _Layout, init_scale: float,
                     zero_readout: bool) -> _Assignment:
    mult = _width_mult(role, shape, base_shape, grows, layout)
    if layout.kind == "vector" or len(shape) < 2:
        value = 1.0 if layout.init == "one" else 0.0
        return _Assignment(s.name, role, mult, None, value, layout)
    if zero_readout and BASE_ROLE[role] == "readout" and role != "router":
        return _Assignment(s.name, role, mult, None, 0.0, layout)
    return _Assignment(s.name, role, mult, _base_std(base_shape, layout, init_scale), 0.0, layout)


def _check_ties(slots: list[_Slot]) -> None:
    seen: dict[int, str] = {}
    for s in slots:
        if id(s.tensor) in seen:
            raise ValueError(f"tied parameters are not supported: {seen[id(s.tensor)]!r} and {s.name!r} share one "
                             "tensor (their roles' multipliers would conflict); untie them first")
        seen[id(s.tensor)] = s.name


# -- forward multipliers ---------------------------------------------------------------------------------
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


def _strip_multipliers(model: nn.Module) -> None:
    for mname, module in list(model.named_modules()):
        plist = getattr(module, "parametrizations", None)
        if plist is None or isinstance(module, torch_parametrize.ParametrizationList):
            continue
        for attr in list(plist):
            if all(isinstance(p, Multiplier) for p in plist[attr]):
                torch_parametrize.remove_parametrizations(module, attr, leave_parametrized=False)
            else:
                raise ValueError(f"{_join(mname, attr)!r} already has a parametrization "
                                 f"({type(plist[attr][0]).__name__}) that sharpscope did not register: not supported")


def _set_multiplier(module: nn.Module, attr: str, value: float) -> None:
    torch_parametrize.register_parametrization(module, attr, Multiplier(value))


# -- the returned groups and the record -------------------------------------------------------------------
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


def parametrize(model: nn.Module, parameterization: str | Parameterization = "mup", *, optimizer: str = "adam",
                lr: float = 1e-3, base_width: int | None = None, base_model: nn.Module | None = None,
                delta_model: nn.Module | None = None, lr_scaling: str | None = None,
                roles: Mapping[str, str] | None = None, depth_scaling: bool = False,
                base_depth: int | None = None, attention: str = "auto", init_scale: float = 1.0,
                zero_readout: bool = False, muon_adjust_lr_fn: MuonAdjust = "original",
                eps_scaling: bool = False, base_eps: float | None = None, expert_input: str = "hidden",
                router: str = "readout", seed: int = 0) -> ParamGroups:
    r"""Put ``model`` into an abc-parameterization in place and return its optimizer param groups.

    Re-initializes every trainable tensor (:math:`w_0 \sim \mathcal N(0, \sigma_0^2 m^{-2b})`, biases 0,
    norm gains :math:`m^{-b}`; drawn from a generator seeded with ``seed``), registers the forward
    multipliers :math:`m^{-a}` (``torch.nn.utils.parametrize``; for every role whose a is nonzero, so
    tensor names do not depend on the width) and sets each group's lr to :math:`\eta\, m^{-c}`.

    Args:
        model: the model to parameterize (in place).
        parameterization: ``"sp"``, ``"ntk"``, ``"mup"``, ``"mf"`` or a :class:`Parameterization`.
        optimizer: ``"sgd"``, ``"adam"``, ``"adamw"``, ``"adafactor"``, ``"muon"`` or ``"adam-atan2"``
            (selects the c table; adam-atan2 uses Adam's).
        lr: the base learning rate :math:`\eta` (tuned at the base width).
        base_width: build the base model with ``model.with_width(base_width)`` (sharpscope.models).
        base_model: a copy of the model at the base width (for any model).
        delta_model: optionally the model at a third width, which tells which dimensions grow (needed
            when ``model`` is the base width itself).
        lr_scaling: ``"global"`` (c = 0), ``"full_alignment"`` or ``"no_alignment"``; default: global for
            SP/NTK, full alignment (the muP table) for muP/MF.
        roles: overrides by plain tensor name or glob (``{"head.weight": "readout"}``).
        depth_scaling: depth-muP, residual branches times :math:`(L/L_0)^{-1/2}` (models exposing
            ``residual_branches()`` and ``branch_multiplier``; L = ``model.depth``, the number of blocks).
        base_depth: :math:`L_0` (default 1: the absolute :math:`1/\sqrt{L}` of Noci et al.).
        attention: ``"auto"`` (the parameterization's rule), ``"1/d"`` or ``"1/sqrt(d)"``.
        init_scale: :math:`\sigma_0 = \text{init\_scale}/\sqrt{\text{fan-in}_0}`.
        zero_readout: initialize the readout weights to 0 (a MoE router keeps its init).
        muon_adjust_lr_fn: torch Muon's ``adjust_lr_fn`` the groups are meant for (changes Muon's c).
        eps_scaling: give every Adam/AdamW group (under Muon: every AdamW group) its own epsilon
            :math:`\epsilon\, m^{-e}`, e = :func:`eps_exponent` (the width exponent of that tensor's
            gradient), stored as the group's ``eps`` (and ``eps_exponent``) and in the record; optimizers
            without Adam's epsilon (SGD, Adafactor, Muon's own groups, adam-atan2) are left as they are.
        base_eps: the base epsilon :math:`\epsilon` (at the base width; default torch's 1e-8), put in every
            Adam/AdamW group (scaled per group with ``eps_scaling``, the same everywhere without; groups of
            optimizers without that epsilon get none, so one probe can mix Adam and Adam-atan2).
            :func:`sharpscope.optim.build_optimizer` ``(groups, eps=...)`` replaces it (the optimizer's
            ``eps`` is then the base: a probe's ``optimizer_kwargs`` or ``eps`` axis).
        expert_input: role of each MoE expert's input projection: ``"hidden"`` (default: its fan-in and
            fan-out grow) or ``"embedding"`` (the reading of docs/science.md; see docs/parameterizations.md).
        router: MoE router scaling: ``"readout"`` (default: the readout row), ``"no_alignment"`` (the
            readout row with its lr exponent lowered by 1/2, i.e. the router's lr grows by
            :math:`m^{1/2}` over the readout's: its logit gradient is an inner product of unaligned
            vectors early in training) or ``"hidden"`` (the hidden row: O(1) router logits at init).
        seed: seed of the generator the re-initialization draws from.

    Returns:
        :class:`ParamGroups` (one group per tensor) with ``.record``.

    Example:
        >>> from sharpscope.models import MLP
        >>> model = MLP(width=256, in_features=8, out_features=4)
        >>> groups = parametrize(model, "mup", optimizer="adam", lr=1e-2, base_width=64)
        >>> opt = torch.optim.Adam(groups, lr=1e-2)
    """
    p, fam = _resolve(parameterization), _family(optimizer)
    lr_scaling = lr_scaling or p.default_lr_scaling
    if lr_scaling not in LR_SCALINGS:
        raise ValueError(f"unknown lr_scaling {lr_scaling!r}; choose one of {', '.join(LR_SCALINGS)}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}")
    if base_eps is not None and not float(base_eps) > 0:
        raise ValueError(f"base_eps must be a positive number, got {base_eps!r}")
    _strip_multipliers(model)
    base_model, delta_model = _base_models(model, base_width, base_model, delta_model)
    moe = _moe_overrides(model, roles, expert_input, router)
    all_roles = {**(roles or {}), **moe}
    assignments = _assign(model, base_model, delta_model, all_roles or None, init_scale, zero_readout)
    _need_roles(assignments, fam, zero_readout)
    depth = _depth_setup(model, depth_scaling, base_depth)
    attn = _attention_setup(model, base_model, p, attention)
    slots = {s.name: s for s in _slots(model)}
    _reinit(slots, assignments, p, seed)
    eps_given = base_eps is not None
    base_eps = DEFAULT_ADAM_EPS if base_eps is None else float(base_eps)
    groups, entries = [], []
    for a in assignments:
        slot = slots[a.name]
        if not slot.tensor.requires_grad:
            continue
        e = p.exponents(a.role)
        c = lr_exponent(p, a.role, optimizer, lr_scaling, ndim=slot.tensor.ndim, muon_adjust_lr_fn=muon_adjust_lr_fn)
        if router == "no_alignment" and a.role == "router" and lr_scaling != "global":
            c = lr_exponent(p, a.role, optimizer, "no_alignment", ndim=slot.tensor.ndim)
        in_branch = id(slot.tensor) in depth["branch_ids"]
        depth_lr = depth["lr_factor"][fam] if in_branch else 1.0
        group_lr = lr * a.width_mult ** (-c) * depth_lr
        opt_name = ("muon" if uses_muon(a.role, slot.tensor.ndim) else "adamw") if fam == "muon" else optimizer.lower()
        init = {"kind": "normal", "std": a.base_std * a.width_mult ** (-e.b)} if a.base_std is not None else \
            {"kind": "constant", "value": a.base_value * a.width_mult ** (-e.b)}
        meta = {"name": a.name, "role": a.role, "width_mult": a.width_mult, "multiplier": a.width_mult ** (-e.a),
                "lr_exponent": c, "init": init, "optimizer": opt_name, "in_residual_branch": in_branch}
        if (eps_scaling or eps_given) and opt_name in EPS_OPTIMIZERS:
            ee = eps_exponent(p, a.role) if eps_scaling else 0.0
            meta.update(eps=float(base_eps * a.width_mult ** (-ee)), eps_exponent=ee)
        groups.append({"params": [slot.tensor], "lr": group_lr, **meta})
        entries.append({**meta, "lr": group_lr, "shape": list(slot.tensor.shape),
                        "trainable_name": _trainable_name(a.name, e.a)})
    has_eps = any("eps" in g for g in groups)
    record = {"format": RECORD_FORMAT, "parameterization": p.to_dict(), "optimizer": optimizer.lower(),
              "lr": float(lr), "lr_scaling": lr_scaling, "base_width": base_width,
              "width": getattr(model, "width", None), "init_scale": init_scale, "zero_readout": zero_readout,
              "muon_adjust_lr_fn": muon_adjust_lr_fn, "eps_scaling": bool(eps_scaling),
              "eps": float(base_eps) if has_eps else None, "expert_input": expert_input, "router": router,
              "seed": seed, "attention": attn,
              "depth": {k: v for k, v in depth.items() if k != "branch_ids"},
              "frozen": [a.name for a in assignments if not slots[a.name].tensor.requires_grad],
              "params": entries}
    return ParamGroups(groups, record)


def _need_roles(assignments: Sequence[_Assignment], family: str, zero_readout: bool) -> None:
    """At the base width with no third width, roles are unknown: fine for multipliers and lrs (all 1),
    not for what depends on the role itself."""
    unknown = [a.name for a in assignments if a.role == "unknown"]
    if not unknown:
        return
    wants = "Muon (which matrices are hidden)" if family == "muon" else "zero_readout (which layer reads out)" \
        if zero_readout else None
    if wants:
        raise ValueError(f"{wants} needs the layer roles, but the model has the base model's shapes, so no role "
                         f"can be inferred ({unknown[0]}, ...): pass delta_model= (the model at another width) "
                         "or roles={name: role}")


def _trainable_name(name: str, a: float) -> str:
    if a == 0:
        return name
    prefix, _, attr = name.rpartition(".")
    return _join(prefix, f"parametrizations.{attr}.original")


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


def _reinit(slots: dict[str, _Slot], assignments: Sequence[_Assignment], p: Parameterization, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for a in assignments:
        slot, e = slots[a.name], p.exponents(a.role)
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
            _set_multiplier(slot.module, slot.attr, a.width_mult ** (-e.a))


def _depth_setup(model: nn.Module, enabled: bool, base_depth: int | None) -> dict:
    off = {"enabled": False, "branch_ids": set(), "lr_factor": {f: 1.0 for f in ("sgd",) + _SCALE_INVARIANT}}
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
            "lr_factor": {"sgd": 1.0, **{f: mult for f in _SCALE_INVARIANT}}}


def _attention_setup(model: nn.Module, base_model: nn.Module, p: Parameterization, attention: str) -> dict:
    rule = p.attention if attention == "auto" else attention
    if rule not in ("1/d", "1/sqrt(d)"):
        raise ValueError(f"unknown attention scaling {attention!r}: 'auto', '1/d' or '1/sqrt(d)'")
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
    _strip_multipliers(model)
    slots = {s.name: s for s in _slots(model)}
    groups = []
    for entry in record["params"]:
        slot = slots.get(entry["name"])
        if slot is None or list(slot.tensor.shape) != list(entry["shape"]):
            found = None if slot is None else list(slot.tensor.shape)
            raise ValueError(f"model does not match the record: {entry['name']!r} has shape {found}, record says "
                             f"{entry['shape']}")
        if entry["trainable_name"] != entry["name"]:
            _set_multiplier(slot.module, slot.attr, entry["multiplier"])
        meta = {k: entry[k] for k in ("name", "role", "width_mult", "multiplier", "lr_exponent", "init",
                                      "optimizer", "in_residual_branch", "eps", "eps_exponent") if k in entry}
        groups.append({"params": [slot.tensor], "lr": entry["lr"], **meta})
    modules = dict(model.named_modules())
    for name, scale in record["attention"]["logit_scales"].items():
        modules[name].set_logit_scale(scale)
    if hasattr(model, "branch_multiplier"):
        model.branch_multiplier = record["depth"].get("branch_multiplier", 1.0) if record["depth"]["enabled"] else 1.0
    return ParamGroups(groups, dict(record))
