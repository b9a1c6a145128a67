"""``sharpscope spectrum`` on a full disk: the exit line, the results kept, the re-run after freeing space.

Mounts a 1 MiB tmpfs (needs root), records a small run on it, fills the disk until FREE KiB are left and
runs ``python -m sharpscope spectrum`` in a fresh process; then frees the space and runs it again. Prints
one markdown row per amount of free space. Run it against any tree with ``PYTHONPATH=<tree>``:

    PYTHONPATH=. python scripts/full_disk_spectrum.py --free 36 60 120 160
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

WHAT = ["--what", "hessian,density", "--k", "1", "--density-probes", "4", "--density-steps", "40", "--quiet"]
RECORD = """
import sys, torch
from torch import nn
import sharpscope as ss
kwargs = {"width": 8, "depth": 1, "in_features": 4, "out_features": 3}
torch.manual_seed(0)
model = ss.MLP(**kwargs)
x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
ce = nn.CrossEntropyLoss()
with ss.Recorder(sys.argv[1], model, opt, batch=(x, y), every=1, loss_fn=ce,
                 meta={"model_factory": "sharpscope.models:MLP", "model_kwargs": kwargs}) as rec:
    for _ in range(int(sys.argv[2])):
        opt.zero_grad(); loss = ce(model(x), y); loss.backward(); opt.step(); rec.step(loss=loss)
"""
COUNT = """
import sys
from sharpscope.runs.spectra import SpectraFile
try:
    with SpectraFile(sys.argv[1]) as sf:
        print(len(sf.rows()))
except Exception as err:  # noqa: BLE001 - what a reader meets is the measurement
    print("unreadable: " + str(err).splitlines()[0][:90])
"""


def _run(args: list[str]) -> tuple[int, str, str]:
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True)
    lines = [line for line in (proc.stderr + proc.stdout).strip().splitlines() if line.strip()]
    return proc.returncode, (lines[-1] if lines else ""), proc.stdout.strip()


def _rows(spectra: Path) -> str:
    if not spectra.exists():
        return "no file"
    return _run(["-c", COUNT, str(spectra)])[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--free", type=int, nargs="+", default=[36, 60, 120, 160], help="KiB left free (default 36 60 120 160)")
    parser.add_argument("--steps", type=int, default=40, help="training steps recorded (checkpoints: steps + 1)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("mounting a tmpfs needs root")
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run.h5"
        subprocess.run([sys.executable, "-c", RECORD, str(run), str(args.steps)], check=True)
        disk = Path(tmp) / "disk"
        disk.mkdir()
        print("| free (KiB) | exit | line | results kept (readable?) | re-run after freeing: exit, line | results then |")
        print("|---|---|---|---|---|---|")
        for free in args.free:
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], check=True)
            try:
                shutil.copy(run, disk / "run.h5")
                st = os.statvfs(disk)
                with open(disk / "filler", "wb") as fh:
                    fh.write(b"\0" * max(0, st.f_bavail * st.f_frsize - free * 1024))
                code, line, _ = _run(["-m", "sharpscope", "spectrum", str(disk / "run.h5"), *WHAT])
                kept = _rows(disk / "run.spectra.h5")
                (disk / "filler").unlink()
                code2, line2, _ = _run(["-m", "sharpscope", "spectrum", str(disk / "run.h5"), *WHAT])
                after = _rows(disk / "run.spectra.h5")
                print(f"| {free} | {code} | `{line[:160]}` | {kept} | {code2}, `{line2[:110]}` | {after} |", flush=True)
            finally:
                subprocess.run(["umount", "-l", str(disk)], check=False)


if __name__ == "__main__":
    main()
