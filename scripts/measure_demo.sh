#!/usr/bin/env bash
# Measure what ./scripts/demo.sh costs: CPU seconds (user + sys, the demo and every process it waits
# for) and wall time, then check the quickstart's verdicts (muP consistent, SP not). CPU seconds are
# the figure to quote: on a machine shared with other jobs the wall time mostly measures the load.
#
# Usage: ./scripts/measure_demo.sh [--python PY] [--out DIR] [--max-cpu SECONDS]
#   --python PY   run the demo's program (python -m sharpscope demo, as demo.sh does, with demo.sh's
#                 OMP_WAIT_POLICY) with this interpreter, the repository first on PYTHONPATH, instead
#                 of running scripts/demo.sh itself; the .venv set-up is never counted
#   --out DIR     the demo's output folder (default: a fresh temporary folder, removed afterwards)
#   --max-cpu S   exit 1 when the demo needed more than S CPU seconds (default 180: the README's budget)
# Prints one line per figure and a closing Markdown row for docs/bench-notes.md.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
py=""; out=""; max_cpu=180
while [ $# -gt 0 ]; do
  case "$1" in
    --python) py="${2:?measure_demo.sh: --python needs a value}"; shift 2 ;;
    --out) out="${2:?measure_demo.sh: --out needs a value}"; shift 2 ;;
    --max-cpu) max_cpu="${2:?measure_demo.sh: --max-cpu needs a value}"; shift 2 ;;
    *) echo "measure_demo.sh: unknown argument $1 (use --python PY, --out DIR, --max-cpu S)" >&2; exit 2 ;;
  esac
done
if [ -z "$py" ]; then
  source "$ROOT/scripts/_env.sh" ""   # the demo's environment, made (or found) before the clock starts
  py="$(command -v python)"
  demo=(bash "$ROOT/scripts/demo.sh")
else
  demo=(env "OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}" "$py" -m sharpscope demo --probe probes/quickstart.toml)
fi
cd "$ROOT"
keep=1
if [ -z "$out" ]; then out="$(mktemp -d)"; keep=0; fi
[ "$keep" = 1 ] || trap 'rm -rf "$out"' EXIT
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$py" - "$out" "$max_cpu" "${demo[@]}" <<'PY'
import datetime, json, os, platform, resource, subprocess, sys, time
from pathlib import Path

out, max_cpu, demo = Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3:]
load_before = os.getloadavg()
t0 = time.perf_counter()
proc = subprocess.run([*demo, "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
wall = time.perf_counter() - t0
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
load_after = os.getloadavg()
if proc.returncode != 0:
    print(proc.stdout[-4000:])
    sys.exit(f"measure_demo: the demo failed (exit {proc.returncode})")
metrics = json.loads((out / "quickstart" / "metrics.json").read_text())
verdicts = {}  # "mup precond" -> (verdict, spread)
for group in metrics["groups"]:
    for quantity, result in group["quantities"].items():
        verdicts[f"{group['parameterization']} {quantity}"] = (result["verdict"], result.get("spread_summary"))
cpu = ru.ru_utime + ru.ru_stime
date = datetime.date.today().isoformat()
print(f"date            {date}")
print(f"machine         {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
      f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after")
print(f"cpu seconds     {cpu:.1f} (user {ru.ru_utime:.1f} + sys {ru.ru_stime:.1f})")
print(f"wall seconds    {wall:.1f}")
for name, (verdict, spread) in verdicts.items():
    print(f"verdict         {name}: {verdict}" + ("" if spread is None else f" (spread {spread:.3g})"))
mup = [v for k, (v, _) in verdicts.items() if k.lower().startswith("mup")]
sp = [v for k, (v, _) in verdicts.items() if k.lower().startswith("sp")]
ok_verdicts = bool(mup) and bool(sp) and all(v == "consistent" for v in mup) and all(v != "consistent" for v in sp)
print(f"| {date} | {os.cpu_count()} cores, load {load_before[0]:.1f} | {cpu:.0f} s (user {ru.ru_utime:.0f}, sys "
      f"{ru.ru_stime:.0f}) | {wall:.0f} s | muP {', '.join(mup)}; SP {', '.join(sp)} |")
if not ok_verdicts:
    sys.exit("measure_demo: the quickstart's verdicts changed: muP must be consistent and SP not")
if cpu > max_cpu:
    sys.exit(f"measure_demo: the demo needed {cpu:.0f} CPU seconds, more than the budget of {max_cpu:.0f}")
PY
