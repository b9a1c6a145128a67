#!/usr/bin/env bash
# Set up the benchmark environment for scripts/bench_eigs.py: the usual .venv with sharpscope (via
# _env.sh, torch pinned to the CPU wheel) plus the peer tools, installed with --no-deps so that
# pip never replaces torch with a CUDA build. At import time the peers need only torch and numpy
# (PyHessian 0.1: torch, numpy; hessian-eigenthings 1.0.0a5: torch -- its declared scipy/tqdm are
# not imported), all already there; curvlinops 3.0.1 imports einops, einconv and linear_operator
# (pinned here, also --no-deps), not its declared backpack-for-pytorch, whose torchvision would
# replace torch. Idempotent: a second run installs nothing.
# Then:  .venv/bin/python scripts/bench_eigs.py [--problem mlp|cnn|all] [--quick] [--repeats N]
set -euo pipefail
source "$(dirname "$0")/_env.sh"
cd "$ROOT"
peers=("pyhessian==0.1" "hessian-eigenthings==1.0.0a5" "curvlinops-for-pytorch==3.0.1" "einops==0.8.2" "einconv==0.1.0"
       "linear_operator==0.6.1")
if ! "$VENV/bin/python" - "${peers[@]}" <<'PY' 2>/dev/null
import sys
from importlib import metadata
sys.exit(0 if all(metadata.version(n) == v for n, v in (p.split("==") for p in sys.argv[1:])) else 1)
PY
then
  echo "[sharpscope] installing the benchmark peers: ${peers[*]} (--no-deps)"
  "$VENV/bin/pip" install -q --no-deps "${peers[@]}"
fi
"$VENV/bin/python" -c "import pyhessian, hessian_eigenthings, curvlinops, torch; print(f'[sharpscope] bench peers ready (torch {torch.__version__})')"
