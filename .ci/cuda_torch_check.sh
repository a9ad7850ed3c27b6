#!/usr/bin/env bash
# The second torch of CI: a CUDA build of torch (default torch==2.14.1, a +cu130 wheel) in a fresh virtual
# environment, and pom_ext built against it with its CUDA kernels (POM_EXT_CUDA=1, TORCH_CUDA_ARCH_LIST=9.0) from
# a copy of the tracked tree: real torch CUDA headers, real linking. Then
#   - every op has a CUDA kernel registered with the dispatcher;
#   - the CPU tests of the suite run against this build (the CUDA tests skip without a GPU), the C++ interop tests
#     included (CMake's find_package(Torch) of a CUDA torch needs the toolkit, found as docs/cpp.md says);
#   - the CUDA kernels' resource check (.ci/sass_check.py with csrc/cuda/resource_budget.json) reads the sm_90 code.
# Skips, saying why, on a machine without nvcc; fails when the CUDA torch cannot be installed.
#   POM_CI_CUDA_REQ     the pip requirement of the CUDA torch (default torch==2.14.1)
#   POM_CI_CUDA_DIR     work directory (default: a new temporary one, removed on success)
#   MAX_JOBS            parallel compile jobs (default 2)
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"
start=$(date +%s)
elapsed() { echo "$(( $(date +%s) - start ))s"; }

nvcc_bin="$(command -v nvcc || true)"
for d in "${CUDA_HOME:-}" /usr/local/cuda /usr/local/cuda-*; do
  if [[ -z "$nvcc_bin" && -n "$d" && -x "$d/bin/nvcc" ]]; then nvcc_bin="$d/bin/nvcc"; fi
done
if [[ -z "$nvcc_bin" ]]; then
  echo "cuda_torch_check: skipped: no nvcc (CUDA toolkit) on this machine"
  exit 0
fi

work="${POM_CI_CUDA_DIR:-$(mktemp -d /tmp/pom_cuda_torch.XXXXXX)}"
mkdir -p "$work"
echo "== cuda_torch_check: virtual environment with ${POM_CI_CUDA_REQ:-torch==2.14.1} ($work)"
python -m venv "$work/venv"
py="$work/venv/bin/python"
"$py" -m pip install --quiet "${POM_CI_CUDA_REQ:-torch==2.14.1}" ninja pytest hypothesis numpy
"$py" -c "import torch; assert torch.version.cuda, 'not a CUDA build of torch'; \
print('torch', torch.__version__, 'cuda', torch.version.cuda)"
echo "installed: $(elapsed)"

echo "== cuda_torch_check: build with the CUDA kernels (TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0})"
rm -rf "$work/tree"
mkdir -p "$work/tree"
# The tracked tree and the files git would add (not ignored), as they are in the working tree.
git ls-files -z --cached --others --exclude-standard | tar --null -T - --ignore-failed-read -cf - 2>/dev/null | \
  tar -xf - -C "$work/tree"
cd "$work/tree"
export CUDA_HOME="${CUDA_HOME:-$(dirname "$(dirname "$(readlink -f "$nvcc_bin")")")}"
# /usr/local/bin/nvcc may be a wrapper script: the toolkit is where a real bin/nvcc and include/ are.
if [[ ! -f "$CUDA_HOME/include/cuda_runtime.h" ]]; then
  for d in /usr/local/cuda /usr/local/cuda-*; do
    if [[ -f "$d/include/cuda_runtime.h" ]]; then CUDA_HOME="$d"; break; fi
  done
fi
# The baseline CPU kernels only (POM_EXT_CPU_ISAS=base): this check is about the CUDA kernels and torch 2.14; the
# instruction-set builds are the first torch's (.ci/run).
POM_EXT_CUDA=1 POM_EXT_CPU_ISAS=base TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-2}" \
  "$py" -m pip install --quiet --no-build-isolation -e .
echo "built: $(elapsed)"

"$py" - <<'EOF'
import torch, pom_ext
assert pom_ext.native_available(), "the CUDA build of pom_ext does not load"
names = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith(("pom_ext::poly_", "pom_ext::causal_conv1d"))]
missing = [n for n in names if not torch._C._dispatch_has_kernel_for_dispatch_key(n, "CUDA")]
assert names and not missing, f"ops without a CUDA kernel: {missing}"
print(f"{len(names)} ops, each with a CUDA kernel; build {torch.ops.pom_ext.build_info()}")
EOF

echo "== cuda_torch_check: the suite against this build (CPU tests)"
"$py" -m pytest tests -q
echo "tests done: $(elapsed)"

echo "== cuda_torch_check: what the compiler made of the kernels (sm_90)"
"$py" .ci/sass_check.py "$(ls pom_ext/_C*.so)" --budget csrc/cuda/resource_budget.json --table "$work/registers.json"
cd "$root"
if [[ -z "${POM_CI_CUDA_DIR:-}" ]]; then rm -rf "$work"; fi
echo "cuda_torch_check passed: $(elapsed)"
