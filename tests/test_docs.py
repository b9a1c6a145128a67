"""The docs site: `mkdocs build --strict` passes offline, the API reference covers exactly the public
``sharpscope.*`` names, and the griffe extension reads sharpscope's docstring habits as intended."""
from __future__ import annotations

import importlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import sharpscope as ss

ROOT = Path(__file__).resolve().parents[1]
API = ROOT / "docs" / "api"


def _targets() -> list[str]:
    return [t for page in sorted(API.glob("*.md")) for t in re.findall(r"^::: (\S+)", page.read_text(), re.MULTILINE)]


def _resolve(dotted: str):
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def test_api_reference_covers_exactly_the_public_names():
    """Every name of ``sharpscope.__all__`` once, and nothing else: the reference reads only the top-level
    package (``sharpscope.lanczos.lanczos`` is the one exception, since the subpackage ``sharpscope.lanczos``
    shadows the function for griffe; it is the same object as ``ss.lanczos``)."""
    public = {name: getattr(ss, name) for name in ss.__all__ if name != "__version__"}
    documented = []
    for target in _targets():
        obj = _resolve(target)
        names = [n for n, o in public.items() if o is obj and (target == f"sharpscope.{n}" or
                                                                target == "sharpscope.lanczos.lanczos")]
        assert names, f"docs/api: {target} is not a public sharpscope.* name"
        documented.append(names[0])
    missing = sorted(set(public) - set(documented))
    assert not missing, f"public names without an API reference entry (add them to docs/api/*.md): {missing}"
    twice = sorted({n for n in documented if documented.count(n) > 1})
    assert not twice, f"documented twice: {twice}"


def _docstrings_extension():
    path = ROOT / "docs" / "_griffe" / "sharpscope_docstrings.py"
    spec = importlib.util.spec_from_file_location("_docs_sharpscope_docstrings", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_docstring_extension_reads_examples_several_arguments_and_roles():
    pytest.importorskip("griffe", reason="griffe comes with the [docs] extra (mkdocstrings-python)")
    normalize = _docstrings_extension().normalize
    text = '''Top eigenvalues (:func:`~sharpscope.lanczos`, :math:`2/\\eta`, :class:`torch.nn.Module`).

    Args:
        model: the model.
        dtype, device: of the vectors
            (default: the matrix's).
        k: how many.

    Example:
        >>> [x for x in (1, 2)]
        [1, 2]
    '''
    out = normalize(text)
    assert "(`lanczos`, `2/\\eta`, `torch.nn.Module`)" in out
    assert "        dtype: of the vectors\n            (default: the matrix's).\n" in out
    assert "        device: of the vectors\n            (default: the matrix's).\n        k: how many." in out
    assert "    Examples:\n        >>>" in out and "Example:\n" not in out
    assert normalize(out) == out  # idempotent: applying it to clean text changes nothing


def test_measure_demo_refuses_a_bad_argument_in_one_line():
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "measure_demo.sh"), "--bogus"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "measure_demo.sh: unknown argument --bogus (use --python PY, --out DIR, --max-cpu S)"]


def _offline() -> list[str]:
    """A prefix that runs a command with no network (a new, empty network namespace: root only), or []."""
    unshare = shutil.which("unshare")
    if unshare and subprocess.run([unshare, "-n", "true"], capture_output=True).returncode == 0:
        return [unshare, "-n"]
    return []


def test_site_builds_strict_and_offline(tmp_path):
    """What .ci/run runs: a broken link, anchor, page outside the navigation or API reference fails."""
    pytest.importorskip("mkdocs", reason="mkdocs comes with the [docs] and [test] extras")
    pytest.importorskip("mkdocstrings_handlers.python", reason="mkdocstrings-python comes with the [docs] extra")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    build = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")]
    proc = subprocess.run(_offline() + build, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    problems = [line for line in proc.stderr.splitlines() if line.startswith(("WARNING", "ERROR"))]
    assert proc.returncode == 0 and not problems, "\n".join(problems) or proc.stderr[-3000:]
    site = tmp_path / "site"
    assert (site / "api" / "solvers.html").is_file()
    page = (site / "api" / "solvers.html").read_text()
    assert "Top-<code>k</code> eigenpairs" in page or "Top-k eigenpairs" in page  # the docstring rendered
    shutil.rmtree(site)
