"""Progress bars of long calls (issue 22): lanczos, the estimators and spectral_density report their products when
asked, stay silent when quick or told not to, and the spectrum job shows its solves' bars under its own."""
from __future__ import annotations

import re

import pytest

import sharpscope as ss
import sharpscope.progress as progress_mod
from conftest import with_spectrum
from sharpscope.progress import Progress, call_bars


class FakeBar:
    def __init__(self, **kwargs):
        self.kwargs, self.n, self.postfix, self.closed = kwargs, kwargs["initial"], "", False

    def update(self, step):
        self.n += step

    def set_postfix_str(self, text, refresh=True):
        self.postfix = text

    def close(self):
        self.closed = True


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _progress(progress, clock, **kwargs):
    return Progress("work", 10, progress, clock=clock, make_bar=FakeBar, **kwargs)


def test_a_default_bar_appears_only_after_the_delay_with_the_count_so_far():
    clock = Clock()
    p = _progress(None, clock, delay=2.0)
    p.advance(3)
    p.note("top 1.5")
    assert p.bar is None
    clock.t = 2.5
    p.advance(4)
    assert p.bar.n == 4 and p.bar.postfix == "top 1.5" and p.bar.kwargs["total"] == 10
    p.advance(9)
    p.close()
    assert p.bar.n == 9 and p.bar.closed


def test_true_shows_at_once_false_never_and_bad_values_are_refused():
    assert _progress(True, Clock()).bar is not None
    never = _progress(False, Clock(), delay=0.0)
    never.advance(5)
    assert never.bar is None and not never.enabled
    with pytest.raises(ValueError, match="progress must be None .*, True or False"):
        Progress("work", progress="yes")


def test_call_bars_sets_what_the_default_means():
    clock = Clock()
    with call_bars(False):
        quiet, forced = _progress(None, clock, delay=0.0), _progress(True, clock)
    quiet.advance(1)
    assert quiet.bar is None and forced.bar is not None  # an explicit True wins
    with call_bars(True, leave=False):
        shown = _progress(None, clock, delay=0.0)
    shown.advance(1)
    assert shown.bar.kwargs["leave"] is False
    assert _progress(True, clock).bar.kwargs["leave"] is True  # outside the block: the default again


def _final_count(err: str, desc: str) -> int:
    # tqdm's line: "desc: 52product [...]" without a total, "desc: 100%|###| 40/40 [...]" with one
    counts = re.findall(re.escape(desc) + r": (?:(\d+)product|\s*\d+%\|[^|]*\| *(\d+)/\d+)", err)
    counts = [a or b for a, b in counts]
    assert counts, err
    return int(counts[-1])


def test_lanczos_and_the_estimators_report_their_products(capsys):
    op = with_spectrum([float(i) for i in range(1, 81)], seed=0)
    res = ss.lanczos(op, k=2, progress=True)
    hutch = ss.hutchinson_trace(op, num_probes=40, block_size=16, progress=True)
    plus = ss.hutchpp_trace(op, num_matvecs=30, progress=True)
    dens = ss.spectral_density(op, num_probes=3, num_steps=12, block_size=2, progress=True)
    err = capsys.readouterr().err
    assert _final_count(err, "lanczos k=2") == res.num_matvecs
    assert _final_count(err, "hutchinson_trace") == hutch.num_matvecs == 40
    assert "estimate" in err
    assert _final_count(err, "hutchpp_trace") == plus.num_matvecs == 30
    assert _final_count(err, "spectral_density") == dens.num_matvecs == 36
    assert "3/3 probes" in err


def test_quick_calls_and_progress_false_print_nothing(capsys):
    op = with_spectrum([float(i) for i in range(1, 41)], seed=0)
    ss.lanczos(op, k=2)
    ss.hutchinson_trace(op, num_probes=10)
    ss.spectral_density(op, num_probes=2, num_steps=8, progress=False)
    ss.hutchpp_trace(op, num_matvecs=12, progress=False)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("quiet", [False, True])
def test_the_spectrum_job_shows_its_solves_bars_unless_quiet(tmp_path, monkeypatch, capsys, quiet):
    from test_jobs import _record

    from sharpscope.runs.jobs import SpectrumSettings, run_spectrum_job

    path = tmp_path / "run.h5"
    _record(path, steps=2, every=2)
    monkeypatch.setattr(progress_mod, "DELAY", 0.0)  # every call's bar at its first product
    closed, close = [], Progress.close
    monkeypatch.setattr(Progress, "close", lambda self: (closed.append((self.desc, self.count, self.bar is not None,
                                                                        self.leave)), close(self)))
    settings = SpectrumSettings(k=1, density_probes=2, density_steps=6)
    report = run_spectrum_job([path], ["hessian", "density"], settings, progress=not quiet, steps=[2])
    assert report.failures == [] and report.computed == 1
    err = capsys.readouterr().err
    solves = {desc: (count, shown, leave) for desc, count, shown, leave in closed}
    assert solves["spectral_density"][0] == 12 and solves["lanczos k=1"][0] > 0  # counted either way
    if quiet:
        assert err == "" and not any(shown for _, shown, _ in solves.values())
    else:  # shown under the job's bar, and cleared when done
        assert all(shown and not leave for _, shown, leave in solves.values())
        assert "spectra" in err and "spectral_density" in err and "lanczos k=1" in err
