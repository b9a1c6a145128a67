"""Deprecated path: moved to :mod:`sharpscope.runs.callbacks` (an alias; see CHANGELOG.md)."""
from ._moved import alias

alias(__name__)
