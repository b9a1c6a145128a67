"""The package layout: imports obey the layer table of docs/architecture.md, public names resolve, the CUDA
sources are found, ``python -m sharpscope`` runs."""
import ast
import re
import sys
from pathlib import Path

import sharpscope as ss

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "sharpscope"


def layer_table(text: str) -> list[set[str]]:
    """The top-level names (modules and folders of sharpscope/) of each layer, in the table's order."""
    layers = []
    for row in (line for line in text.splitlines() if line.startswith("| **")):
        layer, modules = [cell.strip() for cell in row.strip("|").split("|")][:2]
        folder = re.search(r"`sharpscope/(\w+)/`", layer)
        layers.append({folder.group(1)} if folder else {t.rstrip("/") for t in re.findall(r"`([\w/]+)`", modules)})
    return layers


def imported(module: str, tree: ast.Module) -> set[str]:
    """The sharpscope modules (dotted) ``module`` imports anywhere in its body, lazy imports included."""
    package = module if module.endswith(".__init__") else module.rpartition(".")[0]
    package = package.removesuffix(".__init__")
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "sharpscope")
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            target = (f"{base}.{node.module}" if node.module else base) if node.level else node.module or ""
            if target.split(".")[0] == "sharpscope":  # ``from . import x``: x is the module (or a name of target)
                out.update(f"{target}.{a.name}" for a in node.names)
    return out


def layer_of(dotted: str, layers: list[set[str]]) -> int | None:
    """The layer of a sharpscope module: the row naming its top-level name (private helpers: the engine);
    the package itself imports every layer (the last)."""
    parts = dotted.split(".")
    if len(parts) == 1:
        return len(layers) - 1
    if parts[1].startswith("_") and parts[1] != "__main__":
        return 0
    return next((i for i, names in enumerate(layers) if parts[1] in names), None)


def wrong_way_imports(sources: dict[str, str], layers: list[set[str]]) -> list[str]:
    """``"a (layer i) imports b (layer j > i)"`` and ``"a is in no layer"`` for every offending module."""
    problems = []
    for dotted, text in sorted(sources.items()):
        if dotted == "sharpscope.__init__":
            continue
        own = layer_of(dotted, layers)
        if own is None:
            problems.append(f"{dotted} is in no layer of docs/architecture.md")
            continue
        for target in sorted(imported(dotted, ast.parse(text))):
            theirs = layer_of(target, layers)
            if theirs is None or theirs > own:
                problems.append(f"{dotted} (layer {own}) imports {target} (layer {theirs})")
    return problems


def package_sources() -> dict[str, str]:
    return {".".join(p.relative_to(ROOT).with_suffix("").parts): p.read_text() for p in sorted(PACKAGE.rglob("*.py"))}


def test_imports_go_one_way_through_the_documented_layers():
    layers = layer_table((ROOT / "docs" / "architecture.md").read_text())
    assert len(layers) == 5 and {"operators", "preconditioning", "stability"} <= layers[0] and "param" in layers[1]
    assert wrong_way_imports(package_sources(), layers) == []


def test_the_layer_check_sees_lazy_imports_and_unplaced_modules():
    layers = [{"linop", "stability"}, {"optim"}, {"runs"}]
    sources = {"sharpscope.stability": "def f():\n    from .optim import AdamAtan2\n",      # lazy, upward
               "sharpscope.runs.jobs": "from ..linop import matmat\nfrom . import store\n",  # downward: fine
               "sharpscope.newthing": "x = 1\n"}
    assert wrong_way_imports(sources, layers) == [
        "sharpscope.newthing is in no layer of docs/architecture.md",
        "sharpscope.stability (layer 0) imports sharpscope.optim.AdamAtan2 (layer 1)"]


def test_public_names_and_the_lanczos_function():
    for name in ss.__all__:
        assert hasattr(ss, name), name
    assert callable(ss.lanczos) and ss.lanczos.__module__ == "sharpscope.lanczos.solver"


def test_cuda_sources_are_found_from_the_moved_kernel_loader():
    from sharpscope.lanczos.backends.kernels import cuda_source_dir

    assert (cuda_source_dir() / "orthogonalize.cu").is_file()


def test_python_dash_m_runs_the_command_line():
    import subprocess

    out = subprocess.run([sys.executable, "-m", "sharpscope", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("sharpscope ")
