"""The edge-of-stability thresholds live once (sharpscope.stability): the optimizer-object side
(ss.stability_threshold) gives the same numbers as the recorded-numbers side (ss.eos_threshold)."""
import pytest
import torch

import sharpscope as ss
from sharpscope.optim import AdamAtan2
from sharpscope.stability import eos_threshold


def params():
    return [torch.nn.Parameter(torch.ones(3))]


@pytest.mark.parametrize("make, rule, kwargs", [
    (lambda: torch.optim.SGD(params(), lr=0.1), "sgd", {}),
    (lambda: torch.optim.SGD(params(), lr=0.1, momentum=0.9), "sgd", dict(momentum=0.9)),
    (lambda: torch.optim.SGD(params(), lr=0.1, momentum=0.5, dampening=0.3), "sgd", dict(momentum=0.5, dampening=0.3)),
    (lambda: torch.optim.SGD(params(), lr=0.1, momentum=0.9, nesterov=True), "gd", dict(momentum=0.9, nesterov=True)),
    (lambda: torch.optim.Adam(params(), lr=1e-3), "adam", {}),
    (lambda: torch.optim.AdamW(params(), lr=1e-3, betas=(0.5, 0.99)), "adamw", dict(beta1=0.5)),
    (lambda: AdamAtan2(params(), lr=1e-3, betas=(0.8, 0.99)), "adam-atan2", dict(beta1=0.8)),
    (lambda: torch.optim.Adafactor(params(), lr=1e-2), "adafactor", {}),
])
def test_the_optimizer_side_calls_the_same_formulas(make, rule, kwargs):
    opt = make()
    lr = opt.defaults["lr"]
    assert ss.stability_threshold(opt) == eos_threshold(rule, lr, **kwargs)               # bit for bit
    assert ss.stability_threshold(opt, reference_lr=lr / 4) == eos_threshold(rule, lr / 4, **kwargs)


def test_an_optimizer_class_can_declare_its_update_rule():
    """The engine knows Adam-atan2 by the rule it declares, not by importing sharpscope.optim; any optimizer
    implementing a known rule can say so."""
    class MyAdam(torch.optim.Optimizer):
        update_rule = "adam"

        def __init__(self, ps, lr=0.01, betas=(0.9, 0.999)):
            super().__init__(ps, dict(lr=lr, betas=betas))

    assert ss.stability_threshold(MyAdam(params())) == pytest.approx(38 / 0.01)
    assert AdamAtan2.update_rule == "adam-atan2"


@pytest.mark.parametrize("reference_lr, match", [(0.0, "lr must be positive"), (-0.1, "lr must be positive"),
                                                 (float("nan"), "lr must be positive")])
def test_a_reference_lr_that_is_not_positive_is_a_one_line_error(reference_lr, match):
    """Before: 0 raised ZeroDivisionError, a negative lr gave a negative threshold, NaN a NaN one."""
    with pytest.raises(ValueError, match=match) as err:
        ss.stability_threshold(torch.optim.SGD(params(), lr=0.1), reference_lr=reference_lr)
    assert "\n" not in str(err.value)


def test_momentum_outside_the_unit_interval_is_an_error():
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\)"):
        ss.stability_threshold(torch.optim.SGD(params(), lr=0.1, momentum=1.0))
