"""scripts/gpu_probes.sh: valid bash, and every probe it names is a GPU probe file that loads (the files
themselves are parsed and built by test_probe_files.py); its dry run lists each probe's grid."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_probes.sh"


def test_script_parses_and_names_the_gpu_probes():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    names = re.findall(r'"(\w+) \d+"', re.search(r"PROBES=\((.*?)\)", SCRIPT.read_text()).group(1))
    files = {p.stem for p in (ROOT / "probes" / "gpu").glob("*.toml")}
    assert len(names) == 4 and set(names) == files
    text = {n: (ROOT / "probes" / "gpu" / f"{n}.toml").read_text() for n in names}
    assert all('device = "auto"' in t and "Not run" in t for t in text.values())


def test_dry_run_lists_every_grid(tmp_path):
    out = subprocess.run(["bash", str(SCRIPT), "--cpu", str(tmp_path)], capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable}, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ntk-vs-hessian-gpu: 6 runs" in out.stdout and (tmp_path / "gpu_probes.md").exists()
