"""The command line tells the user what to do (issue 22, item 4): a run that cannot be rebuilt is said at capture,
a missing input is one line, both entry points import a factory module of the current folder (never in place of an
installed module), a factory that cannot be imported fails once before any checkpoint, the bar never shows failed
work as done, and ``inspect --results`` prints the values."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import sharpscope as ss
from sharpscope.cli import main
from sharpscope.runs.jobs import SpectrumSettings, run_spectrum_job
from sharpscope.runs.spectra import SpectraFile, spectra_path

CE = nn.CrossEntropyLoss()
KWARGS = {"width": 8, "depth": 1, "in_features": 4, "out_features": 3}
FACTORY_MODULE = "def make(**kwargs):\n    import sharpscope\n    return sharpscope.MLP(**kwargs)\n"


def _record(path, meta, steps=4, every=2, sharpness_every=None, kwargs=KWARGS):
    """A small run (sharpscope's MLP, SGD) with ``meta``; the warnings the Recorder gave at creation."""
    torch.manual_seed(0)
    model = ss.MLP(**kwargs)
    x, y = torch.randn(16, kwargs["in_features"]), torch.randint(0, kwargs["out_features"], (16,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rec = ss.Recorder(path, model, opt, batch=(x, y), every=every, loss_fn=CE, meta=meta,
                          sharpness_every=sharpness_every)
    with rec:
        for _ in range(steps):
            opt.zero_grad()
            loss = CE(model(x), y)
            loss.backward()
            opt.step()
            rec.step(loss=loss)
    return [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


def _one_line(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"sharpscope {command}: error: "), err
    return err


# -- 1. a run that cannot be rebuilt offline: said at creation, and by spectrum, with the fix ---------------------
@pytest.mark.parametrize("meta", [None, {"model_kwargs": KWARGS}, {"model_factory": "__main__:make"},
                                  {"model_factory": "mymodels:torch.os.system"}],
                         ids=["no-meta", "kwargs-only", "training-script", "attribute-chain"])
def test_a_recorder_that_cannot_be_rebuilt_warns_at_creation_with_the_fix(tmp_path, meta):
    caught = _record(tmp_path / "run.h5", meta)
    assert len(caught) == 1 and "sharpscope spectrum` cannot rebuild" in caught[0]
    assert "meta={'model_factory': " in caught[0] and "@ss.register_model" in caught[0]


@pytest.mark.parametrize("factory", ["sharpscope.models:MLP", "mlp", "mypkg.models:make_mlp"])
def test_a_recorder_with_a_factory_name_does_not_warn(tmp_path, factory):
    assert _record(tmp_path / "run.h5", {"model_factory": factory, "model_kwargs": KWARGS}) == []


def test_a_registered_factory_name_does_not_warn(tmp_path):
    ss.register_model(lambda **kw: ss.MLP(**kw), name="test_cli_registered_mlp")
    assert _record(tmp_path / "run.h5", {"model_factory": "test_cli_registered_mlp", "model_kwargs": KWARGS}) == []


def test_spectrum_on_a_run_without_a_factory_names_the_fix(tmp_path, capsys):
    path = tmp_path / "run.h5"
    _record(path, None)
    assert main(["spectrum", str(path), "--quiet"]) == 2
    err = _one_line(capsys, "spectrum")
    assert "meta has no model_factory" in err and "meta={'model_factory': " in err and "@ss.register_model" in err
    assert not spectra_path(path).exists()


# -- 2. a missing input: one line, before anything runs or is written ---------------------------------------------
@pytest.mark.parametrize("argv", [
    ["spectrum", "{missing}/run.h5"], ["spectrum", "{run}", "{missing}.h5"], ["inspect", "{missing}.h5"],
    ["report", "{run}", "{missing}.h5", "--out", "{out}"], ["sweep", "{missing}.toml", "--out", "{out}"],
    ["demo", "--probe", "{missing}.toml", "--out", "{out}"],
    ["spectrum", "{folder}"], ["inspect", "{folder}"], ["report", "{folder}", "--out", "{out}"],
    ["demo", "--probe", "{folder}", "--out", "{out}"]])
def test_a_missing_run_file_or_folder_is_one_line(tmp_path, capsys, argv):
    run = tmp_path / "run.h5"
    _record(run, {"model_factory": "sharpscope.models:MLP", "model_kwargs": KWARGS}, steps=2)
    names = {"missing": tmp_path / "nowhere", "run": run, "out": tmp_path / "out", "folder": tmp_path}
    argv = [a.format(**names) for a in argv]
    assert main(argv) == 2
    err = _one_line(capsys, argv[0])
    assert "no such" in err or "a folder, not a" in err
    assert not (tmp_path / "out").exists() and not spectra_path(run).exists()


def test_the_console_script_says_a_missing_file_in_one_line_without_a_traceback(tmp_path):
    done = subprocess.run([sys.executable, "-c", "import sys; from sharpscope.cli import main; sys.exit(main())",
                           "spectrum", str(tmp_path / "gone" / "run.h5")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip() == f"sharpscope spectrum: error: {tmp_path}/gone/run.h5: no such run file (no folder {tmp_path}/gone)"


# -- 3. both entry points import a factory module of the current folder, never in place of an installed one -------
CONSOLE_SCRIPT = "import sys\nfrom sharpscope.cli import main\nsys.exit(main())\n"  # what pip writes to bin/


def _entry_point(entry: str, tmp_path) -> list[str]:
    """The command line of an entry point. The console script is a file in another folder (``python -c`` would put
    the current folder first on the path, which the real script does not)."""
    if entry == "python -m":
        return ["-m", "sharpscope"]
    script = tmp_path / "bin" / "sharpscope"
    script.parent.mkdir(exist_ok=True)
    script.write_text(CONSOLE_SCRIPT)
    return [str(script)]


@pytest.mark.parametrize("entry", ["console script", "python -m"])
def test_both_entry_points_find_a_factory_module_in_the_current_folder(tmp_path, entry):
    """``localfactory.py`` beside the run is found; ``tqdm.py`` beside it (a module sharpscope imports during the
    job) does not take the installed tqdm's place: the folder is at the end of the import path."""
    folder = tmp_path / "work"
    folder.mkdir()
    _record(folder / "run.h5", {"model_factory": "localfactory:make", "model_kwargs": KWARGS}, steps=2)
    (folder / "localfactory.py").write_text(FACTORY_MODULE)
    (folder / "tqdm.py").write_text(f"import pathlib\npathlib.Path({str(tmp_path / 'SHADOW')!r}).write_text('ran')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p and os.path.abspath(p) != str(folder))}
    done = subprocess.run([sys.executable, *_entry_point(entry, tmp_path), "spectrum", "run.h5", "--allow-factory",
                           "localfactory:make", "--k", "1"], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "computed 2 checkpoint(s), wrote 2 result(s)" in done.stdout
    assert not (tmp_path / "SHADOW").exists() and spectra_path(folder / "run.h5").exists()


def test_the_current_folder_is_on_the_path_last_and_only_while_a_command_runs(tmp_path, monkeypatch):
    from sharpscope.cli import _current_folder_last

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p and os.path.abspath(p) != str(tmp_path)])
    before = list(sys.path)
    with _current_folder_last():
        assert sys.path == [*before, str(tmp_path)]
    assert sys.path == before
    sys.path.insert(0, "")  # already there (``python -c``, a source checkout under ``-m``): not added twice
    with _current_folder_last():
        assert sys.path == ["", *before]


# -- 4. a factory that cannot be imported fails once, before any checkpoint; the bar counts only success ---------
@pytest.mark.parametrize("case", ["missing dependency", "raises at import", "loss override"])
def test_an_unimportable_factory_fails_once_before_any_checkpoint(tmp_path, capsys, monkeypatch, case):
    monkeypatch.chdir(tmp_path)
    body = {"missing dependency": "import sharpscope_test_no_such_dependency\n",
            "raises at import": "raise RuntimeError('no GPU here')\n", "loss override": ""}[case]
    (tmp_path / "brokenfactory.py").write_text(body + FACTORY_MODULE)
    (tmp_path / "brokenloss.py").write_text("import sharpscope_test_no_such_loss_dependency\n"
                                            "def loss(output, target):\n    return output.sum()\n")
    factory = "sharpscope.models:MLP" if case == "loss override" else "brokenfactory:make"
    _record(tmp_path / "run.h5", {"model_factory": factory, "model_kwargs": KWARGS}, steps=6, every=1)
    argv = ["spectrum", "run.h5", "--allow-factory", "brokenfactory:make"]
    argv += ["--loss", "brokenloss:loss"] if case == "loss override" else []
    assert main(argv) == 2
    err = _one_line(capsys, "spectrum")
    expected = {"missing dependency": "sharpscope_test_no_such_dependency", "raises at import": "no GPU here",
                "loss override": "sharpscope_test_no_such_loss_dependency"}[case]
    assert expected in err and "run.h5" in err
    assert not spectra_path(tmp_path / "run.h5").exists()
    for name in ("brokenfactory", "brokenloss"):
        sys.modules.pop(name, None)


def test_failed_checkpoints_are_grouped_and_the_bar_does_not_count_them(tmp_path, capsys):
    """The factory builds a model of another shape than the checkpoints: every checkpoint fails, for one cause."""
    path = tmp_path / "run.h5"
    _record(path, {"model_factory": "sharpscope.models:MLP", "model_kwargs": {**KWARGS, "width": 4}}, steps=4,
            kwargs=KWARGS)
    assert main(["spectrum", str(path)]) == 1
    out, err = capsys.readouterr()
    failed = [line for line in out.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 1 and "steps 0, 2, 4 (3 checkpoints)" in failed[0], out
    final = err.replace("\r", "\n").strip().splitlines()[-1]
    assert "0/3" in final and "3 failed" in final and "100%" not in final, final


def test_the_job_report_groups_failures_per_cause(tmp_path):
    path = tmp_path / "run.h5"
    _record(path, {"model_factory": "sharpscope.models:MLP", "model_kwargs": {**KWARGS, "width": 4}}, steps=4,
            kwargs=KWARGS)
    report = run_spectrum_job([path], ["hessian"], SpectrumSettings(k=1), progress=False)
    assert report.failed_checkpoints == 3 and len(report.failures) == 3 and len(report.failure_lines()) == 1


# -- 5. inspect --results: the values, and the online sharpness log -----------------------------------------------
def test_inspect_results_prints_the_stored_values_and_the_online_sharpness(tmp_path, capsys):
    path = tmp_path / "run.h5"
    _record(path, {"model_factory": "sharpscope.models:MLP", "model_kwargs": KWARGS}, steps=4, sharpness_every=2)
    report = run_spectrum_job([path], ["hessian", "trace"], SpectrumSettings(k=2, trace_matvecs=12), progress=False)
    assert report.failures == []
    assert main(["inspect", str(path), "--results"]) == 0
    out = capsys.readouterr().out
    with SpectraFile(spectra_path(path)) as sf:
        hessian, trace = sf.rows("hessian"), sf.rows("trace")
    lines = out.splitlines()
    for row in hessian:
        shown = ", ".join(f"{float(v):.6g}" for v in row["values"])
        assert any(line.split()[:1] == [str(row["step"])] and shown in line for line in lines), (shown, out)
    for row in trace:
        assert any(line.split()[:2] == [str(row["step"]), f"{float(row['values'][0]):.6g}"] for line in lines), out
    with ss.open_run(path) as run:
        steps, values = run.scalars("sharpness")
    assert len(steps) >= 2
    start = lines.index("online sharpness (logged during training):")
    table = lines[start + 2:]
    for step, value in zip(steps, values):
        assert any(line.split()[:2] == [str(int(step)), f"{float(value):.6g}"] for line in table), out

    assert main(["inspect", str(path), "--results", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert len(info["stored_values"]) == len(hessian) + len(trace)
    assert [s for s, _ in info["online_sharpness"]["sharpness"]] == [int(s) for s in steps]


def test_inspect_results_says_when_nothing_is_stored(tmp_path, capsys):
    path = tmp_path / "run.h5"
    _record(path, {"model_factory": "sharpscope.models:MLP", "model_kwargs": KWARGS}, steps=2)
    assert main(["inspect", str(path), "--results"]) == 0
    out = capsys.readouterr().out
    assert "stored values: none" in out or "results:     none" in out
    assert "online sharpness: none logged (Recorder(sharpness_every=N)" in out
