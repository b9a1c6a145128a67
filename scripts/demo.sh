#!/usr/bin/env bash
# The main job on the embedded default: train a small MLP on scikit-learn's digits for a few steps,
# print its top Hessian eigenvalues, trace and spectral density and save a plot; then run the
# quickstart probe (muP vs SP across widths) and write its report (CPU, about 1 minute).
set -euo pipefail
source "$(dirname "$0")/_env.sh" ""  # no extras (an explicit argument: the script's own arguments are not _env.sh's)
cd "$ROOT"
exec python -m sharpscope.demo --probe probes/quickstart.toml "$@"
