"""Decode benchmark: one token per step through a stack of L pre-norm residual mixing layers,
x + mixer(LayerNorm(x)), at a given context length (no MLPs, no positional encoding: only the token mixing
differs between the stacks).

  pom_ext          PoM layers stepping their recurrent state (PoM.step: a running sum (B, E) fp32 and a
                   token count). The state's count is set to the context length, so every step runs the code
                   path of a real decode at that position; its cost cannot depend on the context.
  attention_sdpa   multi-head attention with a preallocated KV cache (B, H, S, hd) per layer, filled with random
                   keys and values for the context; each step writes its key and value and runs
                   scaled_dot_product_attention of the new query over the cache prefix.
  attention_flash  the same cache in flash-attn's layout through flash_attn_with_kvcache (CUDA, when installed).

Memory: the bytes that hold the context, PoM state against KV cache. A stack whose KV cache does not fit the
free memory is measured on as many of its layers as fit and its step time scaled by L / layers measured
(every layer does the same work; recorded in 'layers_measured' and 'note'); when not even one layer fits,
the point is 'oom'.
"""
import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import pom_ext

from .common import MHA, available_memory_bytes, flash_attn_with_kvcache, is_oom, measure, missing, release_memory

METHODS = ("pom_ext", "attention_sdpa", "attention_flash")
# Part of the free memory a KV cache may take: the rest is for weights, activations and the allocator.
_CACHE_SHARE = {"cuda": 0.9, "cpu": 0.6}


def default_methods(device: torch.device) -> List[str]:
    return ["pom_ext", "attention_sdpa"] + (["attention_flash"] if device.type == "cuda" else [])


@dataclass
class DecodeConfig:
    device: torch.device
    dtype: torch.dtype
    contexts: List[int]
    batches: List[int]
    layers: int
    dim: int
    heads: int
    degree: int = 3
    expand: int = 2
    steps: int = 20
    warmup: int = 3
    methods: List[str] = field(default_factory=list)
    cuda_graph: bool = False  # replay each step from a CUDA graph where the method allows it
    seed: int = 0

    def describe(self) -> Dict[str, object]:
        return {"dtype": str(self.dtype).replace("torch.", ""), "contexts": self.contexts, "batches": self.batches,
                "layers": self.layers, "dim": self.dim, "heads": self.heads, "n_sel_heads": self.heads,
                "degree": self.degree, "expand": self.expand, "steps": self.steps, "warmup": self.warmup,
                "methods": self.methods, "cuda_graph": self.cuda_graph}


def method_unavailable(method: str, device: torch.device) -> Optional[str]:
    if method not in METHODS:
        return f"unknown method (known: {', '.join(METHODS)})"
    need = {"pom_ext": "pom_ext", "attention_flash": "flash_attn"}.get(method)
    return None if need is None else missing(need, device)


class PoMStack(nn.Module):
    graphable = True  # a step has fixed shapes and updates its state in place

    def __init__(self, cfg: DecodeConfig):
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(cfg.dim) for _ in range(cfg.layers))
        self.mixers = nn.ModuleList(pom_ext.PoM(cfg.dim, cfg.degree, cfg.expand, n_sel_heads=cfg.heads)
                                    for _ in range(cfg.layers))

    def cache_bytes_per_layer(self, batch: int, context: int) -> int:
        return batch * (self.mixers[0].state_width * 4 + 8)  # fp32 sum and int64 count, whatever the context

    def allocate(self, layers: int, batch: int, context: int, capacity: int) -> List[pom_ext.PoMState]:
        """States of the first `layers` layers after `context` tokens: count = context, sum = context * mean."""
        states = []
        for mixer in self.mixers[:layers]:
            st = mixer.allocate_state(batch)
            st.sum.normal_(0.0, 1e-2).mul_(context)
            st.count.fill_(context)
            states.append(st)
        return states

    def step(self, x: torch.Tensor, cache: List[pom_ext.PoMState]) -> torch.Tensor:
        for norm, mixer, st in zip(self.norms, self.mixers, cache):
            x = x + mixer.step(norm(x), st)
        return x


class KVCache:
    """Preallocated keys and values of one layer; `pos` tokens are filled."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, pos: int, seqlens: Optional[torch.Tensor] = None):
        self.k, self.v, self.pos, self.seqlens = k, v, pos, seqlens


class AttentionStack(nn.Module):
    def __init__(self, cfg: DecodeConfig, flash: bool):
        super().__init__()
        self.heads, self.dim, self.flash = cfg.heads, cfg.dim, flash
        # flash_attn_with_kvcache reads the cache length from a device tensor; SDPA over a growing prefix
        # changes shape every step.
        self.graphable = flash
        self.norms = nn.ModuleList(nn.LayerNorm(cfg.dim) for _ in range(cfg.layers))
        self.mixers = nn.ModuleList(MHA(cfg.dim, cfg.heads) for _ in range(cfg.layers))

    def cache_bytes_per_layer(self, batch: int, context: int) -> int:
        return 2 * batch * context * self.dim * self.norms[0].weight.element_size()

    def allocate(self, layers: int, batch: int, context: int, capacity: int) -> List[KVCache]:
        """KV caches of the first `layers` layers for `capacity` tokens, the first `context` of them random."""
        p = self.norms[0].weight
        H, hd = self.heads, self.dim // self.heads
        shape = (batch, capacity, H, hd) if self.flash else (batch, H, capacity, hd)
        seq_dim = 1 if self.flash else 2
        block = torch.randn(*shape[:seq_dim], min(context, 1024), *shape[seq_dim + 1:], device=p.device,
                            dtype=p.dtype)
        caches = []
        for _ in range(layers):
            k, v = torch.empty(shape, device=p.device, dtype=p.dtype), torch.empty(shape, device=p.device,
                                                                                 dtype=p.dtype)
            for t in (k, v):  # random keys and values: one random block, tiled over the context
                for start in range(0, context, block.shape[seq_dim]):
                    n = min(block.shape[seq_dim], context - start)
                    t.narrow(seq_dim, start, n).copy_(block.narrow(seq_dim, 0, n))
            seqlens = torch.full((batch,), context, device=p.device, dtype=torch.int32) if self.flash else None
            caches.append(KVCache(k, v, context, seqlens))
        return caches

    def _mix(self, mha: MHA, u: torch.Tensor, c: KVCache) -> torch.Tensor:
        B, _, D = u.shape
        qkv = mha.qkv(u).view(B, 1, 3, self.heads, D // self.heads)
        if self.flash:
            y = flash_attn_with_kvcache(qkv[:, :, 0], c.k, c.v, k=qkv[:, :, 1], v=qkv[:, :, 2],
                                        cache_seqlens=c.seqlens)
            c.seqlens += 1
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4)
            c.k[:, :, c.pos:c.pos + 1] = k
            c.v[:, :, c.pos:c.pos + 1] = v
            y = F.scaled_dot_product_attention(q, c.k[:, :, :c.pos + 1], c.v[:, :, :c.pos + 1]).transpose(1, 2)
        c.pos += 1
        return mha.out(y.reshape(B, 1, D))

    def step(self, x: torch.Tensor, cache: List[KVCache]) -> torch.Tensor:
        for norm, mha, c in zip(self.norms, self.mixers, cache):
            x = x + self._mix(mha, norm(x), c)
        return x


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _layers_that_fit(stack: nn.Module, cfg: DecodeConfig, batch: int, capacity: int) -> int:
    per_layer = stack.cache_bytes_per_layer(batch, capacity)
    free = available_memory_bytes(cfg.device)
    if free is None:
        return cfg.layers
    return min(cfg.layers, int(free * _CACHE_SHARE.get(cfg.device.type, 0.6)) // max(1, per_layer))


def run(cfg: DecodeConfig, progress: Callable[[str], None] = _progress) -> Dict[str, object]:
    """All points; returns {'config', 'methods': {name: {'status'}}, 'points': [...]}."""
    methods: Dict[str, Dict[str, str]] = {}
    stacks: Dict[str, nn.Module] = {}
    for m in cfg.methods:
        why = method_unavailable(m, cfg.device)
        methods[m] = {"status": "ok" if why is None else f"skipped: {why}"}
        if why is not None:
            progress(f"decode: {m} skipped: {why}")
            continue
        torch.manual_seed(cfg.seed)
        stack = PoMStack(cfg) if m == "pom_ext" else AttentionStack(cfg, flash=m == "attention_flash")
        stacks[m] = stack.to(cfg.device, cfg.dtype).eval()

    points: List[Dict[str, object]] = []
    total = len(cfg.batches) * len(cfg.contexts) * len(stacks)
    for batch in cfg.batches:
        x = torch.randn(batch, 1, cfg.dim, device=cfg.device, dtype=cfg.dtype)
        for context in cfg.contexts:
            for m, stack in stacks.items():
                point = {"bench": "decode", "method": m, "context": context, "batch": batch, "layers": cfg.layers,
                         "cache_bytes": cfg.layers * stack.cache_bytes_per_layer(batch, context)}
                try:
                    point.update(_measure(stack, cfg, x, batch, context))
                except Exception as e:  # noqa: BLE001 - recorded; one failing point must not end a sweep
                    release_memory(cfg.device)
                    point["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
                points.append(point)
                progress(f"[{len(points):3d}/{total}] decode B={batch:<3d} context={context:<8d} {m:16s} "
                         f"{_fmt_point(point)}")
    return {"config": cfg.describe(), "methods": methods, "points": points}


def _measure(stack: nn.Module, cfg: DecodeConfig, x: torch.Tensor, batch: int, context: int) -> Dict[str, object]:
    graph = cfg.cuda_graph and cfg.device.type == "cuda" and stack.graphable
    # + 1: the step whose peak memory is measured; + _GRAPH_WARMUP + 1: the steps run to capture a graph
    capacity = context + cfg.warmup + cfg.steps + 1 + (_GRAPH_WARMUP + 1 if graph else 0)
    layers = _layers_that_fit(stack, cfg, batch, capacity)
    if layers < 1:
        need = stack.cache_bytes_per_layer(batch, capacity) / 2**30
        return {"status": "oom", "layers_measured": 0,
                "note": f"predicted: one layer's cache needs {need:.1f} GiB, more than "
                        f"{_CACHE_SHARE.get(cfg.device.type, 0.6):.0%} of the free memory"}
    cache, notes = None, []
    try:
        cache = stack.allocate(layers, batch, context, capacity)
        with torch.no_grad():
            step, why_not = lambda: stack.step(x, cache), None
            if graph:
                step, why_not = _graphed(step)
            r = measure(step, cfg.device, cfg.steps, cfg.warmup)
        r["cuda_graph"] = graph and why_not is None
        notes = [why_not] if why_not else []
    except Exception as e:  # noqa: BLE001 - out of memory while allocating the cache: recorded
        if not is_oom(e):
            raise
        r = {"status": "oom", "error": str(e).splitlines()[0][:300]}
    finally:
        del cache
        release_memory(cfg.device)
    r["layers_measured"] = layers if r["status"] == "ok" else 0
    if r["status"] == "ok":
        if layers < cfg.layers:
            scale = cfg.layers / layers
            for k in ("median_s", "p10_s", "p90_s", "min_s", "max_s"):
                r[k] *= scale
            notes.insert(0, f"extrapolated: the KV cache of {cfg.layers} layers does not fit the free memory; "
                            f"{layers} layers measured, time x {scale:.2f}")
        r["tokens_per_s"] = batch / r["median_s"]
    if notes:
        r["note"] = "; ".join(notes)
    return r


_GRAPH_WARMUP = 2


def _graphed(fn: Callable[[], object]):
    """(replay of fn captured in a CUDA graph, None), or (fn, why not) when the capture fails."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a side stream before capture, as torch.cuda.graph asks
            for _ in range(_GRAPH_WARMUP):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    except Exception as e:  # noqa: BLE001 - recorded; the step is then measured without a graph
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return fn, f"CUDA graph capture failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); eager steps"
    return graph.replay, None


def _fmt_point(p: Dict[str, object]) -> str:
    mem = f"cache {p['cache_bytes'] / 2**20:.2f} MiB"
    if p["status"] != "ok":
        return f"{p['status']} ({mem})"
    star = " *" if "extrapolated" in p.get("note", "") else ""
    return (f"{p['median_s'] * 1e3:.3f} ms/step (p10 {p['p10_s'] * 1e3:.3f}, p90 {p['p90_s'] * 1e3:.3f}), "
            f"{p['tokens_per_s']:.0f} tok/s, {mem}{star}")
