#!/usr/bin/env bash
# Builds the C++ side as a user of the CMake package would, into BUILD (default build/cpp; build/ is git-ignored):
#   BUILD/lib       libpom_ext (CMake), installed into BUILD/prefix
#   BUILD/examples  examples/cpp against the installed package
#   BUILD/tests     tests/cpp against the installed package
# The consumers are compiled as C++17, pom_ext's headers' requirement (C++20 when torch's own headers require it,
# as torch 2.14's do). Incremental: a second run rebuilds only what changed. Used by
# tests/test_cpp_interop.py and .ci/cpp_check.sh.
#   MAX_JOBS        parallel compile jobs (default 2)
#   POM_EXT_CUDA    CUDA kernels in the library: OFF by default here (the C++ tests run on the CPU; AUTO or ON
#                   builds them as the library's own default would)
#   POM_EXT_CPU_ISAS  CPU kernel builds in the library: base by default here (a third of the compile time; the
#                   C++ tests check the API and the interop, tests/test_ops.py every instruction-set build; all
#                   builds them as the library's own default would)
set -euo pipefail
cd "$(dirname "$0")/../.."

build="$(realpath -m "${1:-build/cpp}")"
jobs="${MAX_JOBS:-2}"
python="${PYTHON:-python}"
torch_prefix="$("$python" -c 'import torch; print(torch.utils.cmake_prefix_path)')"
# torch >= 2.14 refuses C++17 in its own headers (ATen/ATen.h: "C++20 or later compatible compiler is required").
torch_include="$("$python" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "include"))')"
std=17
if grep -q "C++20 or later" "$torch_include/ATen/ATen.h" 2>/dev/null; then std=20; fi
generator=()
if command -v ninja >/dev/null 2>&1; then generator=(-G Ninja); fi

configure() {  # SOURCE DIR ARGS...
  local src="$1" dir="$2"
  shift 2
  local gen=("${generator[@]}")
  if [[ -f "$dir/CMakeCache.txt" ]]; then gen=(); fi
  cmake -S "$src" -B "$dir" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release "$@" >/dev/null
}

configure . "$build/lib" -DCMAKE_PREFIX_PATH="$torch_prefix" -DCMAKE_INSTALL_PREFIX="$build/prefix" \
  -DPOM_EXT_CUDA="${POM_EXT_CUDA:-OFF}" -DPOM_EXT_CPU_ISAS="${POM_EXT_CPU_ISAS:-base}"
cmake --build "$build/lib" -j "$jobs"
cmake --install "$build/lib" >/dev/null
for pair in examples/cpp:examples tests/cpp:tests; do
  src="${pair%%:*}" dir="$build/${pair##*:}"
  # CMAKE_CUDA_STANDARD: torch's CMake package of a CUDA build sets the CUDA dialect to the C++ one and compiles a
  # GPU-detection program with it, which CMake 3.25 cannot do for CUDA 20 (docs/cpp.md). No CUDA code here.
  configure "$src" "$dir" -DCMAKE_CXX_STANDARD="$std" -DCMAKE_CUDA_STANDARD=17 \
    -DCMAKE_PREFIX_PATH="$build/prefix;$torch_prefix"
  cmake --build "$dir" -j "$jobs"
done
echo "consumers built as C++$std"
