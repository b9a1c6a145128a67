"""The command line's help: every argument of every command has help text and shows its default, the defaults
and choices the torch-free parsers write out are the code's own, and building the parsers (or answering
``--help``) imports no torch."""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import subprocess
import sys
import typing

import pytest

from sharpscope.cli import build_parser, main

COMMANDS = ("demo", "spectrum", "inspect", "coordcheck", "sweep", "report")


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def _help_of(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    return parser._get_formatter()._expand_help(action)


def test_every_command_is_listed():
    assert tuple(_subparsers(build_parser())) == COMMANDS


@pytest.mark.parametrize("command", COMMANDS)
def test_every_argument_has_help_and_shows_its_default(command):
    parser = _subparsers(build_parser())[command]
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        name = "/".join(action.option_strings) or action.dest
        assert action.help and len(action.help) > 10, f"{command} {name}: no help text"
        has_default = action.option_strings and action.default not in (None, False, argparse.SUPPRESS)
        if has_default:
            text = _help_of(parser, action)
            assert "default" in text, f"{command} {name}: its default {action.default!r} is not shown"
        if action.option_strings and action.default is None and not isinstance(action, argparse._StoreTrueAction):
            assert "default" in action.help or action.required, f"{command} {name}: says nothing of when it is absent"


def test_the_parsers_state_the_codes_own_defaults_and_choices():
    from sharpscope.coordcheck import coord_check
    from sharpscope.demo import run_demo
    from sharpscope.runs import cli as runs_cli
    from sharpscope.runs.jobs import SpectrumSettings
    from sharpscope.runs.quantities import QUANTITIES, Kind

    settings = {f.name: f.default for f in dataclasses.fields(SpectrumSettings)}
    assert runs_cli.SETTINGS_DEFAULTS == {k: settings[k] for k in runs_cli.SETTINGS_DEFAULTS}
    assert set(settings) - set(runs_cli.SETTINGS_DEFAULTS) == {"loss"}  # --loss: None, "the loss the run recorded"
    assert runs_cli.QUANTITY_NAMES == tuple(QUANTITIES)
    assert set(typing.get_args(Kind)) <= set(runs_cli._HEADERS)  # inspect --results has a table for every kind
    sub = _subparsers(build_parser())
    demo = {a.dest: a.default for a in sub["demo"]._actions}
    for name, param in inspect.signature(run_demo).parameters.items():
        if param.default is not inspect.Parameter.empty:
            assert demo[name] == param.default, f"demo --{name}"
    coord = {a.dest: a.default for a in sub["coordcheck"]._actions}
    defaults = {n: p.default for n, p in inspect.signature(coord_check).parameters.items()}
    assert coord["model"] == defaults["model"] and coord["optimizer"] == defaults["optimizer"]
    assert coord["lr"] == defaults["lr"] and coord["steps"] == defaults["steps"]
    assert coord["batch_size"] == defaults["batch_size"] and tuple(coord["widths"]) == tuple(defaults["widths"])


def test_spectrum_and_demo_help_say_what_the_issue_asked(capsys):
    with pytest.raises(SystemExit):
        main(["spectrum", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "dask-cuda" in text and "(default: 1e-06)" in text
    for flag in ("--seed", "--density-probes", "--density-steps", "--batchnorm"):
        assert f"{flag} " in text
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "``" not in text and "a few steps" not in text
    assert "100 steps at lr 0.5" in text and "(default: 100)" in text


@pytest.mark.parametrize("command", COMMANDS)
def test_no_help_text_holds_restructuredtext_markup(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    assert "``" not in out and ":func:" not in out and ":mod:" not in out


def test_building_the_parsers_and_every_help_imports_no_torch():
    """In a fresh process: ``import sharpscope``, building the parser and every ``--help`` leave torch (and scipy,
    matplotlib, h5py, numpy) out of ``sys.modules``; the public names still resolve on first use."""
    code = f"""
import json, sys
import sharpscope
from sharpscope.cli import build_parser, main
build_parser()
for argv in ([], *[[c] for c in {list(COMMANDS)!r}]):
    try:
        main([*argv, "--help"])
    except SystemExit:
        pass
heavy = sorted(m for m in ("torch", "scipy", "matplotlib", "h5py", "numpy") if m in sys.modules)
sharpscope.hessian_operator
print(json.dumps({{"heavy": heavy, "torch_after_use": "torch" in sys.modules}}), file=sys.stderr)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stderr.strip().splitlines()[-1])
    assert result == {"heavy": [], "torch_after_use": True}
