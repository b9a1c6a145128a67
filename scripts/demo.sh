#!/usr/bin/env bash
# The main job on the embedded default: train a small MLP on scikit-learn's digits for a few steps,
# then print its top Hessian eigenvalues, trace and spectral density and save a plot (CPU, < 1 minute).
set -euo pipefail
source "$(dirname "$0")/_env.sh"
cd "$ROOT"
exec python -m sharpscope.demo "$@"
