"""Version 1 files (tests/fixtures/v1, written by the last version 1 writer) read by today's code."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import sharpscope as ss
from sharpscope.cli import main
from sharpscope.demo import digits_data, digits_mlp
from sharpscope.runs.jobs import SpectrumSettings, run_spectrum_job
from sharpscope.runs.spectra import SpectraFile, spectra_path
from sharpscope.runs.store import open_run

V1 = Path(__file__).parent / "fixtures" / "v1"
EXPECTED = json.loads((V1 / "expected.json").read_text())


def _sha(t) -> list:
    t = t.detach().contiguous()
    return [list(t.shape), str(t.dtype).replace("torch.", ""), hashlib.sha256(t.numpy().tobytes()).hexdigest()]


@pytest.fixture
def v1(tmp_path) -> Path:
    """A copy of the fixtures (tests never write next to the committed files)."""
    for name in ("run.h5", "run.spectra.h5", "extras.h5"):
        shutil.copy(V1 / name, tmp_path / name)
    return tmp_path


@pytest.mark.parametrize("name", ["run.h5", "extras.h5"])
def test_v1_run_reads_as_written(v1, name):
    want = EXPECTED[name]
    with open_run(v1 / name) as run:
        assert run.meta == want["meta"]
        assert run.steps == want["steps"] and run.incomplete == 0
        assert [[s.id, s.kind, s.name, list(s.shape), s.dtype, s.key, s.dataset, s.offset] for s in run.specs] \
            == want["specs"]
        for step in run.steps:
            np.testing.assert_equal(run.loss(step), want["loss"][str(step)])
            assert run.lrs(step) == want["lrs"][str(step)]
            tensors = want["tensors"][str(step)]
            assert {n: _sha(t) for n, t in run.params(step).items()} == tensors["param"]  # bit-exact
            assert {n: _sha(t) for n, t in run.buffers(step).items()} == tensors["buffer"]
            assert {f"{n}/{k}": _sha(t) for n, st in run.optimizer_state(step).items() for k, t in st.items()} \
                == tensors["optim"]
        assert run.version == 1 and not run.checksummed and run.axes == {} and run.provenance is None
        inputs, targets = run.batch()
        assert [_sha(t) for t in inputs] == want["batch"]["inputs"]
        assert (None if targets is None else _sha(targets)) == want["batch"]["targets"]
        for log, pairs in want["scalars"].items():
            steps, values = run.scalars(log)
            assert [[int(a), float(b)] for a, b in zip(steps, values)] == pairs


def test_v1_spectra_rows_read_as_written(v1):
    with SpectraFile(v1 / "run.spectra.h5") as sf:
        rows = sf.rows()
        assert len(sf) == 4 and len(sf.keys()) == 4 and sf.version == 1 and not sf.checksummed
    want = EXPECTED["run.spectra.h5"]
    assert [{**r, "values": r["values"].tolist(), "residuals": r["residuals"].tolist()} for r in rows] == want


def test_v1_inspect(v1, capsys):
    assert main(["inspect", str(v1 / "run.h5")]) == 0
    out = capsys.readouterr().out
    assert "sharpscope.demo:digits_mlp" in out and "'hessian': 2" in out
    assert "format:      v1, no checksums" in out and "{'hessian': 2, 'trace': 2} (v1, no checksums)" in out
    assert "batch:       inputs [[16, 64]], targets [16]" in out
    assert main(["inspect", str(v1 / "extras.h5"), "--json", "--verify"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["checkpoints"] == 3 and info["results"] is None and info["problems"] == []
    assert info["format"] == "v1, no checksums" and info["batch"] == {"kind": "tuple", "inputs": [[8, 4], [8, 5]],
                                                                      "targets": None}


def test_v1_spectrum_job_skips_and_appends(v1):
    settings = SpectrumSettings(k=2, trace_matvecs=12)
    again = run_spectrum_job([v1 / "run.h5"], ["hessian", "trace"], settings, steps=[2, 4], progress=False)
    assert again.computed == 0 and again.skipped == 4
    more = run_spectrum_job([v1 / "run.h5"], ["hessian"], settings, steps=[0], progress=False)
    assert more.failures == [] and more.written == 1
    with SpectraFile(spectra_path(v1 / "run.h5")) as sf:
        assert [(r["step"], r["quantity"]) for r in sf.rows("hessian")] == [(0, "hessian"), (2, "hessian"), (4, "hessian")]
        assert sf.version == 1  # appending keeps a version 1 file version 1: no mixed rows
    with h5py.File(spectra_path(v1 / "run.h5"), "r") as f:
        assert f.attrs["format_version"] == 1 and "checksum" not in f


def test_v1_run_resumes_as_v1(v1):
    """Resuming a version 1 run appends version 1 checkpoints; the earlier ones are untouched."""
    torch.manual_seed(0)
    model = digits_mlp(hidden=8, depth=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = digits_data()
    with open_run(v1 / "run.h5") as run:
        model.load_state_dict(run.params(4))
    with ss.Recorder(v1 / "run.h5", model, opt, every=2, resume=True) as rec:
        for _ in range(2):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[:16]), y[:16]).backward()
            opt.step()
            rec.step()
    with open_run(v1 / "run.h5") as run:
        assert run.version == 1 and run.steps == [0, 2, 4, 6]
        assert {n: _sha(t) for n, t in run.params(4).items()} == EXPECTED["run.h5"]["tensors"]["4"]["param"]
        assert torch.equal(run.params(6)["0.weight"], model[0].weight.detach())
    with h5py.File(v1 / "run.h5", "r") as f:
        assert f.attrs["format_version"] == 1 and "checksum" not in f["checkpoints"] and "batch" not in f
