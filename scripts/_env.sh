# Shared set-up for scripts/*.sh: create (or reuse) .venv and install sharpscope into it.
# Usage: source scripts/_env.sh [EXTRAS]   e.g. "test"
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SHARPSCOPE_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[sharpscope] creating virtual environment in $VENV"
  "$PY" -m venv "$VENV"
fi
# torch is pinned to the CPU wheel that lies on this machine's disk; an unpinned torch pulls a CUDA build
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then
  echo "[sharpscope] installing torch==2.13.0"
  "$VENV/bin/pip" install -q torch==2.13.0
fi
extras="${1:-}"
spec="$ROOT"
[ -n "$extras" ] && spec="$ROOT[$extras]"
stamp="$VENV/.sharpscope-installed-${extras:-base}"
if [ ! -f "$stamp" ] || [ "$ROOT/setup.py" -nt "$stamp" ]; then
  echo "[sharpscope] installing sharpscope${extras:+[$extras]} (editable)"
  "$VENV/bin/pip" install -q -e "$spec"
  case ",$extras," in
    *,test,*)
      # curvlinops for the cross-checks, without its dependencies: backpack-for-pytorch pulls torchvision,
      # which replaces the pinned torch with a CUDA build; what it imports (einops, einconv,
      # linear_operator, scipy) comes with the [test] extra
      echo "[sharpscope] installing curvlinops-for-pytorch==3.0.1 (--no-deps)"
      "$VENV/bin/pip" install -q --no-deps curvlinops-for-pytorch==3.0.1 ;;
  esac
  touch "$stamp"
fi
export PATH="$VENV/bin:$PATH"
