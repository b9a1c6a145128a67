"""``python -m sharpscope``: the same as the ``sharpscope`` console script, which imports nothing from the
current folder. For ``-m`` Python puts that folder first on the import path, where a module left beside a
downloaded run file would shadow the user's own package (one that ``--allow-factory`` names), so it is taken
off again -- unless sharpscope itself is imported from there (a source checkout). ``PYTHONPATH=.`` puts it
back on purpose."""
import os
import sys

_here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if sys.path and not sys.flags.safe_path and sys.path[0] in ("", os.getcwd()) and \
        os.path.abspath(sys.path[0] or os.curdir) != _here:
    del sys.path[0]

from .cli import main  # noqa: E402 - after the import path is fixed

sys.exit(main())
