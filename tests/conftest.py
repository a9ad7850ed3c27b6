"""Shared fixtures: devices, CPU instruction sets, tolerances and NaN-poisoned allocations."""
import importlib.util
import os
import pathlib
from contextlib import contextmanager

import pytest
import torch
import torch.utils.deterministic

import pom_ext

if not pom_ext.native_available() and os.environ.get("POM_EXT_ALLOW_REFERENCE") != "1":
    raise pytest.UsageError(
        "pom_ext's compiled kernels are not loaded, so the tests would only exercise the pure-PyTorch reference. "
        "Build them first (pip install --no-build-isolation -e .), or set POM_EXT_ALLOW_REFERENCE=1 to test the "
        "fallback on purpose."
    )

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str):
    """examples/<name>.py as a module (the examples are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"{name}_example", EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# SPEC §4: relative error against the float64 reference.
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def has_cuda_kernels() -> bool:
    """A GPU, and a build of pom_ext with its CUDA kernels."""
    if not (torch.cuda.is_available() and pom_ext.native_available()):
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("pom_ext::poly_eval", "CUDA")


NEEDS_CUDA = pytest.mark.skipif(not has_cuda_kernels(), reason="no CUDA device, or pom_ext built without CUDA")
# "cpu" and "cuda", the latter skipped without a GPU or without the CUDA kernels: for tests that must run on
# every device the kernels have.
CPU_AND_CUDA = ["cpu", pytest.param("cuda", marks=NEEDS_CUDA)]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64; inf when a holds a NaN or inf that b does not."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if not torch.equal(torch.isfinite(a), torch.isfinite(b)):
        return float("inf")
    a, b = a[torch.isfinite(b)], b[torch.isfinite(b)]
    nb = b.norm().item()
    return (a - b).norm().item() / (nb if nb > 0 else 1.0)


def assert_close(a, b, dtype, what=""):
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    err = rel_err(a, b)
    assert err < TOL[dtype], f"{what}: relative error {err:.3e} >= {TOL[dtype]:.0e} ({dtype})"


@pytest.fixture(autouse=True)
def poisoned_memory():
    """Every uninitialised allocation (torch.empty, at::empty in the kernels) is filled with NaN,
    so an output element a kernel forgot to write shows up as NaN in the comparisons."""
    old_det = torch.are_deterministic_algorithms_enabled()
    old_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(old_det)
    torch.utils.deterministic.fill_uninitialized_memory = old_fill


@pytest.fixture
def threads():
    """torch.set_num_threads for the test; the thread count before it is restored after it."""
    old = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(old)


@contextmanager
def isa(name):
    """Runs the kernels of the machine's best instruction set ("native") or of another build it runs ("avx2",
    "base": POM_EXT_CPU_ISA)."""
    old = os.environ.get("POM_EXT_CPU_ISA")
    if name == "native":
        os.environ.pop("POM_EXT_CPU_ISA", None)
    else:
        os.environ["POM_EXT_CPU_ISA"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("POM_EXT_CPU_ISA", None)
        else:
            os.environ["POM_EXT_CPU_ISA"] = old


def hardware_isa() -> str:
    """The best CPU build of the compiled kernels this machine runs ("reference" without them)."""
    with isa("native"):
        return pom_ext.cpu_isa()


# The CPU builds to test on this machine besides the best one ("native"): AVX2 where AVX-512 is the best,
# and the baseline wherever the best is another build (a POM_EXT_CPU_ISAS=base build has only the baseline).
_BEST_ISA = hardware_isa()
OTHER_ISAS = (["avx2"] if _BEST_ISA == "avx512" else []) + (["base"] if _BEST_ISA in ("avx2", "avx512") else [])


@pytest.fixture(params=["native"] + OTHER_ISAS if pom_ext.native_available() else ["reference"])
def cpu_isa(request):
    """Runs a test on the best CPU kernels of this machine and again on every other build it runs."""
    with isa(request.param if request.param in OTHER_ISAS else "native"):
        yield request.param


def pytest_report_header(config):
    return (f"pom_ext native kernels: {pom_ext.native_available()} (best CPU build: {hardware_isa()}), "
            f"torch {torch.__version__}, devices {DEVICES}")


# ---- slow tests: skipped unless `--runslow` or POM_EXT_SLOW=1 ----

def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False,
                     help="run tests marked @pytest.mark.slow (also enabled by POM_EXT_SLOW=1)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running test, skipped unless --runslow or POM_EXT_SLOW=1")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow") or os.environ.get("POM_EXT_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow or POM_EXT_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
