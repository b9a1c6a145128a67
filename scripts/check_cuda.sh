#!/usr/bin/env bash
# Compile every CUDA kernel (cuda/*.cu, or DIR/*.cu) with nvcc for sm_80 and sm_90, warnings as errors,
# into a temporary directory, so a kernel that does not build fails CI. No GPU is needed.
# Exits 0 with a skip message only when nvcc is absent. Usage: scripts/check_cuda.sh [DIR]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SRC="${1:-$ROOT/cuda}"
NVCC="${NVCC:-$(command -v nvcc || true)}"
if [ -z "$NVCC" ] && [ -x /usr/local/cuda/bin/nvcc ]; then NVCC=/usr/local/cuda/bin/nvcc; fi
if [ -z "$NVCC" ]; then
  echo "[check_cuda] SKIP: nvcc not found on PATH; CUDA kernels were not compiled"
  exit 0
fi
shopt -s nullglob
files=("$SRC"/*.cu)
if [ ${#files[@]} -eq 0 ]; then
  echo "[check_cuda] ERROR: no .cu files in $SRC" >&2
  exit 1
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
status=0
for f in "${files[@]}"; do
  if "$NVCC" -std=c++17 -c --Werror all-warnings -I "$SRC" \
      -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
      -o "$tmp/$(basename "$f").o" "$f"; then
    echo "[check_cuda] ok: $(basename "$f")"
  else
    echo "[check_cuda] FAILED: $f" >&2
    status=1
  fi
done
exit $status
