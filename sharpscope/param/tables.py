r"""The exponent tables of the abc-parameterizations and the per-tensor exponents read from them.

(a, b) per base role (embedding, hidden, readout), Everett et al. 2024 (arXiv 2407.05872), Table 1:
SP (0,0) (0,1/2) (0,1/2); NTK (0,0) (1/2,0) (1/2,0); muP (-1/2,1/2) (0,1/2) (1/2,1/2);
MF (0,0) (1/2,0) (1,0).

Learning-rate exponents c under *full alignment* (embedding, hidden, readout)::

               SGD              Adam            Adafactor
    SP    (-1/2, 1/2, 1)    (0, 1, 1)       (0, 1/2, 1/2)
    NTK   (-1/2,-1/2, 0)    (0, 1/2, 1/2)   (0, 1/2, 1/2)
    muP   (0, 0, 0)         (1/2, 1, 1/2)   (0, 1/2, 0)
    MF    (-1, -1, -1)      (0, 1/2, 0)     (0, 1/2, 0)

With :math:`f = 1` when the fan-in grows (hidden, readout) and 0 otherwise and
:math:`g = (a+b)_{readout}` (0 for the readout itself): SGD :math:`c = f - 2a - g`, Adam
:math:`c = f - a`, Adafactor :math:`c = f - (a+b)`; *no alignment* lowers the hidden and readout
exponents by 1/2. **Symmetry** (Everett et al. Sec. 2): :math:`(a, b, c) \to (a+t, b-t, c')` with
:math:`c' = c - 2t` (SGD), :math:`c - t` (Adam), :math:`c` (Adafactor) leaves the training dynamics
unchanged: NTK = SP shifted by t = 1/2 on hidden and readout, MF = muP shifted by t = 1/2 everywhere.
Derivations: docs/parameterizations.md.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

__all__ = [
    "Exponents", "Parameterization", "PARAMETERIZATIONS", "ROLES", "BASE_ROLE", "OPTIMIZERS", "LR_SCALINGS",
    "EPS_OPTIMIZERS", "DEFAULT_ADAM_EPS", "EXPERT_INPUT_ROLES", "ROUTER_SCALINGS", "SCALE_INVARIANT", "MUON_ADJUST",
    "MuonAdjust", "base_role", "family", "resolve", "uses_muon", "lr_exponent", "eps_exponent",
]

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
SCALE_INVARIANT = ("adam", "adafactor", "muon")   # families whose lr in a residual branch follows its multiplier
MUON_ADJUST = ("original", "match_rms_adamw")
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
        base = base_role(role)
        return _FIXED if base == "fixed" else getattr(self, base)

    def shifted(self, role: str, t: float, name: str | None = None) -> "Parameterization":
        """Move one base role (or ``"all"``) along the symmetry by t; the dynamics do not change."""
        roles = ("embedding", "hidden", "readout") if role == "all" else (base_role(role),)
        if "fixed" in roles:
            raise ValueError("the 'fixed' role has no width scaling to shift")
        changes = {r: getattr(self, r).shifted(t) for r in roles}
        return replace(self, name=name or f"{self.name}+shift({role},{t:g})", **changes)

    def to_dict(self) -> dict:
        return {"name": self.name, "attention": self.attention, "default_lr_scaling": self.default_lr_scaling,
                **{r: vars(getattr(self, r)).copy() for r in ("embedding", "hidden", "readout")}}


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


def base_role(role: str) -> str:
    """The row of the table a role reads (``vector`` -> embedding, ``router`` -> readout, ...)."""
    if role not in BASE_ROLE:
        raise ValueError(f"unknown role {role!r}; roles are {', '.join(ROLES)}")
    return BASE_ROLE[role]


def family(optimizer: str) -> str:
    """The column of the table an optimizer reads (``adamw`` and ``adam-atan2`` -> adam)."""
    key = str(optimizer).lower()
    if key not in _FAMILY:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    return _FAMILY[key]


def resolve(parameterization: str | Parameterization) -> Parameterization:
    """A :class:`Parameterization` from its name (or itself)."""
    if isinstance(parameterization, Parameterization):
        return parameterization
    key = str(parameterization).lower()
    if key not in PARAMETERIZATIONS:
        raise ValueError(f"unknown parameterization {parameterization!r}; choose one of "
                         f"{', '.join(PARAMETERIZATIONS)} (or pass a Parameterization)")
    return PARAMETERIZATIONS[key]


def uses_muon(role: str, ndim: int) -> bool:
    """Muon updates 2-D hidden/expert matrices only; everything else runs on AdamW."""
    return base_role(role) == "hidden" and ndim == 2


def lr_exponent(parameterization: str | Parameterization, role: str, optimizer: str,
                lr_scaling: str = "full_alignment", *, ndim: int = 2,
                muon_adjust_lr_fn: MuonAdjust = "original") -> float:
    r"""The exponent c of :math:`\eta_r = \eta\, m^{-c}` for one tensor (the module docstring's table).

    ``"global"`` gives 0 everywhere; ``"no_alignment"`` lowers hidden and readout exponents by 1/2.
    Muon's hidden matrices (torch.optim.Muon, lr times :math:`\sqrt{\max(1, A/B)}` with
    ``adjust_lr_fn="original"``, :math:`0.2\sqrt{\max(A, B)}` with ``"match_rms_adamw"``): :math:`c = -a`
    and :math:`c = 1/2 - a`, under either alignment (an orthogonal update preserves any input's norm);
    its other tensors run on AdamW with Adam's exponents.
    """
    p, fam = resolve(parameterization), family(optimizer)
    if lr_scaling not in LR_SCALINGS:
        raise ValueError(f"unknown lr_scaling {lr_scaling!r}; choose one of {', '.join(LR_SCALINGS)}")
    base = base_role(role)
    if lr_scaling == "global" or base == "fixed":
        return 0.0
    e = p.exponents(role)
    if fam == "muon" and uses_muon(role, ndim):
        if muon_adjust_lr_fn not in MUON_ADJUST:
            raise ValueError(f"unknown muon_adjust_lr_fn {muon_adjust_lr_fn!r}: 'original' or 'match_rms_adamw'")
        return -e.a + (0.5 if muon_adjust_lr_fn == "match_rms_adamw" else 0.0)
    c = {"sgd": e.c_sgd, "adam": e.c_adam, "adafactor": e.c_adafactor, "muon": e.c_adam}[fam]
    if lr_scaling == "no_alignment" and base in ("hidden", "readout"):
        c -= 0.5
    return c


def eps_exponent(parameterization: str | Parameterization, role: str) -> float:
    r"""The exponent e of Adam's per-layer epsilon :math:`\epsilon_r = \epsilon\, m^{-e}` (``eps_scaling``).

    e is the width exponent of the gradient entries of the trainable tensor w, with
    :math:`g = (a+b)_{readout}`: :math:`e = a_r + g` (embedding, vector, hidden, expert), :math:`e = a_r`
    (readout), :math:`e = a_r + g - 1/2` (an MoE router: its logit gradient is an unaligned inner
    product at init), 0 (fixed). The symmetry :math:`(a+t, b-t)` moves e by t, so it stays exact with
    a non-negligible eps. Derivation and measurements: docs/parameterizations.md.
    """
    p = resolve(parameterization)
    base = base_role(role)
    if base == "fixed":
        return 0.0
    e, g = p.exponents(role), p.readout.a + p.readout.b
    if role == "router":
        return float(e.a + g - 0.5)
    return float(e.a if base == "readout" else e.a + g)
