"""Context parallelism: one PoM layer with the sequence sharded over the ranks of a torch.distributed group.

Rank r of P holds the contiguous global tokens [o_r, o_r + n_r) of every sequence (uneven slices allowed,
n_r = 0 too). PoM's whole context is a sum of width E, so the ranks exchange per-rank sums, never tokens:

    S_r = sum over rank r's tokens of w p          (B, E); w = 1, or the (B, N) weights sharded with the tokens
    none / weights   H = sum_q S_q / sum_q W_q       W_q = rank q's token count, or its sum of weights
    causal, block F  H_t = (P_r + C_t + X_r [e_t > o_r + n_r]) / e_t
                     e_t = min(N, (g // F + 1) F) the end of global token g = o_r + t's block (F = 1: g + 1),
                     P_r = sum_{q < r} S_q the exclusive prefix of the earlier ranks, C_t the sum of the local
                     tokens before min(e_t, o_r + n_r), X_r the tokens of later ranks inside rank r's last block
                     when that block straddles the boundary (the sum of their heads: the local tokens before
                     the end of the block holding their first token)
    packed varlen    the same per sequence b of the batch's cu_seqlens: S_{q,b}, P_{r,b}, counts from cu_seqlens,
                     blocks aligned at each sequence's start

One all_gather of the (B, E) sums (two (B, E) rows for block-causal with F > 1) per layer forward; its backward
is one all_reduce of the gradient of the gathered (P, B, E) tensor, each rank keeping its own row. Summing in
rank order after the gather gives every rank the same H bit for bit, and the same result on every run.

Before that, every call all-gathers a small int64 metadata row (the mask kind, batch, width, dtype, block
size, local token counts, which rotary positions are the defaults, a local error flag) and checks it, so ranks
that disagree raise the same ValueError on every rank instead of waiting in mismatched collectives.

Rotary layers (PoMRoPE): every rank rotates its features at their global positions (by default its offset
o_r onwards, restarting in every packed sequence; or its slice of the positions, given), so the exchanged sums
are sums of rotated features and nothing else changes.

Models (ContextParallelLM, ContextParallelEncoder) add a halo exchange for the short causal convolution: the last
conv_size - 1 inputs of the earlier ranks. The attention layers of hybrid stacks gather every rank's keys and
values. docs/distributed.md has the bytes per layer.
"""
import functools
from typing import List, Optional, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from . import functional as PF
from . import ops
from .layers import PoM, PoMState
from .rope import PoMRoPE

_ROPE_ARGS = ("positions", "ctx_positions", "positions_hw", "ctx_positions_hw")

__all__ = ["context_parallel_pom", "ContextParallelPoM", "ContextParallelLM", "ContextParallelEncoder",
           "token_range"]

_DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
_KINDS = ["none", "weights", "causal", "varlen", "varlen_causal"]
_KIND_NAMES = {"none": "None", "weights": "a (B, N) tensor", "causal": "'causal'",
               "varlen": "None with cu_seqlens", "varlen_causal": "'causal' with cu_seqlens"}
# metadata row: error flag, kind, batch, D, E, K, G, dtype, block size, cross, context tokens, query tokens,
# gradients needed, rotary default positions (bit 1: the context's, bit 2: the queries'), the layer's rotary tables
# (0: none, -1: 2-D, else the 1-D max_seq_len)
_META = 15


def _fail(arg: str, message: str) -> None:
    raise ValueError(f"pom_ext.distributed: argument '{arg}' {message}")


def token_range(total: int, world_size: int, rank: int) -> Tuple[int, int]:
    """[start, end) of rank `rank`'s contiguous slice when `total` tokens are split as evenly as possible (the
    first total % world_size ranks hold one token more)."""
    for name, value, low in (("total", total, 0), ("world_size", world_size, 1), ("rank", rank, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            _fail(name, f"must be an integer >= {low}, got {value!r}")
    if rank >= world_size:
        _fail("rank", f"must be below world_size = {world_size}, got {rank}")
    base, extra = divmod(total, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


class _Gather(torch.autograd.Function):
    """x (...) on every rank -> (P, ...) the ranks' x in rank order; backward: one all_reduce of the gradient,
    each rank keeping its own row (the sum over ranks of d loss_q / d x_r)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x, group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)  # reduced in place: never autograd's buffer
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[dist.get_rank(ctx.group)], None


def _gather(x: torch.Tensor, group) -> torch.Tensor:
    return _Gather.apply(x, group)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _kind(mask, packed: bool) -> str:
    if packed:
        if mask is None:
            return "varlen"
        if PF.is_causal(mask):
            return "varlen_causal"
        _fail("mask", f"must be None or 'causal' with cu_seqlens, got {_describe(mask)}")
    if mask is None:
        return "none"
    if PF.is_causal(mask):
        return "causal"
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        return "weights"
    if isinstance(mask, torch.Tensor) and mask.dim() == 3:
        _fail("mask", "must be None, 'causal' or a (B, N) tensor: a (B, T, N) mask is not supported with the "
                      "context sharded (it is O(T N) and has no sum to exchange)")
    _fail("mask", f"must be None, 'causal' or a (B, N) tensor, got {_describe(mask)}")


def _describe(mask) -> str:
    if isinstance(mask, torch.Tensor):
        return f"a tensor of shape {tuple(mask.shape)}"
    return repr(mask)


def _local_checks(layer, xq, xc, mask, block_size, cu_seqlens, return_state, rope: dict,
                  prepared: dict) -> List[int]:
    """The arguments of this rank alone; returns its metadata row (raises ValueError naming the argument) and
    puts the rope ops' form of the rotary positions given into `prepared` (see _rope_local)."""
    if not isinstance(layer, PoM):
        _fail("layer", f"must be a pom_ext.PoM, got {type(layer).__name__}")
    packed = cu_seqlens is not None
    if xc is xq:
        xc = None
    layer._check_x("xq", xq, packed)
    if xc is not None:
        layer._check_x("xc", xc, packed)
    kind = _kind(mask, packed)
    if return_state and kind == "weights":
        _fail("return_state", "is not supported with a (B, N) weight mask (the state counts tokens)")
    if block_size is not None:
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            _fail("block_size", f"must be an integer >= 1, got {block_size!r}")
        if not PF.is_causal(mask):
            _fail("block_size", f"is given only with mask='causal', got mask={_describe(mask)}")
    ctx = xq if xc is None else xc
    if packed:
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2 or \
                cu_seqlens.dtype not in (torch.int32, torch.int64):
            got = f"{cu_seqlens.dtype} of shape {tuple(cu_seqlens.shape)}" if isinstance(cu_seqlens, torch.Tensor) \
                else type(cu_seqlens).__name__
            _fail("cu_seqlens", f"must be a 1-D int32 or int64 tensor (B + 1,) of offsets, got {got}")
        if cu_seqlens.device != xq.device:
            _fail("cu_seqlens", f"must be on {xq.device} like 'xq', got {cu_seqlens.device}")
        batch = cu_seqlens.shape[0] - 1
        if xc is not None and xc.shape[0] != xq.shape[0]:
            _fail("xc", f"must hold as many packed tokens as 'xq' on this rank, got {xc.shape[0]} and "
                        f"{xq.shape[0]}")
        n, t = ctx.shape[0], xq.shape[0]
    else:
        batch = xq.shape[0]
        if xc is not None and xc.shape[0] != batch:
            _fail("xc", f"must have the batch size of 'xq', got {xc.shape[0]} and {batch}")
        n, t = ctx.shape[1], xq.shape[1]
        if kind == "causal" and t != n:
            _fail("xq", f"must hold as many tokens as 'xc' on this rank with mask='causal', got {t} and {n}")
        if kind == "weights":
            if tuple(mask.shape) != (batch, n):
                _fail("mask", f"must be this rank's (B, n) = {(batch, n)} slice of the weights, got shape "
                              f"{tuple(mask.shape)}")
            if mask.dtype != torch.bool and not mask.is_floating_point():
                _fail("mask", f"must be bool or floating point, got {mask.dtype}")
            if mask.device != xq.device:
                _fail("mask", f"must be on {xq.device} like 'xq', got {mask.device}")
    flags = _rope_local(layer, xq, xc, rope, cu_seqlens, 0 if packed else batch, n, t, prepared)
    return [0, _KINDS.index(kind), batch, layer.dim, layer.state_width, layer.degree, layer.n_sel_heads,
            _DTYPES.index(xq.dtype) if xq.dtype in _DTYPES else len(_DTYPES),
            1 if block_size is None else block_size, int(xc is not None), n, t, int(_needs_grad(layer, xq, xc)),
            flags, _rotary_kind(layer)]


def _rotary_kind(layer) -> int:
    """The metadata row's last column: 0 for a layer without rotary positions, -1 for 2-D tables, else the 1-D
    tables' length (what _check_rope_defaults checks against)."""
    if not isinstance(layer, PoMRoPE):
        return 0
    return -1 if layer.rope_2d else layer.max_seq_len


def _rope_local(layer, xq, xc, rope: dict, cu_seqlens, B: int, n: int, t: int, prepared: dict) -> int:
    """Checks this rank's rotary position arguments (shapes, dtype, device, values against the tables), before
    any exchange; puts (context, query positions or None where the default global ones apply, whether the
    queries take the context's) into prepared["rope"]; returns the default bits of the metadata row (1: the
    context, 2: the queries; their global positions are checked on the gathered table: _check_rope_defaults)."""
    given = [k for k in _ROPE_ARGS if rope.get(k) is not None]
    if not isinstance(layer, PoMRoPE):
        if given:
            _fail(given[0], "applies to rotary layers (pom_ext.PoMRoPE)")
        return 0
    dev = xq.device
    qp, cp, qname, cname = layer._position_args(rope.get("positions"), rope.get("ctx_positions"),
                                                rope.get("positions_hw"), rope.get("ctx_positions_hw"), xc is None)
    flags, cpos, qpos = 0, None, None
    if cp is None and not layer.rope_2d:
        flags |= 1
    else:  # given (a 2-D layer without positions raises here)
        cpos = layer._positions(cname, cp, B, n, dev, cu_seqlens)
    one = xc is None and (rope.get(qname) is None or cp is rope.get(qname))
    if not one:
        if qp is None and not layer.rope_2d:
            flags |= 2
        else:
            qpos = layer._positions(qname, qp, B, t, dev, cu_seqlens)
    prepared["rope"] = (cpos, qpos, one)
    return flags


def _reach(offset: int, count: int, cu: Optional[List[int]]) -> int:
    """The largest default global position of the tokens [offset, offset + count) (packed: the position inside
    each sequence), -1 for none."""
    if count <= 0:
        return -1
    if cu is None:
        return offset + count - 1
    end = offset + count
    return max((min(b, end) - 1 - a for a, b in zip(cu, cu[1:]) if a < end and b > offset), default=-1)


def _check_rope_defaults(layer, table: torch.Tensor, cu: Optional[List[int]]) -> None:
    """Identical checks on every rank, over the gathered table, before any exchange of data: the default global
    positions that any rank takes (column 13) must index the rotary tables."""
    if not isinstance(layer, PoMRoPE) or layer.rope_2d:
        return
    cross = bool(table[0, 9])
    for bit, column, name in ((1, 10, "ctx_positions" if cross else "positions"), (2, 11, "positions")):
        counts = table[:, column].tolist()
        reach = {r: _reach(sum(counts[:r]), counts[r], cu) for r in range(len(counts))
                 if int(table[r, 13]) & bit}
        over = [r for r, v in reach.items() if v >= layer.max_seq_len]
        if over:
            where = "inside its packed sequence" if cu is not None else f"of {sum(counts)} tokens over all ranks"
            _fail(name, f"must be given, or the default global positions must be in [0, max_seq_len = "
                        f"{layer.max_seq_len}) (build the layer with a larger max_seq_len): the positions "
                        f"{where} reach {max(reach[r] for r in over)} on rank(s) {over}")


def _needs_grad(layer, xq, xc) -> bool:
    """Whether this call builds a graph: then every rank's backward must run the gather's one collective."""
    if not torch.is_grad_enabled():
        return False
    return xq.requires_grad or (xc is not None and xc.requires_grad) or \
        any(p.requires_grad for p in layer.parameters())


def _agree(table: torch.Tensor, column: int, arg: str, what: str, show=str) -> None:
    values = table[:, column].tolist()
    if len(set(values)) > 1:
        per_rank = ", ".join(f"{show(v)} on rank {r}" for r, v in enumerate(values))
        _fail(arg, f"must agree on every rank: the ranks disagree on {what} ({per_rank})")


def _gather_ints(values: List[int], group, device) -> torch.Tensor:
    """All-gathers a few integers of every rank -> (P, len(values)) int64 on the CPU (no autograd)."""
    mine = torch.tensor(values, dtype=torch.int64)
    if dist.get_backend(group) != "gloo":  # gloo gathers CPU tensors; NCCL needs them on the device
        mine = mine.to(device)
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, mine, group=group)
    return torch.stack(parts).cpu()


def _check_table(table: torch.Tensor) -> None:
    """Identical checks on every rank over the gathered metadata: every rank raises the same error."""
    _agree(table, 1, "mask", "the mask kind", lambda k: _KIND_NAMES[_KINDS[k]])
    _agree(table, 2, "xq", "the batch size (the number of sequences with cu_seqlens)")
    _agree(table, 3, "layer", "the model width D")
    _agree(table, 4, "layer", "the state width E")
    _agree(table, 5, "layer", "the degree")
    _agree(table, 6, "layer", "n_sel_heads")
    _agree(table, 7, "xq", "the dtype", lambda d: str(_DTYPES[d]) if d < len(_DTYPES) else "another dtype")
    _agree(table, 8, "block_size", "the block size")
    _agree(table, 9, "xc", "cross-mixing", lambda v: "xc given" if v else "xc None")
    _agree(table, 12, "xq", "whether gradients are recorded (torch.no_grad, requires_grad)",
           lambda v: "recorded" if v else "not recorded")
    _agree(table, 14, "layer", "the rotary positions (a plain PoM, or PoMRoPE and its tables)",
           lambda v: "PoM" if v == 0 else "PoMRoPE 2-D" if v < 0 else f"PoMRoPE 1-D, max_seq_len {v}")


def _checked_exchange(check, width: int, device, group) -> torch.Tensor:
    """Runs this rank's checks (`check()` returns its metadata row of `width` integers, the first 0, or raises
    ValueError) and all-gathers the rows (where the checks failed: 1, the length of the error message, then -1);
    if any rank failed, every rank then all-gathers the failed ranks' messages: a rank whose checks failed raises
    its error, every other rank a ValueError saying which rank did and quoting its message (so it names the
    argument too)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("pom_ext.distributed: torch.distributed is not initialized (call "
                           "torch.distributed.init_process_group first)")
    error = None
    try:
        row = check()
    except ValueError as e:
        error, row = e, None
    text = list(str(error).encode()) if error is not None else []
    table = _gather_ints(row if row is not None else [1, len(text)] + [-1] * (width - 2), group, device)
    bad = [r for r in range(table.shape[0]) if table[r, 0] != 0]
    if not bad:
        return table
    # every rank gathers the rejecting ranks' messages (a second collective, on this path only)
    longest = max(1, max(int(table[r, 1]) for r in bad))
    texts = _gather_ints(text + [0] * (longest - len(text)), group, device)
    if error is not None:
        raise error
    first = bytes(texts[bad[0], :int(table[bad[0], 1])].tolist()).decode(errors="replace")
    raise ValueError(f"pom_ext.distributed: rank(s) {bad} rejected their arguments; every rank stops. Rank "
                     f"{bad[0]}: {first}")


def _plan(layer, xq, xc, mask, block_size, cu_seqlens, return_state, group, rope: dict, prepared: dict):
    """Runs the local checks, exchanges and checks the metadata; returns (table, cu_seqlens list or None). Every
    check that can fail is here, before any exchange of data."""
    device = xq.device if isinstance(xq, torch.Tensor) else torch.device("cpu")
    table = _checked_exchange(lambda: _local_checks(layer, xq, xc, mask, block_size, cu_seqlens, return_state,
                                                    rope, prepared), _META, device, group)
    _check_table(table)
    if cu_seqlens is None:
        _check_rope_defaults(layer, table, None)
        return table, None
    cu = _gather_ints(cu_seqlens.to(torch.int64).cpu().tolist(), group, device)
    if not bool((cu == cu[0]).all()):
        differ = [r for r in range(cu.shape[0]) if not torch.equal(cu[r], cu[0])]
        _fail("cu_seqlens", f"must be the same offsets of the whole batch on every rank; ranks {differ} differ "
                            f"from rank 0")
    cu = cu[0].tolist()
    total = int(table[:, 10].sum())
    if cu[0] != 0 or cu[-1] != total or any(b < a for a, b in zip(cu, cu[1:])):
        _fail("cu_seqlens", f"must be non-decreasing offsets from 0 to {total}, the packed tokens of all ranks "
                            f"together (local counts {table[:, 10].tolist()}), got {cu}")
    _check_rope_defaults(layer, table, cu)
    return table, cu


class _Local:
    """The layer's local aggregations: the plain ops, or for a rotary layer the rope ops at the context's global
    positions `cpos` (the rope ops' (n, S) form; `pad` zero rows in front take position 0: p(0) = 0)."""

    def __init__(self, layer, cpos: Optional[torch.Tensor]):
        self.layer, self.cpos = layer, cpos
        if cpos is not None:
            self.cos, self.sin = layer._tables(gate=False)

    def _pos(self, pad: int) -> torch.Tensor:
        return F.pad(self.cpos, (0, 0, pad, 0)) if pad else self.cpos

    def mean(self, ha, weight=None, cu=None, pad: int = 0):
        if self.cpos is None:
            return ops.poly_mean(ha, self.layer.po_coeff, weight, cu)
        return ops.poly_mean_rope(ha, self.layer.po_coeff, self.cos, self.sin, self._pos(pad), weight, cu)

    def causal(self, ha, F_: int, cu=None, pad: int = 0):
        if self.cpos is None:
            return ops.poly_causal(ha, self.layer.po_coeff, F_, cu)
        return ops.poly_causal_rope(ha, self.layer.po_coeff, self.cos, self.sin, self._pos(pad), F_, cu)


def _sum_rows(parts: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """parts[lo] + ... + parts[hi - 1] in rank order: the same bits on every rank. An empty range gives zeros
    that stay in the autograd graph of the gather, so that every rank's backward runs its one collective."""
    if hi <= lo:
        return parts[lo:lo].sum(0)
    out = parts[lo]
    for q in range(lo + 1, hi):
        out = out + parts[q]
    return out


def _mix(layer, s: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """ag_proj(select(s, H)) for per-token H in the accumulation dtype: y = s * H is formed there and rounded
    once to the layer's dtype, as the fused causal op does (a 16-bit H rounded before the product, and the
    product's gradient, would add a rounding each)."""
    return layer.ag_proj(PF.select(s.to(H.dtype), H, layer.n_sel_heads).to(s.dtype))


def _later_heads(heads: torch.Tensor, counts: List[int], rank: int, end: int) -> torch.Tensor:
    """The sum of the heads of the ranks after `rank` whose first token is before global position `end`: the
    tokens of later ranks inside a block that starts on this rank and ends at `end`."""
    inside = sum(1 for q in range(rank + 1, len(counts)) if sum(counts[:q]) < end)
    return _sum_rows(heads, rank + 1, rank + 1 + inside)


def _pooled(layer, h, s, weight, counts: List[int], group, local: _Local) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mask None or this rank's (B, n) weights -> (out, total sum (B, E)). Weighted: the rank's sum of weights
    travels in the same gather as an extra column."""
    acc = _acc(h.dtype)
    B, n, E = h.shape
    ha = h.to(acc)
    if weight is None:
        total = _sum_rows(_gather(local.mean(ha) * n, group), 0, len(counts))
        W = torch.full((B, 1), sum(counts), dtype=acc, device=h.device)
    else:
        w = weight.to(acc)
        wsum = w.sum(1, keepdim=True)
        S = local.mean(ha, w) * wsum
        both = _sum_rows(_gather(torch.cat([S, wsum], 1), group), 0, len(counts))
        total, W = both[:, :E], both[:, E:]
    H = torch.where(W > 0, total / torch.where(W > 0, W, torch.ones_like(W)), torch.zeros_like(total))
    return layer._out(s, H.to(h.dtype)), total


def _causal(layer, h, s, F_: int, counts: List[int], rank, group,
            local: _Local) -> Tuple[torch.Tensor, torch.Tensor]:
    """Block-causal (F_ = 1: token-causal) over the sharded sequence -> (out, total sum (B, E))."""
    B, n, E = h.shape
    acc = _acc(h.dtype)
    o, N = sum(counts[:rank]), sum(counts)
    pad = o % F_
    ha = h.to(acc)
    if pad:  # p(0) = 0: zero rows in front align the local blocks with the global ones
        ha = F.pad(ha, (0, 0, pad, 0))
    idx = torch.arange(pad, pad + n, device=h.device)
    local_end = torch.clamp((idx // F_ + 1) * F_, max=n + pad)
    C = local.causal(ha, F_, None, pad)[:, pad:] * local_end.to(acc)[:, None]
    if n:
        last, head = C[:, -1], C[:, 0]
    else:  # (B, E) zeros, in the autograd graph like the sums of the other ranks
        last = head = C.sum(1)
    parts = _gather(torch.stack([last, head], 1) if F_ > 1 else last.unsqueeze(1), group)
    P = _sum_rows(parts[:, :, 0], 0, rank)
    g = o + torch.arange(n, device=h.device)
    e = torch.clamp((g // F_ + 1) * F_, max=N)
    num = C + P.unsqueeze(1)
    if F_ > 1 and n and int(e[-1]) > o + n:  # the last block goes on into later ranks: add their heads
        X = _later_heads(parts[:, :, 1], counts, rank, int(e[-1]))
        num = num + (e > o + n).to(acc)[:, None] * X.unsqueeze(1)
    return _mix(layer, s, num / e.to(acc)[:, None]), _sum_rows(parts[:, :, 0], 0, len(counts))


def _varlen(layer, h, s, causal: bool, F_: int, cu: List[int], counts: List[int], rank,
            group, local: _Local) -> Tuple[torch.Tensor, torch.Tensor]:
    """Packed sequences (total, E) with the batch's cu_seqlens, crossing rank boundaries, mean or block-causal
    (F_ = 1: token-causal) -> (out, per-sequence sums (B, E)). The causal terms of _causal, per sequence."""
    n, E = h.shape
    acc = _acc(h.dtype)
    o = sum(counts[:rank])
    dev = h.device
    cu_t = torch.tensor(cu, dtype=torch.int64, device=dev)
    local_cu = torch.clamp(cu_t - o, 0, n)
    lengths = local_cu[1:] - local_cu[:-1]
    ha = h.to(acc)
    seq_len = (cu_t[1:] - cu_t[:-1]).to(acc)[:, None]
    if not causal:
        parts = _gather(local.mean(ha, None, local_cu) * lengths.to(acc)[:, None], group)
        total = _sum_rows(parts, 0, len(counts))
        H = torch.where(seq_len > 0, total / seq_len.clamp_min(1), torch.zeros_like(total))
        H = H.repeat_interleave(lengths, dim=0, output_size=n)
        return _mix(layer, s, H), total
    # The sequence holding this rank's first token may have started on an earlier rank: zero rows in front
    # align its local blocks with the global ones (p(0) = 0); the later sequences start here, aligned.
    first = max(b for b in range(len(cu) - 1) if cu[b] <= o) if n else 0
    pad = (o - cu[first]) % F_ if n else 0
    if pad:
        ha = F.pad(ha, (0, 0, pad, 0))
        local_cu = torch.where(torch.arange(len(cu), device=dev) > first, local_cu + pad, local_cu)
    plen = local_cu[1:] - local_cu[:-1]  # piece lengths, padding included
    S = local.mean(ha, None, local_cu, pad) * plen.to(acc)[:, None]
    seq = torch.repeat_interleave(torch.arange(len(cu) - 1, device=dev), lengths, output_size=n)
    j = torch.arange(pad, pad + n, device=dev) - local_cu[seq]  # index inside the (padded) local piece
    local_end = torch.minimum((j // F_ + 1) * F_, plen[seq])
    C = local.causal(ha, F_, local_cu, pad)[pad:] * local_end.to(acc)[:, None]
    if F_ > 1:  # this rank's head: its first token's block inside the first piece
        head = (torch.arange(len(cu) - 1, device=dev) == first).to(acc)[:, None] * C[:1] if n else S
        parts = _gather(torch.stack([S, head], 1), group)
    else:
        parts = _gather(S.unsqueeze(1), group)
    a = cu_t[seq]
    g = o + torch.arange(n, device=dev)
    e = torch.minimum(cu_t[seq + 1], a + ((g - a) // F_ + 1) * F_)  # global end of each token's block
    num = C + _sum_rows(parts[:, :, 0], 0, rank)[seq]
    if F_ > 1 and n and int(e[-1]) > o + n:  # the last block goes on into later ranks: add their heads
        X = _later_heads(parts[:, :, 1], counts, rank, int(e[-1]))[int(seq[-1])]
        num = num + (e > o + n).to(acc)[:, None] * X
    H = num / (e - a).to(acc)[:, None]
    return _mix(layer, s, H), _sum_rows(parts[:, :, 0], 0, len(counts))


def context_parallel_pom(layer: PoM, xq: torch.Tensor, xc: Optional[torch.Tensor] = None,
                         mask: PF.Mask = None, *, block_size: Optional[int] = None,
                         cu_seqlens: Optional[torch.Tensor] = None, group=None,
                         return_state: bool = False, positions: Optional[torch.Tensor] = None,
                         ctx_positions: Optional[torch.Tensor] = None, positions_hw: Optional[torch.Tensor] = None,
                         ctx_positions_hw: Optional[torch.Tensor] = None
                         ) -> Union[torch.Tensor, Tuple[torch.Tensor, PoMState]]:
    """`layer(xq, xc, mask, ...)` with the sequence sharded over the ranks of `group` (default: the world).

    Every rank of the group calls it with the same layer (same parameters) and its contiguous slice, in rank
    order, of the tokens of every sequence: xq: (B, t_r, D) its queries, xc: (B, n_r, D) its context or None
    (self-mixing); mask None, "causal" (block_size F: blocks may straddle rank boundaries) or this rank's
    (B, n_r) slice of the weights / padding; packed: xq (n_r, D) its slice of the packed tokens, cu_seqlens
    (B + 1,) the offsets of the whole batch (the same on every rank), mask None or "causal" (block_size F too).
    Returns this rank's slice of the unsharded output (B, t_r, D) (packed: (n_r, D)); with return_state=True
    also the PoMState of the whole context (every rank gets it: sum (B, E), count (B,)), as after a prefill of
    the unsharded sequence, for decoding on any one rank (not with a (B, N) weight mask).

    Autograd: every rank must run backward through its output (it takes one all_reduce). The input gradients
    are this rank's slice of the unsharded ones; the parameter gradients summed over the ranks (what DDP or
    FSDP reduce) are the unsharded ones. Ranks that disagree (batch, width, dtype, mask kind, block size,
    cu_seqlens) or whose arguments are wrong raise ValueError on every rank.

    A rotary layer (PoMRoPE) takes this rank's slices of its positions: 1-D `positions` (queries) and
    `ctx_positions` (context), default the global positions (this rank's offset onwards; packed: the position
    inside each sequence; self-mixing: one set); 2-D `positions_hw` / `ctx_positions_hw`, required.
    """
    group = dist.group.WORLD if group is None else group
    rope = dict(positions=positions, ctx_positions=ctx_positions, positions_hw=positions_hw,
                ctx_positions_hw=ctx_positions_hw)
    prepared: dict = {}
    table, cu = _plan(layer, xq, xc, mask, block_size, cu_seqlens, return_state, group, rope, prepared)
    return _apply(layer, xq, None if xc is xq else xc, mask, _KINDS[int(table[0, 1])], block_size, cu,
                  table[:, 10].tolist(), group, return_state, prepared.get("rope"), table[:, 11].tolist())


def _rope_positions(xq, xc, prepared: Optional[tuple], counts: List[int], qcounts: List[int], rank: int,
                    cu: Optional[List[int]]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(context, query) positions of this rank in the rope ops' form: the given slices that _rope_local checked
    and converted (`prepared`; None: the models' layers, self-mixing at the default positions), or (1-D) the
    global ones, which _check_rope_defaults (or the model's wrapper) checked against the tables."""
    dev = xq.device
    packed = cu is not None
    if packed:
        cu_t = torch.tensor(cu, dtype=torch.int64, device=dev)

    def global_1d(offset: int, count: int) -> torch.Tensor:
        g = offset + torch.arange(count, device=dev)
        if packed:
            g = g - cu_t[torch.searchsorted(cu_t[1:], g, right=True)]  # the position inside each sequence
        return g[:, None]

    cpos, qpos, one = prepared if prepared is not None else (None, None, xc is None)
    if cpos is None:
        cpos = global_1d(sum(counts[:rank]), counts[rank])
    if one:
        return cpos, cpos
    if qpos is None:
        qpos = global_1d(sum(qcounts[:rank]), xq.shape[0] if packed else xq.shape[1])
    return cpos, qpos


def _apply(layer, xq, xc, mask, kind: str, block_size: Optional[int], cu: Optional[List[int]], counts: List[int],
           group, return_state: bool, rope: Optional[tuple] = None, qcounts: Optional[List[int]] = None):
    """context_parallel_pom after its checks: `kind` of the mask and every rank's context (and query) token
    `counts`; `rope`: a rotary layer's positions as _rope_local prepared them (None: the defaults)."""
    rank = dist.get_rank(group)
    h, s = layer.project(xq, xc)
    cpos = None
    if isinstance(layer, PoMRoPE):
        cpos, qpos = _rope_positions(xq, xc, rope, counts, counts if qcounts is None else qcounts, rank, cu)
        s = layer._turn_gate(s, qpos)
    local = _Local(layer, cpos)
    F_ = 1 if block_size is None else block_size
    if kind in ("none", "weights"):
        out, total = _pooled(layer, h, s, mask if kind == "weights" else None, counts, group, local)
    elif kind == "causal":
        out, total = _causal(layer, h, s, F_, counts, rank, group, local)
    else:
        out, total = _varlen(layer, h, s, kind == "varlen_causal", F_, cu, counts, rank, group, local)
    if not return_state:
        return out
    if cu is None:
        count = torch.full((h.shape[0],), sum(counts), dtype=torch.int64, device=h.device)
    else:
        count = torch.tensor([b - a for a, b in zip(cu, cu[1:])], dtype=torch.int64, device=h.device)
    return out, PoMState(total.to(layer._state_dtype()), count)


class ContextParallelPoM(nn.Module):
    """A PoM layer whose forward runs with the sequence sharded over `group` (see context_parallel_pom).

    ContextParallelPoM(layer, group=None); forward(xq, xc=None, mask=None, block_size=None, cu_seqlens=None)
    with this rank's slices. The wrapped layer's parameters are this module's (`.layer`), so DDP and FSDP
    wrap it as they wrap the layer.
    """

    def __init__(self, layer: PoM, group=None):
        super().__init__()
        if not isinstance(layer, PoM):
            _fail("layer", f"must be a pom_ext.PoM, got {type(layer).__name__}")
        self.layer = layer
        self.group = group

    def forward(self, xq: torch.Tensor, xc: Optional[torch.Tensor] = None, mask: PF.Mask = None,
                block_size: Optional[int] = None, cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
        return context_parallel_pom(self.layer, xq, xc, mask, block_size=block_size, cu_seqlens=cu_seqlens,
                                    group=self.group)

    def prefill(self, xq: torch.Tensor, xc: Optional[torch.Tensor] = None, mask: PF.Mask = None,
                block_size: Optional[int] = None) -> Tuple[torch.Tensor, PoMState]:
        """(this rank's output, the PoMState of the whole sequence on every rank)."""
        return context_parallel_pom(self.layer, xq, xc, mask, block_size=block_size, group=self.group,
                                    return_state=True)


# ---- models: PolymorpherLM and PolymorpherEncoder with the sequence sharded ----

def _halo_conv(block, u: torch.Tensor, counts: List[int], rank: int,
               group) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The block's short causal convolution over this rank's u: (B, n, D), its first outputs reading the last
    conv_size - 1 inputs of the earlier ranks (a halo: one all_gather of (B, conv_size - 1, D) per rank).
    Returns (output, the last conv_size - 1 inputs of the whole sequence: the decoding buffer) (None, None
    without a convolution: u is returned)."""
    if block.conv is None:
        return u, None
    m = block.conv_size - 1
    tail = u[:, max(0, u.shape[1] - m):]
    tail = F.pad(tail, (0, 0, m - tail.shape[1], 0))  # real rows last
    parts = _gather(tail, group)
    # zeros before the first token (the unsharded convolution's padding), kept in the gather's graph
    rows = [_sum_rows(parts, 0, 0)] + [parts[q][:, m - min(counts[q], m):] for q in range(len(counts))]
    last = torch.cat(rows, 1)[:, -m:]
    full = torch.cat([torch.cat(rows[:rank + 1], 1)[:, -m:], u], 1)
    if not u.shape[1]:  # no tokens here: an empty output, still in the gather's graph, and the convolution's
        # parameters in it too (zero gradients, not None: DDP and FSDP2 reduce the same tensors on every rank)
        return full[:, m:] + sum(p.sum() for p in block.conv.parameters()) * 0, last
    return block.conv(full.transpose(1, 2)).transpose(1, 2), last


def _block(block, x: torch.Tensor, mask, counts: List[int], rank: int, group,
           caches: Optional[list] = None) -> torch.Tensor:
    """A PolymorpherBlock's forward on this rank's slice x: (B, n, D); with `caches`, appends the block's
    decoding cache of the whole sequence (a PoMCache). The model's own exchange checked the ranks' agreement
    (batch, dtype, grad mode, mask, token counts): the layer skips its metadata exchange."""
    kind = "causal" if PF.is_causal(mask) else "none" if mask is None else "weights"
    u, last = _halo_conv(block, block.norm1(x), counts, rank, group)
    y = _apply(block.mixer, u, None, mask, kind, None, None, counts, group, caches is not None)
    if caches is not None:
        from .models import PoMCache
        y, state = y
        caches.append(PoMCache(state, None if last is None else last.detach().clone()))
    return block._mlp(x + block.drop(block._skip(y, u)))


def _gather_seq(t: torch.Tensor, counts: List[int], dim: int, group) -> torch.Tensor:
    """Every rank's slice t (n_r rows along dim, a negative dim) joined in rank order along dim: one all_gather,
    the slices padded to the longest (autograd: the backward all-reduces the gradient)."""
    pad = [0, 0] * (-dim - 1) + [0, max(counts) - t.shape[dim]]
    parts = _gather(F.pad(t, pad), group)
    return torch.cat([parts[r].narrow(dim, 0, counts[r]) for r in range(len(counts))], dim)


def _attention_block(block, x: torch.Tensor, counts: List[int], rank: int, group, causal: bool = True,
                     valid: Optional[torch.Tensor] = None, caches: Optional[list] = None) -> torch.Tensor:
    """An AttentionBlock's forward on this rank's slice x: (B, n, D): its queries, rotated at their global
    positions, attend over the keys and values of the whole sequence (one all_gather of this rank's (2, B, H,
    max n_r, hd) keys and values; the backward all-reduces their gradient): causal, those at or before them,
    else all (within the window when the attention is local); valid: the whole sequence's (B, N) bool key
    padding (False: padding), gathered once per forward by the caller. With `caches` (causal), appends the
    block's KVCache of the whole sequence, as the unsharded prefill leaves it."""
    from .models import KVCache
    attn = block.mixer
    B, n, _ = x.shape
    offset, total = sum(counts[:rank]), sum(counts)
    q, k, v = attn._qkv(block.norm1(x), offset)  # (B, H, n, hd)
    kv = _gather_seq(torch.stack([k, v]), counts, -2, group)  # (2, B, H, N, hd)
    # keys no query here sees: past the last one (causal), out of every local query's window
    w = attn.window
    lo = 0 if w is None else max(0, offset - w + 1)
    hi = offset + n if causal else total if w is None else min(total, offset + n + w - 1)
    keys = kv[..., lo:hi, :]
    allowed = attn._window_mask(torch.arange(offset, offset + n, device=x.device),
                                torch.arange(lo, hi, device=x.device), causal=causal)
    if valid is not None:
        keep = valid[:, None, None, lo:hi]  # (B, 1, 1, keys)
        allowed = keep if allowed is None else allowed & keep
    if n:
        out = attn._sdpa(q, keys[0], keys[1], allowed).transpose(1, 2).reshape(B, n, attn.dim)
    else:  # no queries here: an empty output, still in the gather's graph (its backward holds a collective)
        out = x[:, :0] + keys.sum() * 0
    if caches is not None:
        cache = KVCache(attn.window)
        keep = total if attn.window is None else min(total, attn.window)
        cache.k, cache.v = (t.detach().clone() for t in kv[..., total - keep:, :])
        cache.pos = total
        caches.append(cache)
    return block._mlp(x + block.drop(attn.proj(out)))


def _as_forward(module: nn.Module, fn, x: torch.Tensor) -> torch.Tensor:
    """module(x) with fn in place of module.forward for the call, so that the hooks on the module run around fn."""
    own = module.__dict__.get("forward")
    module.forward = fn
    try:
        return module(x)
    finally:
        if own is None:
            del module.forward
        else:
            module.forward = own


def _is_checkpoint_wrapper(block) -> bool:
    """checkpoint_wrapper's module, also after fully_shard (whose class for it is a subclass)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
    return isinstance(block, CheckpointWrapper)


def _run_block(block, x: torch.Tensor, counts: List[int], rank: int, group, mask=None, causal: bool = True,
               caches: Optional[list] = None, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One block of a model on this rank's slice x, run as the block's forward (block(x) with the sharded
    computation in place of its forward), so that the hooks on the block run around it: fully_shard (FSDP2) of
    each block gathers the block's parameters before, frees them after and reduces their gradients in backward.
    mask: this rank's (B, n) slice (PoM blocks); valid: the whole sequence's key padding (attention blocks).
    A block under checkpoint_wrapper is run through the wrapper's checkpoint function with the sharded
    computation of the block it wraps, so that the recomputation in backward is the sharded one too (its
    collectives run again, in the same order on every rank: each block's backward waits for the later blocks')."""
    if _is_checkpoint_wrapper(block):
        inner = functools.partial(_run_block, block._checkpoint_wrapped_module, counts=counts, rank=rank,
                                  group=group, mask=mask, causal=causal, caches=caches, valid=valid)
        # a prefill (caches) records no gradient: nothing to recompute
        return _as_forward(block, inner if caches is not None else
                           (lambda z: block.checkpoint_fn(inner, z)), x)
    if block.kind == "A":
        fn = functools.partial(_attention_block, block, counts=counts, rank=rank, group=group, causal=causal,
                               valid=valid, caches=caches)
    else:
        fn = functools.partial(_block, block, mask=mask, counts=counts, rank=rank, group=group, caches=caches)
    return _as_forward(block, fn, x)


def _check_blocks(model) -> None:
    """The composable activation checkpoint (torch.distributed._composable.checkpoint) recomputes a block by
    calling its own forward, the unsharded one, on this rank's slice: refused, on every rank alike
    (checkpoint_wrapper is supported: _run_block)."""
    try:
        from torch.distributed._composable.contract import _get_registry
    except ImportError:  # pragma: no cover - every supported torch has it
        return
    for i, block in enumerate(model.blocks):
        inner = block._checkpoint_wrapped_module if _is_checkpoint_wrapper(block) else block
        if any("checkpoint" in (_get_registry(m) or {}) for m in (block, inner)):
            _fail("model", f"has block {i} under torch.distributed._composable.checkpoint: its recomputation "
                           f"would run the block's own, unsharded forward; wrap the block with checkpoint_wrapper "
                           f"(torch.distributed.algorithms._checkpoint.checkpoint_wrapper) instead")


def _check_model(model, cls, group):
    if not isinstance(model, cls):
        _fail("model", f"must be a pom_ext.models.{cls.__name__}, got {type(model).__name__}")
    return dist.group.WORLD if group is None else group


def _model_row(model, values: List[int]) -> List[int]:
    """A model's metadata row: `values` then its dtype and whether gradients are recorded."""
    dtype = next(model.parameters()).dtype
    grad = torch.is_grad_enabled() and any(p.requires_grad for p in model.parameters())
    return values + [_DTYPES.index(dtype) if dtype in _DTYPES else len(_DTYPES), int(grad)]


def _agree_model(table: torch.Tensor) -> None:
    """The checks of the last two columns of _model_row."""
    _agree(table, -2, "model", "the dtype", lambda d: str(_DTYPES[d]) if d < len(_DTYPES) else "another dtype")
    _agree(table, -1, "model", "whether gradients are recorded (torch.no_grad, requires_grad)",
           lambda v: "recorded" if v else "not recorded")


def _check_tokens(name: str, tokens, what: str = "tokens") -> None:
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
        got = f"shape {tuple(tokens.shape)}, {tokens.dtype}" if isinstance(tokens, torch.Tensor) \
            else type(tokens).__name__
        _fail(name, f"must be this rank's (B, n) integer slice of the {what}, got {got}")


class ContextParallelLM(nn.Module):
    """A PolymorpherLM (PoM and attention blocks) trained with every sequence sharded over `group`.

    ContextParallelLM(model, group=None); forward(tokens: (B, n_r) long, targets: (B, n_r) | None) with this
    rank's contiguous slice of the tokens (and of the targets) -> logits (B, n_r, V), or (logits, loss) where
    loss is this rank's share: the sum of its cross-entropies over the valid targets of all ranks, so that the
    shares summed over the ranks are the unsharded loss and the parameter gradients summed over the ranks
    (all_reduce SUM) are the unsharded ones. Under DDP or FSDP, which average the gradients, back-propagate
    loss * world_size. The short causal convolution reads the previous ranks' last conv_size - 1 inputs (a halo
    exchange). Attention layers (hybrid stacks) gather every rank's keys and values (O(N) per layer; PoM layers
    exchange sums of width E). prefill(tokens) -> (logits, cache): every rank gets the decoding cache of the whole
    prompt (PoM states and convolution buffers, attention keys and values) for PolymorpherLM.step. `.model` is
    the wrapped model.
    """

    def __init__(self, model, group=None):
        super().__init__()
        from .models import PolymorpherLM
        self.group = _check_model(model, PolymorpherLM, group)
        self.model = model

    def _plan(self, tokens, targets) -> torch.Tensor:
        def check():
            _check_tokens("tokens", tokens)
            if targets is not None and (not isinstance(targets, torch.Tensor) or targets.shape != tokens.shape):
                got = tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__
                _fail("targets", f"must have the shape of 'tokens' {tuple(tokens.shape)}, got {got}")
            valid = 0 if targets is None else int((targets != -100).sum())
            return _model_row(self.model, [0, tokens.shape[0], tokens.shape[1], int(targets is not None), valid])

        device = tokens.device if isinstance(tokens, torch.Tensor) else torch.device("cpu")
        table = _checked_exchange(check, 7, device, self.group)
        _agree(table, 1, "tokens", "the batch size")
        _agree(table, 3, "targets", "whether targets are given", lambda v: "given" if v else "None")
        _agree_model(table)
        total = int(table[:, 2].sum())
        if total == 0:
            _fail("tokens", "must hold at least one token on some rank")
        # rotary PoM blocks (rope="1d") read their tables at the global positions 0..total-1: checked here,
        # alike on every rank, before any exchange of data
        limit = min((m.max_seq_len for m in self.model.modules() if isinstance(m, PoMRoPE) and not m.rope_2d),
                    default=None)
        if limit is not None and total > limit:
            _fail("tokens", f"must hold at most rope_max_len = {limit} tokens over all ranks (the rotary PoM "
                            f"layers' max_seq_len: their tables end there), got {total} (local counts "
                            f"{table[:, 2].tolist()})")
        return table

    def _run(self, tokens: torch.Tensor, targets: Optional[torch.Tensor], caches: Optional[list]):
        _check_blocks(self.model)
        table = self._plan(tokens, targets)
        counts, rank, m = table[:, 2].tolist(), dist.get_rank(self.group), self.model
        x = m.drop(m.embed(tokens))
        for block in m.blocks:
            x = _run_block(block, x, counts, rank, self.group, "causal", caches=caches)
        return table, m.head(m.norm(x))

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor):
        """(this rank's logits (B, n_r, V), the decoding cache of the whole prompt on every rank): the list of
        per-block caches (PoMCache, KVCache for attention blocks) that PolymorpherLM.step leaves after the
        unsharded prompt, so any rank decodes on with
        `model.step(next_tokens, cache)` (or model.generate-style sampling) alone."""
        caches: list = []
        _, logits = self._run(tokens, None, caches)
        return logits, caches

    def forward(self, tokens: torch.Tensor, targets: Optional[torch.Tensor] = None):
        table, logits = self._run(tokens, targets, None)
        if targets is None:
            return logits
        ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten().long(), ignore_index=-100,
                             reduction="sum")
        return logits, ce / int(table[:, 4].sum())


class ContextParallelEncoder(nn.Module):
    """A PolymorpherEncoder over token sequences (PoM and attention blocks) with every sequence sharded over
    `group`.

    ContextParallelEncoder(model, group=None); forward(x: (B, n_r) long, mask: (B, n_r) | None) with this
    rank's contiguous slice of the tokens (and of the padding / weight mask) -> logits (B, num_classes), the
    same bits on every rank. Position embeddings are read at the rank's offset; pool="cls" puts the class
    token on rank 0. Attention layers gather every rank's keys, values and key padding. Every rank holds the
    whole logits: a loss computed from them on every rank counts P
    times, so back-propagate loss / world_size (then the gradients summed over the ranks are the unsharded
    ones; under DDP or FSDP, which average them, back-propagate the loss itself). `.model` is the wrapped model.
    """

    def __init__(self, model, group=None):
        super().__init__()
        from .models import PolymorpherEncoder
        self.group = _check_model(model, PolymorpherEncoder, group)
        if not isinstance(model.embed, nn.Embedding):
            _fail("model", "must take token sequences (num_tokens, max_len): image patches are not sharded")
        self.model = model

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        m, group = self.model, self.group
        _check_blocks(m)

        def check():
            _check_tokens("x", x)
            if mask is not None and (not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(x.shape) or
                                     not (mask.dtype == torch.bool or mask.is_floating_point())):
                got = f"shape {tuple(mask.shape)}, {mask.dtype}" if isinstance(mask, torch.Tensor) \
                    else type(mask).__name__
                _fail("mask", f"must be this rank's bool or float (B, n) = {tuple(x.shape)} slice, got {got}")
            return _model_row(m, [0, x.shape[0], x.shape[1], int(mask is not None)])

        table = _checked_exchange(check, 6, x.device if isinstance(x, torch.Tensor) else torch.device("cpu"), group)
        _agree(table, 1, "x", "the batch size")
        _agree(table, 3, "mask", "whether a mask is given", lambda v: "given" if v else "None")
        _agree_model(table)
        counts, rank = table[:, 2].tolist(), dist.get_rank(group)
        o, total = sum(counts[:rank]), sum(counts)
        if total > m.max_len or total == 0:
            _fail("x", f"must hold 1 to max_len = {m.max_len} tokens over all ranks, got {total}")
        z = m.embed(x) + m.pos[:, o:o + x.shape[1]]
        B = z.shape[0]
        if m.cls is not None:  # the class token: global position 0, on rank 0 (every rank counts it)
            if rank == 0:
                z = torch.cat([m.cls.expand(B, -1, -1).to(z.dtype), z], dim=1)
                if mask is not None:  # (B, 1) ones, also when rank 0 holds no tokens
                    mask = torch.cat([mask.new_ones(B, 1), mask], dim=1)
            else:  # a zero gradient here, not None: DDP and FSDP2 reduce the same tensors on every rank
                z = z + m.cls.to(z.dtype).sum() * 0
            counts = [counts[0] + 1] + counts[1:]
        if mask is not None and mask.is_floating_point():
            mask = mask.to(z.dtype)
        z = m.drop(z)
        valid = None  # the attention blocks' key padding: the whole sequence's, gathered once (no gradient)
        if mask is not None and any(block.kind == "A" for block in m.blocks):
            with torch.no_grad():
                valid = _gather_seq((mask > 0).to(z.dtype), counts, -1, group) > 0  # (B, N)
        for block in m.blocks:
            z = _run_block(block, z, counts, rank, group, mask, causal=False, valid=valid)
        z = m.norm(z)
        if m.cls is not None:
            # rank 0's class token to every rank; the other ranks send zeros that stay in the autograd graph
            return m.head(_gather(z[:, 0] if rank == 0 else z[:, :0].sum(1), group)[0])
        if mask is None:
            pooled = _sum_rows(_gather(z.sum(1), group), 0, len(counts)) / sum(counts)
        else:
            w = mask.to(z.dtype).unsqueeze(-1)
            both = _sum_rows(_gather(torch.cat([(z * w).sum(1), w.sum(1)], 1), group), 0, len(counts))
            pooled = both[:, :-1] / both[:, -1:].clamp_min(torch.finfo(z.dtype).tiny)
        return m.head(pooled)
