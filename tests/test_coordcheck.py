"""Coord check: fitted width slopes under muP vs SP, MoE, records, plot and the CLI subcommand."""
from __future__ import annotations

import json

import pytest

from sharpscope.cli import build_parser
from sharpscope.coordcheck import coord_check, fit_slopes, plot_coord_check

WIDTHS = (64, 128, 256, 512, 1024)


def _output_slope(model="mlp", **kw):
    res = coord_check(model, widths=kw.pop("widths", WIDTHS), steps=5, seeds=(0, 1), batch_size=16, **kw)
    return res, res.slope("output", "delta_rms", step=5)


@pytest.mark.parametrize("optimizer,lr", [("sgd", 0.3), ("adam", 1e-2)])
def test_mup_output_change_is_flat_in_width(optimizer, lr):
    res, slope = _output_slope(parameterization="mup", optimizer=optimizer, lr=lr)
    assert abs(slope) <= 0.1, slope
    for layer in res.layers:                                   # every layer, activations and their change
        for quantity in ("act_rms", "delta_rms"):
            assert abs(res.slope(layer, quantity)) <= 0.15, (layer, quantity, res.slope(layer, quantity))
    assert 0.1 < res.values("output", "delta_rms", 5)[1024] < 100   # it trained, and did not blow up


@pytest.mark.parametrize("optimizer,lr", [("sgd", 0.01), ("adam", 1e-3)])
def test_sp_output_change_grows_with_width(optimizer, lr):
    _, slope = _output_slope(parameterization="sp", optimizer=optimizer, lr=lr)
    assert slope >= 0.3, slope


def test_moe_router_and_experts_flat_under_mup():
    res, slope = _output_slope("moe", parameterization="mup", optimizer="adam", lr=1e-2,
                               model_kwargs={"depth": 1, "aux_loss_weight": 0.01})
    assert abs(slope) <= 0.1, slope
    for layer in ("blocks.0.router", "blocks.0.moe"):
        assert abs(res.slope(layer, "delta_rms")) <= 0.1, (layer, res.slope(layer, "delta_rms"))
    sp = coord_check("moe", widths=(64, 256, 1024), parameterization="sp", optimizer="adam", lr=1e-2, steps=5,
                     seeds=(0,), batch_size=16, model_kwargs={"depth": 1})
    assert sp.slope("blocks.0.router", "delta_rms") >= 0.3 and sp.slope("output", "delta_rms") >= 0.3


def test_transformer_and_muon_coord_checks():
    kw = dict(model_kwargs={"depth": 1, "max_len": 8, "vocab_size": 16}, widths=(32, 64, 128, 256))
    _, mup = _output_slope("transformer", parameterization="mup", optimizer="adam", lr=1e-2, **kw)
    _, sp = _output_slope("transformer", parameterization="sp", optimizer="adam", lr=1e-2, **kw)
    assert abs(mup) <= 0.15 and sp >= 0.3, (mup, sp)
    _, muon = _output_slope(parameterization="mup", optimizer="muon", lr=1e-2, widths=(64, 128, 256, 512))
    assert abs(muon) <= 0.1, muon


def test_records_are_a_long_table_and_slopes_refit():
    res = coord_check("cnn", widths=(8, 16, 32), parameterization="mup", optimizer="sgd", lr=0.1, steps=5,
                      seeds=(0, 1), batch_size=4, model_kwargs={"depth": 1, "image_size": 4})
    assert res.steps == list(range(6)) and res.widths == [8, 16, 32]
    assert res.layers == ["input", "hidden.0", "output"]
    assert len(res.records) == 3 * 2 * 6 * 3 * 2                    # widths x seeds x steps x layers x quantities
    assert set(res.records[0]) == {"width", "seed", "step", "layer", "quantity", "value"}
    assert all(r["value"] == 0.0 for r in res.records if r["step"] == 0 and r["quantity"] == "delta_rms")
    assert fit_slopes(res.records) == res.slopes
    assert all(s["slope"] is None for s in res.slopes if s["step"] == 0 and s["quantity"] == "delta_rms")
    json.dumps(res.to_json(), allow_nan=False)
    synthetic = [{"width": w, "seed": 0, "step": 1, "layer": "x", "quantity": "act_rms", "value": 3.0 * w ** 0.5}
                 for w in (4, 8, 16)]
    assert fit_slopes(synthetic)[0]["slope"] == pytest.approx(0.5)
    with pytest.raises(KeyError, match="no slope"):
        res.slope("nope")


def test_plot_writes_png(tmp_path):
    res = coord_check("mlp", widths=(16, 32), steps=5, batch_size=4)
    plot_coord_check(res, tmp_path / "cc.png")
    assert (tmp_path / "cc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _cli(argv):
    args = build_parser().parse_args(argv)
    return args.func(args)


def test_cli_writes_png_and_json(tmp_path, capsys):
    out = tmp_path / "cc"
    assert _cli(["coordcheck", "--model", "mlp", "--kwargs", '{"depth": 1}', "--param", "sp,mup", "--widths",
                 "32,64,128", "--steps", "5", "--seeds", "1", "--optimizer", "adam", "--lr", "1e-3",
                 "--quiet", "--out", str(out)]) == 0
    assert (out / "coordcheck_sp.png").exists() and (out / "coordcheck_mup.png").exists()
    data = json.loads((out / "coordcheck.json").read_text())
    assert [r["settings"]["parameterization"] for r in data["results"]] == ["sp", "mup"]
    assert data["results"][1]["settings"]["model_kwargs"] == {"depth": 1}
    assert "slope" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--widths", "64"], "two distinct positive widths"),
    (["--steps", "0"], "steps must be a positive integer"),
    (["--kwargs", "{depth: 1}"], "not valid JSON"),
    (["--kwargs", '{"width": 8}'], "must not contain 'width'"),
    (["--param", "mu"], "unknown parameterization"),
    (["--model", "nosuch"], "module:function"),
])
def test_cli_bad_input(tmp_path, argv, message):
    with pytest.raises(ValueError, match=message):
        _cli(["coordcheck", "--quiet", "--out", str(tmp_path), "--widths", "16,32", *argv])
