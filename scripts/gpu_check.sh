#!/usr/bin/env bash
# One command that checks and measures sharpscope's GPU engine on one GPU, in at most 9 minutes:
#
#   ./scripts/gpu_check.sh [--cpu] [OUTDIR]        (OUTDIR: $OUT if set, else ./gpu-check-output)
#
# 1. prints the device, the date and the versions;
# 2. runs the gpu-marked tests (every backend x basis x operator x estimator on CUDA against float64
#    CPU references) with SHARPSCOPE_GPU_REQUIRED=1, so that a missing GPU or CuPy fails them
#    instead of skipping them;
# 3. runs scripts/bench_gpu.py (kernel checks and timings, end to end on the 14.7M MLP and the
#    ResNet-18-like CNN, the verdict on backend="auto");
# 4. runs scripts/bench_engine.py --device cuda if that script exists (the GPU targets of the
#    GPU-ready engine issue on its three models), else notes its absence;
# 5. runs scripts/bench_basis_default.py --device cuda (products and basis vectors of the default Krylov basis
#    against the old one, per problem and k) and scripts/bench_scale.py --device cuda (GPT-2 configs of 26M and
#    124M parameters: products, basis bytes and peak GPU memory for the old and new default basis, "host" and
#    "device-bf16");
# 6. writes OUTDIR/perf-gpu-tables.md (device, date, every table of docs/perf-gpu.md), which
#    `python3 scripts/update_perf_gpu.py OUTDIR/perf-gpu-tables.md` folds into docs/perf-gpu.md.
#
# Everything goes to OUTDIR/gpu_check.log too. Each step has its own timeout inside a total budget
# (SHARPSCOPE_GPU_CHECK_BUDGET seconds, default 520); a failing step does not stop the later ones;
# the exit status is 0 only when every step passed. It uses the machine's own python
# ($PYTHON, default python3) with PYTHONPATH set to the checkout: no install, no package registry.
#
# --cpu (or SHARPSCOPE_GPU_CHECK_DRY=1): the dry run the CPU tests use: no GPU is touched, the
# gpu-marked tests are only collected, bench_gpu.py runs with --dry-run, bench_basis_default.py and
# bench_scale.py run a small CPU smoke case each (their tables stay in the log), and every GPU figure in the
# tables reads "not measured".
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY="${SHARPSCOPE_GPU_CHECK_DRY:-0}"
OUTDIR=""
for arg in "$@"; do
  case "$arg" in
    --cpu) DRY=1 ;;
    -h|--help) sed -n '2,29p' "${BASH_SOURCE[0]}"; exit 0 ;;
    -*) echo "gpu_check.sh: unknown option $arg (usage: gpu_check.sh [--cpu] [OUTDIR])" >&2; exit 2 ;;
    *) OUTDIR="$arg" ;;
  esac
done
OUTDIR="${OUTDIR:-${OUT:-./gpu-check-output}}"
mkdir -p "$OUTDIR" || { echo "gpu_check.sh: cannot create $OUTDIR" >&2; exit 2; }
OUTDIR="$(cd "$OUTDIR" && pwd)"
PY="${PYTHON:-python3}"
BUDGET="${SHARPSCOPE_GPU_CHECK_BUDGET:-520}"
LOG="$OUTDIR/gpu_check.log"
GPU_TESTS=(tests/test_backends.py)  # the files holding the gpu-marked tests
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1
: >"$LOG"
START=$SECONDS
STATUS=()
FAILED=0

log() { echo "$*" | tee -a "$LOG"; }

# step NAME LIMIT_S COMMAND...: run with a timeout (capped by what is left of the budget), log it
step() {
  local name="$1" limit="$2" rc t0 left
  shift 2
  left=$((BUDGET - (SECONDS - START)))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt 5 ]; then
    log "== $name: SKIPPED (the ${BUDGET}s budget is spent)"
    STATUS+=("| $name | skipped: budget spent | 0 s |"); FAILED=1; return 1
  fi
  log "== $name (timeout ${limit}s): $*"
  t0=$SECONDS
  timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  local took=$((SECONDS - t0)) verdict="passed"
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then verdict="FAILED: timed out after ${limit}s"
  elif [ "$rc" -ne 0 ]; then verdict="FAILED: exit status $rc"; fi
  [ "$rc" -ne 0 ] && FAILED=1
  log "== $name: $verdict (${took}s)"
  STATUS+=("| $name | $verdict | ${took} s |")
  return "$rc"
}

if [ "$DRY" = "1" ]; then MODE="dry run on the CPU (--cpu): no GPU used, every GPU figure not measured"
else MODE="GPU run"; fi
log "gpu_check.sh: $MODE; output in $OUTDIR; python: $PY; budget ${BUDGET}s"

# 1. device and date (also written to OUTDIR/device.txt, whose first line heads the tables)
if [ "$DRY" = "1" ]; then
  step "device" 60 "$PY" -c 'import sys, time, torch, numpy
lines = ["device: none (dry run on the CPU), date: " + time.strftime("%Y-%m-%d"),
         f"python {sys.version.split()[0]}, torch {torch.__version__}, numpy {numpy.__version__}"]
open(sys.argv[1], "w").write("\n".join(lines) + "\n")
print("\n".join(lines))' "$OUTDIR/device.txt"
else
  step "device" 60 "$PY" -c 'import sys, time, torch
assert torch.cuda.is_available(), "torch sees no CUDA device"
lines = ["device: " + torch.cuda.get_device_name() + ", date: " + time.strftime("%Y-%m-%d"),
         f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda})"]
try:
    import cupy
    rt = cupy.cuda.runtime.runtimeGetVersion()
    lines[1] += f", CuPy {cupy.__version__} (CUDA {rt // 1000}.{rt % 1000 // 10})"
except Exception as exc:
    lines[1] += f", CuPy not importable ({type(exc).__name__}: {exc})"
open(sys.argv[1], "w").write("\n".join(lines) + "\n")
print("\n".join(lines))' "$OUTDIR/device.txt"
fi

# 2. the gpu-marked tests
if [ "$DRY" = "1" ]; then
  step "gpu-marked tests (collected only)" 120 "$PY" -m pytest -m gpu -q -p no:cacheprovider --collect-only \
    "${GPU_TESTS[@]}"
else
  export SHARPSCOPE_GPU_REQUIRED=1  # on a GPU machine a skipped gpu test is a failure
  step "gpu-marked tests" 150 "$PY" -m pytest -m gpu -q -p no:cacheprovider -rfEs "${GPU_TESTS[@]}"
fi
TESTS_RC=$?
unset SHARPSCOPE_GPU_REQUIRED
TESTS_LINE="$(grep -E '([0-9]+ (passed|failed|error|errors|skipped|deselected|tests? collected))|no tests ran' "$LOG" \
  | tail -n 1 | sed 's/=//g; s/^ *//; s/ *$//')"

# 3. bench_gpu.py
if [ "$DRY" = "1" ]; then
  step "scripts/bench_gpu.py --dry-run" 60 "$PY" scripts/bench_gpu.py --dry-run --markdown "$OUTDIR/bench_gpu.md"
else
  step "scripts/bench_gpu.py" 120 "$PY" scripts/bench_gpu.py --markdown "$OUTDIR/bench_gpu.md"
fi

# 4. the engine benchmark, when the GPU-ready engine issue's script is there
ENGINE_NOTE=""
if [ ! -f scripts/bench_engine.py ]; then
  ENGINE_NOTE="scripts/bench_engine.py is absent in this checkout: the engine's GPU targets were not measured."
  log "== scripts/bench_engine.py: SKIPPED ($ENGINE_NOTE)"
  STATUS+=("| scripts/bench_engine.py | skipped: the script is absent | 0 s |")
elif [ "$DRY" = "1" ]; then
  ENGINE_NOTE="dry run: scripts/bench_engine.py --device cuda was not run."
  log "== scripts/bench_engine.py: SKIPPED ($ENGINE_NOTE)"
  STATUS+=("| scripts/bench_engine.py | skipped: dry run | 0 s |")
else
  step "scripts/bench_engine.py --device cuda" 100 "$PY" scripts/bench_engine.py --device cuda \
    --markdown "$OUTDIR/engine.md"
fi

# 5. the default Krylov basis and the GPT-2 scale bench (on the CPU in a dry run: small smoke cases, no GPU figure)
if [ "$DRY" = "1" ]; then
  step "scripts/bench_basis_default.py (CPU smoke)" 60 "$PY" scripts/bench_basis_default.py --problems t-mlp \
    --k 1 --tol 1e-3
  step "scripts/bench_scale.py (CPU smoke)" 120 "$PY" scripts/bench_scale.py --configs tiny --vocab 64 --k 1 \
    --bases old,default --tol 0.1 --product-samples 1 --json "$OUTDIR/bench_scale_smoke.json"
else
  step "scripts/bench_basis_default.py --device cuda" 60 "$PY" scripts/bench_basis_default.py --device cuda \
    --markdown "$OUTDIR/basis_default.md"
  step "scripts/bench_scale.py --device cuda" 120 "$PY" scripts/bench_scale.py --device cuda --configs 26M,124M \
    --k 1,5 --product-samples 3 --json "$OUTDIR/bench_scale.json" --markdown "$OUTDIR/bench_scale.md"
fi

# 6. the tables for docs/perf-gpu.md
DEVICE_LINE="$(head -n 1 "$OUTDIR/device.txt" 2>/dev/null)"
DEVICE_LINE="${DEVICE_LINE:-device: not measured}"
VERSIONS_LINE="$(sed -n 2p "$OUTDIR/device.txt" 2>/dev/null)"
if [ "$DRY" = "1" ]; then
  TESTS_RESULT="not measured (dry run: ${TESTS_LINE:-the tests did not collect})"
elif [ "$TESTS_RC" -eq 0 ]; then
  TESTS_RESULT="${TESTS_LINE:-passed}"
else
  TESTS_RESULT="FAILED: ${TESTS_LINE:-exit status $TESTS_RC}"
fi
TABLES="$OUTDIR/perf-gpu-tables.md"
{
  echo "Run of \`scripts/gpu_check.sh\` ($MODE). ${DEVICE_LINE}; ${VERSIONS_LINE:-versions not measured}."
  echo
  echo "### Steps"
  echo
  echo "| step | result | time |"
  echo "|---|---|---|"
  printf '%s\n' "${STATUS[@]}"
  echo
  echo "### gpu-marked tests (every backend x basis x operator x estimator on CUDA against float64 CPU references)"
  echo
  echo "| tests | result |"
  echo "|---|---|"
  echo "| \`pytest -m gpu ${GPU_TESTS[*]}\` | $TESTS_RESULT |"
  echo
  echo "### Kernels and end to end (\`scripts/bench_gpu.py\`)"
  echo
  if [ -s "$OUTDIR/bench_gpu.md" ]; then cat "$OUTDIR/bench_gpu.md"
  else echo "not measured: scripts/bench_gpu.py wrote no tables (see gpu_check.log)."; fi
  echo
  echo "### Engine targets (\`scripts/bench_engine.py --device cuda\`)"
  echo
  if [ -n "$ENGINE_NOTE" ]; then echo "not measured: $ENGINE_NOTE"
  elif [ -s "$OUTDIR/engine.md" ]; then cat "$OUTDIR/engine.md"
  else echo "not measured: scripts/bench_engine.py wrote no tables (see gpu_check.log)."; fi
  echo
  echo "### The default Krylov basis against the old one (\`scripts/bench_basis_default.py --device cuda\`)"
  echo
  if [ "$DRY" = "1" ]; then echo "not measured: dry run (the CPU smoke case is in gpu_check.log)."
  elif [ -s "$OUTDIR/basis_default.md" ]; then cat "$OUTDIR/basis_default.md"
  else echo "not measured: scripts/bench_basis_default.py wrote no table (see gpu_check.log)."; fi
  echo
  echo "### GPT-2 configs: basis memory, products, peak GPU memory (\`scripts/bench_scale.py --device cuda\`)"
  echo
  if [ "$DRY" = "1" ]; then echo "not measured: dry run (the CPU smoke case is in gpu_check.log)."
  elif [ -s "$OUTDIR/bench_scale.md" ]; then cat "$OUTDIR/bench_scale.md"
  else echo "not measured: scripts/bench_scale.py wrote no table (see gpu_check.log)."; fi
} >"$TABLES"
log "== wrote $TABLES"
ELAPSED=$((SECONDS - START))
if [ "$FAILED" -eq 0 ]; then
  log "gpu_check.sh: every step passed in ${ELAPSED}s; record the results with: $PY scripts/update_perf_gpu.py $TABLES"
else
  log "gpu_check.sh: some steps FAILED (${ELAPSED}s); see $LOG"
fi
exit "$FAILED"
