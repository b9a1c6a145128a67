"""``python -m sharpscope``: the same as the ``sharpscope`` console script."""
import sys

from .cli import main

sys.exit(main())
