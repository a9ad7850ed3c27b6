#!/usr/bin/env bash
# Compiles every csrc/cuda/*.cu for sm_80 and sm_90 against the installed torch's
# headers (object files only, nothing is linked). Works with a CPU-only torch wheel:
# the one generated c10 CUDA header it lacks is stubbed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CUDA_HOME="${CUDA_HOME:-}"
NVCC=""
if [[ -n "$CUDA_HOME" && -x "$CUDA_HOME/bin/nvcc" ]]; then
  NVCC="$CUDA_HOME/bin/nvcc"
elif command -v nvcc >/dev/null 2>&1; then
  NVCC="$(command -v nvcc)"
else
  for d in /usr/local/cuda /usr/local/cuda-*; do
    if [[ -x "$d/bin/nvcc" ]]; then NVCC="$d/bin/nvcc"; break; fi
  done
fi
if [[ -z "$NVCC" ]]; then
  echo "skipping CUDA compile check: nvcc not found"
  exit 0
fi

shopt -s nullglob
SOURCES=("$ROOT"/csrc/cuda/*.cu)
if (( ${#SOURCES[@]} == 0 )); then
  echo "no csrc/cuda/*.cu files to compile"
  exit 0
fi

PYTHON="${PYTHON:-python}"
mapfile -t TORCH_INC < <("$PYTHON" -c 'import torch.utils.cpp_extension as c; print("\n".join(c.include_paths()))')

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$TMP/include/c10/cuda/impl"
printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$TMP/include/c10/cuda/impl/cuda_cmake_macros.h"

FLAGS=(-std=c++20 -O3 -c
  -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90
  -Xcompiler -fPIC --expt-relaxed-constexpr -DPOM_EXT_WITH_CUDA
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
  -D__CUDA_NO_HALF2_OPERATORS__
  -I"$TMP/include" -I"$ROOT/csrc/include" -I"$ROOT/csrc/internal")
for inc in "${TORCH_INC[@]}"; do FLAGS+=(-I"$inc"); done

echo "nvcc: $NVCC ($("$NVCC" --version | tail -n 1))"
start=$(date +%s)
export NVCC TMP
printf '%s\0' "${SOURCES[@]}" | xargs -0 -P 2 -I{} bash -c '
  src="$1"; shift
  obj="$TMP/$(basename "$src" .cu).o"
  if "$NVCC" "$@" "$src" -o "$obj" > "$obj.log" 2>&1; then
    echo "ok    $(basename "$src")"
  else
    echo "FAIL  $(basename "$src")"; cat "$obj.log"; exit 255
  fi
' _ {} "${FLAGS[@]}" && status=0 || status=$?
end=$(date +%s)
if (( status != 0 )); then
  echo "CUDA compile check failed ($((end - start)) s)"
  exit 1
fi
echo "CUDA compile check passed: ${#SOURCES[@]} files in $((end - start)) s"
