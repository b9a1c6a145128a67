"""Integration: a reduced probe (b) -- the quickstart's MLP with muP, NTK and SP -- trained, measured
and analysed end to end, must give the verdicts the seed paper predicts (Noci et al. 2024), not just run."""
from __future__ import annotations

import json
import re
from pathlib import Path

from sharpscope.sweep import run_sweep

PROBE = Path(__file__).resolve().parents[1] / "probes" / "mlp_sgd_parameterizations.toml"


def _reduced(text: str) -> str:
    """Three widths, one lr below the edge of stability, 20 steps: about 20 s on 2 cores."""
    for pattern, value in [(r"widths = \[.*\]", "widths = [64, 128, 256]"), (r"lrs = \[.*\]", "lrs = [0.125]"),
                           (r"steps = \d+", "steps = 20"), (r"every = \d+", "every = 5"),
                           (r"probe_size = \d+", "probe_size = 256")]:
        text, n = re.subn(pattern, value, text)
        assert n == 1, pattern
    return text


def test_reduced_probe_reproduces_mup_consistent_sp_not_ntk_decreasing(tmp_path):
    probe = tmp_path / "reduced.toml"
    probe.write_text(_reduced(PROBE.read_text()))
    result = run_sweep(probe, tmp_path / "out", progress=False)
    assert result.trained == 9 and not result.spectra.failures
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    verdicts = {g["parameterization"]: g["quantities"]["precond"] for g in metrics["groups"]}
    assert verdicts["mup"]["verdict"] == "consistent" and verdicts["mup"]["spread_summary"] < 0.07
    # SP at one global lr: sharpness grows with width
    assert verdicts["sp"]["verdict"] in ("diverging-up", "inconsistent") and verdicts["sp"]["trend_summary"] > 0.5
    assert verdicts["sp"]["spread_summary"] > 0.15
    # NTK: progressive sharpening fades with width, the sharpness falls
    assert verdicts["ntk"]["verdict"] != "consistent" and verdicts["ntk"]["trend_summary"] < -0.5
    assert verdicts["ntk"]["distance_summary"]["64"] > 0.3
    assert not metrics["problems"]
