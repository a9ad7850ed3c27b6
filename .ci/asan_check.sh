#!/usr/bin/env bash
# Builds the CPU kernels with AddressSanitizer + UndefinedBehaviorSanitizer into a scratch copy of the
# pom_ext package and runs tests against it. Exit status 0: clean; anything else: a sanitizer report or a
# failing test.
#
#   .ci/asan_check.sh                         # the CPU test files below (DEFAULT_TESTS), nothing deselected
#   .ci/asan_check.sh tests/test_fuzz.py -x   # any pytest arguments instead
#
# Environment: POM_ASAN_DIR (scratch directory, default a fresh mktemp -d; reuse one and the rebuild is
# incremental), MAX_JOBS (compile jobs, default 2).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${POM_ASAN_DIR:-$(mktemp -d /tmp/pom_asan.XXXXXX)}"
export MAX_JOBS="${MAX_JOBS:-2}"
start=$(date +%s)
echo "asan_check: scratch directory $WORK"

DEFAULT_TESTS=(tests/test_ops.py tests/test_extremes.py tests/test_gated.py tests/test_bad_inputs.py
               tests/test_layer.py tests/test_fuzz.py tests/test_rope.py)

# The interpreter itself, not a launcher script (a pyenv shim is a bash script): only processes that load
# the sanitized library should run with the sanitizer runtime preloaded.
PY="$(python -c 'import sys; print(sys.executable)')"

LIBASAN="$(gcc -print-file-name=libasan.so)"
if [[ ! -e "$LIBASAN" ]]; then
  echo "asan_check: libasan.so not found (gcc -print-file-name=libasan.so gave '$LIBASAN')" >&2
  exit 2
fi
# The libstdc++ that torch's libc10 loads (the system one for the PyPI wheels; torch bundles none).
LIBSTDCXX="$(ldd "$("$PY" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib", "libc10.so"))')" \
  | awk '$1 ~ /^libstdc\+\+\.so/ {print $3; exit}')"
LIBSTDCXX="${LIBSTDCXX:-$(gcc -print-file-name=libstdc++.so.6)}"
if [[ ! -e "$LIBSTDCXX" ]]; then
  echo "asan_check: libstdc++.so.6 not found ('$LIBSTDCXX')" >&2
  exit 2
fi

# Why libasan is preloaded: the sanitized _C.so needs the ASan runtime to be the first library of the
# process, and python is not linked against it. Why libstdc++ is preloaded right after it: ASan intercepts
# __cxa_throw and looks up the real one once, when the runtime starts. python links no libstdc++, so at
# that moment there is none; libstdc++ comes later with `import torch`, every throw in the process still
# goes through the interceptor, and the first C++ exception (any TORCH_CHECK, in pom_ext or in torch, even
# one that Python catches right away) stops the process with
#   AddressSanitizer: CHECK failed: asan_interceptors.cpp:320 "((__interception::real___cxa_throw)) != (0)"
# (the same holds for its _Unwind_RaiseException interceptor and libgcc_s). GCC 12's libasan has no option
# to switch these interceptors off (ASAN_OPTIONS=help=1 lists none). With libstdc++ preloaded, it and its
# libgcc_s are loaded before the runtime starts, both lookups succeed and exceptions work.
PRELOAD="$LIBASAN:$LIBSTDCXX"
# Options: detect_leaks=0 is the only one a clean run needs (each was checked by leaving it out); the other
# two make reports readable.
#   detect_leaks=0   LeakSanitizer otherwise reports, at every interpreter exit, what CPython, pybind11 and
#                    torch keep until exit (about 27 MB in 80,000 allocations after test_ops.py, no stack
#                    through pom_ext) and makes that interpreter exit with status 23: pytest's own, and the
#                    child pythons of tests that check a child's exit status (test_ops.py's fallback test).
#   print_stacktrace=1 (UBSan)  a stack with every UBSan report; ASan prints one anyway.
#   log_path         reports go to $WORK/reports/{asan,ubsan}.<pid>, which this script prints at the end: on
#                    stderr they would be lost, since pytest captures stderr while a test runs and the
#                    sanitizer ends the process before pytest can show it; tests that run a child python
#                    keep only part of its stderr, if any.
# Not needed (a run with only detect_leaks=0 is clean): halt_on_error (ASan's default; UBSan halts because of
# -fno-sanitize-recover), abort_on_error, allocator_may_return_null, and alloc_dealloc_mismatch=0,
# new_delete_type_mismatch=0, detect_odr_violation=0 (neither torch nor pom_ext triggers these checks here).
REPORTS="$WORK/reports"
ASAN_OPTS="detect_leaks=0:log_path=$REPORTS/asan"
UBSAN_OPTS="print_stacktrace=1:log_path=$REPORTS/ubsan"

rm -rf "$REPORTS"
mkdir -p "$WORK/pkg" "$WORK/build" "$REPORTS"
rm -rf "$WORK/pkg/pom_ext"
cp -r "$ROOT/pom_ext" "$WORK/pkg/pom_ext"
find "$WORK/pkg/pom_ext" \( -name '*.so' -o -name '__pycache__' \) -prune -exec rm -rf {} +

# Same sources and flags as setup.py's CPU build with POM_EXT_CPU_ISAS=base, with the sanitizers and -O1 instead
# of -O3. The baseline kernels only: the AVX2 and AVX-512 builds are the same source (poly_cpu_impl.h,
# rope_cpu_impl.h) under another target pragma, and leaving them out takes two thirds off the build. The build
# loads the library it made, so this process runs with the runtime preloaded; the compiler and linker that
# ninja starts do not (LD_PRELOAD is dropped from the environment they inherit: they are not sanitized and
# build about a quarter slower under the ASan allocator).
LD_PRELOAD="$PRELOAD" ASAN_OPTIONS="$ASAN_OPTS" UBSAN_OPTIONS="$UBSAN_OPTS" "$PY" - "$ROOT" "$WORK" <<'EOF'
import os
os.environ.pop("LD_PRELOAD", None)
import glob, shutil, sys, sysconfig
from torch.utils import cpp_extension
root, work = sys.argv[1], sys.argv[2]
rel = lambda pattern: sorted(glob.glob(os.path.join(root, pattern)))
base = rel("csrc/cpu/poly_cpu_base_*.cpp")  # first, as in setup.py
isa_build = lambda p: os.path.basename(p).startswith(("poly_cpu_avx2_", "poly_cpu_avx512_"))
sources = rel("csrc/*.cpp") + base + [p for p in rel("csrc/cpu/*.cpp") if p not in base and not isa_build(p)]
san = ["-fsanitize=address,undefined", "-fno-sanitize=vptr", "-fno-sanitize-recover=undefined",
       "-fno-omit-frame-pointer", "-g1"]  # line tables for the reports, not full debug information
cpp_extension.load(
    name="_C", sources=sources, build_directory=os.path.join(work, "build"),
    extra_cflags=["-O1", "-fno-trapping-math", "-fvisibility=hidden", "-fopenmp", "-DPOM_CPU_BASE_ONLY"] + san,
    extra_ldflags=["-fopenmp"] + san,
    extra_include_paths=[os.path.join(root, "csrc", "include"), os.path.join(root, "csrc", "internal")],
    with_cuda=False, is_python_module=False, verbose=False)
so = glob.glob(os.path.join(work, "build", "_C*.so"))[0]
shutil.copy(so, os.path.join(work, "pkg", "pom_ext", "_C" + sysconfig.get_config_var("EXT_SUFFIX")))
EOF
echo "asan_check: built in $(( $(date +%s) - start ))s"

if [[ $# -eq 0 ]]; then
  for t in "${DEFAULT_TESTS[@]}"; do
    if [[ -e "$ROOT/$t" ]]; then set -- "$@" "$t"; fi
  done
  set -- "$@" -q -rfEs
fi
# Paths given relative to the repository root are resolved there; the tests run from $WORK so that the
# scratch package, not the source tree's, is the pom_ext that gets imported (child processes started by
# the tests inherit PYTHONPATH and LD_PRELOAD, so they load it too).
args=()
for a in "$@"; do
  if [[ "$a" != -* && -e "$ROOT/$a" ]]; then args+=("$ROOT/$a"); else args+=("$a"); fi
done
cd "$WORK"
status=0
export LD_PRELOAD="$PRELOAD" PYTHONPATH="$WORK/pkg" ASAN_OPTIONS="$ASAN_OPTS" UBSAN_OPTIONS="$UBSAN_OPTS"
# The scratch package (and so the sanitized library) is the one imported, and a C++ exception thrown from
# it reaches Python as an error.
"$PY" - "$WORK/pkg" <<'EOF' || status=3
import sys, torch, pom_ext
assert pom_ext.__file__.startswith(sys.argv[1]) and pom_ext.native_available(), pom_ext.__file__
try:
    torch.ops.pom_ext.poly_eval(torch.zeros(2, 3), torch.zeros(2, 2, 2))
except RuntimeError:
    pass
else:
    raise AssertionError("poly_eval accepted a coefficient tensor of the wrong shape")
EOF
"$PY" -m pytest -p no:cacheprovider --rootdir "$ROOT" "${args[@]}" || status=$?
for r in "$REPORTS"/*; do
  [[ -e "$r" ]] || continue
  echo "asan_check: sanitizer report $r:" >&2
  cat "$r" >&2
  [[ $status -ne 0 ]] || status=4
done
echo "asan_check: $([[ $status -eq 0 ]] && echo clean || echo "FAILED (status $status)") in $(( $(date +%s) - start ))s"
exit $status
