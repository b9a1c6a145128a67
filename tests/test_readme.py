"""The README stays short, true and runnable: its example runs as written (scripts/readme_example.py), the
numbers it quotes from that run hold, and the API names and commands it shows exist."""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import sys
from pathlib import Path

import pytest

import sharpscope as ss

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_BYTES = 12_500  # issue 22: a README of at most ~12 kB; the rest is on the docs site


def _load_script(name: str):
    """A module of scripts/ (not a package), registered under a name no other test uses."""
    spec = importlib.util.spec_from_file_location(f"_scripts_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


readme_example = _load_script("readme_example")


def _text() -> str:
    return README.read_text()


def _code_blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)\n```", text, re.DOTALL)


def test_readme_is_short_and_in_the_issues_order():
    text = _text()
    assert len(text.encode()) <= MAX_BYTES, f"README.md is {len(text.encode())} bytes (at most {MAX_BYTES})"
    heads = [h for h in re.findall(r"^## (.+)$", text, re.MULTILINE)]
    order = ["Install", "Example", "Python API", "Documentation"]
    positions = [next(i for i, h in enumerate(heads) if word in h) for word in order]
    assert positions == sorted(positions), heads
    first_figure = text.index("![")
    assert first_figure < text.index("\n## "), "the figure belongs near the top, before the first section"


def test_the_example_is_one_short_block_and_the_guide_shows_the_same():
    example = readme_example.extract(README)
    assert len(example.code.rstrip("\n").splitlines()) <= 25
    assert [words[0] for words in example.commands] == ["python", "sharpscope", "sharpscope"]
    assert [words[1] for words in example.commands[1:]] == ["spectrum", "report"]
    guide = (ROOT / "docs" / "getting-started.md").read_text()
    assert example.code.rstrip("\n") in _code_blocks(guide, "python"), \
        "docs/getting-started.md must show the README's example as it is"


def test_extract_names_what_is_missing(tmp_path):
    bad = tmp_path / "README.md"
    bad.write_text("# x\n\n```python\nprint(1)\n```\n")
    with pytest.raises(ValueError, match="no ```python block after an '<!-- example"):
        readme_example.extract(bad)
    bad.write_text("<!-- example: a.py -->\n```python\nprint(1)\n```\n<!-- example: commands -->\n```sh\nls\n```\n")
    with pytest.raises(ValueError, match="commands block is ```sh, expected ```bash"):
        readme_example.extract(bad)
    bad.write_text("<!-- example: a.py -->\n```python\nprint(1)\n```\n<!-- example: commands -->\n```bash\nls -la\n```\n")
    with pytest.raises(ValueError, match="only python and sharpscope commands are run"):
        readme_example.run(readme_example.extract(bad), tmp_path)


def test_the_example_runs_and_its_quoted_result_holds(tmp_path):
    """The user's path: train.py, then `sharpscope spectrum`, then `sharpscope report`, in a fresh folder."""
    example = readme_example.extract(README)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two pytest workers on two cores
    done = readme_example.run(example, tmp_path, env)
    assert [p.returncode for p in done] == [0] * len(example.commands), done[-1].stdout[-2000:]
    out = tmp_path / readme_example.report_folder(example)
    assert (out / "report.html").is_file() and list((out / "figures").glob("*.png"))
    metrics = json.loads((out / "metrics.json").read_text())
    [group] = [g for g in metrics["groups"] if "precond" in g["quantities"]]
    result = group["quantities"]["precond"]
    # the README: "The report finds the two widths `consistent` (median relative spread 0.06 ..."
    claim = re.search(r"finds the two widths `(\w[\w-]*)` \(median relative spread ([0-9.]+)", _text())
    assert claim, "the README no longer quotes the example's verdict: update this test with it"
    verdict, spread = claim.group(1), claim.group(2)
    assert result["verdict"] == verdict
    decimals = len(spread.split(".")[1])
    assert round(result["spread_summary"], decimals) == pytest.approx(float(spread)), result


def test_every_ss_name_and_command_shown_exists():
    text = _text()
    names = set(re.findall(r"\bss\.([A-Za-z_]\w*)", text))
    assert names, "the README shows no ss.* name"
    assert sorted(n for n in names if not hasattr(ss, n)) == []
    from sharpscope.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    shown = set(re.findall(r"^sharpscope (\w+)", "\n".join(_code_blocks(text, "bash")), re.MULTILINE))
    assert shown and shown <= set(sub.choices), shown - set(sub.choices)


def test_local_links_resolve_and_terms_have_glossary_entries():
    text = _text()
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if not re.match(r"[a-z]+://", target):
            assert (ROOT / target).exists(), f"README links to {target}, which does not exist"
    glossary = (ROOT / "docs" / "concepts.md").read_text()
    heads = " ".join(re.findall(r"^### (.+)$", glossary, re.MULTILINE))
    for term in ("muP", "SP", "NTK", "GGN", "EoS", "Ritz residual", "Hutch++", "SLQ", "Super consistency",
                 "lr-weighted", "Octave"):
        assert term in heads, f"the glossary (docs/concepts.md) has no entry for {term}"
    assert text.index("docs/concepts.md#glossary") < text.index("\n## Install")


def test_the_demo_time_quoted_is_a_dated_measurement_in_the_bench_notes():
    """Claims that hold: the README's demo cost is a row that scripts/measure_demo.sh printed, kept with its date
    in docs/bench-notes.md, within the 180 CPU-second budget of issue 22."""
    quoted = re.search(r"It needed ([0-9.]+) CPU seconds \(user \+ sys\) and\s+([0-9.]+) s of wall time.*?on\s+"
                       r"(\d{4}-\d\d-\d\d)", _text(), re.DOTALL)
    assert quoted, "the README no longer quotes the demo's measured cost: update this test with it"
    cpu, wall, date = quoted.groups()
    assert float(cpu) <= 180
    notes = (ROOT / "docs" / "bench-notes.md").read_text()
    rows = [line for line in notes.splitlines() if line.startswith(f"| {date} ") and "measure_demo.sh" in line]
    assert any(f"| {cpu} (" in row and f"| {wall} s |" in row for row in rows), \
        f"docs/bench-notes.md has no measure_demo.sh row of {date} with {cpu} CPU seconds and {wall} s"
