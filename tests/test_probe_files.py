"""Every probe file shipped in probes/ parses, and its model builds and parametrizes at its smallest
size for each parameterization/optimizer (the larger GPU variants included, though not trained here)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sharpscope.models import build_model
from sharpscope.optim import build_optimizer
from sharpscope.param import parametrize
from sharpscope.sweep import load_probe

PROBES = sorted((Path(__file__).resolve().parents[1] / "probes").rglob("*.toml"))


def test_the_probes_are_there():
    names = {p.stem for p in PROBES}
    assert {"quickstart", "mlp_sgd_parameterizations", "adam_preconditioned", "depth_transfer", "moe_mup",
            "muon_mup", "ntk_vs_hessian"} <= names and any(p.parent.name == "large" for p in PROBES)


@pytest.mark.parametrize("path", PROBES, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_probe_parses_and_its_models_build(path):
    probe = load_probe(path)
    assert probe.description and probe.expected and probe.source  # each states what it shows, and why
    kwargs = {**probe.kwargs, probe.width_key: min(probe.widths)}
    if probe.depths:
        kwargs[probe.depth_key] = min(probe.depths)
    for name in probe.parameterizations:
        for optimizer in probe.optimizers:
            torch.manual_seed(0)
            model = build_model(probe.factory, kwargs)
            groups = parametrize(model, name, optimizer=optimizer, lr=probe.lrs[0],
                                 base_width=probe.base_width or min(probe.widths),
                                 depth_scaling=probe.depth_scaling, base_depth=probe.base_depth)
            build_optimizer(groups)
