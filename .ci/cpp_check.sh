#!/usr/bin/env bash
# C++ package check: tests/cpp/build.sh builds libpom_ext with CMake, installs it into a prefix and builds
# examples/cpp and tests/cpp against the installed package as C++17 consumers (find_package(pom_ext 0.1));
# then the example runs (trains, saves/reloads, decodes with the recurrent state; exits non-zero on any failed
# check), and the package's find_package contract is checked: version requests, the CUDA component, a
# mismatched torch, and what is installed (public headers only, RUNPATH $ORIGIN).
#   MAX_JOBS            parallel compile jobs (default 2)
#   POM_EXT_CPP_BUILD   build directory (default build/cpp, the one tests/test_cpp_interop.py builds and reuses)
set -euo pipefail
cd "$(dirname "$0")/.."

start=$(date +%s)
build="${POM_EXT_CPP_BUILD:-build/cpp}"
elapsed() { echo "$(( $(date +%s) - start ))s"; }

echo "== cpp_check: library, examples and test programs ($build)"
tests/cpp/build.sh "$build"
echo "built: $(elapsed)"

echo "== cpp_check: run pom_tiny_lm"
"$build/examples/pom_tiny_lm" "$build/examples/pom_tiny_lm.pt"

echo "== cpp_check: the installed package"
python .ci/cpp_package_check.py "$build"
echo "cpp_check passed: $(elapsed)"
