"""Old module paths kept working after the layout change: each old module is an alias of its new home.

Importing an old path (``sharpscope.jobs``, ``sharpscope.store``, ...) warns once with a
DeprecationWarning and returns the new module itself, so every name, private ones included, is
the same object. CHANGELOG.md says when the aliases go.
"""
from __future__ import annotations

import importlib
import sys
import warnings
from types import ModuleType

MOVED = {
    "sharpscope.store": "sharpscope.runs.store",
    "sharpscope.capture": "sharpscope.runs.capture",
    "sharpscope.callbacks": "sharpscope.runs.callbacks",
    "sharpscope.jobs": "sharpscope.runs.jobs",
    "sharpscope.runs_cli": "sharpscope.runs.cli",
    "sharpscope.consistency": "sharpscope.analysis.consistency",
    "sharpscope.comparisons": "sharpscope.analysis.comparisons",
    "sharpscope.plots": "sharpscope.analysis.plots",
    "sharpscope.report": "sharpscope.analysis.report",
    "sharpscope.backends": "sharpscope.lanczos.backends",
}


def warn_moved(old: str) -> None:
    """The DeprecationWarning of an old path."""
    warnings.warn(f"{old} moved to {MOVED[old]}; the old path will be removed (see CHANGELOG.md)",
                  DeprecationWarning, stacklevel=4)


def alias(old: str, submodules: tuple[str, ...] = ()) -> ModuleType:
    """Make ``old`` (and ``old.<sub>`` for each submodule) the new module; warn once."""
    new = MOVED[old]
    warn_moved(old)
    module = importlib.import_module(new)
    sys.modules[old] = module
    for sub in submodules:
        sys.modules[f"{old}.{sub}"] = importlib.import_module(f"{new}.{sub}")
    return module
