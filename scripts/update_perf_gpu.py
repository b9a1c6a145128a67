"""Fold the tables of one scripts/gpu_check.sh run into docs/perf-gpu.md.

    python3 scripts/update_perf_gpu.py OUTDIR/perf-gpu-tables.md [docs/perf-gpu.md]

Replaces everything between the marker lines ``<!-- gpu-check:begin -->`` and
``<!-- gpu-check:end -->`` of the document with the tables file (which names the device and the
date); the rest of the document is kept as it is. Exits 1 with a one-line reason when a file or a
marker is missing.
"""
from __future__ import annotations

import sys
from pathlib import Path

BEGIN = "<!-- gpu-check:begin -->"
END = "<!-- gpu-check:end -->"
DEFAULT_DOC = Path(__file__).resolve().parents[1] / "docs" / "perf-gpu.md"


def fold(doc: str, tables: str) -> str:
    """``doc`` with the text between its markers replaced by ``tables``; ValueError (one line) when the
    markers are missing, repeated or out of order."""
    if doc.count(BEGIN) != 1 or doc.count(END) != 1:
        raise ValueError(f"the document needs exactly one {BEGIN} and one {END} line")
    head, rest = doc.split(BEGIN)
    if END not in rest:
        raise ValueError(f"{END} comes before {BEGIN}")
    _, tail = rest.split(END)
    if BEGIN in tables or END in tables:
        raise ValueError("the tables contain the markers themselves")
    return f"{head}{BEGIN}\n{tables.strip()}\n{END}{tail}"


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or len(args) > 2 or args[0] in ("-h", "--help"):
        print(__doc__.strip().splitlines()[2].strip())
        return 0 if args and args[0] in ("-h", "--help") else 2
    tables_path = Path(args[0])
    doc_path = Path(args[1]) if len(args) > 1 else DEFAULT_DOC
    try:
        tables = tables_path.read_text()
        doc = doc_path.read_text()
        new = fold(doc, tables)
    except (OSError, ValueError) as exc:
        print(f"update_perf_gpu.py: {exc}", file=sys.stderr)
        return 1
    doc_path.write_text(new)
    first = tables.strip().splitlines()[0] if tables.strip() else ""
    print(f"updated {doc_path} from {tables_path}: {first[:120]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
