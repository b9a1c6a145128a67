"""One-line errors everywhere (issue 21, item 9).

``inspect`` on a run whose JSON attributes hold valid JSON of the wrong type (``versions = "[]"``,
``optimizer = "SGD"``, ``format_version = "abc"``) ended in a traceback; probe files whose later axis values
break the model (``[sweep.axes] in_features = [64, 32]``, ``widths = [8, 100000000000]``) trained one or two
runs, then a traceback (a shape mismatch; a 25.6 TB allocation). Now each is one line naming what is wrong
(or, for the caller's own meta entries, a readable rendering), and a bad probe is refused before anything
trains: the dry run builds every distinct model configuration on the ``meta`` device."""
from __future__ import annotations

import json

import h5py
import pytest

from conftest import probe_text
from sharpscope.cli import main
from sharpscope.runs.spectra import spectra_path
from sharpscope.sweep import load_probe

from ._run_files import record


def _set(path, group, attr, value):
    with h5py.File(path, "r+") as f:
        (f[group] if group != "/" else f).attrs[attr] = value


def _edit_meta(path, **changes):
    with h5py.File(path, "r+") as f:
        meta = json.loads(f["meta"].attrs["json"])
        meta.update(changes)
        f["meta"].attrs["json"] = json.dumps(meta)


def _one_line(capsys, argv, status, fragment):
    assert main(argv) == status
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert "Traceback" not in captured.out + captured.err
    assert len(err) == 1 and fragment in err[0], err
    return err[0]


DAMAGED = {  # attribute edits that make the file unreadable as a run: one line from every command
    'versions = "[]"': (lambda p: _set(p, "/", "versions", "[]"), "the versions attribute is a JSON list, not an object"),
    'format_version = "abc"': (lambda p: _set(p, "/", "format_version", "abc"), "format_version 'abc' is not an integer"),
    'axes = "[1, 2]"': (lambda p: _set(p, "meta", "axes", "[1, 2]"), "the axes is a JSON list, not an object"),
    'provenance = "3"': (lambda p: _set(p, "provenance", "json", "3"), "the provenance record is a JSON int"),
    "run_id = 12345": (lambda p: _set(p, "/", "run_id", 12345), "run_id 12345 is not 32 hex digits"),
    'meta = "a string"': (lambda p: _set(p, "meta", "json", '"a string"'), "the meta is a JSON str, not an object"),
    "format_version = 2.5": (lambda p: _set(p, "/", "format_version", 2.5), "format_version 2.5 is not an integer"),
}


@pytest.mark.parametrize("case", sorted(DAMAGED))
def test_wrong_typed_attributes_are_one_line_errors(tmp_path, capsys, case):
    path = tmp_path / "run.h5"
    record(path)
    edit, fragment = DAMAGED[case]
    edit(path)
    line = _one_line(capsys, ["inspect", str(path)], 2, fragment)
    assert f"{path}: damaged run file (" in line
    _one_line(capsys, ["spectrum", str(path), "--k", "1", "--quiet"], 2, fragment)


def test_an_optimizer_that_is_a_string_is_shown_not_a_traceback(tmp_path, capsys):
    path = tmp_path / "run.h5"
    record(path)
    _edit_meta(path, optimizer="SGD")
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert 'optimizer:   "SGD" (not an optimizer description' in out
    assert main(["spectrum", str(path), "--k", "1", "--quiet", "--what", "hessian,precond"]) == 1
    out = capsys.readouterr().out
    assert out.count("FAILED") == 4 and "Traceback" not in out  # precond needs it; hessian is measured
    assert "wrote 4 result(s)" in out


def test_a_damaged_spectra_file_attribute_is_one_line(tmp_path, capsys):
    path = tmp_path / "run.h5"
    record(path)
    assert main(["spectrum", str(path), "--k", "1", "--quiet"]) == 0
    _set(spectra_path(path), "/", "format_version", "x")
    capsys.readouterr()
    _one_line(capsys, ["spectrum", str(path), "--k", "1", "--quiet"], 2, "damaged spectra file (format_version 'x'")
    assert main(["inspect", str(path), "--verify"]) == 1
    assert "damaged spectra file" in capsys.readouterr().out


def test_a_damaged_batch_description_is_reported_not_raised(tmp_path, capsys):
    path = tmp_path / "run.h5"
    record(path)
    _set(path, "batch", "entries", "{}")
    assert main(["inspect", str(path)]) == 1
    out = capsys.readouterr().out
    assert "batch:       DAMAGED:" in out and "the entries attribute is not a JSON list of objects" in out


# -- the probe dry run ----------------------------------------------------------------------------------------------
PROBES = {
    "[sweep.axes] in_features = [64, 32]": (
        lambda t: t + "[sweep.axes]\nin_features = [64, 32]\n", ("'in_features': 32", "does not run on the data 'digits'")),
    "widths = [8, 100000000000]": (
        lambda t: t.replace("widths = [16, 32]", "widths = [8, 100000000000]").replace("base_width = 16", "base_width = 8"),
        ("'width': 100000000000", "too big to build")),
    "[sweep.axes] out_features = [10, 5]": (
        lambda t: t + "[sweep.axes]\nout_features = [10, 5]\n", "has 5 outputs, but the data 'digits' has class 9"),
    "[sweep.axes] in_features = [64, 10**12]": (
        lambda t: t + "[sweep.axes]\nin_features = [64, 1000000000000]\n",
        ("'in_features': 1000000000000", "parameters: training it needs at least", "lower the sizes")),
    '[sweep.axes] activation = ["tanh", "nope"]': (
        lambda t: t + '[sweep.axes]\nactivation = ["tanh", "nope"]\n', "cannot be built"),
}


@pytest.mark.parametrize("case", sorted(PROBES))
def test_a_probe_whose_later_values_break_the_model_is_refused_before_training(tmp_path, capsys, case):
    edit, fragment = PROBES[case]
    text = edit(probe_text(quantities=("hessian",)))
    probe = tmp_path / "p.toml"
    probe.write_text(text)
    with pytest.raises(ValueError) as caught:
        load_probe(probe)
    fragments = (fragment,) if isinstance(fragment, str) else fragment
    assert all(f in str(caught.value) for f in fragments) and "\n" not in str(caught.value), str(caught.value)
    _one_line(capsys, ["sweep", str(probe), "--out", str(tmp_path / "out"), "--quiet"], 2, fragments[-1])
    assert not (tmp_path / "out").exists()  # nothing trained
