#!/usr/bin/env bash
# Entry point of the pom-bench image, results in $OUT (default /results: mount a host folder there).
#   no arguments: the whole GPU check (benchmarks/gpu_check.sh: every CUDA test, compute-sanitizer, the register
#                 table, bench_ops.py, pom-bench --decode), pom_ext being installed in the image already
#   arguments:    pom-bench with them (e.g. --quick, or --seq-lens 1k,4k), the layer sweep and the decode benchmark
set -uo pipefail
OUT="${OUT:-/results}"
mkdir -p "$OUT"
if [[ $# -eq 0 ]]; then
  POM_GPU_CHECK_BUILD=0 PYTHON=python /opt/pom_ext/benchmarks/gpu_check.sh "$OUT"
  exit $?
fi
cd "$OUT" || exit 1  # run the installed pom_ext, never a source tree in the working directory
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || echo "bench.sh: nvidia-smi not available (was the container started with --gpus all?)" >&2
pom-bench --what all --out "$OUT" "$@" 2> >(tee "$OUT/progress.log" >&2) | tee "$OUT/tables.txt"
rc=${PIPESTATUS[0]}
echo "bench.sh: results in $OUT (pom-bench exit status $rc)" >&2
exit $rc
