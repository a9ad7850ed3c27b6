"""Functional PoM: the mixer on already-projected context `h` and gate `s`.

    p = sum_k coeff[:, k] act(h)^(k+1)       per element, act = clamp(leaky_relu(., 0.01), -0.1, 6)
    H = aggregate(p)                          over context tokens, by mask (SPEC §1.4)
    y = s * H                                 per channel, or per head of E / G channels

Masks: None (mean), a (B, N) bool/float weight tensor (weighted mean, padding),
"causal" with optional `block_size` F (block-causal, F frames), a (B, T, N) tensor
(arbitrary mask, O(T N E)), and packed sequences through `cu_seqlens`. `weight` (B, N) ((total,) packed)
weighs the context tokens of the mean or of the causal prefix means: padding (0 / False) contributes nothing.
"""
from typing import Optional, Tuple, Union

import torch

from . import ops, reference

Mask = Union[None, str, torch.Tensor]


def _fail(arg: str, expected: str, got) -> None:
    raise ValueError(f"pom_ext: argument '{arg}' must be {expected}, got {got}")


def _shape(t: torch.Tensor) -> str:
    if torch.jit.is_scripting():
        return f"shape {t.shape}"
    return f"shape {tuple(t.shape)}"


def check_coeff(coeff: torch.Tensor, width: int) -> None:
    if not isinstance(coeff, torch.Tensor) or coeff.dim() != 2:
        _fail("coeff", "a 2-D tensor (E, K)", _shape(coeff) if isinstance(coeff, torch.Tensor) else type(coeff))
    if coeff.shape[1] < 1:
        _fail("coeff", "(E, K) with degree K >= 1", _shape(coeff))
    if coeff.shape[0] != width:
        _fail("coeff", f"(E, K) with E = {width} (the width of h)", _shape(coeff))


def check_cu_seqlens(cu_seqlens: torch.Tensor, total: int, device: torch.device) -> None:
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        _fail("cu_seqlens", "a 1-D tensor (B + 1,) of offsets", _shape(cu_seqlens)
              if isinstance(cu_seqlens, torch.Tensor) else type(cu_seqlens))
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        _fail("cu_seqlens", "int32 or int64", cu_seqlens.dtype)
    if cu_seqlens.device != device:
        _fail("cu_seqlens", f"on {device} like the input", cu_seqlens.device)
    if cu_seqlens.device.type == "cpu" and not torch.compiler.is_compiling():
        cu = cu_seqlens.tolist()
        if cu[0] != 0 or cu[-1] != total or any(b < a for a, b in zip(cu, cu[1:])):
            _fail("cu_seqlens", f"non-decreasing offsets from 0 to {total} (the number of packed tokens)", cu)


def _check_h(h: torch.Tensor, packed: bool) -> None:
    if not isinstance(h, torch.Tensor):
        _fail("h", "a tensor", type(h))
    if not h.is_floating_point():
        _fail("h", "a floating-point tensor", h.dtype)
    want = 2 if packed else 3
    if h.dim() != want:
        _fail("h", "a 2-D tensor (total, E) with cu_seqlens" if packed else "a 3-D tensor (B, N, E)", _shape(h))


def _check_block_size(block_size) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        _fail("block_size", "an integer >= 1", repr(block_size))
    return block_size


def is_causal(mask: Mask) -> bool:
    """mask == "causal" (block-causal with a block_size)."""
    if isinstance(mask, str):
        return mask == "causal"
    return False


def is_pooled(mask: Mask) -> bool:
    """True when aggregate pools the context into one H row shared by all queries: mask None or (B, N)."""
    if mask is None:
        return True
    if isinstance(mask, torch.Tensor):
        return mask.dim() == 2
    return False


def as_weight(weight: torch.Tensor) -> torch.Tensor:
    """An integer padding mask (e.g. an attention_mask of 0 / 1) as float32 weights; bool and floats as given."""
    if not isinstance(weight, torch.Tensor) or weight.dtype == torch.bool or weight.is_floating_point() or \
            weight.is_complex():
        return weight
    return weight.to(torch.float32)


def check_weight(weight, h: torch.Tensor, packed: bool, mask: Mask) -> None:
    """weight: (B, N) for h (B, N, E), (total,) for packed h (total, E); bool or floating, on h's device; not
    together with a tensor mask."""
    if not isinstance(weight, torch.Tensor):
        _fail("weight", "a tensor of per-token weights", type(weight))
    if isinstance(mask, torch.Tensor):
        _fail("weight", "None when 'mask' is a tensor (give the weights once, as 'mask' or as 'weight')",
              "both")
    want = (h.shape[0],) if packed else (h.shape[0], h.shape[1])
    if tuple(weight.shape) != want:
        _fail("weight", f"{'(total,)' if packed else '(B, N)'} = {want}, one weight per context token",
              _shape(weight))
    if weight.is_complex():
        _fail("weight", "bool or integer (padding mask), or floating point", weight.dtype)
    if weight.device != h.device:
        _fail("weight", f"on {h.device} like the input", weight.device)


def _check_aggregate(h, coeff, mask, block_size, cu_seqlens, weight=None) -> None:
    """The argument checks of aggregate, with Python-only messages (skipped under TorchScript)."""
    packed = cu_seqlens is not None
    _check_h(h, packed)
    check_coeff(coeff, h.shape[-1])
    if coeff.device != h.device:
        _fail("coeff", f"on {h.device} like 'h'", coeff.device)
    if weight is not None:
        check_weight(weight, h, packed, mask)
    if block_size is not None:
        _check_block_size(block_size)
        if not is_causal(mask):
            _fail("block_size", "given only with mask='causal'", f"mask={mask!r}")
    if packed:
        check_cu_seqlens(cu_seqlens, h.shape[0], h.device)
        if mask is not None and not is_causal(mask):
            _fail("mask", "None or 'causal' when cu_seqlens is given", repr(mask))
        return
    if mask is None:
        return
    if isinstance(mask, str):
        if mask != "causal":
            _fail("mask", "None, 'causal', a (B, N) or a (B, T, N) tensor", repr(mask))
        return
    if not isinstance(mask, torch.Tensor):
        _fail("mask", "None, 'causal', a (B, N) or a (B, T, N) tensor", type(mask))
    if mask.device != h.device:
        _fail("mask", f"on {h.device} like the input", mask.device)
    if mask.dtype != torch.bool and not mask.is_floating_point():
        _fail("mask", "bool or floating point", mask.dtype)
    B, N, _ = h.shape
    if mask.dim() == 2:
        if tuple(mask.shape) != (B, N):
            _fail("mask", f"(B, N) = {(B, N)} for a padding/weight mask", _shape(mask))
    elif mask.dim() == 3:
        if mask.shape[0] != B or mask.shape[2] != N:
            _fail("mask", f"(B, T, N) with B = {B}, N = {N}", _shape(mask))
    else:
        _fail("mask", "None, 'causal', a (B, N) or a (B, T, N) tensor", _shape(mask))


def aggregate(h: torch.Tensor, coeff: torch.Tensor, mask: Mask = None, block_size: Optional[int] = None,
              cu_seqlens: Optional[torch.Tensor] = None, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """H from h: (B, N, E), coeff: (E, K).

    mask None -> (B, 1, E); (B, N) weights -> (B, 1, E); "causal" [block_size F] -> (B, N, E);
    (B, T, N) -> (B, T, E). Packed h: (total, E) with cu_seqlens (B + 1,): mask None -> (B, E) per
    sequence, "causal" -> (total, E). weight: (B, N) ((total,) packed) token weights of the mean or of the
    causal prefix means, bool padding or floats >= 0 (a prefix of zero weight reads 0). Pass block_size,
    cu_seqlens and weight by keyword.
    """
    if not torch.jit.is_scripting():
        _check_aggregate(h, coeff, mask, block_size, cu_seqlens, weight)
    if weight is not None:
        if isinstance(mask, str):
            if mask != "causal":
                raise ValueError(f"pom_ext: argument 'mask' must be None, 'causal', a (B, N) or a (B, T, N) "
                                 f"tensor, got the string '{mask}'")
            return ops.poly_causal_weighted(h, coeff, weight, 1 if block_size is None else block_size, cu_seqlens)
        if mask is not None:
            raise ValueError("pom_ext: argument 'weight' must be None when 'mask' is a tensor")
        if block_size is not None:
            raise ValueError("pom_ext: argument 'block_size' must be given only with mask='causal'")
        H = ops.poly_mean(h, coeff, weight, cu_seqlens)
        return H if cu_seqlens is not None else H.unsqueeze(1)
    # The raises below are reached only under TorchScript (eager calls were checked above). Every type test of
    # mask returns: a refined mask that lives on after an `if` does not survive torch.jit.save / load.
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"pom_ext: argument 'mask' must be None, 'causal', a (B, N) or a (B, T, N) tensor, "
                             f"got the string '{mask}'")
        return ops.poly_causal(h, coeff, 1 if block_size is None else block_size, cu_seqlens)
    if block_size is not None:
        raise ValueError("pom_ext: argument 'block_size' must be given only with mask='causal'")
    if mask is None:
        H = ops.poly_mean(h, coeff, None, cu_seqlens)
        return H if cu_seqlens is not None else H.unsqueeze(1)
    if cu_seqlens is not None:
        raise ValueError("pom_ext: argument 'mask' must be None or 'causal' when cu_seqlens is given, got a tensor")
    if mask.dim() == 2:
        return ops.poly_mean(h, coeff, mask).unsqueeze(1)
    if mask.dim() != 3:
        raise ValueError(f"pom_ext: argument 'mask' must be None, 'causal', a (B, N) or a (B, T, N) tensor, "
                         f"got a {mask.dim()}-D tensor")
    # p in fp32 at least, never rounded to a 16-bit dtype before the fp32 matmul (nor its gradient after).
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    p = ops.poly_eval(h.to(acc), coeff)
    m = mask.to(acc)
    den = m.sum(-1, keepdim=True)
    return (torch.bmm(m, p) / torch.where(den == 0, torch.ones_like(den), den)).to(h.dtype)


def select(s: torch.Tensor, H: torch.Tensor, n_sel_heads: int = 1) -> torch.Tensor:
    """y = s * H. s: (..., S), H: (..., E) broadcastable; S = E, or S = G heads of E / G channels."""
    G = n_sel_heads
    if not torch.jit.is_scripting():
        if G > 1:
            if s.shape[-1] != G or H.shape[-1] % G:
                _fail("s", f"(..., {G}) gates for n_sel_heads={G} over a width divisible by {G}",
                      f"s {_shape(s)}, H {_shape(H)}")
        elif s.shape[-1] != H.shape[-1]:
            _fail("s", f"(..., E) with E = {H.shape[-1]} (the width of H)", _shape(s))
    return reference.select(s, H, G)


def pom(h: torch.Tensor, s: torch.Tensor, coeff: torch.Tensor, mask: Mask = None, n_sel_heads: int = 1,
        block_size: Optional[int] = None, cu_seqlens: Optional[torch.Tensor] = None,
        weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The mixer: y = s * aggregate(poly(h)). h: (B, N, E), s: (B, T, S) -> y: (B, T, E).

    Packed: h: (total, E), s: (total, S) with cu_seqlens -> (total, E). weight: as in aggregate. Pass the
    arguments after mask by keyword.
    """
    H = aggregate(h, coeff, mask, block_size, cu_seqlens, weight)
    if is_causal(mask):
        if s.shape[-2] != H.shape[-2]:
            raise ValueError(f"pom_ext: argument 's' must be {H.shape[-2]} query tokens for a causal mask "
                             f"(T must equal N), got {_shape(s)}")
    elif cu_seqlens is not None:  # packed mean: one row per sequence, repeated over its tokens
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        H = H.repeat_interleave(lengths, dim=0, output_size=h.shape[0])
    return select(s, H, n_sel_heads)


def state_update(h: torch.Tensor, coeff: torch.Tensor, state_sum: torch.Tensor,
                 count: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Append h: (B, T, E) to the recurrent state -> (H (B, E), new_sum (B, E), new_count (B,))."""
    if isinstance(count, torch.Tensor) and count.is_floating_point():  # a weight total
        return weighted_state_update(h, coeff, state_sum, count, None)
    check_state(h, coeff, state_sum, count)
    return ops.poly_state_update(h, coeff, state_sum, count)


def weighted_state_update(h: torch.Tensor, coeff: torch.Tensor, state_sum: torch.Tensor, count: torch.Tensor,
                          weight: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Append h: (B, T, E) with token weights (B, T) (None: 1 each) to (state_sum, count): the sum grows by
    sum_t w_t p_t and the count (the weight total) by sum_t w_t; H = sum / count, 0 where count is 0. An int64
    count (a token count) takes whole weights only (padding masks); a floating count any weights >= 0."""
    check_state(h, coeff, state_sum, count)
    acc = state_sum.dtype
    p = ops.poly_eval(h.to(acc), coeff).to(acc)
    if weight is None:
        w = torch.ones(h.shape[0], h.shape[1], dtype=acc, device=h.device)
    else:
        check_weight(weight, h, False, None)
        if not count.is_floating_point() and weight.is_floating_point() and not torch.compiler.is_compiling() \
                and bool((weight != weight.round()).any()):
            _fail("weight", "whole numbers (a padding mask) for a state that counts tokens (int64 count); "
                            "allocate the state with weighted=True for fractional weights", "fractional weights")
        w = weight.to(acc)
    new_sum = state_sum + (p * w.unsqueeze(-1)).sum(1)
    total = w.sum(1)
    new_count = count + (total.to(count.dtype) if count.is_floating_point() else total.round().long())
    c = new_count.to(acc).unsqueeze(-1)
    H = torch.where(c != 0, new_sum / torch.where(c != 0, c, torch.ones_like(c)), torch.zeros_like(new_sum))
    return H.to(h.dtype), new_sum, new_count


def check_state(h: torch.Tensor, coeff: torch.Tensor, state_sum: torch.Tensor, count: torch.Tensor) -> None:
    _check_h(h, packed=False)
    check_coeff(coeff, h.shape[-1])
    B, _, E = h.shape
    if not isinstance(state_sum, torch.Tensor) or tuple(state_sum.shape) != (B, E):
        _fail("state_sum", f"a (B, E) = {(B, E)} tensor", _shape(state_sum)
              if isinstance(state_sum, torch.Tensor) else type(state_sum))
    if state_sum.dtype not in (torch.float32, torch.float64):
        _fail("state_sum", "float32 (or float64)", state_sum.dtype)
    if not isinstance(count, torch.Tensor) or tuple(count.shape) != (B,) or \
            count.dtype not in (torch.int64, state_sum.dtype):
        _fail("count", f"a tensor of shape (B,) = {(B,)}, int64 (tokens) or {state_sum.dtype} like 'state_sum' "
                       f"(a weight total)", f"{_shape(count)}, {count.dtype}"
              if isinstance(count, torch.Tensor) else type(count))
    for name, t in (("coeff", coeff), ("state_sum", state_sum), ("count", count)):
        if t.device != h.device:
            _fail(name, f"on {h.device} like the input", t.device)
    # Counts are read where that costs no device synchronization.
    if count.device.type == "cpu" and B > 0 and bool((count < 0).any()):
        _fail("count", "token counts >= 0", int(count.min()))
