"""Deprecated path: moved to :mod:`sharpscope.analysis.consistency` (an alias; see CHANGELOG.md)."""
from ._moved import alias

alias(__name__)
