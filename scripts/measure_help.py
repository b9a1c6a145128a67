#!/usr/bin/env python
"""How long ``sharpscope --help`` and ``sharpscope <command> --help`` take, each in a fresh process.

Every command line runs ``--repeat`` times (default 5) in a new Python process, as the console script
runs it (``from sharpscope.cli import main; sys.exit(main())``), and the median wall time and the median
CPU time (user + sys of the child, from ``wait4``) are printed. The machine is shared, so the CPU time is
the steadier figure; ``import torch`` alone is measured in the same run as the yardstick. With
``--compare REV`` the package of commit REV (read through ``git archive``, no checkout) is measured too,
interleaved with the working tree's run by run, so that both see the same load.

    .venv/bin/python scripts/measure_help.py                  # the working tree
    .venv/bin/python scripts/measure_help.py --compare c141927 # and that commit, A/B interleaved
    .venv/bin/python scripts/measure_help.py --limit 1.0       # exit status 1 if a median wall time is over 1 s
"""
from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = ("demo", "sweep", "spectrum", "inspect", "report", "coordcheck")
CONSOLE_SCRIPT = "import sys; from sharpscope.cli import main; sys.exit(main())"


def run_once(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """``(wall, CPU)`` of one fresh process, started in the temporary folder (so that ``-m`` finds nothing of
    the current folder) and reaped with ``wait4`` for its own resource usage."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, cwd=tempfile.gettempdir(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"measure_help.py: {' '.join(argv[1:])!r} exited with status {proc.returncode} "
                         "(run it by hand to see why)")
    return wall, usage.ru_utime + usage.ru_stime


def package_of(rev: str, into: Path) -> Path:
    """The ``sharpscope`` package of commit ``rev`` extracted under ``into`` (returns the folder to put on
    PYTHONPATH)."""
    archive = subprocess.run(["git", "archive", "--format=tar", rev, "sharpscope"], cwd=ROOT, check=True,
                             capture_output=True).stdout
    target = into / rev
    target.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(target, filter="data")
    return target


def _row(label: str, tree: str, samples: list[tuple[float, float]]) -> str:
    walls, cpus = [w for w, _ in samples], [c for _, c in samples]
    return (f"{label:<32} {tree:<13} {statistics.median(walls):>6.2f} ({min(walls):.2f}-{max(walls):.2f})"
            f" {statistics.median(cpus):>6.2f} ({min(cpus):.2f}-{max(cpus):.2f})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--python", default=sys.executable, help="the interpreter to run")
    parser.add_argument("--repeat", type=int, default=5, help="fresh processes per command line")
    parser.add_argument("--compare", metavar="REV", help="also measure the package of this git commit, interleaved")
    parser.add_argument("--limit", type=float, help="exit status 1 if a median wall time of the working tree is over "
                                                    "this many seconds")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    trees = {"working tree": ROOT}
    with tempfile.TemporaryDirectory() as tmp:
        if args.compare:
            trees[args.compare] = package_of(args.compare, Path(tmp))
        print(f"{args.python}, {args.repeat} fresh processes per line, median (min-max); load average "
              f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores, {time.strftime('%Y-%m-%d %H:%M')}")
        print(f"{'command':<32} {'tree':<13} {'wall s':>19} {'CPU s':>19}")
        yardstick = [run_once([args.python, "-c", "import torch"], dict(os.environ)) for _ in range(args.repeat)]
        print(_row("import torch (the yardstick)", "", yardstick))
        lines = [(f"sharpscope {c} --help".replace("  ", " "), ["-c", CONSOLE_SCRIPT, *([c] if c else []), "--help"])
                 for c in ("", *COMMANDS)]
        lines.append(("python -m sharpscope --help", ["-m", "sharpscope", "--help"]))
        worst = 0.0
        for label, cmd in lines:
            samples: dict[str, list[tuple[float, float]]] = {name: [] for name in trees}
            for _ in range(args.repeat):
                for name, tree in trees.items():  # interleaved: every tree sees the same load
                    samples[name].append(run_once([args.python, *cmd], {**os.environ, "PYTHONPATH": str(tree)}))
            for name in trees:
                print(_row(label, name, samples[name]))
            worst = max(worst, statistics.median(w for w, _ in samples["working tree"]))
    if args.limit is not None and worst > args.limit:
        print(f"measure_help.py: a median wall time is {worst:.2f} s, over the limit {args.limit} s", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
