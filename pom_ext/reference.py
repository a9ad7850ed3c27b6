"""Pure-PyTorch reference of every pom_ext op (SPEC §1-2).

Short and obviously right: the oracle of the tests and the fallback when the
compiled library is unavailable. Low-precision inputs are computed in float32
(float64 stays float64) and cast back, as the kernels do.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def act(u: torch.Tensor) -> torch.Tensor:
    """clamp(leaky_relu(u, 0.01), -0.1, 6), written with the torch functions themselves, so its gradient at the
    kinks is torch's: slope 1 on (0, 6), 0.01 on (-10, 0] (leaky_relu takes the negative slope at 0), and at the
    clamp's bounds u = -10, 6 whatever the installed torch's clamp gives (SPEC §1.2)."""
    return F.leaky_relu(u, 0.01).clamp(-0.1, 6.0)


def _poly(h: torch.Tensor, coeff: torch.Tensor) -> torch.Tensor:
    """p = sum_k coeff[:, k] act(h)^(k+1), in the accumulation dtype."""
    a = act(h.to(_acc(h.dtype)))
    c = coeff.to(a.dtype)
    p, pw = torch.zeros_like(a), torch.ones_like(a)
    for k in range(c.shape[1]):
        pw = pw * a
        p = p + c[:, k] * pw
    return p


def _divide(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den, and 0 where den == 0."""
    safe = torch.where(den == 0, torch.ones_like(den), den)
    return torch.where(den == 0, torch.zeros_like(num), num / safe)


def _segments(cu_seqlens: torch.Tensor):
    cu = cu_seqlens.tolist()
    return list(zip(cu[:-1], cu[1:]))


def poly_eval(h: torch.Tensor, coeff: torch.Tensor) -> torch.Tensor:
    """h: (..., E), coeff: (E, K) -> p: (..., E)."""
    return _poly(h, coeff).to(h.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotary positions (SPEC §2b), in x's dtype: x (..., N, E) with E = 2 P S, tables cos, sin (L, P), positions
    (..., N, S) integer rows of the tables. In section s, pair i joins channels 2Ps + i and 2Ps + P + i:
    (a, b) -> (a cos - b sin, b cos + a sin) at the angle of row positions[n, s], column i."""
    P = cos.shape[1]
    S = x.shape[-1] // (2 * P)
    pos = positions.long()
    c, s = cos[pos].to(x.dtype), sin[pos].to(x.dtype)  # (..., N, S, P)
    q = x.unflatten(-1, (S, 2, P))
    a, b = q[..., 0, :], q[..., 1, :]
    return torch.stack([a * c - b * s, b * c + a * s], -2).flatten(-3)


def _features(h, coeff, rope):
    """p, or p rotated when rope = (cos, sin, positions) is given, in the accumulation dtype."""
    p = _poly(h, coeff)
    return p if rope is None else rotate(p, *rope)


def _mean_of(p, weight):
    w = torch.ones(p.shape[:2], dtype=p.dtype, device=p.device) if weight is None else weight.to(p.dtype)
    return _divide((p * w[..., None]).sum(1), w.sum(1, keepdim=True))


def _prefix_mean(p, block_size: int):
    n = p.shape[1]
    end = torch.clamp((torch.arange(n, device=p.device) // block_size + 1) * block_size, max=n)
    return p.cumsum(1)[:, end - 1] / end.to(p.dtype)[:, None]


def poly_mean(h, coeff, weight=None, cu_seqlens=None, rope=None) -> torch.Tensor:
    """h: (B, N, E) [or (total, E) packed] -> H: (B, E) = sum_n w p / sum_n w (0 where sum_n w == 0).
    rope = (cos, sin, positions): of the rotated p."""
    p = _features(h, coeff, rope)
    if cu_seqlens is not None:
        rows = [_mean_of(p[a:b][None], None if weight is None else weight[a:b][None]) for a, b in _segments(cu_seqlens)]
        return torch.cat(rows, 0).to(h.dtype)
    return _mean_of(p, weight).to(h.dtype)


def poly_causal(h, coeff, block_size: int = 1, cu_seqlens=None, rope=None) -> torch.Tensor:
    """Block-causal prefix mean: H_t = mean of p_n over n < min(N, (t // F + 1) F). rope: of the rotated p."""
    p = _features(h, coeff, rope)
    if cu_seqlens is not None:
        return torch.cat([_prefix_mean(p[a:b][None], block_size)[0] for a, b in _segments(cu_seqlens)], 0).to(h.dtype)
    return _prefix_mean(p, block_size).to(h.dtype)


def _weighted_prefix_mean(p, w, block_size: int):
    n = p.shape[1]
    end = torch.clamp((torch.arange(n, device=p.device) // block_size + 1) * block_size, max=n) - 1
    w = w.to(p.dtype)
    return _divide((p * w[..., None]).cumsum(1)[:, end], w.cumsum(1)[:, end][..., None])


def poly_causal_weighted(h, coeff, weight, block_size: int = 1, cu_seqlens=None) -> torch.Tensor:
    """Weighted block-causal prefix mean: H_t = sum_{n <= end(t)} w_n p_n / sum_{n <= end(t)} w_n, 0 where the
    weights of the prefix sum to 0; end(t) = min(N, (t // F + 1) F) - 1."""
    p = _poly(h, coeff)
    if cu_seqlens is not None:
        return torch.cat([_weighted_prefix_mean(p[a:b][None], weight[a:b][None], block_size)[0]
                          for a, b in _segments(cu_seqlens)], 0).to(h.dtype)
    return _weighted_prefix_mean(p, weight, block_size).to(h.dtype)


def poly_mean_rope(h, coeff, cos, sin, positions, weight=None, cu_seqlens=None) -> torch.Tensor:
    return poly_mean(h, coeff, weight, cu_seqlens, (cos, sin, positions))


def poly_causal_rope(h, coeff, cos, sin, positions, block_size: int = 1, cu_seqlens=None) -> torch.Tensor:
    return poly_causal(h, coeff, block_size, cu_seqlens, (cos, sin, positions))


def poly_masked(h, coeff, mask) -> torch.Tensor:
    """h: (B, N, E), mask: (B, T, N) -> H: (B, T, E) = sum_n M_tn p_n / sum_n M_tn (0 on empty rows)."""
    p = _poly(h, coeff)
    m = mask.to(p.dtype)
    return _divide(torch.bmm(m, p), m.sum(-1, keepdim=True)).to(h.dtype)


def poly_state_update(h, coeff, state_sum, count) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Append h: (B, T, E) to the state (sum (B, E), count (B,)): H = (sum + sum_t p_t) / (count + T)."""
    p = _poly(h, coeff).to(torch.promote_types(state_sum.dtype, _acc(h.dtype)))
    new_sum = state_sum.to(p.dtype) + p.sum(1)
    new_count = count + h.shape[1]
    H = _divide(new_sum, new_count.to(new_sum.dtype)[:, None])
    return H.to(h.dtype), new_sum.to(state_sum.dtype), new_count


def select(s: torch.Tensor, H: torch.Tensor, n_sel_heads: int) -> torch.Tensor:
    """y = s * H, with s: (..., G) broadcast over E/G contiguous channels when n_sel_heads > 1."""
    if n_sel_heads <= 1:
        return s * H
    g = s.shape[-1]
    return (s.unsqueeze(-1) * H.unflatten(-1, (g, H.shape[-1] // g))).flatten(-2)


def poly_causal_gated(hs, coeff, gate_bias=None, block_size: int = 1, cu_seqlens=None) -> torch.Tensor:
    """hs = [h | pre] (E = coeff.shape[0], then S gate columns) -> hardsigmoid(pre + gate_bias) * poly_causal(h)."""
    E = coeff.shape[0]
    S = hs.shape[-1] - E
    pre = hs[..., E:] if gate_bias is None else hs[..., E:] + gate_bias
    return select(F.hardsigmoid(pre), poly_causal(hs[..., :E], coeff, block_size, cu_seqlens), S if S < E else 1)


def poly_causal_gated_rope(hs, coeff, gate_bias, cos, sin, gate_cos, gate_sin, positions, block_size: int = 1,
                           cu_seqlens=None) -> torch.Tensor:
    """hs = [h | pre] -> rotate(hardsigmoid(pre + gate_bias), gate tables) * poly_causal_rope(h), in the accumulation
    dtype, rounded once to hs's."""
    E = coeff.shape[0]
    S = hs.shape[-1] - E
    acc = _acc(hs.dtype)
    pre = hs[..., E:].to(acc) if gate_bias is None else hs[..., E:].to(acc) + gate_bias.to(acc)
    s = rotate(F.hardsigmoid(pre), gate_cos, gate_sin, positions)
    h = hs[..., :E].to(acc)
    H = poly_causal(h, coeff.to(acc), block_size, cu_seqlens, (cos, sin, positions))
    return select(s, H, S if S < E else 1).to(hs.dtype)


class _RoundGrad(torch.autograd.Function):
    """Identity whose gradient is rounded to `dtype` (as autograd stores the gradient of a tensor of it)."""

    @staticmethod
    def forward(ctx, x, dtype):
        ctx.dtype = dtype
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g.to(ctx.dtype).to(g.dtype), None


def _stored(x: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    """x and its gradient rounded to dtype, the arithmetic staying in x's precision (None: unchanged)."""
    if dtype is None:
        return x
    return _RoundGrad.apply(x.to(dtype).to(x.dtype), dtype)


def pom_layer(layer, xq, xc=None, mask=None, block_size: Optional[int] = None, cu_seqlens=None,
              store_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The whole PoM layer of SPEC §1, read off `layer`'s parameters, without shortcuts.

    store_dtype: the tensors a layer run in that dtype stores — the projections (h and the gate's
    pre-activation), the aggregate H, the mixer's output y, and the gradients reaching them — rounded to it,
    every computation staying in the input's precision: the error of a 16-bit layer that is due to its dtype
    alone."""
    xc = xq if xc is None else xc
    E, G = layer.state_width, layer.n_sel_heads
    if layer.n_groups > 1:
        w = layer.po_proj.weight  # (E, D / groups, 1): a grouped 1x1 convolution
        g = layer.n_groups
        xg = xc.unflatten(-1, (g, xc.shape[-1] // g))
        h = torch.einsum("...gd,ged->...ge", xg, w[..., 0].unflatten(0, (g, E // g))).flatten(-2)
        if layer.po_proj.bias is not None:
            h = h + layer.po_proj.bias
        s = F.hardsigmoid(_stored(F.linear(xq, layer.se_proj.weight, layer.se_proj.bias), store_dtype))
    else:
        w = layer.qc_proj.weight
        h = F.linear(xc, w[:E])
        s = F.hardsigmoid(_stored(F.linear(xq, w[E:]), store_dtype) + layer.se_bias)
    h = _stored(h, store_dtype)
    c = layer.po_coeff
    if cu_seqlens is not None:
        if mask == "causal":
            H = poly_causal(h, c, block_size or 1, cu_seqlens)
        else:
            lengths = cu_seqlens[1:] - cu_seqlens[:-1]
            H = poly_mean(h, c, None, cu_seqlens).repeat_interleave(lengths.long(), 0)
    elif mask is None:
        H = poly_mean(h, c)[:, None]
    elif isinstance(mask, str):
        H = poly_causal(h, c, block_size or 1)
    elif mask.dim() == 2:
        H = poly_mean(h, c, mask)[:, None]
    else:
        H = poly_masked(h, c, mask)
    return layer.ag_proj(_stored(select(s, _stored(H, store_dtype), G), store_dtype))


def _rope_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half over the last dim of x with per-token tables cos, sin (..., x.shape[-1] / 2)."""
    a, b = x.chunk(2, -1)
    return torch.cat([a * cos - b * sin, b * cos + a * sin], -1)


def pom_rope_layer(layer, xq, xc=None, mask=None, positions=None, ctx_positions=None, positions_hw=None,
                   ctx_positions_hw=None, block_size: Optional[int] = None, cu_seqlens=None) -> torch.Tensor:
    """The whole PoMRoPE layer (SPEC §2b) read off `layer`'s parameters and buffers, in the input's precision:
    the tables indexed per token and applied by halves (1-D) or quarters (2-D) as the paper's reference does."""
    self_mix = xc is None
    xc = xq if xc is None else xc
    E, G = layer.state_width, layer.n_sel_heads
    head = E // max(G, 1)
    if layer.n_groups > 1:
        g = layer.n_groups
        w = layer.po_proj.weight[..., 0].unflatten(0, (g, E // g))
        h = torch.einsum("...gd,ged->...ge", xc.unflatten(-1, (g, xc.shape[-1] // g)), w).flatten(-2)
        if layer.po_proj.bias is not None:
            h = h + layer.po_proj.bias
        s = F.hardsigmoid(F.linear(xq, layer.se_proj.weight, layer.se_proj.bias))
    else:
        h = F.linear(xc, layer.qc_proj.weight[:E])
        s = F.hardsigmoid(F.linear(xq, layer.qc_proj.weight[E:]) + layer.se_bias)
    p = _poly(h, layer.po_coeff).to(h.dtype)
    n_ctx = p.shape[-2]

    def default(n):
        if cu_seqlens is None:
            return torch.arange(n, device=xq.device)
        return torch.cat([torch.arange(b - a, device=xq.device) for a, b in _segments(cu_seqlens)])

    def turn(x, pos, pos_hw, gate):
        dt = x.dtype
        if layer.rope_2d:
            rc, rs, cc, cs = layer.row_cos, layer.row_sin, layer.col_cos, layer.col_sin
            if gate and G > 1:
                rc, rs, cc, cs = (t[:, ::head][:, : G // 4] for t in (rc, rs, cc, cs))
            r, c = pos_hw[..., 0].long(), pos_hw[..., 1].long()
            lo, hi = x.chunk(2, -1)
            return torch.cat([_rope_half(lo, rc[r].to(dt), rs[r].to(dt)), _rope_half(hi, cc[c].to(dt), cs[c].to(dt))],
                             -1)
        fc, fs = layer.freqs_cos, layer.freqs_sin
        if gate and G > 1:
            fc, fs = fc[:, :: head // 2][:, : G // 2], fs[:, :: head // 2][:, : G // 2]
        pos = default(x.shape[-2]) if pos is None else pos.long()
        return _rope_half(x, fc[pos].to(dt), fs[pos].to(dt))

    cpos = ctx_positions if ctx_positions is not None else (positions if self_mix else None)
    cpos_hw = ctx_positions_hw if ctx_positions_hw is not None else (positions_hw if self_mix else None)
    p = turn(p, cpos, cpos_hw, False)
    s = turn(s.to(p.dtype), positions, positions_hw, True)
    if cu_seqlens is not None:
        if mask == "causal":
            H = torch.cat([_prefix_mean(p[a:b][None], block_size or 1)[0] for a, b in _segments(cu_seqlens)], 0)
        else:
            H = torch.cat([p[a:b].mean(0, keepdim=True).expand(b - a, -1) for a, b in _segments(cu_seqlens)], 0)
    elif mask is None:
        H = p.mean(1, keepdim=True)
    elif isinstance(mask, str):
        H = _prefix_mean(p, block_size or 1)
    elif mask.dim() == 2:
        H = _mean_of(p, mask)[:, None]
    else:
        m = mask.to(p.dtype)
        H = _divide(torch.bmm(m, p), m.sum(-1, keepdim=True))
    assert n_ctx == p.shape[-2]
    return layer.ag_proj(select(s, H, G).to(xq.dtype))


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The causal depthwise convolution of the PoM block: x (B, T, D), weight (D, K), bias (D,) ->
    y[b, t, d] = bias[d] + sum_k weight[d, k] x[b, t - K + 1 + k, d] (x = 0 before the first row), in x's dtype."""
    acc = _acc(x.dtype)
    D, K = weight.shape
    u = F.pad(x.to(acc).transpose(1, 2), (K - 1, 0))
    b = None if bias is None else bias.to(acc)
    return F.conv1d(u, weight.to(acc).reshape(D, 1, K), b, groups=D).transpose(1, 2).to(x.dtype)
