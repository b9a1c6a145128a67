"""The ``sharpscope`` command line.

The parsers are built without torch, so that ``sharpscope --help`` and ``sharpscope COMMAND --help`` answer at
once: the parsers of ``demo``, ``coordcheck`` and ``sweep`` are here, those of ``spectrum`` and ``inspect`` in
:mod:`sharpscope.runs.cli` and that of ``report`` in :mod:`sharpscope.analysis.report` (torch-free modules);
each command imports what it needs when it runs. Every option shows its default (:class:`HelpFormatter`).
User errors become one line and exit status 2.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import textwrap
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from ._version import __version__

__all__ = ["main", "build_parser", "HelpFormatter", "UsageError"]


class UsageError(Exception):
    """A problem with the user's input: reported as one line, exit status 2."""


class HelpFormatter(argparse.HelpFormatter):
    """Descriptions wrapped paragraph by paragraph (a blank line separates them), and every option's default:
    ``(default: X)`` is appended to a help text that does not state its default already. Options whose default
    is "absent" (None, or off for a switch) say in their text what that means."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n\n".join(textwrap.fill(" ".join(paragraph.split()), width, initial_indent=indent,
                                          subsequent_indent=indent, break_on_hyphens=False) for paragraph in text.split("\n\n"))

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        absent = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if "default" in text or absent or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose help uses :class:`HelpFormatter` (the subcommands' parsers are of this class)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


# -- the commands whose modules need torch: parsers here, the work imported when the command runs --------------
def _demo(args: argparse.Namespace) -> int:
    from .demo import demo_command

    return demo_command(args)


def _coordcheck(args: argparse.Namespace) -> int:
    from .coordcheck import run_cli

    return run_cli(args)


def _sweep(args: argparse.Namespace) -> int:
    from .sweep import sweep_command

    return sweep_command(args)


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _add_demo(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="curvature of a small MLP trained on sklearn digits (then, with --probe, a probe)",
        description="The embedded default job, on the CPU with nothing downloaded: a 64-128-128-10 tanh MLP "
                    "trained with full-batch SGD (100 steps at lr 0.5 unless --steps and --lr say otherwise) on "
                    "scikit-learn's 1,797 bundled 8x8 digits; then the top --k Hessian eigenvalues with their Ritz "
                    "residuals, the edge of stability 2/lr, the Hessian trace (Hutch++) and the spectral density "
                    "(stochastic Lanczos quadrature), saved to OUT/demo.json and the plot OUT/demo_density.png.\n\n"
                    "With --probe probes/quickstart.toml (what scripts/demo.sh passes) it then runs that probe: "
                    "muP against SP across widths, their spectra, and the super-consistency report.")
    p.add_argument("--out", type=Path, default=Path("demo-output"), help="output folder")
    p.add_argument("--steps", type=int, default=100, help="full-batch SGD steps before measuring")
    p.add_argument("--lr", type=float, default=0.5, help="learning rate")
    p.add_argument("--k", type=int, default=5, help="number of top eigenvalues")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialization and of the solvers' random vectors")
    p.add_argument("--probe", type=Path, help="then run this probe file (e.g. probes/quickstart.toml) into "
                                              "OUT/<probe name> and print its verdicts and where its report is "
                                              "(default: no probe)")
    p.set_defaults(func=_demo)


def _add_coordcheck(subparsers) -> None:
    p = subparsers.add_parser(
        "coordcheck", help="coordinate check: activation scales vs width under a parameterization",
        description="Does every layer's activation scale stay width-independent during training? For each width "
                    "the model is put into the parameterization, trained for --steps steps on one fixed synthetic "
                    "batch, and after every step the RMS of each layer's output and of its change since "
                    "initialization are recorded. Under muP both are flat in the width; under SP at a fixed lr the "
                    "change of the output logits grows with it (slope ~1 on log-log axes). Writes one PNG per "
                    "parameterization and coordcheck.json to --out, and prints the slope of the logits' change.\n\n"
                    "What it proves: the first updates have the intended width scaling. What it cannot: that the "
                    "optimal lr transfers (run at least 5 steps, and check transfer itself with an lr sweep).")
    p.add_argument("--model", default="mlp", help="family (mlp, cnn, transformer, moe) or 'module:function'")
    p.add_argument("--kwargs", default="", help="JSON object of model kwargs other than width (default: none)")
    p.add_argument("--param", default="sp,mup", help="comma-separated parameterizations: sp, ntk, mup, mf")
    p.add_argument("--optimizer", default="adam", help="sgd, adam, adamw, adafactor or muon")
    p.add_argument("--lr", type=float, default=1e-2, help="base learning rate (at the base width)")
    p.add_argument("--widths", type=_int_list, default=[64, 128, 256, 512, 1024],
                   help="comma-separated widths (default: 64,128,256,512,1024)")
    p.add_argument("--base-width", type=int, default=None, help="base width (default: the smallest width)")
    p.add_argument("--steps", type=int, default=5, help="optimizer steps per width")
    p.add_argument("--seeds", type=int, default=2, help="number of seeds averaged")
    p.add_argument("--batch-size", type=int, default=32, help="samples in the synthetic batch")
    p.add_argument("--lr-scaling", choices=("global", "full_alignment", "no_alignment"), default=None,
                   help="per-layer lr exponents (default: the parameterization's own: global for SP and NTK, "
                        "full_alignment for muP and MF)")
    p.add_argument("--depth-scaling", action="store_true", help="depth-muP: residual branches scaled by 1/sqrt(L)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--out", type=Path, default=Path("coordcheck-output"), help="output folder")
    p.set_defaults(func=_coordcheck)


def _add_sweep(subparsers) -> None:
    p = subparsers.add_parser(
        "sweep", help="train a probe's grid, measure its spectra, write its report",
        description="Run a probe file (see probes/): train the width x lr x parameterization x optimizer x seed "
                    "grid with a Recorder, measure the spectra and write the report to --out. Complete runs and "
                    "stored spectra are reused; a stored run of another config is moved aside, never deleted. "
                    "The probe's model factory and loss are trusted for the spectrum jobs of this sweep.")
    p.add_argument("probe", type=Path, metavar="PROBE.toml", help="the probe file")
    p.add_argument("--out", type=Path, required=True, help="output folder (runs/, the report, metrics.json)")
    p.add_argument("--executor", help="override the probe's executor: local, process:N, dask-local:N, dask-cuda[:N] "
                                      "or dask://HOST:PORT (default: the probe's)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_sweep)


def _adders() -> tuple[Callable[[Any], None], ...]:
    """The functions that register each command, in the order ``--help`` lists them."""
    from .analysis import report
    from .runs import cli as runs_cli

    return _add_demo, runs_cli.add_parser, _add_coordcheck, _add_sweep, report.add_parser


def build_parser() -> argparse.ArgumentParser:
    """The ``sharpscope`` parser with every subcommand registered (imports no torch)."""
    parser = _Parser(prog="sharpscope", description="Hessian-spectrum and sharpness diagnostics for PyTorch models.")
    parser.add_argument("--version", action="version", version=f"sharpscope {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for add in _adders():
        add(sub)
    return parser


# the arguments that name files a command reads, by their ``dest``: what the file is
_INPUTS = {"runs": "run file", "run": "run file", "probe": "probe file"}


def _check_inputs(args: argparse.Namespace) -> None:
    """The command's input before anything runs or is written, one line for the first problem: the allow-patterns
    (:func:`sharpscope.registry.allow_patterns`), then every file the command reads exists and is a file (a
    folder: its run files are named instead, ``FOLDER/*.h5``)."""
    if getattr(args, "allow_factory", None):
        from .registry import allow_patterns

        allow_patterns(args.allow_factory)
    for dest, what in _INPUTS.items():
        value = getattr(args, dest, None)
        for path in value if isinstance(value, list) else [value] if value is not None else []:
            if path.is_dir():
                raise UsageError(f"{path}: a folder, not a {what}" + (f": pass the run files in it ({path}/*.h5)"
                                                                        if what == "run file" else ""))
            if not path.exists():
                raise UsageError(f"{path}: no such {what}" + ("" if path.parent.is_dir() else
                                                               f" (no folder {path.parent})"))


@contextlib.contextmanager
def _current_folder_last() -> Iterator[None]:
    """The current folder at the *end* of the import path while a command runs, in both entry points (the console
    script, which Python gives no such entry, and ``python -m sharpscope``, whose *first* entry
    :mod:`sharpscope.__main__` takes off): a factory module beside the runs (``mymodels.py``, named by
    ``--allow-factory``) is found, but never in place of an installed module of the same name. Worker processes
    start with this path. Being on the path trusts nothing (docs/trust.md, section 6, with its one caveat)."""
    here = os.getcwd()
    added = all(os.path.abspath(p or os.curdir) != here for p in sys.path)
    if added:
        sys.path.append(here)
    try:
        yield
    finally:
        if added and here in sys.path:
            sys.path.remove(here)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 and one line on bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        _check_inputs(args)
        with _current_folder_last():
            return int(args.func(args) or 0)
    except (UsageError, ValueError, TypeError, OSError, KeyError) as err:
        message = err.strerror if isinstance(err, OSError) and err.strerror and not err.filename else str(err)
        print(f"sharpscope {args.command}: error: {message.splitlines()[0] if message else type(err).__name__}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sharpscope {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
