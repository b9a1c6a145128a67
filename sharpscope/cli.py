"""The ``sharpscope`` command line.

Each subcommand lives in the module that implements it and registers itself through a small
``add_parser(subparsers)`` function listed in ``_SUBCOMMANDS``; this file only dispatches and turns
user errors into a one-line reason with a non-zero exit status.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from ._version import __version__

# modules that provide ``add_parser(subparsers)``; each sets ``func`` on its parser
_SUBCOMMANDS: tuple[str, ...] = ("sharpscope.demo", "sharpscope.runs.cli", "sharpscope.coordcheck",
                                 "sharpscope.sweep", "sharpscope.analysis.report")


class UsageError(Exception):
    """A problem with the user's input: reported as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sharpscope",
        description="Hessian-spectrum and sharpness diagnostics for PyTorch models.",
    )
    parser.add_argument("--version", action="version", version=f"sharpscope {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in _SUBCOMMANDS:
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
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
