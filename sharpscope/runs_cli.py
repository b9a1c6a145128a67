"""Deprecated path: moved to :mod:`sharpscope.runs.cli` (an alias; see CHANGELOG.md)."""
from ._moved import alias

alias(__name__)
