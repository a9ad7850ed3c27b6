"""Layer sweep: one token-mixing layer at model width D over sequence lengths N, PoM against attention.

Methods (all at width D, one layer with its projections; input (B, N, D), output (B, N, D)):
  pom_ext            pom_ext.PoM(D, degree, expand, n_sel_heads=heads) on the compiled kernels
  pom_ext_reference  the same layer through pom_ext.reference.pom_layer (pure PyTorch)
  pom_paper          the paper's reference implementation, pom.PoM, when the `pom` package is importable
  sdpa               multi-head attention (q/k/v/out projections) through scaled_dot_product_attention,
                     backend chosen by torch (the CPU default)
  sdpa_flash, sdpa_cudnn, sdpa_efficient, sdpa_math
                     the same, pinned to one SDPA backend (GPU defaults: flash, cuDNN, memory-efficient)
  flash_attn         the same, through flash_attn_func, when flash-attn is installed (GPU)
Passes: fwd (under torch.no_grad) and fwd+bwd (backward with a fixed upstream gradient; parameter and
input gradients reset to None before each call). Modes: non-causal and causal.
"""
import contextlib
import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

import pom_ext
from pom_ext import reference

from .common import MHA, fwd_bwd, measure, missing, release_memory

try:
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:  # torch < 2.3
    SDPBackend = sdpa_kernel = None

try:
    import pom as pom_paper
except ImportError:
    pom_paper = None

SDPA_BACKENDS = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_cudnn": "CUDNN_ATTENTION",
                 "sdpa_efficient": "EFFICIENT_ATTENTION", "sdpa_math": "MATH"}
POM_METHODS = ("pom_ext", "pom_ext_reference", "pom_paper")
ALL_METHODS = ("pom_ext", "pom_ext_reference", "pom_paper", "sdpa", *SDPA_BACKENDS, "flash_attn")
MODES = ("non-causal", "causal")
PASSES = ("fwd", "fwd+bwd")


def default_methods(device: torch.device) -> List[str]:
    if device.type == "cuda":
        return ["pom_ext", "pom_ext_reference", "pom_paper", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient",
                "flash_attn"]
    return ["pom_ext", "pom_ext_reference", "pom_paper", "sdpa"]


def is_attention(method: str) -> bool:
    return method not in POM_METHODS


@dataclass
class LayerConfig:
    device: torch.device
    dtype: torch.dtype
    seq_lens: List[int]
    dim: int
    heads: int
    degree: int = 3
    expand: int = 2
    batch: Optional[int] = None  # fixed batch; None: max(1, tokens // N)
    tokens: int = 65536
    modes: List[str] = field(default_factory=lambda: list(MODES))
    passes: List[str] = field(default_factory=lambda: list(PASSES))
    methods: List[str] = field(default_factory=list)
    repeats: int = 10
    warmup: int = 1
    reference_max_n: Optional[int] = None  # pom_ext_reference and pom_paper only up to this N
    max_run_s: float = 60.0  # a method whose call took longer is skipped at larger N
    seed: int = 0

    def batch_for(self, n: int) -> int:
        return self.batch if self.batch is not None else max(1, self.tokens // n)

    def describe(self) -> Dict[str, object]:
        return {"dtype": str(self.dtype).replace("torch.", ""), "seq_lens": self.seq_lens, "dim": self.dim,
                "heads": self.heads, "n_sel_heads": self.heads, "degree": self.degree, "expand": self.expand,
                "batch": self.batch if self.batch is not None else f"max(1, {self.tokens} // N)",
                "modes": self.modes, "passes": self.passes, "methods": self.methods, "repeats": self.repeats,
                "warmup": self.warmup, "reference_max_n": self.reference_max_n, "max_run_s": self.max_run_s}


# ---- methods: each gives (call(x, causal) -> out, parameters, context) ----

Built = Tuple[Callable[[torch.Tensor, bool], torch.Tensor], List[torch.nn.Parameter], Callable[[], object]]


def method_unavailable(method: str, device: torch.device) -> Optional[str]:
    """Why `method` cannot run here (None: it can)."""
    if method not in ALL_METHODS:
        return f"unknown method (known: {', '.join(ALL_METHODS)})"
    if method == "pom_paper" and pom_paper is None:
        return "the paper's `pom` package is not importable"
    if method in ("pom_ext", "flash_attn"):
        return missing(method, device)
    if method in SDPA_BACKENDS:
        if sdpa_kernel is None or not hasattr(SDPBackend, SDPA_BACKENDS[method]):
            return f"this torch has no SDPBackend.{SDPA_BACKENDS[method]}"
        if device.type != "cuda" and method in ("sdpa_cudnn", "sdpa_efficient"):
            return "a CUDA-only SDPA backend"
    return None


def _pom_paper_layer(cfg: LayerConfig) -> torch.nn.Module:
    cls = getattr(pom_paper, "PoM")
    return cls(cfg.dim, cfg.degree, cfg.expand, 1, cfg.heads)


def _pom_paper_call(layer: torch.nn.Module, cfg: LayerConfig) -> Callable[[torch.Tensor, bool], torch.Tensor]:
    """Causal through mask='causal' when the package supports it, else through a (B, N, N) lower-triangular
    mask (its general masked path, O(N^2 E)), made by call.prepare(x, causal) outside the measured calls."""
    probe = torch.randn(1, 3, cfg.dim, device=cfg.device, dtype=cfg.dtype)
    try:
        with torch.no_grad():
            layer(probe, mask="causal")
        causal_kw = True
    except Exception:  # noqa: BLE001 - any failure means: no string mask support
        causal_kw = False
    mask: Dict[Tuple[int, int], torch.Tensor] = {}

    def prepare(x, causal):
        mask.clear()
        if causal and not causal_kw:
            B, N = x.shape[:2]
            mask[(B, N)] = torch.ones(N, N, device=x.device, dtype=x.dtype).tril().expand(B, N, N)

    def call(x, causal):
        if not causal:
            return layer(x)
        if causal_kw:
            return layer(x, mask="causal")
        return layer(x, mask=mask[tuple(x.shape[:2])])
    call.prepare = prepare
    return call


def build(method: str, cfg: LayerConfig) -> Built:
    torch.manual_seed(cfg.seed)
    none = contextlib.nullcontext
    if method in ("pom_ext", "pom_ext_reference"):
        layer = pom_ext.PoM(cfg.dim, cfg.degree, cfg.expand, n_sel_heads=cfg.heads)
        layer = layer.to(cfg.device, cfg.dtype)
        if method == "pom_ext":
            call = lambda x, causal: layer(x, mask="causal" if causal else None)  # noqa: E731
        else:
            call = lambda x, causal: reference.pom_layer(layer, x, mask="causal" if causal else None)  # noqa: E731
        return call, list(layer.parameters()), none
    if method == "pom_paper":
        layer = _pom_paper_layer(cfg).to(cfg.device, cfg.dtype)
        return _pom_paper_call(layer, cfg), list(layer.parameters()), none
    attn = MHA(cfg.dim, cfg.heads, kernel="flash_attn" if method == "flash_attn" else "sdpa")
    attn = attn.to(cfg.device, cfg.dtype)
    ctx = none
    if method in SDPA_BACKENDS:
        backend = getattr(SDPBackend, SDPA_BACKENDS[method])
        ctx = lambda: sdpa_kernel(backend)  # noqa: E731
    return attn, list(attn.parameters()), ctx


# ---- the sweep ----

def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _fmt_point(p: Dict[str, object]) -> str:
    if p["status"] != "ok":
        return p["status"]
    mem = "" if p.get("peak_bytes") is None else f", peak {p['peak_bytes'] / 2**20:.1f} MiB"
    return f"{p['median_s'] * 1e3:.2f} ms (p10 {p['p10_s'] * 1e3:.2f}, p90 {p['p90_s'] * 1e3:.2f}){mem}"


def run(cfg: LayerConfig, progress: Callable[[str], None] = _progress) -> Dict[str, object]:
    """All points of the sweep; a point that runs out of memory is recorded as 'oom' and the sweep goes on.

    Returns {'config', 'methods': {name: {'status', 'kind'}}, 'points': [...]}.
    """
    methods: Dict[str, Dict[str, str]] = {}
    runnable = []
    for m in cfg.methods:
        why = method_unavailable(m, cfg.device)
        methods[m] = {"kind": "attention" if is_attention(m) else "pom", "status": "ok" if why is None
                      else f"skipped: {why}"}
        if why is None:
            runnable.append(m)
        else:
            progress(f"layer: {m} skipped: {why}")
    built: Dict[str, Built] = {}
    for m in list(runnable):
        try:
            built[m] = build(m, cfg)
        except Exception as e:  # noqa: BLE001 - an optional method that cannot be built is skipped
            methods[m]["status"] = f"skipped: could not be built ({type(e).__name__}: {e})"
            progress(f"layer: {m} {methods[m]['status']}")
            runnable.remove(m)

    points: List[Dict[str, object]] = []
    too_slow: Dict[Tuple[str, str, str], str] = {}
    total = len(cfg.modes) * len(cfg.seq_lens) * len(runnable) * len(cfg.passes)
    for mode in cfg.modes:
        causal = mode == "causal"
        for n in cfg.seq_lens:
            B = cfg.batch_for(n)
            g = torch.Generator(device="cpu").manual_seed(cfg.seed + n)
            x = torch.randn(B, n, cfg.dim, generator=g).to(cfg.device, cfg.dtype)
            grad = torch.randn(B, n, cfg.dim, generator=g).to(cfg.device, cfg.dtype)
            for m in runnable:
                call, params, ctx = built[m]
                for pas in cfg.passes:
                    point = {"bench": "layer", "method": m, "mode": mode, "pass": pas, "n": n, "batch": B,
                             "tokens": B * n}
                    key = (m, mode, pas)
                    if m in ("pom_ext_reference", "pom_paper") and cfg.reference_max_n is not None \
                            and n > cfg.reference_max_n:
                        point["status"] = f"skipped: N > {cfg.reference_max_n} (--reference-max-n)"
                    elif key in too_slow:
                        point["status"] = too_slow[key]
                    else:
                        try:
                            point.update(_measure(cfg, call, params, ctx, x, grad, causal, pas))
                        except Exception as e:  # noqa: BLE001 - recorded; one failing point must not end a sweep
                            point["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
                    if point["status"] == "ok":
                        point["tokens_per_s"] = B * n / point["median_s"]
                        if point["median_s"] > cfg.max_run_s:
                            too_slow[key] = (f"skipped: a call took {point['median_s']:.1f} s at N={n}, over "
                                             f"--max-run-s {cfg.max_run_s:g}")
                    points.append(point)
                    progress(f"[{len(points):3d}/{total}] {mode:10s} N={n:<7d} B={B:<4d} {m:18s} {pas:8s} "
                             f"{_fmt_point(point)}")
            del x, grad
            release_memory(cfg.device)
    return {"config": cfg.describe(), "methods": methods, "points": points}


def _measure(cfg: LayerConfig, call, params, ctx, x, grad, causal: bool, pas: str) -> Dict[str, object]:
    if hasattr(call, "prepare"):
        call.prepare(x, causal)
    if pas == "fwd":
        def fn():
            with torch.no_grad():
                call(x, causal)
    else:
        xg = x.detach().requires_grad_()
        fn = fwd_bwd(lambda: call(xg, causal), xg, *params, grad=grad)
    try:
        with ctx():
            return measure(fn, cfg.device, cfg.repeats, cfg.warmup)
    finally:
        for p in params:
            p.grad = None
