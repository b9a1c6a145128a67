"""``python -m sharpscope``: the same program as the ``sharpscope`` console script, with the same import path.

For ``-m`` Python puts the current folder *first* on the import path, where a ``mymodels.py`` left beside a
downloaded run file would shadow the user's own package (one that ``--allow-factory`` names), or anything
installed; so that entry is taken off again, unless sharpscope itself is imported from there (a source
checkout). Both entry points then put the current folder at the *end* of the path while a command runs
(:func:`sharpscope.cli.main`), so a factory module kept beside the runs is found, the same way in both
(docs/trust.md, section 6)."""
import os
import sys

_here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if sys.path and not sys.flags.safe_path and sys.path[0] in ("", os.getcwd()) and \
        os.path.abspath(sys.path[0] or os.curdir) != _here:
    del sys.path[0]

from .cli import main  # noqa: E402 - after the import path is fixed

sys.exit(main())
