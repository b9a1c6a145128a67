#!/usr/bin/env python
"""Sizes of sharpscope's modules, classes and functions (lines, largest first) and its import cycles.

A line count is the span from the first decorator (or ``def`` / ``class``) to the last line, docstring
included; methods and nested functions are listed as functions under their qualified name. Sizes over
the thresholds (module > 500, class > 250, function > 60 lines) are marked ``!``. An import cycle is a
set of sharpscope modules that import each other, directly or through others (a strongly connected
component of the import graph with two or more modules); imports inside functions count, because they
tie the modules together all the same.

    .venv/bin/python scripts/code_sizes.py                # the working tree
    .venv/bin/python scripts/code_sizes.py --rev 7abbbde  # a commit, read through git (no checkout)
    .venv/bin/python scripts/code_sizes.py --top 0        # only what is over the thresholds
"""
from __future__ import annotations

import argparse
import ast
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIMITS = {"module": 500, "class": 250, "function": 60}


def sources(package: str, rev: str | None) -> dict[str, str]:
    """``{path: text}`` of the package's .py files, from the working tree or from commit ``rev``."""
    if rev is None:
        return {str(p.relative_to(ROOT)): p.read_text() for p in sorted((ROOT / package).rglob("*.py"))}
    names = subprocess.run(["git", "ls-tree", "-r", "--name-only", rev, package], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split()
    return {n: subprocess.run(["git", "show", f"{rev}:{n}"], cwd=ROOT, check=True, capture_output=True,
                              text=True).stdout for n in names if n.endswith(".py")}


def module_name(path: str) -> str:
    parts = list(Path(path).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def span(node: ast.AST) -> int:
    first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
    return node.end_lineno - first + 1


def definitions(path: str, tree: ast.Module) -> tuple[list, list]:
    """``(classes, functions)`` as ``(lines, "path:Qualified.name")``."""
    classes, functions = [], []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                classes.append((span(child), f"{path}:{prefix}{child.name}"))
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions.append((span(child), f"{path}:{prefix}{child.name}"))
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(tree, "")
    return classes, functions


def imported_modules(name: str, is_package: bool, tree: ast.Module, known: set[str]) -> set[str]:
    """The package's own modules that ``name`` imports, anywhere in its body."""
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            target = node.module or ""
            if node.level:
                target = f"{base}.{target}" if target else base
            # ``from pkg import mod`` imports the module; ``from pkg import name``, pkg itself
            found.update(f"{target}.{a.name}" if f"{target}.{a.name}" in known else target for a in node.names)
    out = set()
    for target in found:  # ``a.b.c`` is ``a.b.c`` if it is a module, else its nearest known parent
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name:
            out.add(target)
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with two or more modules (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def table(kind: str, rows: list[tuple[int, str]], top: int | None) -> list[str]:
    rows = sorted(rows, key=lambda r: (-r[0], r[1]))
    over = [r for r in rows if r[0] > LIMITS[kind]]
    shown = rows if top is None else rows[:max(top, len(over))]
    plural = "classes" if kind == "class" else f"{kind}s"
    lines = [f"{plural}: {len(rows)}, {len(over)} over {LIMITS[kind]} lines"]
    lines += [f"  {n:5d} {'!' if n > LIMITS[kind] else ' '} {where}" for n, where in shown]
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package", default="sharpscope", help="the package folder (default: sharpscope)")
    parser.add_argument("--rev", default=None, help="a git revision to read instead of the working tree")
    parser.add_argument("--top", type=int, default=15,
                        help="rows per table beyond those over the thresholds (default 15; -1: all)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # piped into head: stop quietly
    files = sources(args.package, args.rev)
    trees = {path: ast.parse(text, filename=path) for path, text in files.items()}
    names = {module_name(p): p for p in trees}
    modules = [(len(files[p].splitlines()), p) for p in trees]
    classes, functions = [], []
    for path, tree in trees.items():
        c, f = definitions(path, tree)
        classes += c
        functions += f
    graph = {m: imported_modules(m, p.endswith("__init__.py"), trees[p], set(names)) for m, p in names.items()}
    found = cycles(graph)
    top = None if args.top < 0 else args.top
    total = sum(n for n, _ in modules)
    print(f"{args.package} at {args.rev or 'the working tree'}: {len(modules)} modules, {total} lines; "
          f"import cycles: {len(found)}")
    for members in found:
        print("  cycle: " + " <-> ".join(members))
    for kind, rows in (("module", modules), ("class", classes), ("function", functions)):
        print("\n".join(table(kind, rows, top)))


if __name__ == "__main__":
    main()
