"""Alignment diagnostics: the per-layer log-ratio against explicit constructions, the spectrum job on
recorded runs, the exponent fit across widths, the report, and bad inputs."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import sharpscope as ss
from sharpscope.alignment import alignment_terms, layer_alignment
from sharpscope.analysis.alignment import FULL_AT_LEAST, NONE_AT_MOST, fit_exponent, regime
from sharpscope.cli import main
from sharpscope.demo import digits_data
from sharpscope.runs.jobs import SpectrumSettings, run_spectrum_job
from sharpscope.runs.spectra import SpectraFile, spectra_path

CE = nn.CrossEntropyLoss()


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# -- the per-layer definition against constructions whose alignment is known ------------------------
def test_rank_one_update_along_the_inputs_is_fully_aligned_and_a_random_one_is_not():
    g, d, out, S = _gen(), 4096, 64, 32
    v = torch.randn(d, generator=g, dtype=torch.float64)
    X = torch.randn(S, 1, generator=g, dtype=torch.float64) * v + 1e-3 * torch.randn(S, d, generator=g,
                                                                                     dtype=torch.float64)
    aligned = alignment_terms(torch.randn(out, 1, generator=g, dtype=torch.float64) * v, X)
    assert aligned.alignment == pytest.approx(1.0, abs=1e-3)
    assert aligned.ratio == pytest.approx(d, rel=0.05)  # M / (RMS(U) RMS(x)) = d at full alignment
    Xr = torch.randn(S, d, generator=g, dtype=torch.float64)
    random = alignment_terms(torch.randn(out, d, generator=g, dtype=torch.float64), Xr)
    assert abs(random.alignment) < 0.02
    assert random.ratio == pytest.approx(math.sqrt(d), rel=0.05)
    # explicit references: N = RMS(U) RMS(x) sqrt(d) and F = RMS(U) RMS(x) d for homogeneous inputs
    U = torch.randn(out, d, generator=g, dtype=torch.float64)
    t = alignment_terms(U, Xr)
    dense_m = float((Xr @ U.T).pow(2).mean().sqrt())
    assert t.measured == pytest.approx(dense_m, rel=1e-12)
    assert t.full == pytest.approx(float(U.pow(2).mean().sqrt() * Xr.pow(2).mean().sqrt()) * d, rel=1e-12)
    assert t.none == pytest.approx(t.full / math.sqrt(d), rel=0.02)


def test_an_sgd_like_update_on_few_samples_sits_where_the_formula_says():
    """U = delta X^T / N on N samples: |U x_s| ~ |x|^2 / N against N's |x|^2/(sqrt(N) sqrt(d)):
    alignment = 1 - log N / log d (up to the O(N/d) cross terms)."""
    g, d, out, N = _gen(1), 4096, 64, 4
    X = torch.randn(N, d, generator=g, dtype=torch.float64)
    U = torch.randn(out, N, generator=g, dtype=torch.float64) @ X / N
    assert alignment_terms(U, X).alignment == pytest.approx(1 - math.log(N) / math.log(d), abs=0.02)


def test_values_are_not_clipped_and_undefined_cases_are_nan():
    g, d = _gen(2), 256
    X = torch.randn(64, d, generator=g, dtype=torch.float64)
    # rows orthogonal to every input: U x = 0 up to rounding, far below random signs (anti-aligned)
    Q, _ = torch.linalg.qr(torch.cat([X.T, torch.randn(d, 8, generator=g, dtype=torch.float64)], dim=1))
    anti = alignment_terms(Q[:, 64:72].T + 1e-6 * torch.randn(8, d, generator=g, dtype=torch.float64), X)
    assert anti.alignment < -0.5
    assert math.isnan(alignment_terms(torch.zeros(4, d, dtype=torch.float64), X).alignment)  # no update
    one = torch.zeros(16, d, dtype=torch.float64)
    one[:, 0] = torch.randn(16, generator=g, dtype=torch.float64)
    U = torch.randn(3, d, generator=g, dtype=torch.float64)
    dense = alignment_terms(U, one)  # effective fan-in (sum_j c_j) / c_0, about d: U is spread evenly
    assert dense.full / dense.none == pytest.approx(float(U.pow(2).sum() / U[:, 0].pow(2).sum()) ** 0.5)
    assert dense.alignment == pytest.approx(0.0, abs=1e-12)  # one term: exactly the random-sign value
    assert math.isnan(alignment_terms(one[:3], one).alignment)  # both on one coordinate: effective fan-in 1
    with pytest.raises(ValueError, match="same d"):
        alignment_terms(torch.zeros(3, 4), torch.zeros(5, 6))


def test_layers_use_effective_weights_and_conv_patches():
    """The multiplier m^-a of a muP readout is part of W; the conv's rows are its unfolded patches."""
    model = ss.build_model("sharpscope.models:MLP", {"width": 64, "depth": 1, "in_features": 8, "out_features": 3})
    ss.parametrize(model, "mup", optimizer="sgd", lr=0.1, base_width=16)
    x = torch.randn(32, 8, generator=_gen(3))
    before = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    with torch.no_grad():
        model.readout.parametrizations.weight.original.mul_(1.5)
    layers = {la.name: la for la in layer_alignment(model, x, before)}
    assert list(layers) == ["input", "hidden.0", "readout"]
    # dW of the readout = 0.5 * W_before (effective); identical alignment to the weights before
    h = model.act(model.hidden[0](model.act(model.input(x)))).detach()
    ref = alignment_terms(0.5 * before["readout"], h)
    assert layers["readout"].update.measured == pytest.approx(ref.measured, rel=1e-6)
    assert layers["readout"].fan_in == 64 and math.isnan(layers["input"].update.alignment)
    conv = nn.Sequential(nn.Conv2d(2, 5, 3, padding=1, stride=2), nn.Tanh(), nn.Flatten(), nn.Linear(5 * 16, 4))
    img = torch.randn(3, 2, 8, 8, generator=_gen(4))
    c = layer_alignment(conv, img)[0]
    patches = nn.functional.unfold(img, 3, padding=1, stride=2).transpose(1, 2).reshape(-1, 18)
    assert c.fan_in == 18
    assert c.params.measured == pytest.approx(alignment_terms(conv[0].weight.reshape(5, -1), patches).measured)


# -- the exponent across widths -----------------------------------------------------------------------
def test_fitted_exponent_recovers_a_known_slope_and_the_regimes():
    fan_in = np.array([64.0, 128, 256, 512])
    for slope in (0.5, 0.7, 1.0):
        ratios = 3.0 * fan_in ** slope * np.exp(0.01 * np.array([1, -1, 1, -1]))
        assert fit_exponent(fan_in, ratios) == pytest.approx(slope, abs=0.01)
    assert regime(0.97) == "full" and regime(0.52) == "none" and regime(0.75) == "between"
    assert regime(FULL_AT_LEAST) == "full" and regime(NONE_AT_MOST) == "none"
    assert math.isnan(fit_exponent([64, 64], [1.0, 2.0]))  # fan-in does not vary: no exponent
    assert regime(float("nan")) == "undetermined"


# -- the spectrum job and the report ----------------------------------------------------------------------
def _record(path, width, steps=6, every=3, first=True, lr=0.5):
    torch.manual_seed(0)
    kwargs = {"width": width, "depth": 1, "in_features": 64, "out_features": 10, "activation": "tanh"}
    model = ss.build_model("sharpscope.models:MLP", kwargs)
    groups = ss.parametrize(model, "mup", optimizer="sgd", lr=lr, base_width=16)
    opt = ss.build_optimizer(groups, "sgd")
    x, y = digits_data()
    x, y = x[:64], y[:64]
    if not first:  # train before recording: the run file has no step-0 checkpoint
        for _ in range(2):
            opt.zero_grad()
            CE(model(x), y).backward()
            opt.step()
    meta = {"model_factory": "sharpscope.models:MLP", "model_kwargs": kwargs, "parameterization": groups.record,
            "user": {"parameterization": "mup", "optimizer": "sgd", "lr": lr, "width": width}}
    with ss.Recorder(path, model, opt, batch=(x, y), every=every, loss_fn=CE, meta=meta,
                     **({} if first else {"start_step": 2})) as rec:
        for _ in range(steps):
            opt.zero_grad()
            loss = CE(model(x), y)
            loss.backward()
            opt.step()
            rec.step(loss=loss)
    return model, (x, y)


def test_spectrum_job_stores_per_layer_alignment(tmp_path):
    path = tmp_path / "w32.h5"
    model, (x, _) = _record(path, 32)
    report = run_spectrum_job([path], ["alignment"], SpectrumSettings(), progress=False)
    assert report.failures == [] and report.written == 3  # steps 0, 3, 6
    with SpectraFile(spectra_path(path)) as sf:
        rows = sf.rows("alignment")
    assert [r["step"] for r in rows] == [0, 3, 6]
    last = rows[-1]
    assert last["info"]["layers"] == ["input", "hidden.0", "readout"] and last["info"]["fan_in"] == [64, 32, 32]
    assert np.isnan(rows[0]["values"]).all() and np.isfinite(rows[0]["residuals"]).all()  # no update at step 0
    from sharpscope.runs.rebuild import model_at
    from sharpscope.runs.store import open_run

    with open_run(path) as run:
        initial = model_at(run, 0)
    direct = layer_alignment(model, x, initial)  # the model in memory is at step 6
    np.testing.assert_allclose(last["values"], [la.update.alignment for la in direct], rtol=1e-6)
    np.testing.assert_allclose(last["residuals"], [la.params.alignment for la in direct], rtol=1e-6)
    assert all(-0.5 < v <= 1 for v in last["values"])
    assert main(["spectrum", str(path), "--what", "alignment", "--quiet"]) == 0  # stored: nothing to do


def test_alignment_without_a_step_zero_checkpoint_is_a_one_line_failure(tmp_path):
    path = tmp_path / "late.h5"
    _record(path, 16, first=False)
    report = run_spectrum_job([path], ["alignment", "hessian"], SpectrumSettings(k=1), progress=False)
    assert report.written == 2  # hessian at steps 3 and 6 still measured
    messages = [m for _, _, m in report.failures]
    assert len(messages) == 2 and all("alignment: " in m and "needs the step-0 checkpoint" in m for m in messages)
    assert all("\n" not in m and "first checkpoint is step 3" in m for m in messages)


def test_report_fits_exponents_across_widths(tmp_path, capsys):
    paths = []
    for width in (16, 32, 64):
        paths.append(tmp_path / f"w{width}.h5")
        _record(paths[-1], width, steps=6, every=6)
    assert main(["spectrum", *map(str, paths), "--what", "alignment", "--quiet"]) == 0
    assert main(["report", *map(str, paths), "--out", str(tmp_path / "rep")]) == 0
    out = capsys.readouterr().out
    metrics = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    found = metrics["groups"][0]["alignment"]
    assert found["step"] == 6 and found["thresholds"] == {"full": FULL_AT_LEAST, "none": NONE_AT_MOST}
    hidden = found["layers"]["hidden.0"]
    assert hidden["fan_in"] == {"16.0": 16, "32.0": 32, "64.0": 64}
    assert hidden["verdict"] in ("full", "none", "between") and 0 < hidden["exponent"] < 1.5
    assert found["layers"]["input"]["verdict"] == "undetermined"  # fan-in 64 at every width
    assert "alignment of hidden.0 across widths" in out
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "## Alignment" in md and "hidden.0" in md
    assert "Alignment" in (tmp_path / "rep" / "report.html").read_text()
    assert any(p.name.startswith("alignment-mup-sgd") for p in (tmp_path / "rep" / "figures").glob("*.png"))
    assert ss.layer_alignment is layer_alignment


def test_models_without_handled_layers_and_mismatched_references_are_refused_in_one_line():
    with pytest.raises(ValueError, match="has no layer alignment can measure") as err:
        layer_alignment(nn.Sequential(nn.Tanh()), torch.randn(4, 3))
    assert "\n" not in str(err.value)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    with pytest.raises(ValueError, match="reference model has no layer '2' of shape \\(2, 5\\)"):
        layer_alignment(model, torch.randn(4, 3), nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)))
