"""What every pom-bench measurement shares: the attention baseline, timing, peak memory, out-of-memory
handling and the description of the machine.

Timing: CUDA events around each call on GPU (after a synchronize), time.perf_counter on CPU; each sample
is one call, statistics are over the samples (median, p10, p90, min, max).

Peak memory: the most bytes allocated through torch's allocator during one call, above what was allocated
when it started (so inputs and parameters are not counted; activations, saved tensors, gradients and
workspace are). On GPU from torch.cuda.max_memory_allocated after reset_peak_memory_stats; on CPU from the
allocation records of torch's profiler (profile_memory=True): every allocation and free through torch's CPU
allocator, with its time stamp, summed in time order. Memory that a library allocates outside torch's
allocator (e.g. oneDNN scratch space on CPU) is not counted on either device.
"""
import datetime
import gc
import os
import platform
import statistics
import subprocess
import time
import warnings
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    from flash_attn import flash_attn_func, flash_attn_with_kvcache
except ImportError:
    flash_attn_func = flash_attn_with_kvcache = None

PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class MHA(nn.Module):
    """Multi-head attention with q/k/v/out projections: (B, N, D) -> (B, N, D).

    kernel "sdpa": scaled_dot_product_attention (the backend is torch's choice unless pinned by the caller
    with torch.nn.attention.sdpa_kernel); "flash_attn": flash_attn_func (CUDA, fp16/bf16).
    """

    def __init__(self, dim: int, heads: int, kernel: str = "sdpa"):
        super().__init__()
        if dim % heads:
            raise ValueError(f"MHA: heads ({heads}) must divide dim ({dim})")
        if kernel not in ("sdpa", "flash_attn"):
            raise ValueError(f"MHA: kernel must be 'sdpa' or 'flash_attn', got {kernel!r}")
        self.heads, self.kernel = heads, kernel
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    def forward(self, x, causal: bool):
        B, N, D = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.heads, D // self.heads)
        if self.kernel == "flash_attn":
            y = flash_attn_func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], causal=causal)
            return self.out(y.reshape(B, N, D))
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.out(y.transpose(1, 2).reshape(B, N, D))


def fwd_bwd(fn: Callable[[], torch.Tensor], *inputs: torch.Tensor, grad: Optional[torch.Tensor] = None):
    """A call of forward then backward with a fixed upstream gradient (made once, outside the timing).

    inputs: the tensors whose .grad is reset before each call (inputs and parameters), so every call
    allocates its gradients as a training step with zero_grad(set_to_none=True) does.
    """
    if grad is None:
        grad = torch.randn_like(fn())

    def run():
        for t in inputs:
            t.grad = None
        fn().backward(grad)
    return run


def median_time(fn, repeat: int, warmup: int = 1):
    """(median, min, max) seconds of fn() on CPU over `repeat` calls after `warmup` calls."""
    s = Timer(torch.device("cpu")).samples(fn, repeat, warmup)
    return statistics.median(s), min(s), max(s)


def missing(need: str, device: torch.device) -> Optional[str]:
    """Why a method that needs `need` ('pom_ext': the compiled kernels, 'flash_attn') cannot run here (None: it
    can)."""
    import pom_ext

    if need == "pom_ext" and not pom_ext.native_available():
        return "the compiled kernels are not loaded (pom_ext would run its reference)"
    if need == "flash_attn":
        if flash_attn_func is None:
            return "flash-attn is not installed"
        if device.type != "cuda":
            return "flash-attn runs on CUDA only"
    return None


# ---- timing and memory ----

class Timer:
    """Seconds per call of fn on `device`: CUDA events on GPU, perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def samples(self, fn: Callable[[], object], repeat: int, warmup: int = 0) -> List[float]:
        for _ in range(warmup):
            fn()
        self.sync()
        return [self.once(fn) for _ in range(repeat)]

    def once(self, fn: Callable[[], object]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    def interleaved(self, fns: Sequence[Callable[[], object]], rounds: int, warmup: int = 1) -> List[List[float]]:
        """Samples of each of fns, one call of each per round in turn, so that a drift of the machine (a shared
        CPU's memory bandwidth can halve within minutes) reaches all of them alike: for ops compared by a ratio."""
        for fn in fns:
            for _ in range(warmup):
                fn()
        self.sync()
        out: List[List[float]] = [[] for _ in fns]
        for _ in range(rounds):
            for s, fn in zip(out, fns):
                s.append(self.once(fn))
        return out


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of a non-empty sequence."""
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def summarize(samples: Sequence[float]) -> Dict[str, float]:
    return {"median_s": statistics.median(samples), "p10_s": quantile(samples, 0.1),
            "p90_s": quantile(samples, 0.9), "min_s": min(samples), "max_s": max(samples),
            "repeats": len(samples)}


def _cpu_peak_bytes(fn: Callable[[], object]) -> Optional[int]:
    # Kineto prints start/stop lines to stderr at its default log level; a user's own setting wins.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:
        events = prof.profiler.kineto_results.events()
        records = sorted((e.start_ns(), e.nbytes()) for e in events
                         if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    except AttributeError:
        return None
    live = peak = 0
    for _, nbytes in records:
        live += nbytes
        peak = max(peak, live)
    return peak


def peak_bytes(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Peak bytes allocated through torch's allocator during fn(), above those allocated before it (None:
    not measurable with this torch)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    return _cpu_peak_bytes(fn)


def is_oom(e: BaseException) -> bool:
    if isinstance(e, torch.OutOfMemoryError):
        return True
    msg = str(e)
    return isinstance(e, RuntimeError) and any(s in msg for s in (
        "out of memory", "can't allocate memory", "not enough memory", "CUBLAS_STATUS_ALLOC_FAILED"))


def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure(fn: Callable[[], object], device: torch.device, repeat: int, warmup: int,
            memory: bool = True) -> Dict[str, object]:
    """One point: `warmup` calls, one call for peak memory, then `repeat` timed calls.

    Returns {'status': 'ok', median_s, p10_s, p90_s, min_s, max_s, repeats, peak_bytes}, or {'status': 'oom'}
    when torch runs out of memory, or {'status': 'skipped: ...'} when SDPA has no kernel for the inputs
    under the pinned backend. Other errors propagate.
    """
    timer = Timer(device)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(warmup):
                fn()
            peak = peak_bytes(fn, device) if memory else None
            samples = timer.samples(fn, repeat)
    except Exception as e:  # noqa: BLE001 - classified below, re-raised otherwise
        if is_oom(e):
            release_memory(device)
            return {"status": "oom", "error": str(e).splitlines()[0][:300]}
        if isinstance(e, RuntimeError) and "No available kernel" in str(e):
            reasons = [str(w.message).splitlines()[0] for w in caught if "because" in str(w.message)]
            why = "; ".join(reasons[:2]) or str(e).splitlines()[0]
            return {"status": f"skipped: no kernel for these inputs ({why[:300]})"}
        raise
    return {"status": "ok", **summarize(samples), "peak_bytes": peak}


# ---- the machine ----

def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    """The commit of the source tree pom_ext runs from (with '-dirty' when tracked files differ), else
    $POM_EXT_COMMIT (set by the Docker build), else 'unknown'."""
    try:
        head = subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=PACKAGE_ROOT, text=True,
                                       stderr=subprocess.DEVNULL).strip()
        dirty = subprocess.check_output(["git", "status", "--porcelain", "--untracked-files=no"],
                                        cwd=PACKAGE_ROOT, text=True, stderr=subprocess.DEVNULL).strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("POM_EXT_COMMIT", "unknown")


def load_average() -> Optional[List[float]]:
    """The machine's 1, 5 and 15 minute load averages (other work competing for the CPU), if known."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def available_memory_bytes(device: torch.device) -> Optional[int]:
    """Free memory now: the GPU's free memory, or MemAvailable of /proc/meminfo on CPU (None: unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info()[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def environment(device: torch.device) -> Dict[str, object]:
    import pom_ext

    env = {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "cpu_model": cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "flash_attn": None,
        "pom_ext": pom_ext.__version__,
        "pom_ext_native": pom_ext.native_available(),
        "pom_ext_cpu_isa": pom_ext.cpu_isa(),
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE"),
        "loadavg_start": load_average(),
    }
    if flash_attn_func is not None:
        import flash_attn
        env["flash_attn"] = getattr(flash_attn, "__version__", "installed")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu_memory_bytes"] = props.total_memory
        env["gpu_capability"] = f"{props.major}.{props.minor}"
        env["driver"] = _nvidia_driver()
    return env


def _nvidia_driver() -> Optional[str]:
    try:
        out = subprocess.check_output(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                      text=True, stderr=subprocess.DEVNULL, timeout=10)
        return out.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return None
