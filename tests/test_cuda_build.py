"""scripts/check_cuda.sh compiles every kernel in cuda/ with nvcc (no GPU needed); skipped without nvcc."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "check_cuda.sh"
pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")


def test_every_kernel_compiles():
    out = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    for name in ("orthogonalize.cu", "normalize.cu"):
        assert f"ok: {name}" in out.stdout


def test_a_broken_kernel_fails(tmp_path):
    (tmp_path / "broken.cu").write_text('extern "C" __global__ void k(float* x) { x[0] = undefined_name; }\n')
    out = subprocess.run(["bash", str(SCRIPT), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "FAILED" in out.stderr
