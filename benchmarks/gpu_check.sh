#!/usr/bin/env bash
# The first GPU minutes in one command: build pom_ext's CUDA kernels for this GPU, then check and measure everything
# CUDA, each stage under a time budget, into one folder. For a fresh machine with one NVIDIA GPU, a CUDA build of
# torch, nvcc, all its cores and no internet (the packages the tests use: pytest, hypothesis, numpy).
#
#   benchmarks/gpu_check.sh [OUT]          # default OUT: gpu-check/ (results, logs, summary.json, summary.txt)
#
# Stages (budget in seconds; 570 in all, for an H200 with 16 cores):
#   env        35   nvidia-smi, torch / CUDA / nvcc versions (a busy machine: seconds)         env.txt, nvidia-smi.txt
#   build      200  POM_EXT_CUDA=1, TORCH_CUDA_ARCH_LIST = this GPU, MAX_JOBS = cores     build.log
#   registers  10   registers, stack, 16-byte accesses of every kernel (.ci/sass_check.py) registers.json/.txt
#   tests      120  every CUDA test: test_cuda, test_gated, the CUDA cases of the          tests.log, tests.xml
#                   device-parametrized suites, the slow CUDA memory and large-tensor tests
#   memcheck   40   compute-sanitizer --tool memcheck on benchmarks/ops_smoke.py          memcheck.log
#   racecheck  20   compute-sanitizer --tool racecheck, the same program                   racecheck.log
#   bench_ops  60   benchmarks/bench_ops.py at the GPU defaults                           bench_ops.json/.log
#   pom_bench  85   pom-bench --decode at the GPU defaults                                 pom_bench/, pom_bench.log
# A stage past its budget is stopped and recorded as such; the others still run (the CUDA stages need the build).
#
# Environment:
#   POM_GPU_CHECK_MODE=cpu   the CPU mode CI runs: no GPU and no build (the installed pom_ext); every stage that
#                            can runs on the CPU (tests collect and skip their CUDA cases, the smoke program and
#                            the benchmarks run small), so the script cannot rot
#   POM_GPU_CHECK_BUILD=0    skip the build (pom_ext is installed with its CUDA kernels, as in docker/)
#   POM_GPU_CHECK_PACK=1     also pack OUT into OUT.tar.gz (a lent machine returns a few files only)
#   PYTHON                   the interpreter (default: python3), run with -P: the installed pom_ext is tested,
#                            not a source tree in the working directory
set -uo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"
out="$(realpath -m "${1:-gpu-check}")"
mkdir -p "$out"
py="${PYTHON:-python3}"
mode="${POM_GPU_CHECK_MODE:-gpu}"
cores="$(nproc)"
start=$(date +%s)
summary="$out/summary.tsv"
printf 'stage\tstatus\tseconds\tbudget\n' >"$summary"
build_ok=1

# stage NAME BUDGET COMMAND...: runs COMMAND (a program; functions through `bash -c` after `export -f`) under
# `timeout BUDGET`, output to NAME.log; records the outcome.
stage() {
  local name="$1" budget="$2"
  shift 2
  local t0=$(date +%s) status
  echo "== $name (budget ${budget}s)"
  timeout --kill-after=10 "$budget" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  if (( rc == 0 )); then status=ok; elif (( rc == 124 || rc == 137 )); then status=timeout; else status="failed($rc)"; fi
  local dt=$(( $(date +%s) - t0 ))
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$dt" "$budget" >>"$summary"
  echo "   $status in ${dt}s (log: $out/$name.log)"
  tail -n 3 "$out/$name.log" | sed 's/^/   | /'
  [[ "$status" == ok ]]
}
skip() {
  printf '%s\tskipped: %s\t0\t0\n' "$1" "$2" >>"$summary"
  echo "== $1: skipped ($2)"
}

# ---- env ----
env_info() {
  nvidia-smi >"$out/nvidia-smi.txt" 2>&1 || echo "no nvidia-smi" >"$out/nvidia-smi.txt"
  "$py" - <<'EOF'
import platform, subprocess, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs", round(p.total_memory / 2**30, 1), "GiB")
else:
    print("gpu none")
try:
    print(subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1])
except OSError:
    print("nvcc not found")
EOF
  git -C "$root" rev-parse HEAD 2>/dev/null || echo "commit: unknown (no git)"
}
export out py root cores
export -f env_info
stage env 35 bash -c env_info && cp "$out/env.log" "$out/env.txt"
if [[ "$mode" == gpu ]] && ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no GPU visible to torch; run with POM_GPU_CHECK_MODE=cpu for the CPU mode" >&2
  exit 2
fi

# ---- build ----
if [[ "$mode" == cpu || "${POM_GPU_CHECK_BUILD:-1}" == 0 ]]; then
  skip build "$([[ "$mode" == cpu ]] && echo 'CPU mode: the installed pom_ext' || echo 'POM_GPU_CHECK_BUILD=0')"
else
  arch="$("$py" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')"
  build() {
    POM_EXT_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS="$cores" NVCC_THREADS=2 \
      "$py" -m pip install --no-build-isolation --no-deps -e "$root"
  }
  export arch
  export -f build
  stage build 200 bash -c build || build_ok=0
fi
"$py" -c "import pom_ext, sys; sys.exit(0 if pom_ext.native_available() else 1)" || build_ok=0

# ---- registers ----
so="$("$py" -c 'import pom_ext._C as m; print(m.__file__)' 2>/dev/null)"
if [[ "$mode" == cpu ]]; then
  skip registers "CPU mode (CI's cuda_torch_check reads the CUDA build)"
elif (( build_ok )); then
  cc="$("$py" -c 'import torch; print("sm_%d%d" % torch.cuda.get_device_capability())')"
  stage registers 10 "$py" .ci/sass_check.py "$so" --arch "$cc" --report-only --table "$out/registers.json"
  cp "$out/registers.log" "$out/registers.txt"
else
  skip registers "no CUDA build"
fi

# ---- tests ----
if [[ "$mode" == cpu ]]; then
  # The CUDA test files collect without a GPU and skip every case.
  stage tests 120 "$py" -P -m pytest tests/test_cuda.py tests/test_gated.py tests/test_cuda_rope.py -q -rs \
    --junitxml="$out/tests.xml"
elif (( build_ok )); then
  stage tests 120 "$py" -P -m pytest tests -q -k cuda --runslow -p no:cacheprovider --junitxml="$out/tests.xml"
else
  skip tests "no CUDA build"
fi

# ---- sanitizers ----
if [[ "$mode" == cpu ]]; then
  stage memcheck 40 "$py" benchmarks/ops_smoke.py --device cpu
  skip racecheck "CPU mode"
elif (( build_ok )) && command -v compute-sanitizer >/dev/null 2>&1; then
  stage memcheck 40 compute-sanitizer --tool memcheck --error-exitcode 3 "$py" benchmarks/ops_smoke.py --device cuda
  stage racecheck 20 compute-sanitizer --tool racecheck --error-exitcode 3 "$py" benchmarks/ops_smoke.py \
    --device cuda
else
  skip memcheck "no CUDA build or no compute-sanitizer"
  skip racecheck "no CUDA build or no compute-sanitizer"
fi

# ---- benchmarks ----
if [[ "$mode" == cpu ]]; then
  stage bench_ops 60 "$py" benchmarks/bench_ops.py --device cpu --quick --out "$out/bench_ops.json"
  stage pom_bench 85 "$py" -P -m pom_ext.bench --quick --device cpu --decode --no-plots --out "$out/pom_bench"
elif (( build_ok )); then
  stage bench_ops 60 "$py" benchmarks/bench_ops.py --out "$out/bench_ops.json"
  stage pom_bench 85 "$py" -P -m pom_ext.bench --decode --out "$out/pom_bench"
else
  skip bench_ops "no CUDA build"
  skip pom_bench "no CUDA build"
fi

# ---- summary ----
total=$(( $(date +%s) - start ))
"$py" - "$summary" "$out" "$total" "$mode" <<'EOF'
import csv, datetime, json, os, sys
tsv, out, total, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
stages = list(csv.DictReader(open(tsv), delimiter="\t"))
env = open(os.path.join(out, "env.txt")).read() if os.path.exists(os.path.join(out, "env.txt")) else ""
doc = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "mode": mode, "total_s": total,
       "env": env.strip().splitlines(), "stages": stages}
json.dump(doc, open(os.path.join(out, "summary.json"), "w"), indent=1)
lines = [f"{s['stage']:<10} {s['status']:<44} {s['seconds']:>4} s / {s['budget']:>3} s" for s in stages]
lines.append(f"total {total} s")
open(os.path.join(out, "summary.txt"), "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
failed=$(awk -F'\t' 'NR > 1 && $2 != "ok" && $2 !~ /^skipped/' "$summary" | wc -l)
if [[ "${POM_GPU_CHECK_PACK:-0}" == 1 ]]; then
  tar -czf "$out.tar.gz" -C "$(dirname "$out")" "$(basename "$out")" && echo "packed: $out.tar.gz"
fi
echo "gpu_check ($mode): $failed stage(s) not ok, ${total}s; results in $out"
(( failed == 0 ))
