"""report.html renders in headless Chromium (skipped where Chromium is not installed)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import probe_text
from sharpscope.sweep import run_sweep

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "render_report.py"
sys.path.insert(0, str(SCRIPT.parent))
from render_report import find_chromium  # noqa: E402

pytestmark = pytest.mark.skipif(find_chromium() is None, reason="Chromium not installed (apt-get install chromium)")


def test_report_renders_with_its_figures(tmp_path):
    probe = tmp_path / "mini.toml"
    probe.write_text(probe_text("mini", widths=(16, 32, 64), lrs=(0.1, 0.2, 0.4), steps=6, every=3))
    page = run_sweep(probe, tmp_path / "out", progress=False).report
    shot = tmp_path / "shot.png"
    done = subprocess.run([sys.executable, str(SCRIPT), str(page), "--screenshot", str(shot)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "8/8 figures in the DOM" in done.stdout and shot.stat().st_size > 10_000


def test_a_broken_page_fails_the_check(tmp_path):
    page = tmp_path / "report.html"
    page.write_text("<html><body><img src='data:image/png;base64,AAAA'></body></html>")
    done = subprocess.run([sys.executable, str(SCRIPT), str(page)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "no verdict table" in done.stderr and "blank" in done.stderr
