"""Build of pom_ext._C: C++ CPU kernels always, CUDA kernels when the toolchain has them.

CUDA is decided from the toolchain, never from the presence of a GPU:
  POM_EXT_CUDA=1   build the CUDA kernels (fail if torch or the toolkit lacks CUDA)
  POM_EXT_CUDA=0   CPU only
  unset            CUDA when torch is a CUDA build and a CUDA toolkit (nvcc) is found
  POM_EXT_CPU_ISAS=base   only the baseline CPU kernels (no AVX2 / AVX-512 builds): about a third of the
                          compile time, slower kernels on x86-64; for test builds (default: all)
  POM_EXT_DEBUG_INFO=1   keep the compiler's debug information (-g from Python's flags); by default the C++
                         units are built with -g0: a fifth less compile time and a library of 15 MB, not 120 MB
TORCH_CUDA_ARCH_LIST, MAX_JOBS and NVCC_THREADS are honoured.
"""
import glob
import os
import sys

from setuptools import setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:  # pragma: no cover - message for a build without torch
    sys.exit(
        "pom_ext needs PyTorch at build time. Install torch first, then build without isolation:\n"
        "    pip install --no-build-isolation ."
    )

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    flag = os.environ.get("POM_EXT_CUDA", "").strip().lower()
    have = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if flag in ("0", "false", "no", "off"):
        return False
    if flag in ("1", "true", "yes", "on"):
        if not have:
            sys.exit(
                "POM_EXT_CUDA=1 but CUDA kernels cannot be built: torch.version.cuda="
                f"{torch.version.cuda}, CUDA_HOME={cpp_extension.CUDA_HOME}"
            )
        return True
    if torch.version.cuda is not None and cpp_extension.CUDA_HOME is None:
        print("pom_ext: torch has CUDA but no CUDA toolkit (nvcc) was found; building CPU kernels only")
    return have


def _base_isa_only() -> bool:
    isas = os.environ.get("POM_EXT_CPU_ISAS", "all").strip().lower() or "all"
    if isas not in ("all", "base"):
        sys.exit(f"POM_EXT_CPU_ISAS must be 'all' (the default) or 'base', got {isas!r}")
    return isas == "base"


def _extension():
    rel = lambda pattern: sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))
    # The baseline CPU kernels (poly_cpu_base_<part>.cpp, four parts per instruction set) are listed first, for a
    # linker that keeps the first copy of shared inline code; besides, the AVX2 and AVX-512 units include every
    # header before their instruction-set pragma, so shared inline code is baseline code in every object (objdump
    # of the library: no VEX/EVEX instruction outside the avx2 and avx512 namespaces).
    # POM_EXT_CPU_ISAS=base leaves out the instruction-set builds (poly_cpu.h then declares none).
    base_only = _base_isa_only()
    isa_build = lambda p: os.path.basename(p).startswith(("poly_cpu_avx2_", "poly_cpu_avx512_"))
    base = rel("csrc/cpu/poly_cpu_base_*.cpp")
    cpu = base + [p for p in rel("csrc/cpu/*.cpp") if p not in base and not (base_only and isa_build(p))]
    sources = rel("csrc/*.cpp") + cpu
    # -fno-trapping-math lets the channel loops (selects on comparisons) vectorize; it never reassociates.
    cxx = ["-O3", "-fno-trapping-math", "-fvisibility=hidden"] + (["-DPOM_CPU_BASE_ONLY"] if base_only else [])
    if os.environ.get("POM_EXT_DEBUG_INFO", "").strip().lower() not in ("1", "true", "yes", "on"):
        cxx.append("-g0")  # after Python's own -g, so it wins
    link = []
    if sys.platform.startswith("linux") and torch.backends.openmp.is_available():
        # at::parallel_for is inline OpenMP code: without -fopenmp it runs on one thread. The loader
        # resolves libgomp.so.1 to the copy torch already loaded, so there is one OpenMP runtime.
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    # csrc/include: the public C++ headers; csrc/internal: the ones shared by the kernels only.
    include_dirs = [os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc", "internal")]
    if _want_cuda():
        nvcc = ["-O3", "-lineinfo", "--threads", os.environ.get("NVCC_THREADS", "4")]
        return cpp_extension.CUDAExtension(
            "pom_ext._C",
            sources + rel("csrc/cuda/*.cu"),
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx + ["-DPOM_EXT_WITH_CUDA"], "nvcc": nvcc + ["-DPOM_EXT_WITH_CUDA"]},
            extra_link_args=link,
        )
    return cpp_extension.CppExtension(
        "pom_ext._C", sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx}, extra_link_args=link
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
