"""``python -m sharpscope``: the same program as the ``sharpscope`` console script, with the same import path.

For ``-m`` Python puts the current folder *first* on the import path, where a module left beside a downloaded
run file would shadow the user's own package (one that ``--allow-factory`` names), or anything installed; so
it is taken off again, unless sharpscope itself is imported from there (a source checkout). A module that an
allow-pattern names and that nothing installed provides is still found in the current folder, by both entry
points alike: the registry then appends that folder at the *end* of the path (``sharpscope.registry``,
docs/trust.md "The current folder")."""
import os
import sys

_here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if sys.path and not sys.flags.safe_path and sys.path[0] in ("", os.getcwd()) and \
        os.path.abspath(sys.path[0] or os.curdir) != _here:
    del sys.path[0]

from .cli import main  # noqa: E402 - after the import path is fixed

sys.exit(main())
