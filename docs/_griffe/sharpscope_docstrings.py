r"""A griffe extension for the API reference: reads three docstring habits of sharpscope as Google style
with Markdown.

- ``Example:`` heads a doctest; Google style (and griffe) know the section as ``Examples:``. Left as it
  is, griffe renders it as prose, where ``[a, b]`` on the line after ``[x for x in y]`` reads as a
  Markdown reference link that cannot resolve (a warning, so ``mkdocs build --strict`` fails).
- ``a, b: text`` documents several arguments at once; Google style has one name per entry. The entry
  is repeated for each name, so that griffe's checks (documented names that are not in the
  signature) still run on every other entry.
- Sphinx roles (``:func:`~sharpscope.lanczos```, ``:math:`2/\eta```) become code spans (the last
  dotted component where the role has a ``~``), since Markdown does not know them.

Only the docstring text griffe parses is changed; the package's own ``__doc__`` is untouched.
"""
from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)
_ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|exc|obj|math):`(~?)([^`]+)`")
_ARGS_HEAD = re.compile(r"^(\s*)(Args|Arguments|Parameters|Keyword Args|Keyword Arguments|Other Parameters):\s*$")
_SEVERAL = re.compile(r"^(\s*)([A-Za-z_]\w*(?:\s*,\s*[A-Za-z_]\w*)+)(\s*(?:\([^)]*\))?\s*:.*)$")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _split_entries(text: str) -> str:
    """Repeat every ``a, b: ...`` entry of an argument section once per name."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        head = _ARGS_HEAD.match(lines[i])
        out.append(lines[i])
        i += 1
        if not head:
            continue
        section_indent = len(head.group(1))
        while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > section_indent):
            several = _SEVERAL.match(lines[i])
            entry = [lines[i]]
            i += 1
            if several:
                entry_indent = len(several.group(1))
                while i < len(lines) and lines[i].strip() and _indent(lines[i]) > entry_indent:
                    entry.append(lines[i])
                    i += 1
                for name in (n.strip() for n in several.group(2).split(",")):
                    out.append(f"{several.group(1)}{name}{several.group(3)}")
                    out.extend(entry[1:])
            else:
                out.extend(entry)
    return "\n".join(out)


def _code_span(m: re.Match) -> str:
    target = m.group(2).rsplit(".", 1)[-1] if m.group(1) else m.group(2)
    return f"`{target}`"


def normalize(text: str) -> str:
    """The docstring as griffe's Google parser expects it, with Markdown in place of Sphinx roles."""
    return _split_entries(_ROLE.sub(_code_span, _EXAMPLE.sub(r"\1Examples:", text)))


class SharpscopeDocstrings(griffe.Extension):
    """Applies :func:`normalize` to every docstring griffe reads."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = normalize(obj.docstring.value)
