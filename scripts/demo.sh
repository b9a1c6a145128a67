#!/usr/bin/env bash
# The main job on the embedded default: train a small MLP on scikit-learn's digits for 100 steps,
# print its top Hessian eigenvalues, trace and spectral density and save a plot; then run the
# quickstart probe (muP vs SP across widths) and write its report. What it costs on this repository's
# 2-core machine is measured by scripts/measure_demo.sh (docs/bench-notes.md has the dated figures).
set -euo pipefail
source "$(dirname "$0")/_env.sh" ""  # no extras (an explicit argument: the script's own arguments are not _env.sh's)
cd "$ROOT"
# OpenMP threads that wait for work sleep instead of spinning: on a busy machine a spinning thread
# burns CPU while its partner waits for a core (2026-12-07: 308 CPU s against 72 s for this demo under
# load, the same work; docs/bench-notes.md). scripts/measure_demo.sh --python sets the same.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
exec python -m sharpscope demo --probe probes/quickstart.toml "$@"
