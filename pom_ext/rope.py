"""PoMRoPE: the PoM layer with rotary positions (SPEC §2b), the paper's reference `PoMRoPE` as a pom_ext layer.

After the polynomial every context token's features are rotated by its position, p~_j = R(pos_j) p_j (rotate-half:
channel e < E/2 pairs with e + E/2, angle pos * theta_e, theta_e = base^(-e / (E/2))); the aggregation runs over
p~ and the gate is rotated at the query's position, y = ag_proj(R(pos_i) s_i * H~). 2-D (`rope_2d=True`): the first
half of E turns by the row position (pairs e, e + E/4), the second half by the column position. The cos / sin
tables are float32 buffers under the reference's names, computed as the reference computes them; the kernels read
the tables as loaded, so a reference state dict gives the reference's numbers.

The rotation is fused into the native aggregations (pom_ext.ops.poly_mean_rope / poly_causal_rope): mean, weighted
mean, token- and block-causal, packed sequences. The (B, T, N) mask is a batched matmul over rotated features.
"""
from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch.jit import Final

from . import functional as PF
from . import ops, reference
from .layers import PoM, PoMState, _check_int


def rope_tables_1d(width: int, length: int, base: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (length, width / 2) float32: angle[t, i] = t * base^(-i / (width / 2)), as the reference builds them."""
    half = width // 2
    inv_freq = 1.0 / (base ** (torch.arange(0, half, dtype=torch.float32) / half))
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def rope_tables_2d(width: int, max_h: int, max_w: int, base: float) -> Tuple[torch.Tensor, ...]:
    """row_cos, row_sin (max_h, width / 4), col_cos, col_sin (max_w, width / 4) float32, as the reference builds them."""
    quarter = width // 4
    inv_freq = 1.0 / (base ** (torch.arange(0, quarter, dtype=torch.float32) / quarter))
    rows = torch.outer(torch.arange(max_h, dtype=torch.float32), inv_freq)
    cols = torch.outer(torch.arange(max_w, dtype=torch.float32), inv_freq)
    return rows.cos(), rows.sin(), cols.cos(), cols.sin()


def _fail(arg: str, expected: str, got) -> None:
    raise ValueError(f"pom_ext.PoMRoPE: argument '{arg}' must be {expected}, got {got}")


class PoMRoPE(PoM):
    """PoM with rotary positions (1-D, or 2-D over a grid of patches).

    PoMRoPE(dim, degree, expand, n_groups=1, n_sel_heads=1, bias=False, max_seq_len=4096, max_h=64, max_w=64,
    rope_base=10000.0, rope_2d=False): the reference's constructor; parameters and buffers under the reference's
    names (state dicts load both ways, strict). forward(xq, xc=None, mask=None, positions=None, ctx_positions=None,
    positions_hw=None, ctx_positions_hw=None, block_size=None, cu_seqlens=None).

    Positions are integers: 1-D `positions` (T,) or (B, T) for the queries, `ctx_positions` (N,) or (B, N) for the
    context (self-mixing: one set for both; default 0..N-1, restarting in every packed sequence); 2-D
    `positions_hw` (T, 2) or (B, T, 2) (row, column), `ctx_positions_hw` likewise, required. Every position must
    index the tables: 0 <= pos < max_seq_len (1-D), rows < max_h and columns < max_w (2-D); a position past them
    raises (build the layer with a larger max_seq_len / max_h / max_w). The state (`step`, `state_forward`) holds
    the running sum of rotated features; decoding continues at position `count` (1-D) unless positions are given.
    """

    rope_2d: Final[bool]

    def __init__(self, dim: int, degree: int, expand: int, n_groups: int = 1, n_sel_heads: int = 1,
                 bias: bool = False, max_seq_len: int = 4096, max_h: int = 64, max_w: int = 64,
                 rope_base: float = 10000.0, rope_2d: bool = False):
        super().__init__(dim, degree, expand, n_groups=n_groups, n_sel_heads=n_sel_heads, bias=bias)
        _check_int("max_seq_len", max_seq_len, 1)
        _check_int("max_h", max_h, 1)
        _check_int("max_w", max_w, 1)
        if isinstance(rope_base, bool) or not isinstance(rope_base, (int, float)) or not rope_base > 0:
            raise ValueError(f"pom_ext.PoMRoPE: argument 'rope_base' must be a number > 0, got {rope_base!r}")
        if not isinstance(rope_2d, bool):
            raise ValueError(f"pom_ext.PoMRoPE: argument 'rope_2d' must be a bool, got {rope_2d!r}")
        E, G = self.state_width, n_sel_heads
        split = 4 if rope_2d else 2
        if E % split:
            raise ValueError(f"pom_ext.PoMRoPE: arguments 'expand' * 'dim' = {E} must be divisible by {split} for "
                             f"{'2-D' if rope_2d else '1-D'} rotary positions")
        if G > 1:
            head = E // G
            if G % split:
                raise ValueError(f"pom_ext.PoMRoPE: argument 'n_sel_heads' ({G}) must be divisible by {split} for "
                                 f"{'2-D' if rope_2d else '1-D'} rotary positions (the gates turn in pairs)")
            if head < split:
                raise ValueError(f"pom_ext.PoMRoPE: the head width 'expand' * 'dim' / 'n_sel_heads' = {head} must be "
                                 f">= {split} for {'2-D' if rope_2d else '1-D'} rotary positions")
        self.rope_2d = rope_2d
        self.max_seq_len, self.max_h, self.max_w, self.rope_base = max_seq_len, max_h, max_w, float(rope_base)
        if rope_2d:
            rc, rs, cc, cs = rope_tables_2d(E, max_h, max_w, float(rope_base))
            self.register_buffer("row_cos", rc)
            self.register_buffer("row_sin", rs)
            self.register_buffer("col_cos", cc)
            self.register_buffer("col_sin", cs)
        else:
            c, s = rope_tables_1d(E, max_seq_len, float(rope_base))
            self.register_buffer("freqs_cos", c)
            self.register_buffer("freqs_sin", s)

    def extra_repr(self) -> str:
        where = f"max_h={self.max_h}, max_w={self.max_w}" if self.rope_2d else f"max_seq_len={self.max_seq_len}"
        return f"{super().extra_repr()}, {where}, rope_base={self.rope_base}, rope_2d={self.rope_2d}"

    # ---- tables and positions ----

    def _tables(self, gate: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) of the rope ops: (L, P) with E = 2 P S. 2-D: the row tables then the column tables (the
        column positions are offset by max_h). The gate of n_sel_heads > 1 heads reads the tables at the stride of
        the reference: head_dim / 2 (1-D) or head_dim (2-D) columns, G / 2 (G / 4) of them."""
        G = self.n_sel_heads
        head = self.state_width // max(G, 1)
        if self.rope_2d:
            rc, rs, cc, cs = self.row_cos, self.row_sin, self.col_cos, self.col_sin
            if gate and G > 1:
                rc, rs = rc[:, ::head][:, : G // 4], rs[:, ::head][:, : G // 4]
                cc, cs = cc[:, ::head][:, : G // 4], cs[:, ::head][:, : G // 4]
            return torch.cat([rc, cc], 0), torch.cat([rs, cs], 0)
        c, s = self.freqs_cos, self.freqs_sin
        if gate and G > 1:
            c, s = c[:, :: head // 2][:, : G // 2], s[:, :: head // 2][:, : G // 2]
        return c, s

    def _position_args(self, positions, ctx_positions, positions_hw, ctx_positions_hw, self_mixing: bool):
        """(query positions, context positions, their argument names): the 1-D pair or the 2-D pair, as the layer
        takes (the other pair must be None); the context's default to the queries' when mixing a sequence with
        itself."""
        if self.rope_2d:
            if positions is not None or ctx_positions is not None:
                _fail("positions", "None for a 2-D layer (rope_2d=True): give positions_hw / ctx_positions_hw",
                      "a tensor")
            qp, cp, qname, cname = positions_hw, ctx_positions_hw, "positions_hw", "ctx_positions_hw"
        else:
            if positions_hw is not None or ctx_positions_hw is not None:
                _fail("positions_hw", "None for a 1-D layer (rope_2d=False): give positions / ctx_positions",
                      "a tensor")
            qp, cp, qname, cname = positions, ctx_positions, "positions", "ctx_positions"
        if self_mixing and cp is None:
            cp, cname = qp, qname
        return qp, cp, qname, cname

    def _positions(self, arg: str, pos: Optional[torch.Tensor], B: int, N: int, device: torch.device,
                   cu_seqlens: Optional[torch.Tensor]) -> torch.Tensor:
        """The rope ops' positions: (N, S), (B, N, S) or packed (total, S), from a user's 1-D (N,) / (B, N) or 2-D
        (N, 2) / (B, N, 2) positions, checked against the tables; None: 0..N-1 (1-D only)."""
        packed = cu_seqlens is not None
        if pos is None:
            if self.rope_2d:
                _fail(arg, "given for 2-D rotary positions (rope_2d=True): (N, 2) or (B, N, 2) (row, column)", None)
            if packed:
                lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
                longest = int(lengths.max()) if lengths.numel() and device.type != "meta" and \
                    not torch.compiler.is_compiling() else 0
            else:
                longest = N
            if longest > self.max_seq_len:
                _fail(arg, f"given, or sequences of at most max_seq_len = {self.max_seq_len} tokens (the default "
                           f"positions 0..N-1 index the tables; build the layer with a larger max_seq_len)",
                      f"None with a sequence of {longest} tokens")
            if packed:
                starts = cu_seqlens[:-1].long().repeat_interleave(lengths, output_size=N)
                return (torch.arange(N, device=device) - starts)[:, None]
            return torch.arange(N, device=device)[:, None]
        if not isinstance(pos, torch.Tensor):
            _fail(arg, "an integer tensor", type(pos).__name__)
        if pos.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            _fail(arg, "an integer tensor", pos.dtype)
        if pos.device != device:
            _fail(arg, f"on {device} like the input", pos.device)
        if self.rope_2d:
            shapes = "(total, 2)" if packed else "(N, 2) or (B, N, 2)"
            ok = pos.dim() >= 2 and pos.shape[-1] == 2 and pos.shape[-2] == N and (
                pos.dim() == 2 or (pos.dim() == 3 and not packed and pos.shape[0] == B))
        else:
            shapes = "(total,)" if packed else "(N,) or (B, N)"
            ok = pos.dim() >= 1 and pos.shape[-1] == N and (pos.dim() == 1 or (pos.dim() == 2 and not packed
                                                                                and pos.shape[0] == B))
        if not ok:
            _fail(arg, f"{shapes} with N = {N} tokens" + ("" if packed else f" and B = {B}"), tuple(pos.shape))
        if pos.numel() and pos.device.type != "meta" and not torch.compiler.is_compiling():  # values: not on meta
            if self.rope_2d:
                lo = pos.amin(dim=tuple(range(pos.dim() - 1))).tolist()
                hi = pos.amax(dim=tuple(range(pos.dim() - 1))).tolist()
                if min(lo) < 0 or hi[0] >= self.max_h or hi[1] >= self.max_w:
                    _fail(arg, f"rows in [0, max_h = {self.max_h}) and columns in [0, max_w = {self.max_w}) "
                               f"(build the layer with larger max_h / max_w)",
                          f"rows {lo[0]}..{hi[0]}, columns {lo[1]}..{hi[1]}")
            else:
                lo, hi = int(pos.min()), int(pos.max())
                if lo < 0 or hi >= self.max_seq_len:
                    _fail(arg, f"in [0, max_seq_len = {self.max_seq_len}) (build the layer with a larger "
                               f"max_seq_len)", f"values {lo}..{hi}")
        pos = pos.long()
        if self.rope_2d:
            return torch.stack([pos[..., 0], pos[..., 1] + self.row_cos.shape[0]], -1)
        return pos[..., None]

    def _turn_gate(self, s: torch.Tensor, qpos: torch.Tensor) -> torch.Tensor:
        """s~ = R(pos) s, computed in fp32 (fp64) and stored in s's dtype."""
        c, sn = self._tables(gate=True)
        acc = torch.float64 if s.dtype == torch.float64 else torch.float32
        return reference.rotate(s.to(acc), c, sn, qpos).to(s.dtype)

    # ---- forward ----

    def forward(self, xq: torch.Tensor, xc: Optional[torch.Tensor] = None, mask: PF.Mask = None,
                positions: Optional[torch.Tensor] = None, ctx_positions: Optional[torch.Tensor] = None,
                positions_hw: Optional[torch.Tensor] = None, ctx_positions_hw: Optional[torch.Tensor] = None,
                block_size: Optional[int] = None, cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
        packed = cu_seqlens is not None
        if xc is xq:
            xc = None
        self._check_x("xq", xq, packed)
        if xc is not None:
            self._check_x("xc", xc, packed)
            if xc.shape[0] != xq.shape[0]:
                _fail("xc", f"the {'packed tokens' if packed else 'batch size'} of 'xq' ({xq.shape[0]})",
                      xc.shape[0])
        qp, cp, qname, cname = self._position_args(positions, ctx_positions, positions_hw, ctx_positions_hw,
                                                   xc is None)
        B = xq.shape[0]
        T = xq.shape[0] if packed else xq.shape[1]
        N = T if xc is None else xc.shape[0] if packed else xc.shape[1]
        if packed:
            PF.check_cu_seqlens(cu_seqlens, T, xq.device)
        cpos = self._positions(cname, cp, B, N, xq.device, cu_seqlens)
        qpos = cpos if xc is None and cp is qp else self._positions(qname, qp, B, T, xq.device, cu_seqlens)
        if PF.is_causal(mask) and T != N:
            _fail("xq", f"as many tokens as the context with mask='causal' (N = {N})", f"T = {T}")
        if PF.is_causal(mask) and (qpos is cpos or (qp is None and cp is None)) and \
                ops.has_kernel("poly_causal_gated_rope", xq.device):
            return self._causal_fused_rope(xq, xc, cpos, block_size, cu_seqlens)
        h, s = self.project(xq, xc)
        PF._check_aggregate(h, self.po_coeff, mask, block_size, cu_seqlens)
        s = self._turn_gate(s, qpos)
        cos, sin = self._tables(gate=False)
        if PF.is_causal(mask):
            H = ops.poly_causal_rope(h, self.po_coeff, cos, sin, cpos, 1 if block_size is None else block_size,
                                     cu_seqlens)
            return self.ag_proj(PF.select(s, H, self.n_sel_heads))
        if packed:
            H = ops.poly_mean_rope(h, self.po_coeff, cos, sin, cpos, None, cu_seqlens)
            lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
            H = H.repeat_interleave(lengths, dim=0, output_size=T)
            return self.ag_proj(PF.select(s, H, self.n_sel_heads))
        if PF.is_pooled(mask):
            return self._out(s, ops.poly_mean_rope(h, self.po_coeff, cos, sin, cpos, mask))
        # (B, T, N): a batched matmul over the rotated features (O(T N E), like the plain layer's).
        acc = torch.float64 if h.dtype == torch.float64 else torch.float32
        p = reference.rotate(ops.poly_eval(h.to(acc), self.po_coeff), cos, sin, cpos)
        m = mask.to(acc)
        den = m.sum(-1, keepdim=True)
        H = (torch.bmm(m, p) / torch.where(den == 0, torch.ones_like(den), den)).to(h.dtype)
        return self.ag_proj(PF.select(s, H, self.n_sel_heads))

    def _causal_fused_rope(self, xq: torch.Tensor, xc: Optional[torch.Tensor], pos: torch.Tensor,
                           block_size: Optional[int], cu_seqlens: Optional[torch.Tensor]) -> torch.Tensor:
        """Causal mixing through the fused gated rope op (queries and context at the same positions): h and the
        gate are read once, turned inside the op, and y written once."""
        hs, bias = self._gated_input(xq, xc)
        E = self.state_width
        PF._check_aggregate(hs[..., :E], self.po_coeff, "causal", block_size, cu_seqlens)
        cos, sin = self._tables(gate=False)
        gcos, gsin = self._tables(gate=True)
        y = ops.poly_causal_gated_rope(hs, self.po_coeff, bias, cos, sin, gcos, gsin, pos,
                                       1 if block_size is None else block_size, cu_seqlens)
        return self.ag_proj(y)

    # ---- recurrent state ----

    def _append(self, h: torch.Tensor, st: PoMState, cpos: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(H, new_sum): the chunk's rotated features added to the state's running sum, in the state's dtype."""
        T = h.shape[1]
        hh = h if h.dtype in (torch.float32, torch.float64) else h.float()
        cos, sin = self._tables(gate=False)
        chunk = ops.poly_mean_rope(hh, self.po_coeff, cos, sin, cpos).to(st.sum.dtype) * T
        new_sum = st.sum + chunk
        cnt = (st.count + T).to(new_sum.dtype)[:, None]
        H = torch.where(cnt > 0, new_sum / cnt.clamp_min(1), torch.zeros_like(new_sum))
        return H, new_sum

    def allocate_state(self, batch_size: int, device=None, dtype: Optional[torch.dtype] = None,
                       weighted: bool = False) -> PoMState:
        """A zero state for `step` (see PoM.allocate_state); its count is the token count that positions continue
        from, so weighted states are refused."""
        if weighted:
            _fail("weighted", "False for a rotary layer (its state counts tokens, the next position)", weighted)
        return super().allocate_state(batch_size, device, dtype)

    def _chunk_positions(self, st: PoMState, B: int, T: int, positions, positions_hw, device) -> torch.Tensor:
        """Positions of an appended chunk: given, or (1-D) count + 0..T-1 per batch row."""
        if st.count.is_floating_point():
            _fail("state", "a state that counts tokens (int64 count; see allocate_state)", "a weighted state")
        if self.rope_2d:
            if positions is not None:
                _fail("positions", "None for a 2-D layer (rope_2d=True): give positions_hw", "a tensor")
            return self._positions("positions_hw", positions_hw, B, T, device, None)
        if positions_hw is not None:
            _fail("positions_hw", "None for a 1-D layer (rope_2d=False): give positions", "a tensor")
        if positions is None:
            positions = st.count[:, None] + torch.arange(T, device=device)
        return self._positions("positions", positions, B, T, device, None)

    def state_forward(self, xq: torch.Tensor, xc: Optional[torch.Tensor] = None,
                      state: Union[None, PoMState, Dict[str, Any]] = None, positions: Optional[torch.Tensor] = None,
                      positions_hw: Optional[torch.Tensor] = None):
        """Append a chunk and read it (every token of the chunk sees the state including the whole chunk), at the
        chunk's positions (default, 1-D: the state's count onwards). Returns (out, new_state); the state is not
        modified. Self-mixing: one set of positions for the chunk's context and its queries."""
        self._check_x("xq", xq, False)
        if xc is not None:
            self._check_x("xc", xc, False)
            if xc.shape[0] != xq.shape[0] or xc.shape[1] != xq.shape[1]:
                _fail("xc", f"(B, T, D) like 'xq' {tuple(xq.shape[:2])} (the chunk's context and queries share "
                            f"positions)", tuple(xc.shape))
        st, as_dict = self._as_state(state, xq.shape[0], xq.device)
        h, s = self.project(xq, xc)
        PF.check_state(h, self.po_coeff, st.sum, st.count)  # the state first: default positions come from it
        pos = self._chunk_positions(st, xq.shape[0], xq.shape[1], positions, positions_hw, xq.device)
        H, new_sum = self._append(h, st, pos)
        new = PoMState(new_sum, st.count + xq.shape[1])
        return self._out(self._turn_gate(s, pos), H), (new.to_reference() if as_dict else new)

    def step(self, x: torch.Tensor, state: PoMState, positions: Optional[torch.Tensor] = None,
             positions_hw: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Decode: x (B, T, D) appended to `state` (updated in place) at its positions (default, 1-D: count on)."""
        if not isinstance(state, PoMState):
            raise ValueError(f"pom_ext.PoMRoPE.step: argument 'state' must be a PoMState (see allocate_state), "
                             f"got {type(state).__name__}")
        self._check_x("x", x, False)
        h, s = self.project(x)
        PF.check_state(h, self.po_coeff, state.sum, state.count)  # the state first: default positions come from it
        pos = self._chunk_positions(state, x.shape[0], x.shape[1], positions, positions_hw, x.device)
        H, new_sum = self._append(h, state, pos)
        if torch.is_grad_enabled() and new_sum.requires_grad:
            state.sum = new_sum
            state.count = state.count + x.shape[1]
        else:
            state.sum.copy_(new_sum)
            state.count.add_(x.shape[1])
        return self._out(self._turn_gate(s, pos), H)
