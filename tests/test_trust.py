"""Nothing a run file names is imported unless trusted; checkpoints must cover the rebuilt model; a
string parameterization is a label; parametrize accepts the base width. Crafted files included."""
from __future__ import annotations

import json
import sys
import textwrap

import h5py
import pytest
import torch
from torch import nn

import sharpscope as ss
from conftest import probe_text
from sharpscope import registry
from sharpscope.cli import main
from sharpscope.runs.jobs import SpectrumSettings, run_spectrum_job
from sharpscope.runs.rebuild import model_at
from sharpscope.runs.spectra import spectra_path

CE = nn.CrossEntropyLoss()
SETTINGS = SpectrumSettings(k=1)


def _record(path, meta, model=None, optimizer="sgd"):
    torch.manual_seed(0)
    model = model if model is not None else ss.MLP(width=8, depth=1, in_features=4, out_features=3)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1) if optimizer == "sgd" else \
        torch.optim.Adam(model.parameters(), lr=1e-2)
    with ss.Recorder(path, model, opt, batch=(x, y), every=1, loss_fn=CE, meta=meta) as rec:
        for _ in range(2):
            opt.zero_grad()
            loss = CE(model(x), y)
            loss.backward()
            opt.step()
            rec.step(loss=loss)
    return model


@pytest.fixture
def evil_module(tmp_path, monkeypatch):
    """A module that leaves a marker file when imported: proof of whether a name was imported."""
    marker = tmp_path / "PWNED"
    (tmp_path / "evil_mod.py").write_text(textwrap.dedent(f"""
        import pathlib
        pathlib.Path({str(marker)!r}).write_text("imported")
        import torch
        def make(**kwargs):
            from sharpscope.models import MLP
            return MLP(width=8, depth=1, in_features=4, out_features=3)
        def loss():
            return torch.nn.CrossEntropyLoss()
        class Evil(torch.optim.SGD):
            pass
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield marker
    sys.modules.pop("evil_mod", None)


def _crafted(path, **meta_changes):
    """A run file whose meta was edited by hand after the fact (what a stranger could send)."""
    with h5py.File(path, "r+") as f:
        meta = json.loads(f["meta"].attrs["json"])
        meta.update(meta_changes)
        f["meta"].attrs["json"] = json.dumps(meta)


def test_a_run_file_naming_os_system_runs_nothing(tmp_path):
    path = tmp_path / "run.h5"
    _record(path, {"model_factory": "sharpscope.models:MLP",
                   "model_kwargs": {"width": 8, "depth": 1, "in_features": 4, "out_features": 3}})
    marker = tmp_path / "f"
    _crafted(path, model_factory="os:system", model_kwargs={"command": f"echo PWNED > {marker}"})
    with pytest.raises(ss.UntrustedNameError, match=r"names the model 'os:system', which is not trusted.*--allow-factory 'os:\*'"):
        run_spectrum_job([path], ["hessian"], SETTINGS, progress=False)
    assert main(["spectrum", str(path), "--quiet"]) == 2
    assert not marker.exists() and not spectra_path(path).exists()
    with ss.open_run(path) as run, pytest.raises(ss.UntrustedNameError):
        model_at(run, 1)
    assert not marker.exists()


@pytest.mark.parametrize("field", ["model", "loss", "optimizer"])
def test_untrusted_names_are_refused_before_their_module_is_imported(tmp_path, evil_module, field):
    path = tmp_path / "run.h5"
    kwargs = {"width": 8, "depth": 1, "in_features": 4, "out_features": 3}
    _record(path, {"model_factory": "sharpscope.models:MLP", "model_kwargs": kwargs}, optimizer="adam")
    change = {"model": {"model_factory": "evil_mod:make"},
              "loss": {"loss": "evil_mod:loss"}}.get(field)
    if field == "optimizer":
        with ss.open_run(path) as run:
            opt = run.meta["optimizer"]
        change = {"optimizer": {**opt, "class": "evil_mod.Evil"}}
    _crafted(path, **change)
    with pytest.raises(ss.UntrustedNameError, match=f"names the {field} 'evil_mod"):
        run_spectrum_job([path], ["hessian", "precond"], SETTINGS, progress=False)
    assert not evil_module.exists() and "evil_mod" not in sys.modules
    report = run_spectrum_job([path], ["hessian", "precond"], SETTINGS, progress=False,
                              allow_factories=["evil_mod:*"])
    assert evil_module.exists()  # allowed explicitly: imported and used
    assert report.failures == [] and report.written == 6  # 3 checkpoints x 2 (Adam step 0: not applicable)


def test_registered_and_entry_point_factories_are_trusted(tmp_path, monkeypatch):
    (tmp_path / "mine_mod.py").write_text("import torch\ndef make(width=8):\n    return torch.nn.Sequential("
                                           "torch.nn.Linear(4, width), torch.nn.Tanh(), torch.nn.Linear(width, 3))\n"
                                           "def other(width=8):\n    return make(width)\n")
    dist = tmp_path / "mine-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mine\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[sharpscope.models]\nmake = mine_mod:make\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry._entry_point_values.cache_clear()
    try:
        import mine_mod

        path = tmp_path / "run.h5"
        _record(path, {"model_factory": "mine_mod:make"}, model=mine_mod.make())
        assert run_spectrum_job([path], ["hessian"], SETTINGS, progress=False).written == 3  # entry point
        other = tmp_path / "other.h5"
        _record(other, {"model_factory": "mine_mod:other"}, model=mine_mod.other())
        with pytest.raises(ss.UntrustedNameError):
            run_spectrum_job([other], ["hessian"], SETTINGS, progress=False)
        ss.register_model(mine_mod.other)
        assert run_spectrum_job([other], ["hessian"], SETTINGS, progress=False).written == 3
    finally:
        registry._REGISTERED["model"].pop("mine_mod:other", None)
        registry._entry_point_values.cache_clear()
        sys.modules.pop("mine_mod", None)


def test_a_probe_trusts_its_own_factory_for_the_runs_it_created(tmp_path, monkeypatch):
    (tmp_path / "probe_models.py").write_text(
        "from sharpscope.models import MLP\ndef tiny(width=16, **kw):\n    return MLP(width=width, **kw)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    text = probe_text("custom", widths=(16, 32), steps=2, every=2, quantities=("hessian",))
    probe = tmp_path / "custom.toml"
    probe.write_text(text.replace('factory = "mlp"', 'factory = "probe_models:tiny"'))
    out = tmp_path / "out"
    assert main(["sweep", str(probe), "--out", str(out), "--quiet"]) == 0
    runs = sorted((out / "runs").glob("*-w*.h5"))
    runs = [r for r in runs if not r.name.endswith(".spectra.h5")]
    for r in runs:
        spectra_path(r).unlink()
    assert main(["spectrum", *map(str, runs), "--quiet"]) == 0  # the recorded, unchanged probe file trusts it
    probe.write_text(probe.read_text() + "\n# edited\n")
    for r in runs:
        spectra_path(r).unlink()
    assert main(["spectrum", *map(str, runs), "--quiet"]) == 2  # edited: no longer vouches for the runs
    assert main(["spectrum", *map(str, runs), "--quiet", "--allow-factory", "probe_models:*"]) == 0
    sys.modules.pop("probe_models", None)


def test_a_checkpoint_must_cover_the_rebuilt_model(tmp_path):
    kwargs = {"width": 8, "depth": 1, "in_features": 4, "out_features": 3}
    path = tmp_path / "run.h5"
    _record(path, {"model_factory": "sharpscope.models:MLP", "model_kwargs": kwargs})
    with ss.open_run(path) as run:
        model_at(run, 1)  # covered
    with h5py.File(path, "r+") as f:  # a row without one tensor (edited tensor list)
        specs = json.loads(f["checkpoints"].attrs["tensors"])
        f["checkpoints"].attrs["tensors"] = json.dumps([s for s in specs if s["name"] != "readout.bias"])
    with ss.open_run(path) as run, pytest.raises(ss.RunFileError, match="does not cover the rebuilt model: "
                                                 "readout.bias is not stored"):
        model_at(run, 1)
    report = run_spectrum_job([path], ["hessian"], SETTINGS, progress=False)
    assert report.written == 0 and len(report.failures) == 3 and "readout.bias" in report.failures[0][2]


def test_a_model_rebuilt_with_other_kwargs_is_refused(tmp_path):
    path = tmp_path / "run.h5"
    model = nn.Sequential(nn.Linear(4, 8, bias=False), nn.Tanh(), nn.Linear(8, 3, bias=False))

    def no_bias():
        return model

    ss.register_model(no_bias, name="tests:no_bias")
    ss.register_model(lambda bias=True: nn.Sequential(nn.Linear(4, 8, bias=bias), nn.Tanh(), nn.Linear(8, 3, bias=bias)),
                      name="tests:with_bias")
    try:
        _record(path, {"model_factory": "tests:no_bias"}, model=model)
        _crafted(path, model_factory="tests:with_bias")  # bias on: two tensors the run never stored
        with ss.open_run(path) as run, pytest.raises(ss.RunFileError, match="0.bias is not stored"):
            model_at(run, 2)
    finally:
        registry._REGISTERED["model"].pop("tests:no_bias")
        registry._REGISTERED["model"].pop("tests:with_bias")


def test_a_string_parameterization_is_a_label(tmp_path):
    path = tmp_path / "run.h5"
    kwargs = {"width": 8, "depth": 1, "in_features": 4, "out_features": 3}
    _record(path, {"model_factory": "sharpscope.models:MLP", "model_kwargs": kwargs, "parameterization": "sp",
                   "width": 8, "lr": 0.1})
    report = run_spectrum_job([path], ["hessian"], SETTINGS, progress=False)
    assert report.failures == [] and report.written == 3
    summaries, _ = ss.collect([path])
    assert summaries[0].parameterization == "sp"


def test_parametrize_at_the_base_width_of_a_plain_sequential():
    def make(width):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 3))

    base = make(16)
    for width in (16, 32):  # a width sweep that includes the base width
        groups = ss.parametrize(make(width), "mup", optimizer="adam", lr=1e-2, base_model=base)
        if width == 16:
            assert {g["role"] for g in groups} == {"unknown"}
            assert all(g["lr"] == 1e-2 and g["multiplier"] == 1.0 for g in groups)
    with pytest.raises(ValueError, match="Muon .* needs the layer roles.*delta_model="):
        ss.parametrize(make(16), "mup", optimizer="muon", lr=1e-2, base_model=base)
    with pytest.raises(ValueError, match="zero_readout .* needs the layer roles"):
        ss.parametrize(make(16), "mup", optimizer="sgd", lr=1e-2, base_model=base, zero_readout=True)
    roles = ss.parametrize(make(16), "mup", optimizer="sgd", lr=0.1, base_model=base, delta_model=make(64))
    assert [g["role"] for g in roles][:3] == ["embedding", "vector", "hidden"]
