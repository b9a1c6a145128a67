"""Optimizers from :func:`sharpscope.param.parametrize`'s groups, incl. Muon + AdamW as one optimizer.

torch 2.13 provides every optimizer the toolkit needs (SGD, Adam, AdamW, Adafactor, Muon); this
module only builds them from per-tensor param groups. Muon (Jordan et al. 2024; torch.optim.Muon)
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

from typing import Any, Callable, Iterable, Sequence

import torch

__all__ = ["build_optimizer", "OptimizerList"]

_CLASSES = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW,
            "adafactor": torch.optim.Adafactor, "muon": torch.optim.Muon}


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
