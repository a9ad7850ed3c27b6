#!/usr/bin/env bash
# C++ package check: configure, build and install libpom_ext with CMake into a temporary
# prefix, build examples/cpp against the installed package (find_package(pom_ext)) and run
# the example (trains, saves/reloads, decodes with the recurrent state; exits non-zero on
# any failed check).
#   MAX_JOBS            parallel compile jobs (default 2)
#   POM_EXT_CPP_BUILD   build directory (default build/cpp-check; build/ is git-ignored)
set -euo pipefail
cd "$(dirname "$0")/.."

start=$(date +%s)
jobs="${MAX_JOBS:-2}"
build="${POM_EXT_CPP_BUILD:-build/cpp-check}"
torch_prefix="$(python -c 'import torch; print(torch.utils.cmake_prefix_path)')"
prefix="$(mktemp -d "${TMPDIR:-/tmp}/pom_ext_prefix.XXXXXX")"
trap 'rm -rf "$prefix"' EXIT
generator=()
if command -v ninja >/dev/null 2>&1; then generator=(-G Ninja); fi
elapsed() { echo "$(( $(date +%s) - start ))s"; }

echo "== cpp_check: library (build $build/lib, install prefix $prefix)"
if [[ -f "$build/lib/CMakeCache.txt" ]]; then generator=(); fi
cmake -S . -B "$build/lib" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$torch_prefix" -DCMAKE_INSTALL_PREFIX="$prefix" >/dev/null
cmake --build "$build/lib" -j "$jobs"
cmake --install "$build/lib" --prefix "$prefix" >/dev/null
test -f "$prefix"/lib*/cmake/pom_ext/pom_extConfig.cmake
echo "library built and installed: $(elapsed)"

echo "== cpp_check: examples/cpp against the installed package"
# A fresh configure: the package must be found through CMAKE_PREFIX_PATH alone.
rm -rf "$build/examples"
generator=()
if command -v ninja >/dev/null 2>&1; then generator=(-G Ninja); fi
cmake -S examples/cpp -B "$build/examples" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$prefix;$torch_prefix" >/dev/null
cmake --build "$build/examples" -j "$jobs"
echo "examples built: $(elapsed)"

echo "== cpp_check: run pom_tiny_lm"
"$build/examples/pom_tiny_lm" "$build/examples/pom_tiny_lm.pt"
echo "cpp_check passed: $(elapsed)"
