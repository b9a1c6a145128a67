r"""abc-parameterizations (SP, NTK, muP, mean-field) and the per-layer learning rates each optimizer needs.

Every weight of layer role :math:`r` is stored as a trainable tensor :math:`w` and used as

.. math::  W = m^{-a_r}\, w, \qquad w_0 \sim \mathcal N\!\big(0,\ \sigma_0^2\, m^{-2 b_r}\big), \qquad
           \eta_r = \eta\, m^{-c_r},

with :math:`m = n / n_0` the *width multiplier* of that tensor (its width over the base width at
which :math:`\eta` and :math:`\sigma_0` were tuned), :math:`\sigma_0` the standard fan-in init at the
base width and (a, b, c) the exponents of Everett et al. 2024 (arXiv 2407.05872), Table 1; Yang & Hu
2021 (Tensor Programs IV) for the abc family. Written relative to the base width, all four
parameterizations coincide at :math:`n = n_0` (the convention of ``microsoft/mup``).

* :mod:`.tables` -- the exponent tables (:data:`PARAMETERIZATIONS`), :func:`lr_exponent`, :func:`eps_exponent`;
* :mod:`.roles` -- which role each tensor plays (:func:`infer_roles`);
* :mod:`.tensors` -- the model's tensors by plain name and the forward :class:`Multiplier`;
* :mod:`.apply` -- :func:`parametrize` (options: :class:`ParametrizeOptions`) and :func:`parametrize_from_record`.

Derivations, the MoE and Muon choices and their measurements: docs/parameterizations.md.
"""
from .apply import RECORD_FORMAT, ParametrizeOptions, ParamGroups, parametrize, parametrize_from_record
from .roles import infer_roles
from .tables import (
                     DEFAULT_ADAM_EPS,
                     EPS_OPTIMIZERS,
                     EXPERT_INPUT_ROLES,
                     LR_SCALINGS,
                     OPTIMIZERS,
                     PARAMETERIZATIONS,
                     ROLES,
                     ROUTER_SCALINGS,
                     Exponents,
                     Parameterization,
                     eps_exponent,
                     lr_exponent,
                     uses_muon,
)
from .tensors import Multiplier

__all__ = [
    "parametrize", "parametrize_from_record", "infer_roles", "lr_exponent", "eps_exponent", "uses_muon",
    "Parameterization", "Exponents", "ParamGroups", "ParametrizeOptions", "Multiplier",
    "PARAMETERIZATIONS", "ROLES", "OPTIMIZERS", "LR_SCALINGS", "RECORD_FORMAT", "EPS_OPTIMIZERS",
    "EXPERT_INPUT_ROLES", "ROUTER_SCALINGS", "DEFAULT_ADAM_EPS",
]
