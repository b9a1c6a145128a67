"""The console script and the embedded demo, end to end."""
from __future__ import annotations

import json
import subprocess
import sys

import sharpscope as ss
from conftest import probe_text
from sharpscope.cli import main
from sharpscope.demo import run_demo


def test_version_and_help(capsys):
    try:
        main(["--version"])
    except SystemExit as exit_:
        assert exit_.code == 0
    assert ss.__version__ in capsys.readouterr().out
    assert main([]) == 0
    assert "demo" in capsys.readouterr().out


def test_console_script_reports_bad_input_in_one_line():
    proc = subprocess.run([sys.executable, "-m", "sharpscope.cli", "demo", "--k", "0", "--steps", "1",
                           "--out", "/nonexistent-dir/x"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("sharpscope demo: error: k must be a positive integer")


def test_demo_end_to_end(tmp_path):
    summary = run_demo(tmp_path, steps=10, k=3)
    assert all(summary["converged"]) and len(summary["top_eigenvalues"]) == 3
    assert summary["top_eigenvalues"] == sorted(summary["top_eigenvalues"], reverse=True)
    assert (tmp_path / "demo_density.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "demo.json").read_text())["parameters"] == 26_122


def test_demo_with_a_probe_prints_verdicts_and_report(tmp_path, capsys):
    probe = tmp_path / "mini.toml"
    probe.write_text(probe_text("mini", steps=4, every=2))
    assert main(["demo", "--steps", "3", "--k", "2", "--out", str(tmp_path / "o"), "--probe", str(probe)]) == 0
    out = capsys.readouterr().out
    assert "verdicts:" in out and "mup / sgd / lr 0.2" in out
    assert (tmp_path / "o" / "mini" / "report.html").exists()
    assert main(["demo", "--out", str(tmp_path / "o2"), "--probe", str(tmp_path / "nope.toml")]) == 2
    assert "no such probe file" in capsys.readouterr().err
