"""Deprecated path: moved to :mod:`sharpscope.lanczos.backends` (an alias; see CHANGELOG.md)."""
from .._moved import alias

alias(__name__, ("base", "bf16", "reference", "torch_basis", "array_basis", "selfcheck", "kernels"))
