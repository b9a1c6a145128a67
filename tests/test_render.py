"""report.html as a reader sees it: rendered by headless Chromium (driven by Playwright) at 1300 x 900, it does
not overflow sideways and opens on the summary and the headline figure. Skipped, with the reason, only where no
browser can be driven (no Chromium, or no playwright package)."""
from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import probe_text
from sharpscope.sweep import run_sweep

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "render_report.py"
sys.path.insert(0, str(SCRIPT.parent))
from render_report import HEIGHT, WIDTH, measure, missing_browser  # noqa: E402

pytestmark = pytest.mark.skipif(missing_browser() is not None, reason=str(missing_browser()))

LONG = "a_setting_without_spaces_" * 40  # 1,000 characters no line can break: the settings block must wrap it
EXPECT = '\n[expect]\nmup = ["consistent", "converging", "diverging-up", "diverging-down", "inconsistent"]\n'


def _png() -> str:
    """A small valid PNG, base64."""
    import io

    import matplotlib.image as mpimg
    import numpy as np

    buf = io.BytesIO()
    mpimg.imsave(buf, np.zeros((4, 4, 3)), format="png")
    return base64.b64encode(buf.getvalue()).decode()


def _render(page: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), str(page), "--screenshot", str(tmp_path / "full.png"),
                           "--first-screen", str(tmp_path / "first.png")], capture_output=True, text=True, timeout=300)


def test_a_sweep_report_opens_on_its_summary_and_headline_and_fits_the_window(tmp_path):
    text = probe_text("mini", widths=(16, 32, 64), lrs=(0.1, 0.2, 0.4), steps=6, every=3)
    text = text.replace('name = "mini"', f'name = "mini"\ndescription = "{LONG}"\nexpected = "{LONG}"') + EXPECT
    probe = tmp_path / "mini.toml"
    probe.write_text(text)
    page = run_sweep(probe, tmp_path / "out", progress=False).report
    found = measure(page, tmp_path / "full.png", tmp_path / "first.png")
    assert found["scrollWidth"] <= found["innerWidth"] == WIDTH  # the settings and tables wrap or scroll in place
    assert 0 <= found["summary"]["top"] < found["summary"]["bottom"] <= HEIGHT
    assert found["summary"]["bottom"] <= found["headline"]["top"] < found["headline"]["bottom"] <= HEIGHT
    assert found["headline"]["width"] > 0.8 * WIDTH  # full width
    assert found["verdicts"] and found["figures"] == found["loaded"] == 3
    done = _render(page, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3/3 figures in the DOM" in done.stdout and (tmp_path / "full.png").stat().st_size > 10_000


def test_a_one_run_report_opens_on_that_runs_trajectories(tmp_path):
    probe = tmp_path / "one.toml"
    probe.write_text(probe_text("one", widths=(16,), lrs=(0.2,), steps=4, every=2))
    page = run_sweep(probe, tmp_path / "out", progress=False).report
    found = measure(page, tmp_path / "full.png")
    assert found["figures"] == 1 and found["headline"]["bottom"] <= HEIGHT
    assert found["scrollWidth"] <= found["innerWidth"]


def test_pages_that_overflow_or_bury_the_headline_fail_the_check(tmp_path):
    broken = tmp_path / "report.html"
    broken.write_text("<html><body><img src='data:image/png;base64,AAAA'></body></html>")
    done = _render(broken, tmp_path)
    assert done.returncode == 1 and "no verdict table" in done.stderr and "blank" in done.stderr
    wide = tmp_path / "wide.html"
    wide.write_text(f"<html><body><main id=summary><h2>Verdicts</h2><pre>{LONG}</pre></main></body></html>")
    done = _render(wide, tmp_path)
    assert done.returncode == 1 and "overflows sideways" in done.stderr
    buried = tmp_path / "buried.html"
    buried.write_text(f"<html><body><p id=summary>summary</p><h2>Verdicts</h2><div style='height:1200px'></div>"
                      f"<figure id=headline><img src='data:image/png;base64,{_png()}'></figure></body></html>")
    done = _render(buried, tmp_path)
    assert done.returncode == 1 and "headline figure is not on the first screen" in done.stderr
    assert "overflows" not in done.stderr
