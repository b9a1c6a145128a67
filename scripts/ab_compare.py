#!/usr/bin/env python
"""A/B against another commit in one run: the same command, alternately on two source trees.

The base revision is checked out into a temporary git worktree; the command runs in fresh
processes, alternating base and current (ABAB..., so that slow drifts of a shared machine hit both
alike), with ``PYTHONPATH`` pointing at the tree under test (the command's ``import sharpscope``
then loads that tree's package, whatever the venv's editable install says). The command's last
line of output must be a JSON object of numbers; the script prints the median of each key for both
trees, the ratio current / base and the spread of the per-repeat ratios (run i of current over run i of base).

    .venv/bin/python scripts/ab_compare.py --base HEAD~1 --repeats 5 -- \\
        .venv/bin/python scripts/bench_capture.py --repeats 1 --json

The command itself (a benchmark script) is taken from the current tree, so both sides measure the
same way; only the package differs.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(command: list[str], tree: Path) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"command failed on {tree}:\n{out.stderr[-2000:]}")
    last = [ln for ln in out.stdout.splitlines() if ln.strip()][-1]
    return {k: float(v) for k, v in json.loads(last).items() if isinstance(v, (int, float))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="git revision to compare against (e.g. HEAD~1)")
    parser.add_argument("--repeats", type=int, default=5, help="runs per tree (default 5)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command after --")
    base_rev = subprocess.run(["git", "rev-parse", "--short", args.base], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    head_rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                capture_output=True, text=True).stdout.strip())
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(base), base_rev], cwd=ROOT, check=True)
        try:
            results: dict[str, list[dict[str, float]]] = {"base": [], "current": []}
            for i in range(args.repeats):
                for name, tree in (("base", base), ("current", ROOT)):
                    print(f"[{i + 1}/{args.repeats}] {name} ...", file=sys.stderr, flush=True)
                    results[name].append(_run(command, tree))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, check=False)
    print(f"A/B: base {base_rev} vs current {head_rev}{' + uncommitted changes' if dirty else ''}, "
          f"{args.repeats} alternating runs each, medians; command: {' '.join(command)}")
    keys = [k for k in results["current"][0] if all(k in r for r in results["base"])]
    width = max(len(k) for k in keys)
    print(f"{'metric':<{width}}  {'base':>12}  {'current':>12}  {'current/base':>12}  {'paired ratios: median [min, max]':>34}")
    for k in keys:
        b = statistics.median(r[k] for r in results["base"])
        c = statistics.median(r[k] for r in results["current"])
        ratio = c / b if b else float("nan")
        pairs = [rc[k] / rb[k] for rb, rc in zip(results["base"], results["current"]) if rb[k]]
        spread = f"{statistics.median(pairs):.4f} [{min(pairs):.4f}, {max(pairs):.4f}]" if pairs else "-"
        print(f"{k:<{width}}  {b:>12.5g}  {c:>12.5g}  {ratio:>12.4f}  {spread:>34}")


if __name__ == "__main__":
    main()
