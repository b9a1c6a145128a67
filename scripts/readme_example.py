#!/usr/bin/env python
"""Run the README's example as a new user would, so that it stays runnable and its figure stays true.

The README marks its example with two HTML comments (invisible on GitHub): ``<!-- example: FILE -->``
before the Python block, saved as FILE, and ``<!-- example: commands -->`` before the shell block,
whose lines are run one after the other in the same folder. ``python`` runs as this interpreter and
``sharpscope`` as ``python -m sharpscope`` (the same program as the console script), both with this
checkout first on ``PYTHONPATH``.

Usage: python scripts/readme_example.py [--workdir DIR] [--figure OUT.png] [--readme README.md]
  --workdir DIR   run there (default: a fresh temporary folder, removed afterwards)
  --figure OUT    copy the report's figure of the measured quantity to OUT (the README shows it:
                  docs/figures/readme-example.png)
Exit status 0 when every command succeeded; the last line printed is the report's folder.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_MARKED_BLOCK = re.compile(r"<!-- example: (?P<name>[\w.-]+) -->\s*\n```(?P<lang>\w+)\n(?P<body>.*?)\n```", re.DOTALL)


@dataclass(frozen=True)
class Example:
    """The README's example: the Python file's name and text, and the shell commands after it."""

    filename: str
    code: str
    commands: list[list[str]]


def extract(readme: Path) -> Example:
    """The marked blocks of ``readme``; a missing or doubled block is a one-line ValueError."""
    blocks = {}
    for m in _MARKED_BLOCK.finditer(readme.read_text()):
        key = "commands" if m["name"] == "commands" else "code"
        if key in blocks:
            raise ValueError(f"{readme}: more than one example block marked for {key}")
        blocks[key] = (m["name"], m["lang"], m["body"])
    for key, lang in (("code", "python"), ("commands", "bash")):
        if key not in blocks:
            raise ValueError(f"{readme}: no ```{lang} block after an '<!-- example: ... -->' marker")
        if blocks[key][1] != lang:
            raise ValueError(f"{readme}: the example's {key} block is ```{blocks[key][1]}, expected ```{lang}")
    commands = []
    for line in blocks["commands"][2].splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            commands.append(shlex.split(line))
    return Example(blocks["code"][0], blocks["code"][2] + "\n", commands)


def _argv(words: list[str]) -> list[str]:
    if words[0] == "python":
        return [sys.executable, *words[1:]]
    if words[0] == "sharpscope":
        return [sys.executable, "-m", "sharpscope", *words[1:]]
    raise ValueError(f"the README's example runs {words[0]!r}: only python and sharpscope commands are run")


def run(example: Example, workdir: Path, env: dict[str, str] | None = None) -> list[subprocess.CompletedProcess]:
    """Write the file and run the commands in ``workdir``; stops at the first failing command."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    (workdir / example.filename).write_text(example.code)
    done = []
    for words in example.commands:
        proc = subprocess.run(_argv(words), cwd=workdir, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
        done.append(proc)
        print(f"$ {shlex.join(words)}\n{proc.stdout}", end="" if proc.stdout.endswith("\n") else "\n")
        if proc.returncode != 0:
            break
    return done


def report_folder(example: Example) -> str:
    """The ``--out`` folder of the example's ``sharpscope report`` command."""
    for words in example.commands:
        if words[:2] == ["sharpscope", "report"] and "--out" in words:
            return words[words.index("--out") + 1]
    raise ValueError("the README's example has no 'sharpscope report ... --out DIR' command")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--figure", type=Path)
    ap.add_argument("--readme", type=Path, default=ROOT / "README.md")
    args = ap.parse_args()
    example = extract(args.readme)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="sharpscope-readme-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        done = run(example, workdir)
        if done[-1].returncode != 0 or len(done) != len(example.commands):
            print(f"readme_example: '{shlex.join(example.commands[len(done) - 1])}' failed", file=sys.stderr)
            return 1
        figures = workdir / report_folder(example) / "figures"
        if args.figure is not None:
            # the quantity's trajectory figure: not its spread figure, not the PDF copy
            found = sorted(p for p in figures.glob("*.png") if "spread" not in p.name)
            if not found:
                print(f"readme_example: no figure in {figures}", file=sys.stderr)
                return 1
            shutil.copyfile(found[0], args.figure)
            print(f"figure: {found[0].name} -> {args.figure}")
        print(workdir / report_folder(example))
        return 0
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
