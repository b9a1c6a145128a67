"""scripts/code_sizes.py: sizes with the thresholds marked, and import cycles (lazy imports and ``from . import x``
included; a child importing its parent package is not a cycle by itself)."""
from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("code_sizes", ROOT / "scripts" / "code_sizes.py")
code_sizes = importlib.util.module_from_spec(spec)
spec.loader.exec_module(code_sizes)


def graph(sources: dict[str, str]) -> dict[str, set[str]]:
    known = {code_sizes.module_name(p) for p in sources}
    return {code_sizes.module_name(p): code_sizes.imported_modules(code_sizes.module_name(p), p.endswith("__init__.py"),
                                                                   ast.parse(t), known) for p, t in sources.items()}


def test_cycles_count_lazy_and_package_relative_imports():
    sources = {"pkg/__init__.py": "from .a import f\n",
               "pkg/a.py": "def f():\n    from . import b\n",          # lazy: a -> b
               "pkg/b.py": "from .a import f\nfrom . import c\n",        # b -> a: a cycle; b -> c
               "pkg/c.py": "import pkg.d\n", "pkg/d.py": "from . import helper\n",  # d -> pkg (a name of pkg)
               "pkg/sub/__init__.py": "", "pkg/sub/e.py": "from .. import c\n"}
    g = graph(sources)
    assert g["pkg.a"] == {"pkg.b"} and g["pkg.b"] == {"pkg.a", "pkg.c"} and g["pkg.d"] == {"pkg"}
    assert g["pkg.sub.e"] == {"pkg.c"}
    assert code_sizes.cycles(g) == [["pkg", "pkg.a", "pkg.b", "pkg.c", "pkg.d"]]


def test_the_tables_mark_what_is_over_the_thresholds():
    rows = [(61, "m.py:big"), (60, "m.py:at_limit"), (3, "m.py:small")]
    lines = code_sizes.table("function", rows, top=0)
    assert lines == ["functions: 3, 1 over 60 lines", "     61 ! m.py:big"]
    assert code_sizes.table("class", rows, top=None)[2] == "     60   m.py:at_limit"
    classes, functions = code_sizes.definitions("m.py", ast.parse("@dec\nclass A:\n    def f(self):\n        pass\n"))
    assert classes == [(4, "m.py:A")] and functions == [(2, "m.py:A.f")]
