#!/usr/bin/env bash
# The GPU variants of probes (a), (b), (e) and (g) (probes/gpu/*.toml: bundled digits data, nothing is
# downloaded) in one command, sized to finish within about 10 minutes on one H100/H200:
#
#   ./scripts/gpu_probes.sh [--cpu] [OUTDIR]       (OUTDIR: $OUT if set, else ./gpu-probes-output)
#
# Each probe runs as `python3 -m sharpscope sweep probes/gpu/<probe>.toml --out OUTDIR/<probe>` with its
# own timeout inside a total budget (SHARPSCOPE_GPU_PROBES_BUDGET seconds, default 570). The probe
# files say device = "auto": training and spectra run on the GPU when torch sees one; without one the
# runs go to the CPU cores (--executor process:N, N = half the cores) and only what fits the budget
# completes (a probe that times out keeps its finished runs: re-running the script resumes it). Every
# probe writes OUTDIR/<probe>/report.html, report.md and metrics.json; OUTDIR/gpu_probes.md lists each
# probe's status, time and verdict lines; everything goes to OUTDIR/gpu_probes.log too. It uses the
# machine's own python ($PYTHON, default python3) with PYTHONPATH set to the checkout: no install.
# The exit status is 0 only when every probe finished.
#
# --cpu (or SHARPSCOPE_GPU_PROBES_DRY=1): a dry run for CPU machines: each probe file is only loaded
# and its run grid listed (nothing trains).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY="${SHARPSCOPE_GPU_PROBES_DRY:-0}"
OUTDIR=""
for arg in "$@"; do
  case "$arg" in
    --cpu) DRY=1 ;;
    -h|--help) sed -n '2,20p' "${BASH_SOURCE[0]}"; exit 0 ;;
    -*) echo "gpu_probes.sh: unknown option $arg (usage: gpu_probes.sh [--cpu] [OUTDIR])" >&2; exit 2 ;;
    *) OUTDIR="$arg" ;;
  esac
done
OUTDIR="${OUTDIR:-${OUT:-./gpu-probes-output}}"
mkdir -p "$OUTDIR" || { echo "gpu_probes.sh: cannot create $OUTDIR" >&2; exit 2; }
OUTDIR="$(cd "$OUTDIR" && pwd)"
PY="${PYTHON:-python3}"
BUDGET="${SHARPSCOPE_GPU_PROBES_BUDGET:-570}"
LOG="$OUTDIR/gpu_probes.log"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1
: >"$LOG"
START=$SECONDS
FAILED=0
SUMMARY=("| probe | status | time |" "|---|---|---|")
log() { echo "$*" | tee -a "$LOG"; }

# probe name, its share of the budget (s): (a) quickstart, (g) NTK vs Hessian, (e) MoE, (b) parameterizations
PROBES=("quickstart_gpu 120" "ntk_vs_hessian_gpu 150" "moe_mup_gpu 120" "mlp_sgd_parameterizations_gpu 180")

EXTRA=()   # the probe files train and measure on device = "auto": CUDA when torch sees a GPU
if [ "$DRY" != "1" ]; then
  "$PY" -c 'import sys, time, torch
print("device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device: runs on the CPU",
      "| date:", time.strftime("%Y-%m-%d %H:%M"), "| torch", torch.__version__)' 2>&1 | tee -a "$LOG"
  "$PY" -c 'import torch; raise SystemExit(0 if torch.cuda.is_available() else 1)' || {
    CORES="$(nproc 2>/dev/null || echo 2)"; EXTRA=(--executor "process:$(( CORES > 3 ? CORES / 2 : 1 ))"); }
fi
log "gpu_probes.sh: output in $OUTDIR; python: $PY; budget ${BUDGET}s; sweep options: ${EXTRA[*]:-(dry run)}"

for entry in "${PROBES[@]}"; do
  read -r name share <<<"$entry"
  file="probes/gpu/$name.toml"
  left=$((BUDGET - (SECONDS - START)))
  limit=$(( share < left ? share : left ))
  if [ "$limit" -lt 10 ]; then
    log "== $name: SKIPPED (budget spent)"; SUMMARY+=("| $name | skipped: budget spent | 0 s |"); FAILED=1; continue
  fi
  t0=$SECONDS
  if [ "$DRY" = "1" ]; then
    log "== $name (dry run): load $file"
    "$PY" -c 'import sys; from sharpscope.sweep import load_probe, plan
p = load_probe(sys.argv[1]); runs = plan(p)
print(f"{p.name}: {len(runs)} runs, widths {list(p.widths)}, lrs {list(p.lrs)}, steps {p.steps}")' "$file" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
  else
    log "== $name (timeout ${limit}s)"
    timeout -k 10 "$limit" "$PY" -m sharpscope sweep "$file" --out "$OUTDIR/$name" "${EXTRA[@]}" 2>&1 \
      | tr '\r' '\n' | grep -v '%|' | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
  fi
  took=$((SECONDS - t0))
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status="timed out after ${limit}s (finished runs kept)"; FAILED=1
  elif [ "$rc" -ne 0 ]; then status="failed: exit status $rc"; FAILED=1
  else status="done"; fi
  log "== $name: $status (${took}s)"
  SUMMARY+=("| $name | $status | ${took} s |")
done

{
  echo "# GPU probes ($(date +%Y-%m-%d))"
  echo
  printf '%s\n' "${SUMMARY[@]}"
  for entry in "${PROBES[@]}"; do
    read -r name _ <<<"$entry"
    if [ -f "$OUTDIR/$name/report.md" ]; then
      echo; echo "## $name"; echo
      grep -E "consistent|converging|diverging|inconsistent|transfers|shifts|undetermined" "$OUTDIR/$name/report.md" | head -n 40
    fi
  done
} >"$OUTDIR/gpu_probes.md"
log "summary: $OUTDIR/gpu_probes.md (total $((SECONDS - START))s)"
exit "$FAILED"
