"""Residual blocks for Polymorpher models: PoM blocks, attention blocks and hybrid layer patterns.

Every block is pre-norm residual, x + mixer(norm(x)) then x + mlp(norm(x)), and exposes
    forward(x (B, N, D), mask)                  full-sequence pass (training, encoders)
    allocate_cache(batch, device, dtype)        per-layer decoding cache
    step(x (B, T, D), cache)                    causal continuation: the T new tokens attend causally to
                                                everything in the cache and to each other; the cache is updated.
A PoM block's cache is the layer's PoMState (plus a fixed buffer of the last conv_size - 1 inputs when the
block has a short convolution): constant memory in the context length. An attention block keeps a KV cache,
truncated to the last `window` positions when the attention is local.
"""
import math
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.jit import Final

from .. import functional as PF
from .. import ops, reference
from ..layers import PoM, PoMState
from ..rope import PoMRoPE

try:
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None


def check_int(owner: str, name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{owner}: argument '{name}' must be an integer >= {minimum}, got {value!r}")
    return value


def check_bool(owner: str, name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{owner}: argument '{name}' must be a bool, got {value!r}")
    return value


def check_optional_int(owner: str, name: str, value, minimum: int) -> Optional[int]:
    return None if value is None else check_int(owner, name, value, minimum)


def check_rate(owner: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"{owner}: argument '{name}' must be a number in [0, 1), got {value!r}")
    return float(value)


def resolve_layer_pattern(depth: int, layer_pattern: Optional[str] = None, attn_every: Optional[int] = None,
                          owner: str = "pom_ext.models") -> str:
    """The kind of each layer, 'P' (PoM) or 'A' (attention), as a string of length depth.

    layer_pattern: a string over {P, A} of length depth, or a shorter one whose length divides depth
    (tiled: "PPPA" with depth 8 is "PPPAPPPA"). attn_every=k: every k-th layer is attention.
    Neither: all PoM.
    """
    check_int(owner, "depth", depth, 1)
    if layer_pattern is not None and attn_every is not None:
        raise ValueError(f"{owner}: give at most one of 'layer_pattern' and 'attn_every', got "
                         f"layer_pattern={layer_pattern!r} and attn_every={attn_every!r}")
    if attn_every is not None:
        check_int(owner, "attn_every", attn_every, 1)
        return "".join("A" if (i + 1) % attn_every == 0 else "P" for i in range(depth))
    if layer_pattern is None:
        return "P" * depth
    if not isinstance(layer_pattern, str) or not layer_pattern or set(layer_pattern.upper()) - {"P", "A"}:
        raise ValueError(f"{owner}: argument 'layer_pattern' must be a non-empty string of 'P' (PoM) and "
                         f"'A' (attention), got {layer_pattern!r}")
    pattern = layer_pattern.upper()
    if depth % len(pattern):
        raise ValueError(f"{owner}: argument 'layer_pattern' ({pattern!r}, length {len(pattern)}) must have "
                         f"length depth = {depth} or a length that divides it")
    return pattern * (depth // len(pattern))


class MLP(nn.Module):
    """Linear -> GELU -> Linear, hidden width round(mlp_ratio * dim)."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0, bias: bool = False, dropout: float = 0.0):
        super().__init__()
        hidden = max(1, int(round(mlp_ratio * dim)))
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(F.gelu(self.fc1(x))))


# ---------------------------------------------------------------------------------------------------------
# PoM block
# ---------------------------------------------------------------------------------------------------------

class PoMCache:
    """Decoding cache of a PoM block: the PoM state and, with a short convolution, its last inputs."""

    def __init__(self, state: PoMState, conv: Optional[torch.Tensor] = None):
        self.state = state
        self.conv = conv

    def tensors(self) -> List[torch.Tensor]:
        return [self.state.sum, self.state.count] + ([] if self.conv is None else [self.conv])

    def select_(self, index: torch.Tensor) -> "PoMCache":
        """Keep (and reorder, repeat) batch rows: every tensor becomes tensor[index] (beam search)."""
        self.state = PoMState(self.state.sum[index], self.state.count[index])
        if self.conv is not None:
            self.conv = self.conv[index]
        return self

    @property
    def length(self) -> int:
        return int(self.state.count.max().item()) if self.state.count.numel() else 0


def pom_causal_step(layer: PoM, x: torch.Tensor, state: PoMState, weight: Optional[torch.Tensor] = None
                    ) -> torch.Tensor:
    """Causal continuation of `state` by x: (B, T, D) -> (B, T, D); updates `state` in place.

    Token t of x sees the state plus x[:, :t + 1], so on an empty state the output is layer(x, mask="causal")
    and the new state is the one that decoding x token by token leaves. T = 1 uses the layer's step kernel.
    weight: (B, T) padding mask (or weights) of the new tokens: padded tokens add nothing to the state.
    """
    if isinstance(layer, PoMRoPE):
        if weight is not None:
            raise ValueError("pom_ext.models: argument 'weight' (padding) is not supported with rotary PoM layers "
                             "yet (rope=None only)")
        return layer.step(x, state) if x.shape[1] == 1 else _rope_causal_step(layer, x, state)
    if x.shape[1] == 1:
        return layer.step(x, state, weight=weight)
    h, s = layer.project(x)
    coeff = layer.po_coeff
    if weight is None and not state.count.is_floating_point():
        if bool((state.count == 0).all()):
            H = PF.aggregate(h, coeff, "causal")
        else:
            sums = state.sum.unsqueeze(1) + torch.cumsum(ops.poly_eval(h, coeff).to(state.sum.dtype), dim=1)
            counts = state.count.unsqueeze(1) + torch.arange(1, x.shape[1] + 1, device=x.device)
            H = (sums / counts.unsqueeze(-1).to(sums.dtype)).to(h.dtype)
        _, new_sum, new_count = PF.state_update(h, coeff, state.sum, state.count)
    else:
        _, new_sum, new_count = PF.weighted_state_update(h, coeff, state.sum, state.count, weight)
        acc = state.sum.dtype
        w = torch.ones(h.shape[:2], dtype=acc, device=h.device) if weight is None else PF.as_weight(weight).to(acc)
        if bool((state.count == 0).all()):
            H = PF.aggregate(h, coeff, "causal", weight=w)
        else:
            sums = state.sum.unsqueeze(1) + torch.cumsum(ops.poly_eval(h.to(acc), coeff).to(acc) * w[..., None], 1)
            counts = (state.count.to(acc).unsqueeze(1) + torch.cumsum(w, 1)).unsqueeze(-1)
            H = torch.where(counts != 0, sums / torch.where(counts != 0, counts, torch.ones_like(counts)),
                            torch.zeros_like(sums)).to(h.dtype)
    with torch.no_grad():
        state.sum.copy_(new_sum)
        state.count.copy_(new_count)
    return layer.ag_proj(PF.select(s, H, layer.n_sel_heads))


def _rope_causal_step(layer: PoMRoPE, x: torch.Tensor, state: PoMState) -> torch.Tensor:
    """pom_causal_step of a 1-D rotary layer: the T tokens at positions count .. count + T - 1 of every row."""
    if layer.rope_2d:
        raise ValueError("pom_ext.models: decoding a 2-D rotary PoM layer (rope='2d') needs the grid positions of "
                         "every new token; call the layer's step with positions_hw")
    B, T = x.shape[0], x.shape[1]
    pos = layer._positions("positions", state.count[:, None] + torch.arange(T, device=x.device), B, T, x.device,
                           None)
    h, s = layer.project(x)
    cos, sin = layer._tables(gate=False)
    p = reference.rotate(ops.poly_eval(h.to(state.sum.dtype), layer.po_coeff), cos, sin, pos)
    sums = state.sum.unsqueeze(1) + torch.cumsum(p, dim=1)
    counts = state.count.unsqueeze(1) + torch.arange(1, T + 1, device=x.device)
    H = (sums / counts.unsqueeze(-1).to(sums.dtype)).to(h.dtype)
    with torch.no_grad():
        state.sum.copy_(sums[:, -1])
        state.count.add_(T)
    return layer.ag_proj(PF.select(layer._turn_gate(s, pos), H, layer.n_sel_heads))


def grid_positions(grid, cls_token: bool = False) -> torch.Tensor:
    """(row, column) of the patches of a (rows, columns) grid in raster order, (N, 2) int64; a class token first at
    (0, 0) when cls_token."""
    rows, cols = grid
    idx = torch.arange(rows * cols)
    pos = torch.stack([idx // cols, idx % cols], -1)
    return torch.cat([torch.zeros(1, 2, dtype=pos.dtype), pos]) if cls_token else pos


class PolymorpherBlock(nn.Module):
    """Pre-norm residual PoM + MLP: a drop-in transformer block with linear-time token mixing.

    x + PoM(conv(norm1(x)), mask) then x + MLP(norm2(x)). conv_size > 1 adds a causal depthwise
    convolution over the last conv_size tokens before the PoM (local order; a fixed-size decoding buffer).
    conv_skip=True adds d ⊙ u to the mixer's output, u = conv(norm1(x)) the mixer's input and d a learned
    per-channel weight (`skip`, zeros at init, so the block starts as without it): the local features reach the
    residual stream directly, not only through the gate (Mamba's D skip; docs/models.md measures what it gives).
    forward(x: (B, N, D), mask=None | "causal" | (B, N) | (B, T, N), block_size=None) -> (B, N, D).
    rope: None, "1d" (rotary positions 0..N-1 in the mixer, PoMRoPE with max_seq_len = rope_max_len) or "2d"
    (rotary positions over a fixed patch grid `rope_grid` = (rows, columns), patches in raster order, after a class
    token at (0, 0) when rope_cls_token).
    Scriptable with torch.jit.script without rope (forward only; step keeps Python caches).
    """

    kind = "P"
    use_rope: Final[bool]

    def __init__(self, dim: int, degree: int = 2, expand: int = 2, n_sel_heads: int = 1, n_groups: int = 1,
                 mlp_ratio: float = 4.0, conv_size: int = 0, bias: bool = False, dropout: float = 0.0,
                 rope: Optional[str] = None, rope_max_len: int = 4096, rope_grid=None, rope_cls_token: bool = False,
                 rope_base: float = 10000.0, conv_skip: bool = False):
        super().__init__()
        owner = "pom_ext.models.PolymorpherBlock"
        check_int(owner, "dim", dim, 1)
        check_bool(owner, "conv_skip", conv_skip)
        check_int(owner, "conv_size", conv_size, 0)
        check_rate(owner, "dropout", dropout)
        if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, (int, float)) or mlp_ratio < 0:
            raise ValueError(f"{owner}: argument 'mlp_ratio' must be a number >= 0, got {mlp_ratio!r}")
        if rope not in (None, "1d", "2d"):
            raise ValueError(f"{owner}: argument 'rope' must be None, '1d' or '2d', got {rope!r}")
        if rope == "2d" and (not isinstance(rope_grid, (tuple, list)) or len(rope_grid) != 2 or
                             any(isinstance(g, bool) or not isinstance(g, int) or g < 1 for g in rope_grid)):
            raise ValueError(f"{owner}: argument 'rope_grid' must be (rows, columns) of the patch grid with "
                             f"rope='2d', got {rope_grid!r}")
        self.dim, self.conv_size = dim, conv_size
        self.norm1 = nn.LayerNorm(dim)
        self.conv = nn.Conv1d(dim, dim, conv_size, groups=dim, bias=True) if conv_size > 1 else None
        self.use_rope = rope is not None
        self.rope = rope
        if rope is None:
            self.mixer = PoM(dim, degree, expand, n_groups=n_groups, n_sel_heads=n_sel_heads, bias=bias)
            self.positions_hw = None
        elif rope == "1d":
            self.mixer = PoMRoPE(dim, degree, expand, n_groups, n_sel_heads, bias, max_seq_len=rope_max_len,
                                 rope_base=rope_base)
            self.positions_hw = None
        else:
            self.mixer = PoMRoPE(dim, degree, expand, n_groups, n_sel_heads, bias, max_h=rope_grid[0],
                                 max_w=rope_grid[1], rope_base=rope_base, rope_2d=True)
            self.register_buffer("positions_hw", grid_positions(rope_grid, rope_cls_token), persistent=False)
        self.drop = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(dim) if mlp_ratio > 0 else None
        self.mlp = MLP(dim, mlp_ratio, bias, dropout) if mlp_ratio > 0 else None
        if conv_skip:
            self.skip = nn.Parameter(torch.zeros(dim))
        else:
            self.register_parameter("skip", None)

    def _skip(self, y: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """The mixer's output y plus skip ⊙ u (u: the mixer's input) when the block has the skip."""
        skip = self.skip
        return y if skip is None else y + skip.to(u.dtype) * u

    def _conv(self, u: torch.Tensor) -> torch.Tensor:
        if self.conv is None:
            return u
        # self.conv's parameters through the native op, in the (B, T, D) layout (no transposes).
        return ops.causal_conv1d(u, self.conv.weight.reshape(self.dim, self.conv_size), self.conv.bias)

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.mlp is None else x + self.mlp(self.norm2(x))

    def forward(self, x: torch.Tensor, mask: PF.Mask = None, block_size: Optional[int] = None,
                weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """weight: (B, N) padding mask (0 / False on padded tokens) or token weights: padded tokens enter neither
        the convolution nor the PoM mean, so each row gives what it gives alone (left or right padding)."""
        u = self.norm1(x)
        if weight is not None:
            u = u * (weight != 0).unsqueeze(-1).to(u.dtype)
        u = self._conv(u)
        if self.use_rope:
            if weight is not None:
                raise ValueError("pom_ext.models.PolymorpherBlock: argument 'weight' (padding) is not supported "
                                 "with rotary PoM layers yet (rope=None only)")
            y = self.mixer(u, mask=mask, block_size=block_size, positions_hw=self.positions_hw)
        else:
            y = self.mixer(u, mask=mask, block_size=block_size, weight=weight)
        return self._mlp(x + self.drop(self._skip(y, u)))

    def allocate_cache(self, batch_size: int, device=None, dtype: Optional[torch.dtype] = None) -> PoMCache:
        device = self.mixer.po_coeff.device if device is None else device
        dtype = self.mixer.po_coeff.dtype if dtype is None else dtype
        conv = None
        if self.conv is not None:
            conv = torch.zeros(batch_size, self.conv_size - 1, self.dim, device=device, dtype=dtype)
        return PoMCache(self.mixer.allocate_state(batch_size, device), conv)

    def step(self, x: torch.Tensor, cache: PoMCache, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B, T, D) causal continuation of `cache` (updated in place) -> (B, T, D); weight: (B, T) padding
        mask of the new tokens (padded ones enter neither the convolution buffer nor the state), or None."""
        u = self.norm1(x)
        if weight is not None:
            u = u * (weight != 0).unsqueeze(-1).to(u.dtype)
        if self.conv is not None:
            full = torch.cat([cache.conv.to(u.dtype), u], dim=1)
            with torch.no_grad():
                cache.conv.copy_(full[:, -(self.conv_size - 1):])
            u = self.conv(full.transpose(1, 2)).transpose(1, 2)
        x = x + self._skip(pom_causal_step(self.mixer, u, cache.state, weight), u)
        return self._mlp(x)


# ---------------------------------------------------------------------------------------------------------
# Attention block
# ---------------------------------------------------------------------------------------------------------

class KVCache:
    """Keys and values (B, H, L, hd) of the positions [pos - L, pos); L <= window when the attention is local.
    valid: (B, L) bool, False on padded positions (None: no padding seen)."""

    def __init__(self, window: Optional[int] = None):
        self.k: Optional[torch.Tensor] = None
        self.v: Optional[torch.Tensor] = None
        self.valid: Optional[torch.Tensor] = None
        self.pos = 0
        self.window = window

    def tensors(self) -> List[torch.Tensor]:
        return ([] if self.k is None else [self.k, self.v]) + ([] if self.valid is None else [self.valid])

    def select_(self, index: torch.Tensor) -> "KVCache":
        """Keep (and reorder, repeat) batch rows: every tensor becomes tensor[index] (beam search)."""
        if self.k is not None:
            self.k, self.v = self.k[index], self.v[index]
        if self.valid is not None:
            self.valid = self.valid[index]
        return self

    @property
    def length(self) -> int:
        return self.pos


def rotary(x: torch.Tensor, offset: int, base: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding of x: (B, H, T, hd) at positions offset .. offset + T - 1."""
    T, hd = x.shape[-2], x.shape[-1]
    inv = base ** (-torch.arange(0, hd, 2, device=x.device, dtype=torch.float32) / hd)
    angle = torch.arange(offset, offset + T, device=x.device, dtype=torch.float32)[:, None] * inv
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


class Attention(nn.Module):
    """Multi-head self-attention with rotary positions and optional local (sliding-window) attention.

    window=w: a causal query sees its last w positions (itself included); a non-causal one those at distance < w.
    Uses flash_attn_func when flash-attn is importable and the inputs are fp16/bf16 on CUDA, SDPA otherwise.
    """

    def __init__(self, dim: int, n_heads: int, window: Optional[int] = None, bias: bool = False,
                 rope: bool = True, dropout: float = 0.0):
        super().__init__()
        owner = "pom_ext.models.Attention"
        check_int(owner, "n_heads", n_heads, 1)
        check_optional_int(owner, "window", window, 1)
        if dim % n_heads or (rope and (dim // n_heads) % 2):
            raise ValueError(f"{owner}: argument 'n_heads' ({n_heads}) must divide dim ({dim})"
                             + (" into an even head size (rotary embedding)" if rope else ""))
        self.dim, self.n_heads, self.head_dim = dim, n_heads, dim // n_heads
        self.window, self.rope, self.dropout = window, rope, dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)

    def _qkv(self, x: torch.Tensor, offset: int):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.rope:
            q, k = rotary(q, offset), rotary(k, offset)
        return q, k, v

    def _window_mask(self, qpos: torch.Tensor, kpos: torch.Tensor, causal: bool) -> Optional[torch.Tensor]:
        d = qpos[:, None] - kpos[None, :]
        allowed = None
        if causal:
            allowed = d >= 0
        if self.window is not None:
            near = (d < self.window) if causal else (d.abs() < self.window)
            allowed = near if allowed is None else allowed & near
        return allowed

    def _sdpa(self, q, k, v, allowed: Optional[torch.Tensor]) -> torch.Tensor:
        p = self.dropout if self.training else 0.0
        if allowed is None:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        visible = allowed.any(-1, keepdim=True)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed | ~visible, dropout_p=p)
        return torch.where(visible, out, torch.zeros_like(out)) if not bool(visible.all()) else out

    def _flash_ok(self, q: torch.Tensor) -> bool:
        return flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)

    def forward(self, x: torch.Tensor, mask=None, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B, N, D), mask None | "causal" | (B, N) key padding/weights | (B, T, N) -> (B, N, D); weight: (B, N)
        key padding (0 / False: padded) with mask None or "causal"."""
        B, N, _ = x.shape
        q, k, v = self._qkv(x, 0)
        causal = isinstance(mask, str)
        if causal and mask != "causal":
            raise ValueError(f"pom_ext.models.Attention: argument 'mask' must be None, 'causal' or a tensor, "
                             f"got {mask!r}")
        if weight is not None:
            if isinstance(mask, torch.Tensor):
                raise ValueError("pom_ext.models.Attention: argument 'weight' must be None when 'mask' is a tensor")
            if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (B, N):
                raise ValueError(f"pom_ext.models.Attention: argument 'weight' must be a (B, N) = {(B, N)} padding "
                                 f"mask, got {getattr(weight, 'shape', type(weight))}")
            mask = mask if causal else weight
        if weight is None and (mask is None or causal) and self._flash_ok(q):
            w = -1 if self.window is None else self.window - 1
            out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                  dropout_p=self.dropout if self.training else 0.0, causal=causal,
                                  window_size=(w, 0 if causal else w)).transpose(1, 2)
        elif causal and self.window is None and weight is None:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                                 is_causal=True)
        else:
            pos = torch.arange(N, device=x.device)
            allowed = self._window_mask(pos, pos, causal)
            if causal and weight is not None:
                keys = (weight != 0)[:, None, None, :]
                allowed = keys if allowed is None else allowed & keys
            if isinstance(mask, torch.Tensor):
                if mask.dim() == 2 and tuple(mask.shape) == (B, N):
                    m = (mask > 0)[:, None, None, :]
                elif mask.dim() == 3 and tuple(mask.shape) == (B, N, N):
                    m = (mask > 0)[:, None]
                else:
                    raise ValueError(f"pom_ext.models.Attention: argument 'mask' must be (B, N) = {(B, N)} or "
                                     f"(B, N, N), got shape {tuple(mask.shape)}")
                allowed = m if allowed is None else m & allowed
            elif mask is not None and not causal:
                raise ValueError(f"pom_ext.models.Attention: argument 'mask' must be None, 'causal' or a "
                                 f"tensor, got {type(mask).__name__}")
            out = self._sdpa(q, k, v, allowed)
        return self.proj(out.transpose(1, 2).reshape(B, N, self.dim))

    def step(self, x: torch.Tensor, cache: KVCache, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B, T, D) causal continuation of `cache` (updated) -> (B, T, D); weight: (B, T) padding mask of the
        new tokens (padded keys are never attended to), or None."""
        B, T, _ = x.shape
        q, k, v = self._qkv(x, cache.pos)
        valid = cache.valid
        if weight is not None or valid is not None:
            new = torch.ones(B, T, dtype=torch.bool, device=x.device) if weight is None else weight != 0
            old = cache.k.shape[2] if cache.k is not None else 0
            if valid is None:
                valid = torch.ones(B, old, dtype=torch.bool, device=x.device)
            valid = torch.cat([valid, new], 1)
        if cache.k is not None:
            k, v = torch.cat([cache.k, k], dim=2), torch.cat([cache.v, v], dim=2)
        L = k.shape[2]
        end = cache.pos + T
        allowed = None
        if T > 1 or (self.window is not None and L > self.window):
            allowed = self._window_mask(torch.arange(cache.pos, end, device=x.device),
                                        torch.arange(end - L, end, device=x.device), causal=True)
        if valid is not None:
            keys = valid[:, None, None, :]
            allowed = keys if allowed is None else allowed & keys
        out = self._sdpa(q, k, v, allowed)
        if self.window is not None and L > self.window:
            k, v = k[:, :, -self.window:], v[:, :, -self.window:]
            valid = None if valid is None else valid[:, -self.window:]
        cache.k, cache.v, cache.pos, cache.valid = k, v, end, valid
        return self.proj(out.transpose(1, 2).reshape(B, T, self.dim))


class AttentionBlock(nn.Module):
    """Pre-norm residual multi-head attention + MLP (the transformer block), optionally local (window)."""

    kind = "A"

    def __init__(self, dim: int, n_heads: int, window: Optional[int] = None, mlp_ratio: float = 4.0,
                 bias: bool = False, dropout: float = 0.0, rope: bool = True):
        super().__init__()
        check_rate("pom_ext.models.AttentionBlock", "dropout", dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.mixer = Attention(dim, n_heads, window=window, bias=bias, rope=rope, dropout=dropout)
        self.drop = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(dim) if mlp_ratio > 0 else None
        self.mlp = MLP(dim, mlp_ratio, bias, dropout) if mlp_ratio > 0 else None

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.mlp is None else x + self.mlp(self.norm2(x))

    def forward(self, x: torch.Tensor, mask=None, *, block_size: Optional[int] = None,
                weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        if block_size is not None:
            raise ValueError("pom_ext.models.AttentionBlock: argument 'block_size' is not supported by attention "
                             "layers (use mask='causal')")
        return self._mlp(x + self.drop(self.mixer(self.norm1(x), mask=mask, weight=weight)))

    def allocate_cache(self, batch_size: int, device=None, dtype: Optional[torch.dtype] = None) -> KVCache:
        return KVCache(self.mixer.window)

    def step(self, x: torch.Tensor, cache: KVCache, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self._mlp(x + self.mixer.step(self.norm1(x), cache, weight))


def build_blocks(dim: int, pattern: str, *, degree: int, expand: int, n_sel_heads: int, n_groups: int,
                 mlp_ratio: float, conv_size: int, n_heads: Optional[int], window: Optional[int], bias: bool,
                 dropout: float, owner: str, conv_skip: bool = False, **rope) -> nn.ModuleList:
    """One block per character of pattern ('P': PolymorpherBlock, 'A': AttentionBlock)."""
    if "A" in pattern:
        if n_heads is None:
            n_heads = max(1, dim // 64)
        check_int(owner, "n_heads", n_heads, 1)
    elif window is not None:
        raise ValueError(f"{owner}: argument 'window' applies to attention layers, but the layer pattern "
                         f"{pattern!r} has none")
    check_optional_int(owner, "window", window, 1)
    blocks = []
    for kind in pattern:
        if kind == "P":
            blocks.append(PolymorpherBlock(dim, degree, expand, n_sel_heads, n_groups, mlp_ratio, conv_size,
                                           bias, dropout, conv_skip=conv_skip, **rope))
        else:
            blocks.append(AttentionBlock(dim, n_heads, window, mlp_ratio, bias, dropout))
    return nn.ModuleList(blocks)


def init_weights(module: nn.Module, depth: int) -> None:
    """Normal(0, 0.02) linear and embedding weights, residual output projections scaled by 1/sqrt(2 depth).

    The PoM layers keep their reference initialization.
    """
    skip = {id(sub) for m in module.modules() if isinstance(m, PoM) for sub in m.modules()}
    for name, m in module.named_modules():
        if id(m) in skip:
            continue
        if isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
        elif isinstance(m, nn.Linear):
            residual = name.endswith(("mlp.fc2", "mixer.proj"))
            nn.init.normal_(m.weight, std=0.02 / math.sqrt(2 * depth) if residual else 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
