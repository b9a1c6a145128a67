"""Deprecated path: moved to :mod:`sharpscope.analysis.comparisons` (an alias; see CHANGELOG.md)."""
from ._moved import alias

alias(__name__)
