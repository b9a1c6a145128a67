r"""Edge-of-stability thresholds of the (preconditioned) sharpness, per update rule (plain Python, no torch).

Gradient descent with step :math:`\eta` on a quadratic of curvature :math:`\lambda` is stable iff
:math:`\eta\lambda < 2`; along training the sharpness rises to that edge and hovers there (Cohen et
al. 2021, "Gradient descent on neural networks typically occurs at the edge of stability"). Per update
rule, the value the (preconditioned) sharpness is compared with:

* ``"sgd"``: :math:`2/\eta`; heavy-ball momentum :math:`\mu` with dampening :math:`d`:
  :math:`(2+2\mu)/((1-d)\eta)`; Nesterov: :math:`(2+2\mu)/((1+2\mu)\eta)` (the largest
  :math:`\eta\lambda` with both roots of the quadratic's recurrence in the unit disc).
* ``"adam"`` (Cohen et al. 2022, "Adaptive gradient methods at the edge of stability"):
  :math:`(2+2\beta_1)/((1-\beta_1)\eta)`, 38/eta at :math:`\beta_1 = 0.9`, for the Adam-preconditioned
  sharpness; ``"adam-atan2"`` the same for its linearized preconditioner (its update is Adam's EMA
  momentum with another diagonal preconditioner: :mod:`sharpscope.preconditioning`).
* ``"adafactor"`` (torch's, no momentum): :math:`2/\eta`.

With per-layer learning rates, :math:`\eta` is the reference lr the lr-weighted Hessian is scaled to.
:func:`sharpscope.stability_threshold` reads these hyper-parameters from an optimizer object;
:func:`eos_threshold` takes them as recorded numbers.
"""
from __future__ import annotations

import math
from typing import Any

__all__ = ["eos_threshold", "check_lr", "UPDATE_RULES"]

UPDATE_RULES = ("sgd", "adam", "adam-atan2", "adafactor")
_NAMES = {"sgd": "sgd", "gd": "sgd", "adam": "adam", "adamw": "adam", "adam-atan2": "adam-atan2",
          "adam_atan2": "adam-atan2", "adamatan2": "adam-atan2", "adafactor": "adafactor"}


def eos_threshold(optimizer: str, lr: float, momentum: float = 0.0, beta1: float = 0.9, *,
                  dampening: float = 0.0, nesterov: bool = False) -> float:
    """The edge-of-stability value of the (preconditioned) sharpness (formulas in the module docstring).

    ``optimizer``: ``"sgd"``/``"gd"``, ``"adam"``/``"adamw"``, ``"adam-atan2"`` or ``"adafactor"``;
    ``momentum``, ``dampening`` and ``nesterov`` apply to SGD, ``beta1`` to the Adam rules.
    """
    eta = check_lr(lr)
    for nm, val in (("momentum", momentum), ("beta1", beta1), ("dampening", dampening)):
        if not (0.0 <= float(val) < 1.0):
            raise ValueError(f"{nm} must be in [0, 1), got {val}")
    rule = _NAMES.get(str(optimizer).lower())
    if rule == "sgd":
        mu = float(momentum)
        if mu == 0.0:
            return 2.0 / eta
        if nesterov:
            return (2.0 + 2.0 * mu) / ((1.0 + 2.0 * mu) * eta)
        return (2.0 + 2.0 * mu) / ((1.0 - float(dampening)) * eta)
    if rule in ("adam", "adam-atan2"):
        b = float(beta1)
        return (2.0 + 2.0 * b) / ((1.0 - b) * eta)
    if rule == "adafactor":
        return 2.0 / eta
    raise ValueError(f"unknown optimizer {optimizer!r}: expected 'sgd', 'gd', 'adam', 'adamw', 'adam-atan2' or "
                     "'adafactor'")


def check_lr(value: Any, name: str = "lr") -> float:
    """A learning rate as a positive finite float, or a one-line ValueError naming ``name``."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be positive and finite, got {value!r}")
    return v
