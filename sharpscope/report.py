"""Deprecated path: moved to :mod:`sharpscope.analysis.report` (an alias; see CHANGELOG.md)."""
from ._moved import alias

alias(__name__)
