#!/usr/bin/env bash
# Entry point of the pom-bench image: the layer sweep and the decode benchmark, results in $OUT (default
# /results: mount a host folder there). Arguments are passed to pom-bench, e.g. --quick or --seq-lens 1k,4k.
set -uo pipefail
OUT="${OUT:-/results}"
mkdir -p "$OUT"
cd "$OUT" || exit 1  # run the installed pom_ext, never a source tree in the working directory
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || echo "bench.sh: nvidia-smi not available (was the container started with --gpus all?)" >&2
pom-bench --what all --out "$OUT" "$@" 2> >(tee "$OUT/progress.log" >&2) | tee "$OUT/tables.txt"
rc=${PIPESTATUS[0]}
echo "bench.sh: results in $OUT (pom-bench exit status $rc)" >&2
exit $rc
