"""Sweeps and verdicts along any axis: batch size, training horizon, a weight decay of 0, settings that
make groups; the axes stored in the run files and read back from users' own runs."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import sharpscope as ss
from conftest import probe_text
from sharpscope.analysis.report import verdict_lines
from sharpscope.cli import main
from sharpscope.sweep import load_probe, plan, run_sweep

SWEEP = """
[sweep]
compare = "{compare}"
[sweep.axes]
{axes}
"""


def _probe(tmp_path, compare, axes, **kwargs):
    text = probe_text(**{"widths": (16,), "steps": 6, "every": 3, "quantities": ("hessian",), **kwargs})
    path = tmp_path / "axes.toml"
    path.write_text(text + SWEEP.format(compare=compare, axes=axes))
    return path


def test_batch_size_is_compared_and_weight_decay_makes_groups(tmp_path):
    probe = _probe(tmp_path, "batch_size", "batch_size = [16, 32, 64]\nweight_decay = [0.0, 0.01]")
    specs = plan(load_probe(probe))
    assert len(specs) == 6 and len({s.filename for s in specs}) == 6
    assert "-batch_size16-weight_decay0.01-" in specs[1].filename
    result = run_sweep(probe, tmp_path / "out", progress=False)
    with ss.open_run(result.runs[1]) as run:
        assert run.axes["batch_size"] == 16 and run.axes["weight_decay"] == 0.01  # stored in the file
        assert run.provenance["config"]["optimizer"]["kwargs"] == {"weight_decay": 0.01}
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["compared"] == ["batch_size"]
    assert {g["axis"] for g in metrics["groups"]} == {"batch_size"}
    assert sorted(g["fixed"]["weight_decay"] for g in metrics["groups"]) == [0.0, 0.01]
    assert all(g["sizes"] == [16, 32, 64] for g in metrics["groups"])
    lines = verdict_lines(tmp_path / "out" / "metrics.json")
    assert any("weight_decay 0.01" in ln and "hessian across batch_sizes" in ln for ln in lines)
    assert any("lr transfer across batch_sizes" in ln for ln in lines)
    figures = sorted(p.name for p in (tmp_path / "out" / "figures").glob("*.png"))
    # the weight-decay groups side by side in one figure (issue 22: one comparison figure per set of groups)
    assert any("batch_sizes" in name and "weight_decay0.01" in name for name in figures)


def test_the_training_horizon_is_compared_at_equal_fractions(tmp_path):
    probe = _probe(tmp_path, "steps", "steps = [6, 12]", every=3)
    result = run_sweep(probe, tmp_path / "out", progress=False)
    with ss.open_run(result.runs[1]) as run:
        assert run.steps == [0, 3, 6, 9, 12]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    (group,) = metrics["groups"]
    assert group["axis"] == "steps" and group["x"] == "fraction of training"
    window = group["quantities"]["hessian"]["window_steps"]
    assert 0 < window[0] and window[1] == pytest.approx(1.0)  # compared on fractions 0..1, not steps
    lines = verdict_lines(tmp_path / "out" / "metrics.json")
    assert any("hessian across steps " in ln for ln in lines) and not any("stepss" in ln for ln in lines)


def test_an_axis_with_zero_is_compared_on_a_linear_scale(tmp_path):
    probe = _probe(tmp_path, "weight_decay", "weight_decay = [0.0, 0.05, 0.1]")
    run_sweep(probe, tmp_path / "out", progress=False)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    (group,) = metrics["groups"]
    evidence = group["quantities"]["hessian"]
    assert evidence["verdict"] != "undetermined" and "linear axis" in evidence["alpha_note"]


def test_report_reads_an_axis_from_users_own_runs(tmp_path):
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    runs = []
    for batch_size in (8, 16, 32):
        for lr in (0.05, 0.1, 0.2):
            torch.manual_seed(0)
            model = ss.MLP(width=16, depth=1, in_features=4, out_features=3)
            opt = torch.optim.SGD(model.parameters(), lr=lr)
            path = tmp_path / f"bs{batch_size}-lr{lr}.h5"
            meta = {"model_factory": "sharpscope.models:MLP",
                    "model_kwargs": {"width": 16, "depth": 1, "in_features": 4, "out_features": 3},
                    "lr": lr, "batch_size": batch_size}
            with ss.Recorder(path, model, opt, batch=(x, y), every=2, loss_fn=nn.CrossEntropyLoss(), meta=meta) as rec:
                for step in range(4):
                    idx = torch.arange(step * batch_size, (step + 1) * batch_size) % 64
                    opt.zero_grad()
                    loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                    loss.backward()
                    opt.step()
                    rec.step(loss=loss)
            runs.append(path)
    assert main(["spectrum", *map(str, runs), "--quiet", "--k", "1"]) == 0
    out = tmp_path / "report"
    assert main(["report", *map(str, runs), "--out", str(out), "--compare", "batch_size"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["compared"] == ["batch_size"] and len(metrics["groups"]) == 3
    assert metrics["groups"][0]["sizes"] == [8, 16, 32]
    (transfer,) = metrics["transfer"]
    assert transfer["axis"] == "batch_size" and transfer["verdict"] in ("transfers", "shifts", "undetermined")


@pytest.mark.parametrize("axes, compare, message", [
    ("bogus_knob = [1, 2]", "width", "unknown axis 'bogus_knob'"),
    ("model.bogus = [1, 2]", "width", "takes no keyword 'bogus'"),
    ("batch_size = [16]", "batch_size", "has a single value"),
    ("batch_size = [16, 32]\nweight_decay = [0.0, 0.1]", '["batch_size", "weight_decay"]', "names one axis"),
    ('lr_scaling = ["global", "full_alignment"]', "lr_scaling", "needs numbers"),
    ("width = [16, 32]", "width", "varied by its own list"),
    ("steps = [2.5, 4]", "steps", "must be an integer"),
])
def test_bad_axes_are_one_line_errors_at_load_time(tmp_path, capsys, axes, compare, message):
    text = probe_text(widths=(16, 32)) + (f"[sweep]\ncompare = {compare}\n" if compare.startswith("[") else
                                          f'[sweep]\ncompare = "{compare}"\n') + f"[sweep.axes]\n{axes}\n"
    probe = tmp_path / "bad.toml"
    probe.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_probe(probe)
    assert main(["sweep", str(probe), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message.split("'")[0] in err[0]
