#!/usr/bin/env bash
# GPU check: on a machine with a CUDA GPU and torch preinstalled (no network), rebuild lasnn in
# place, run the whole test suite (CUDA and Triton tests run for real), then the benchmarks.
#
#   scripts/gpu_check.sh OUTDIR
#
# Writes to OUTDIR: env.txt, build.log, info.txt, tests.log, tests_triton.log, bench.log,
# bench.json, bench_sj_triton.log/.json (SpikingJelly forced onto its Triton backend), summary.txt.
# Every step has its own timeout (the whole script stays under 8 minutes) and a failing step does
# not stop the next one; the exit status is non-zero if any step failed, and summary.txt lists all.
set -uo pipefail

OUT="${1:?usage: scripts/gpu_check.sh OUTDIR}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$(dirname "$0")/.."
START=$(date +%s)
PY="${PYTHON:-python}"
declare -a RESULTS=()
FAILED=0

step() {  # step NAME TIMEOUT_S LOGFILE CMD...
  local name=$1 limit=$2 log=$3
  shift 3
  local t0 rc
  t0=$(date +%s)
  echo "== $name (timeout ${limit}s): $*" | tee -a "$OUT/summary.txt"
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$log" 2>&1
  rc=$?
  local msg="$name: rc=$rc in $(( $(date +%s) - t0 ))s (log: $log)"
  [ "$rc" -eq 124 ] && msg="$msg TIMED OUT"
  [ "$rc" -ne 0 ] && FAILED=1
  RESULTS+=("$msg")
  echo "   $msg" | tee -a "$OUT/summary.txt"
  tail -n 3 "$OUT/$log" | sed 's/^/   | /' | tee -a "$OUT/summary.txt"
}

: >"$OUT/summary.txt"
{
  echo "date: $(date -u)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv 2>&1 || true
  "$PY" - <<'PY' 2>&1
import importlib, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
for m in ("triton", "spikingjelly", "snntorch", "pytest", "pytest_benchmark", "ninja"):
    try:
        mod = importlib.import_module(m)
        print(m, getattr(mod, "__version__", "installed"))
    except Exception as e:
        print(m, "ABSENT", type(e).__name__)
PY
  nproc
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# CUDA_HOME: an explicit one, else the usual places, else nvcc on PATH (setup.py does the same).
if [ -z "${CUDA_HOME:-}" ]; then
  for d in /usr/local/cuda /usr/local/cuda-*; do
    if [ -x "$d/bin/nvcc" ]; then export CUDA_HOME="$d"; break; fi
  done
  if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null; then
    CUDA_HOME="$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"
    export CUDA_HOME
  fi
fi
echo "CUDA_HOME=${CUDA_HOME:-<none>}" | tee -a "$OUT/summary.txt"
[ -n "${CUDA_HOME:-}" ] && export PATH="$CUDA_HOME/bin:$PATH"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
# Build for the GPU that is here only (setup.py defaults to 9.0+PTX when it cannot see one).
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  cc=$("$PY" -c "import torch; c=torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}')" 2>/dev/null)
  [ -n "$cc" ] && export TORCH_CUDA_ARCH_LIST="$cc"
fi

# 1. Rebuild in place (no network: no build isolation, no dependency resolution).
step build 240 build.log "$PY" -m pip install --no-build-isolation --no-deps -e .
step info 60 info.txt "$PY" -m lasnn info
cat "$OUT/info.txt"

# Plugins of unrelated packages can break collection on a foreign machine; -p no:cacheprovider keeps
# the read-only checkout clean. TRITON_INTERPRET unset: Triton runs on the GPU.
unset TRITON_INTERPRET
PYTEST=("$PY" -m pytest -p no:cacheprovider)

# 2. The whole suite (CUDA and Triton tests included), then the Triton-marked ones again, as CI does.
remaining() { echo $(( 450 - ($(date +%s) - START) )); }
t=$(remaining); [ "$t" -gt 200 ] && t=200
step tests "$t" tests.log "${PYTEST[@]}" -q --maxfail=50 -rs --junitxml="$OUT/tests.xml"
t=$(remaining); [ "$t" -gt 60 ] && t=60
[ "$t" -gt 10 ] && step tests_triton "$t" tests_triton.log "${PYTEST[@]}" -q -m triton -rs

# 3. Benchmarks: short rounds, JSON for the note.
BENCH_OPTS=(--benchmark-json="$OUT/bench.json" --benchmark-max-time=0.2 --benchmark-columns=median,ops
            --benchmark-sort=name -q)
t=$(remaining); [ "$t" -gt 150 ] && t=150
# The compiled reference loop is the CPU comparison row; on the GPU its ~16 compiles would eat the budget.
[ "$t" -gt 20 ] && step bench "$t" bench.log "${PYTEST[@]}" benches/ -k "not reference-compiled" "${BENCH_OPTS[@]}"
t=$(remaining); [ "$t" -gt 45 ] && t=45
[ "$t" -gt 15 ] && SJ_LIF_CUDA_IMPLEMENTATION=triton step bench_sj_triton "$t" bench_sj_triton.log \
  "${PYTEST[@]}" benches/bench_lif.py -k "spikingjelly and fwdbwd" -q \
  --benchmark-json="$OUT/bench_sj_triton.json" --benchmark-max-time=0.2 --benchmark-columns=median,ops

# 4. A readable table of the benchmark JSON (GB/s and fraction of copy bandwidth).
if [ -f "$OUT/bench.json" ]; then
  "$PY" - "$OUT/bench.json" "$OUT/bench_sj_triton.json" >"$OUT/bench_table.txt" 2>&1 <<'PY'
import json, os, sys
rows = []
for path in sys.argv[1:]:
    if not os.path.exists(path):
        continue
    tag = " (SJ triton)" if "sj_triton" in path else ""
    for b in json.load(open(path))["benchmarks"]:
        e = b.get("extra_info", {})
        rows.append((b["group"] or "", e.get("impl", b["name"]) + tag, b["stats"]["median"] * 1e3,
                     e.get("gbps"), e.get("fraction_of_copy_bw")))
for g, impl, ms, gbps, frac in sorted(rows):
    print(f"{g:<34} {impl:<34} {ms:9.4f} ms  {gbps!s:>8} GB/s  {frac!s:>6} of copy")
PY
  cat "$OUT/bench_table.txt"
fi

echo "== total $(( $(date +%s) - START ))s" | tee -a "$OUT/summary.txt"
printf '%s\n' "${RESULTS[@]}" | tee -a "$OUT/summary.txt"
exit "$FAILED"
