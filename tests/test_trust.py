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
    with pytest.raises(ss.UntrustedNameError, match=r"names the model 'os:system', which is not trusted.*--allow-factory 'os:system'"):
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


def test_a_sweep_trusts_its_probe_for_its_own_jobs_only(tmp_path, monkeypatch, capsys):
    """The probe given to `sharpscope sweep` trusts its factory for the spectrum jobs that sweep launches; the
    run files' record of it does not: `spectrum` on those runs alone is refused with the fix. (On 7abbbde the
    recorded, unchanged probe file vouched for the runs, so a probe file shipped beside a run could too: this
    test asserted that behaviour, issue 21.)"""
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
    assert runs and all(spectra_path(r).exists() for r in runs)  # the sweep's own jobs were trusted
    for r in runs:
        spectra_path(r).unlink()
    capsys.readouterr()
    assert main(["spectrum", *map(str, runs), "--quiet"]) == 2  # the run file's probe record grants nothing
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "names the model 'probe_models:tiny', which is not trusted" in err
    assert "--allow-factory 'probe_models:tiny'" in err and "run that sweep again" in err
    assert not any(spectra_path(r).exists() for r in runs)
    assert main(["sweep", str(probe), "--out", str(out), "--quiet"]) == 0  # the sweep again: trusted, measured
    assert all(spectra_path(r).exists() for r in runs)
    for r in runs:
        spectra_path(r).unlink()
    assert main(["spectrum", *map(str, runs), "--quiet", "--allow-factory", "probe_models:tiny"]) == 0
    assert main(["spectrum", *map(str, runs), "--quiet", "--allow-factory", "probe_models:*"]) == 0  # stored: skipped
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


# -- the name rules and the allow-pattern semantics (docs/trust.md) ---------------------------------------------
def test_every_stored_name_still_resolves():
    """Short names, sharpscope's own factories and losses, torch losses, and optimizers in every form the Recorder
    and the fixtures store (``"torch.optim.adam.Adam"``, ``"torch.optim.SGD"``, sharpscope's own)."""
    from pathlib import Path

    for name in ("mlp", "CNN", "transformer", "moe", "sharpscope.models:MLP", "sharpscope.demo:digits_mlp",
                 "sharpscope.hf:causal_lm_from_config", "sharpscope.hf:model_from_config"):
        assert callable(registry.resolve_trusted("model", name))
    for name in ("torch.nn:CrossEntropyLoss", "torch.nn.modules.loss:MSELoss", "sharpscope.hf:causal_lm_loss"):
        assert callable(registry.resolve_trusted("loss", name))
    for name, cls in (("torch.optim.SGD", torch.optim.SGD), ("torch.optim.adam.Adam", torch.optim.Adam),
                      ("torch.optim.sgd.SGD", torch.optim.SGD), ("sharpscope.optim.AdamAtan2", ss.optim.AdamAtan2),
                      ("sharpscope.optim.OptimizerList", ss.optim.OptimizerList),
                      (f"{torch.optim.Muon.__module__}.Muon", torch.optim.Muon)):
        assert registry.resolve_trusted("optimizer", name) is cls
    fixtures = Path(__file__).parent / "fixtures"
    stored = 0
    for path in fixtures.rglob("*.h5"):
        if path.name.endswith(".spectra.h5"):
            continue
        with ss.open_run(path) as run:
            meta = run.meta
        for kind, name in (("model", meta.get("model_factory")), ("optimizer", (meta.get("optimizer") or {}).get("class"))):
            if name:
                registry.resolve_trusted(kind, name)
                stored += 1
    assert stored >= 3
    for bad in ("torch.optim.lr_scheduler.LambdaLR", "torch.optim.Optimizer.step"):
        with pytest.raises(ValueError):
            registry.resolve_trusted("optimizer", bad)
    with pytest.raises(ValueError, match="not a torch.nn loss"):
        registry.resolve_trusted("loss", "torch.nn:Module")


@pytest.fixture
def pkg(tmp_path, monkeypatch):
    """``mypkg`` (a function, a class, a re-export, a private helper) and ``mypkg.models`` / ``mypkg.models.deep``."""
    (tmp_path / "mypkg" / "models").mkdir(parents=True)
    (tmp_path / "mypkg" / "__init__.py").write_text(
        "from os.path import basename\nfrom mypkg.models import make as reexported\n"
        "def top(**kw):\n    return 'top'\nclass Net:\n    pass\ndef _helper():\n    pass\n")
    (tmp_path / "mypkg" / "models" / "__init__.py").write_text("def make(**kw):\n    return 'make'\n")
    (tmp_path / "mypkg" / "models" / "deep.py").write_text("def make(**kw):\n    return 'deep'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    for name in ("mypkg", "mypkg.models", "mypkg.models.deep"):
        sys.modules.pop(name, None)


@pytest.mark.parametrize("allow, name, trusted", [
    (["mypkg:*"], "mypkg:top", True),
    (["mypkg:*"], "mypkg:Net", True),
    (["mypkg:*"], "mypkg:_helper", False),            # '*' matches public names only
    (["mypkg:*"], "mypkg:basename", False),           # re-exported from os.path: not defined in mypkg
    (["mypkg:*"], "mypkg:reexported", False),         # defined in mypkg.models, which 'mypkg:*' does not cover
    (["mypkg:*", "mypkg.*:*"], "mypkg:reexported", True),  # ... and is covered here
    (["mypkg:reexported"], "mypkg:reexported", True),  # an exact name trusts exactly what it names
    (["mypkg:*"], "mypkg.models:make", False),        # a submodule is another module
    (["mypkg.*:*"], "mypkg.models:make", True),
    (["mypkg.*:*"], "mypkg.models.deep:make", True),  # any depth
    (["mypkg.*:*"], "mypkg:top", False),              # submodules only, not the package itself
    (["mypkg.*:make"], "mypkg.models.deep:make", True),
    (["mypkg.models:make"], "mypkg.models.deep:make", False),
    (["mypkg:*"], "mypkg:models", False),             # a module, not a function
    (["mypkg:*"], "mypkg:top.__globals__", False),    # attribute chains are not names
])
def test_allow_pattern_semantics(pkg, allow, name, trusted):
    if trusted:
        assert registry.resolve_trusted("model", name, allow) is not None
        registry.is_trusted("model", name, allow, check_object=True)
    else:
        with pytest.raises(ss.UntrustedNameError):
            registry.resolve_trusted("model", name, allow)
        with pytest.raises(ss.UntrustedNameError):
            registry.is_trusted("model", name, allow, check_object=True)


@pytest.mark.parametrize("pattern, why", [
    ("mypkg", "is not accepted"), ("mypkg.*", "is not accepted"), ("*:make", "is not accepted"),
    ("mypkg:**", "is not accepted"), ("mypkg:ma?e", "is not accepted"), ("mypkg:[a-z]*", "is not accepted"),
    ("my*:make", "is not accepted"), ("mypkg:a.b", "is not accepted"), ("mypkg:__init__", "is not accepted"),
    ("mypkg::make", "is not accepted"), ("torch.*:*", "no wildcard over torch"), ("os:*", "no wildcard over os"),
    ("sharpscope.models:*", "no wildcard over sharpscope"),
])
def test_bad_allow_patterns_are_one_line(pattern, why, capsys, tmp_path):
    with pytest.raises(ValueError, match=why) as err:
        registry.allow_patterns([pattern])
    assert "\n" not in str(err.value)
    assert main(["spectrum", str(tmp_path / "none.h5"), "--allow-factory", pattern]) == 2
    assert why in capsys.readouterr().err


def test_exact_names_in_no_wildcard_packages_and_probe_allowances():
    assert registry.allow_patterns(["os.path:join", "torch.nn:Linear"]) == ["os.path:join", "torch.nn:Linear"]
    assert registry.allowances("mlp", "CrossEntropyLoss", "probe_models:tiny", None) == ["probe_models:tiny"]
    with pytest.raises(ValueError, match="is not a 'module:function' name"):
        registry.allowances("probe_models:Outer.tiny")


def test_an_entry_point_is_trusted_exactly_as_declared(tmp_path, monkeypatch):
    """An installed entry point may name an attribute (``mod:obj.attr``): that exact value is trusted, nothing
    beside it."""
    (tmp_path / "ep_mod.py").write_text("import torch\nclass Holder:\n    @staticmethod\n    def make(width=8):\n"
                                        "        return torch.nn.Linear(4, width)\n")
    dist = tmp_path / "epdist-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: epdist\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[sharpscope.models]\nmake = ep_mod:Holder.make\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry._entry_point_values.cache_clear()
    try:
        assert registry.resolve_trusted("model", "ep_mod:Holder.make")().out_features == 8
        with pytest.raises(ss.UntrustedNameError, match="is not a 'module:function' name"):
            registry.resolve_trusted("model", "ep_mod:Holder.__init__")
    finally:
        registry._entry_point_values.cache_clear()
        sys.modules.pop("ep_mod", None)


def test_a_sweep_passes_its_allowances_to_worker_processes(tmp_path, monkeypatch):
    """On a process pool the spectrum tasks get the probe's allowances as an argument: nothing in the worker
    reads a probe file, and the run files carry no trust."""
    (tmp_path / "probe_models2.py").write_text(
        "from sharpscope.models import MLP\ndef tiny(width=16, **kw):\n    return MLP(width=width, **kw)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    probe = tmp_path / "custom.toml"
    probe.write_text(probe_text("custom", widths=(16,), steps=2, every=2, quantities=("hessian",))
                     .replace('factory = "mlp"', 'factory = "probe_models2:tiny"'))
    try:
        result = ss.run_sweep(probe, tmp_path / "out", executor="process:1", progress=False)
        assert result.spectra.failures == [] and result.spectra.written == 2
    finally:
        sys.modules.pop("probe_models2", None)
