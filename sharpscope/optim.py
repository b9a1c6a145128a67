"""Optimizers from :func:`sharpscope.param.parametrize`'s groups, incl. Muon + AdamW as one optimizer.

torch 2.13 provides SGD, Adam, AdamW, Adafactor and Muon; this module adds :class:`AdamAtan2`
(Everett et al. 2024) and builds all of them from per-tensor param groups. Muon (Jordan et al. 2024; torch.optim.Muon)
accepts 2-D matrices only, so its groups are split: hidden/expert matrices (``group["optimizer"] ==
"muon"``) go to Muon, everything else (embeddings, readout, router, biases, gains, conv kernels) to
AdamW, combined in :class:`OptimizerList`. The per-group lrs already contain the width scaling
(see :mod:`sharpscope.param`: with ``adjust_lr_fn="original"`` a width-independent Muon lr is muP).

Two deliberate differences from torch's constructors: ``weight_decay`` defaults to 0 for every
optimizer (torch's defaults are AdamW 1e-2, Muon 0.1, others 0: weight decay changes the width
scaling and should be a visible choice), and the reference lr (``optimizer.defaults["lr"]``, used by
:func:`sharpscope.stability_threshold`) is the base lr of the parameterization.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Sequence

import torch

__all__ = ["build_optimizer", "OptimizerList", "AdamAtan2"]


class AdamAtan2(torch.optim.Optimizer):
    r"""Adam-atan2 (Everett et al. 2024, arXiv 2407.05872): Adam without epsilon, scale invariant.

    Adam's :math:`\hat m / (\sqrt{\hat v} + \epsilon)` is replaced by :math:`a\,\mathrm{atan2}(\hat m,
    b\sqrt{\hat v})`::

        m_t = beta1 m_{t-1} + (1 - beta1) g_t          v_t = beta2 v_{t-1} + (1 - beta2) g_t^2
        m_hat = m_t / (1 - beta1^t)                     v_hat = v_t / (1 - beta2^t)
        w <- w (1 - lr * weight_decay) - lr * a * atan2(m_hat, b * sqrt(v_hat))

    atan2 is bounded (|update| <= a pi/2 per entry), equals :math:`\hat m / (b \sqrt{\hat v})` to first
    order when :math:`|\hat m| \ll b\sqrt{\hat v}`, is 0 for a zero gradient history (where Adam
    divides 0 by eps), and is invariant under :math:`g \to k g` for every k > 0 (Adam only while
    :math:`\epsilon \ll \sqrt{\hat v}`): the width scaling of the gradient can no longer fall below an
    epsilon. Defaults ``a = 4/pi`` (1.273, so that a constant gradient, :math:`\hat m = \sqrt{\hat v}`,
    gives Adam's unit step: :math:`a\,\mathrm{atan2}(1, 1) = 1`) and ``b = 1``; the paper's exact
    constants could not be read here (the public reference implementation, lucidrains/adam-atan2-pytorch,
    uses a = 1.27, b = 1). Weight decay is decoupled (AdamW's). The state has Adam's keys and dtypes
    (``step`` a float32 scalar tensor, ``exp_avg``, ``exp_avg_sq``), so tools that read Adam's state read
    this one. Its lr exponents are Adam's (:mod:`sharpscope.param`); its preconditioner and
    edge-of-stability threshold are in :mod:`sharpscope.preconditioning`.
    """

    update_rule = "adam-atan2"   # how the engine (sharpscope.preconditioning) knows it without importing this layer

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 weight_decay: float = 0.0, a: float = 4.0 / math.pi, b: float = 1.0) -> None:
        if not lr > 0:
            raise ValueError(f"AdamAtan2: lr must be positive, got {lr}")
        if not all(0.0 <= beta < 1.0 for beta in betas):
            raise ValueError(f"AdamAtan2: betas must be in [0, 1), got {betas}")
        if weight_decay < 0 or not a > 0 or not b > 0:
            raise ValueError(f"AdamAtan2: weight_decay >= 0, a > 0 and b > 0 needed, got {weight_decay}, {a}, {b}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, a=a, b=b))

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), wd = float(group["lr"]), group["betas"], float(group["weight_decay"])
            a, b = float(group["a"]), float(group["b"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamAtan2 does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = float(state["step"])
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.lerp_(p.grad, 1.0 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1.0 - beta2)
                if wd:
                    p.mul_(1.0 - lr * wd)
                m_hat = m / (1.0 - beta1 ** t)
                den = (v / (1.0 - beta2 ** t)).sqrt_().mul_(b)
                p.add_(torch.atan2(m_hat, den), alpha=-lr * a)
        return loss


_CLASSES = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW,
            "adafactor": torch.optim.Adafactor, "muon": torch.optim.Muon, "adam-atan2": AdamAtan2}


class OptimizerList:
    """Several optimizers stepping together (Muon for matrices + AdamW for the rest).

    ``param_groups`` concatenates the members' groups (the same dict objects), ``state_dict()`` is
    ``{"optimizers": [member state dicts]}``.
    """

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        if not optimizers:
            raise ValueError("OptimizerList needs at least one optimizer")
        self.optimizers = list(optimizers)

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    @property
    def defaults(self) -> dict:
        return self.optimizers[0].defaults

    @property
    def state(self) -> dict:
        return {p: s for opt in self.optimizers for p, s in opt.state.items()}

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.optimizers:
            opt.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        members = state.get("optimizers", [])
        if len(members) != len(self.optimizers):
            raise ValueError(f"state has {len(members)} optimizers, this OptimizerList has {len(self.optimizers)}")
        for opt, s in zip(self.optimizers, members):
            opt.load_state_dict(s)

    def __repr__(self) -> str:
        return f"OptimizerList({', '.join(type(o).__name__ for o in self.optimizers)})"


def build_optimizer(groups: Iterable[dict], optimizer: str | None = None, *, lr: float | None = None,
                    weight_decay: float = 0.0, muon_adjust_lr_fn: str | None = None,
                    **kwargs: Any) -> torch.optim.Optimizer | OptimizerList:
    """The optimizer for ``parametrize``'s groups (name and base lr default to the groups' record).

    ``kwargs`` go to the optimizer's constructor (for Muon: to Muon; ``adamw_kwargs=`` to its AdamW).
    Groups from ``parametrize(..., eps_scaling=True)`` carry their own ``eps``; an ``eps=`` given here
    (``adamw_kwargs={"eps": ...}`` for Muon) is then the *base* epsilon: each such group gets
    ``eps * width_mult ** -eps_exponent`` and the groups' record is updated to that base (in place), so
    the record, the optimizer and a rebuilt optimizer agree.
    """
    groups = list(groups) if not hasattr(groups, "record") else groups
    record = getattr(groups, "record", {})
    name = (optimizer or record.get("optimizer") or "").lower()
    if name not in _CLASSES:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(_CLASSES)}")
    base_lr = lr if lr is not None else record.get("lr")
    if base_lr is None:
        raise ValueError("build_optimizer needs lr= (the groups carry no parameterization record)")
    groups = [dict(g) for g in groups]
    _rescale_eps(groups, record, (kwargs.get("adamw_kwargs") or {}).get("eps") if name == "muon" else kwargs.get("eps"))
    if name != "muon":
        return _CLASSES[name](groups, lr=base_lr, weight_decay=weight_decay, **kwargs)
    adjust = muon_adjust_lr_fn or record.get("muon_adjust_lr_fn", "original")
    if record and adjust != record.get("muon_adjust_lr_fn", adjust):
        raise ValueError(f"muon_adjust_lr_fn={adjust!r} but the groups' lrs were computed for "
                         f"{record['muon_adjust_lr_fn']!r}: pass the same value to parametrize")
    adamw_kwargs = kwargs.pop("adamw_kwargs", {})
    matrices = [g for g in groups if g.get("optimizer") == "muon"]
    rest = [g for g in groups if g.get("optimizer") != "muon"]
    bad = [g.get("name", "?") for g in matrices if any(p.ndim != 2 for p in g["params"])]
    if bad:
        raise ValueError(f"Muon groups must hold 2-D matrices only; not: {bad[:5]}")
    members: list[torch.optim.Optimizer] = []
    if matrices:
        members.append(torch.optim.Muon(matrices, lr=base_lr, weight_decay=weight_decay, adjust_lr_fn=adjust,
                                        **kwargs))
    if rest:
        members.append(torch.optim.AdamW(rest, lr=base_lr, weight_decay=weight_decay, **adamw_kwargs))
    return OptimizerList(members)


def _rescale_eps(groups: list[dict], record: dict, eps: float | None) -> None:
    """Per-group epsilons of ``eps_scaling`` groups from the base ``eps`` (None: keep the groups' own)."""
    scaled = [g for g in groups if "eps_exponent" in g]
    if eps is None or not scaled:
        return
    if not float(eps) > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    for g in scaled:
        g["eps"] = float(eps) * float(g["width_mult"]) ** -float(g["eps_exponent"])
    if record:
        record["eps"] = float(eps)
        by_name = {g.get("name"): g["eps"] for g in scaled}
        for entry in record.get("params", []):
            if entry.get("name") in by_name:
                entry["eps"] = by_name[entry["name"]]
