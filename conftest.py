"""Root pytest configuration: the deprecated module aliases (sharpscope/_moved.py) are not collected
for doctests -- importing them by file path would load a second copy of the module they alias."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from sharpscope._moved import MOVED  # noqa: E402

collect_ignore = [str(Path("sharpscope", *old.split(".")[1:]).with_suffix(".py")) for old in MOVED
                  if old != "sharpscope.backends"] + ["sharpscope/backends", "sharpscope/__main__.py"]
