"""The PoM layer (SPEC §1) and its constant-memory recurrent state (SPEC §2)."""
from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.jit import Final

from . import functional as PF
from . import ops


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"pom_ext.PoM: argument '{name}' must be an integer >= {minimum}, got {value!r}")
    return value


class PoMState:
    """Recurrent state of one PoM layer: a running sum `sum` (B, E) fp32 (fp64 for a float64 layer) and a token
    count `count` (B,) int64 — or, for a weighted state (allocate(..., weighted=True)), the sum of w p and the
    weight total `count` (B,) in the sum's dtype.

    Memory is constant in the context length. `PoM.step` updates it in place.
    """

    def __init__(self, sum: torch.Tensor, count: torch.Tensor):
        self.sum = sum
        self.count = count

    @classmethod
    def allocate(cls, batch_size: int, width: int, device=None, dtype: torch.dtype = torch.float32,
                 weighted: bool = False) -> "PoMState":
        return cls(torch.zeros(batch_size, width, device=device, dtype=dtype),
                   torch.zeros(batch_size, device=device, dtype=dtype if weighted else torch.int64))

    @classmethod
    def from_reference(cls, state: Dict[str, Any], batch_size: int, width: int, device=None,
                       dtype: torch.dtype = torch.float32) -> "PoMState":
        """From the reference form {'h': (B, 1, E) running mean, 'n': token count}."""
        if not isinstance(state, dict) or "h" not in state or "n" not in state:
            raise ValueError(f"pom_ext: argument 'state' must be a PoMState or a dict with keys 'h' and 'n', "
                             f"got {type(state).__name__}")
        try:
            n = torch.as_tensor(state["n"], device=device)
            h = torch.as_tensor(state["h"], device=device)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"pom_ext: argument 'state' must hold tensors (or numbers) 'h' and 'n', got {e}") from e
        if n.numel() not in (1, batch_size) or n.is_floating_point() or n.is_complex() or (n < 0).any():
            raise ValueError(f"pom_ext: argument 'state' must hold a token count 'n' >= 0, one integer or one per "
                             f"batch row ({batch_size}), got {n.dtype} of shape {tuple(n.shape)}")
        if h.numel() not in (1, batch_size * width) or not (h.is_floating_point() or h.numel() == 1):
            raise ValueError(f"pom_ext: argument 'state' must hold a running mean 'h' of shape (B, 1, E) = "
                             f"{(batch_size, 1, width)}, got {h.dtype} of shape {tuple(h.shape)}")
        n = n.to(torch.int64).reshape(-1).expand(batch_size).clone()
        h = h.to(dtype)
        mean = h.reshape(batch_size, width) if h.numel() > 1 else h.reshape(1, 1).expand(batch_size, width)
        return cls(mean * n[:, None].to(dtype), n)

    def to_reference(self) -> Dict[str, Any]:
        return {"h": self.mean().unsqueeze(1), "n": self.count.clone()}

    def mean(self) -> torch.Tensor:
        """H = sum / count (0 where count == 0): (B, E)."""
        c = self.count.to(self.sum.dtype)[:, None]
        return torch.where(c > 0, self.sum / c.clamp_min(1), torch.zeros_like(self.sum))

    def reset_(self) -> "PoMState":
        self.sum.zero_()
        self.count.zero_()
        return self

    def clone(self) -> "PoMState":
        return PoMState(self.sum.clone(), self.count.clone())

    @property
    def batch_size(self) -> int:
        return self.sum.shape[0]

    def __repr__(self) -> str:
        return f"PoMState(batch_size={self.sum.shape[0]}, width={self.sum.shape[1]}, count={self.count.tolist()})"


class PoM(nn.Module):
    """Polynomial Mixer: a linear-time drop-in for self-attention.

    PoM(dim, degree, expand, n_groups=1, n_sel_heads=1, bias=False); E = expand * dim.
    forward(xq: (B, T, D), xc: (B, N, D) | None, mask) -> (B, T, D), with mask None, "causal"
    (block-causal with block_size=F), (B, N) weights or padding, or (B, T, N); packed sequences:
    xq: (total, D) with cu_seqlens (B + 1,) and mask None or "causal". weight=(B, N) (or (total,)) weighs the
    context tokens of a mean or of causal prefix means: with mask="causal" and a padding mask (False / 0 on
    padded tokens) every row gives what it gives alone, left or right padded.
    Parameter names and shapes match the reference implementation (state dicts load both ways).
    torch.jit.script compiles forward (every mask form); scripted, the checks of xq / xc are left to the ops.
    """

    dim: Final[int]
    degree: Final[int]
    expand: Final[int]
    n_groups: Final[int]
    n_sel_heads: Final[int]
    state_width: Final[int]
    gate_width: Final[int]

    def __init__(self, dim: int, degree: int, expand: int, n_groups: int = 1, n_sel_heads: int = 1,
                 bias: bool = False):
        super().__init__()
        _check_int("dim", dim, 1)
        _check_int("degree", degree, 1)
        _check_int("expand", expand, 1)
        _check_int("n_groups", n_groups, 1)
        _check_int("n_sel_heads", n_sel_heads, 0)
        if dim % n_groups:
            raise ValueError(f"pom_ext.PoM: 'dim' ({dim}) must be divisible by 'n_groups' ({n_groups})")
        E = expand * dim
        if n_sel_heads > 1 and E % n_sel_heads:
            raise ValueError(f"pom_ext.PoM: 'n_sel_heads' ({n_sel_heads}) must divide 'expand' * 'dim' = {E}")
        self.dim, self.degree, self.expand = dim, degree, expand
        self.n_groups, self.n_sel_heads = n_groups, n_sel_heads
        self.state_width = E
        self.gate_width = n_sel_heads if n_sel_heads > 1 else E
        # Creation order follows the reference so that one seed gives the same initial weights. The projections
        # of the other n_groups form are None (plain attributes, not in the state dict), for TorchScript.
        if n_groups > 1:
            self.po_proj = nn.Conv1d(dim, E, kernel_size=1, bias=bias, groups=n_groups)
            self.se_proj = nn.Linear(dim, self.gate_width, bias=True)
            self.qc_proj, self.se_bias = None, None
        else:
            self.qc_proj = nn.Linear(dim, E + self.gate_width, bias=False)
            self.se_bias = nn.Parameter(torch.zeros(self.gate_width))
            self.po_proj, self.se_proj = None, None
        self.po_coeff = nn.Parameter(torch.randn(E, degree).clamp(-1e-3, 1e-3))
        self.ag_proj = nn.Linear(E, dim, bias=bias)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, degree={self.degree}, expand={self.expand}, n_groups={self.n_groups}, "
                f"n_sel_heads={self.n_sel_heads}")

    # ---- projections ----

    def _check_x(self, name: str, x, packed: bool) -> None:
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"pom_ext.PoM: argument '{name}' must be a tensor, got {type(x).__name__}")
        want = 2 if packed else 3
        if x.dim() != want or x.shape[-1] != self.dim:
            layout = "(total, D)" if packed else "(B, T, D)" if name == "xq" else "(B, N, D)"
            raise ValueError(f"pom_ext.PoM: argument '{name}' must be a {want}-D tensor {layout} with "
                             f"D = {self.dim}, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"pom_ext.PoM: argument '{name}' must be floating point, got {x.dtype}")
        param = self.po_coeff
        if x.device != param.device:
            raise ValueError(f"pom_ext.PoM: argument '{name}' is on {x.device} but the layer's parameters are on "
                             f"{param.device}; move both to one device")
        if x.dtype != param.dtype and not torch.is_autocast_enabled(x.device.type):
            raise ValueError(f"pom_ext.PoM: argument '{name}' is {x.dtype} but the layer's parameters are "
                             f"{param.dtype}; convert one of them (or run under torch.autocast)")

    def _context(self, xc: torch.Tensor) -> torch.Tensor:
        if self.po_proj is not None:
            g, E, D = self.n_groups, self.state_width, self.dim
            w = self.po_proj.weight.view(g, E // g, D // g)
            h = torch.einsum("...gd,ged->...ge", xc.unflatten(-1, (g, D // g)), w).flatten(-2)
            b = self.po_proj.bias
            return h if b is None else h + b
        return F.linear(xc, self.qc_proj.weight[: self.state_width])

    def _gate(self, xq: torch.Tensor) -> torch.Tensor:
        if self.se_proj is not None:
            return F.hardsigmoid(self.se_proj(xq))
        return F.hardsigmoid(F.linear(xq, self.qc_proj.weight[self.state_width:]) + self.se_bias)

    def project(self, xq: torch.Tensor, xc: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """(h, s): context h (B, N, E) and gate s = hardsigmoid(.) (B, T, S).

        With n_groups == 1 and self-mixing both come from one GEMM; h is then a strided view. (split, not two
        slices: the backward of a slice fills a zero tensor of the GEMM's output for each; split's concatenates.)
        """
        if self.qc_proj is not None:
            if xc is None:
                z = F.linear(xq, self.qc_proj.weight)
                h, pre = z.split([self.state_width, self.gate_width], -1)
                return h, F.hardsigmoid(pre + self.se_bias)
        return self._context(xq if xc is None else xc), self._gate(xq)

    def _gated_input(self, xq: torch.Tensor, xc: Optional[torch.Tensor]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(hs, gate_bias) for the fused causal op: hs = [h | gate pre-activation] (B, N, E + S) and the bias the
        op adds to the pre-activation (None where the gate's projection added its own). With n_groups == 1 and
        self-mixing hs is the output of one GEMM."""
        if self.qc_proj is not None and xc is None:
            return F.linear(xq, self.qc_proj.weight), self.se_bias
        if self.qc_proj is not None:
            pre, bias = F.linear(xq, self.qc_proj.weight[self.state_width:]), self.se_bias
        else:
            # The bias inside the GEMM, as the unfused gate adds it: in 16 bits the pre-activation is then rounded
            # once as a whole; rounding the product before adding a bias that cancels it loses its low bits.
            pre, bias = self.se_proj(xq), None
        return torch.cat([self._context(xq if xc is None else xc), pre], -1), bias

    def _causal_fused(self, xq: torch.Tensor, xc: Optional[torch.Tensor], block_size: Optional[int],
                      cu_seqlens: Optional[torch.Tensor]) -> torch.Tensor:
        """Causal mixing through the fused gated op: h and the gate are read once, y written once, and the
        backward writes the gradient of the projection's output as one tensor."""
        hs, bias = self._gated_input(xq, xc)
        PF._check_aggregate(hs[..., : self.state_width], self.po_coeff, "causal", block_size, cu_seqlens)
        y = ops.poly_causal_gated(hs, self.po_coeff, bias, 1 if block_size is None else block_size, cu_seqlens)
        return self.ag_proj(y)

    def _out(self, s: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
        """ag_proj(select(s, H)) for H: (B, E) shared by all T queries of s: (B, T, S) (SPEC §3)."""
        W, b = self.ag_proj.weight, self.ag_proj.bias
        B, T = s.shape[0], s.shape[1]
        G, E, D = self.n_sel_heads, self.state_width, self.dim
        H = H.to(s.dtype)
        # The shortcuts sum over tokens and channels in another order than y = s * H followed by the projection:
        # in 16 bits their rounded intermediates (Gamma, W diag(H) and their gradients) lose what that order
        # keeps. Gamma is small (T*G*D work): 16-bit inputs compute it in fp32; W diag(H) costs a full
        # projection: 16-bit inputs form y instead.
        half = s.dtype == torch.float16 or s.dtype == torch.bfloat16
        if G > 1:
            # Gamma_g = sum_{e in g} W[:, e] H[e]: out = s @ Gamma^T, T*G*D work instead of T*E*D.
            acc = torch.float32 if half else s.dtype
            gamma = torch.einsum("dgj,bgj->bgd", W.view(D, G, E // G).to(acc), H.view(B, G, E // G).to(acc))
            out = torch.bmm(s.to(acc), gamma)
            if b is not None:
                out = out + b.to(acc)
            return out.to(s.dtype)
        if T > D and not half:
            # W diag(H) applied to s: y = s * H is never formed.
            out = torch.bmm(s, (W.unsqueeze(0) * H.unsqueeze(1)).transpose(1, 2))
            return out if b is None else out + b
        return F.linear(s * H.unsqueeze(1), W, b)

    # ---- forward ----

    def forward(self, xq: torch.Tensor, xc: Optional[torch.Tensor] = None, mask: PF.Mask = None,
                block_size: Optional[int] = None, cu_seqlens: Optional[torch.Tensor] = None,
                weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """xq: (B, T, D), xc: (B, N, D) or None (self-mixing) -> (B, T, D); packed: (total, D) with cu_seqlens.

        weight: (B, N) ((total,) packed) per-token weights of the context, bool / integer padding masks or floats
        >= 0; with mask None it is the weighted mean, with mask="causal" the weighted prefix means (a query whose
        prefix weighs nothing reads H = 0). Pass block_size, cu_seqlens and weight by keyword.
        """
        packed = cu_seqlens is not None
        if xc is xq:
            xc = None
        if not torch.jit.is_scripting():
            self._check_x("xq", xq, packed)
            if xc is not None:
                self._check_x("xc", xc, packed)
        if xc is not None and xc.shape[0] != xq.shape[0]:
            what = "packed tokens" if packed else "batch size"
            raise ValueError(f"pom_ext.PoM: 'xc' and 'xq' must have the same {what}, got "
                             f"{xc.shape[0]} and {xq.shape[0]}")
        if PF.is_causal(mask) and not packed:
            n = xq.shape[1] if xc is None else xc.shape[1]
            if xq.shape[1] != n:
                raise ValueError(f"pom_ext.PoM: with mask='causal', argument 'xq' must have as many tokens as "
                                 f"'xc', got T = {xq.shape[1]} and N = {n}")
        if not torch.jit.is_scripting():
            if isinstance(mask, torch.Tensor) and mask.dim() == 3 and not packed:
                B, T = xq.shape[0], xq.shape[1]
                N = T if xc is None else xc.shape[1]
                if tuple(mask.shape) != (B, T, N):
                    raise ValueError(f"pom_ext.PoM: argument 'mask' must be (B, T, N) = {(B, T, N)} for a (B, T, N) "
                                     f"mask (T query tokens of 'xq', N context tokens), got shape "
                                     f"{tuple(mask.shape)}")
            if weight is None and PF.is_causal(mask) and ops.has_kernel("poly_causal_gated", xq.device):
                return self._causal_fused(xq, xc, block_size, cu_seqlens)
        if weight is not None:
            weight = PF.as_weight(weight)
        h, s = self.project(xq, xc)
        if PF.is_pooled(mask) and not packed:
            return self._out(s, PF.aggregate(h, self.po_coeff, mask, block_size=block_size, weight=weight)[:, 0])
        y = PF.pom(h, s, self.po_coeff, mask, n_sel_heads=self.n_sel_heads, block_size=block_size,
                   cu_seqlens=cu_seqlens, weight=weight)
        return self.ag_proj(y)

    # ---- recurrent state ----

    def _state_dtype(self) -> torch.dtype:
        """The running sum's dtype: float64 for a float64 layer, else float32."""
        return torch.float64 if self.po_coeff.dtype == torch.float64 else torch.float32

    def allocate_state(self, batch_size: int, device=None, dtype: Optional[torch.dtype] = None,
                       weighted: bool = False) -> PoMState:
        """A zero state for `step`, on the layer's device unless given; its sum is float64 for a float64 layer,
        else float32, unless `dtype` says otherwise. Its count is an int64 token count, which takes padding masks
        (whole weights); weighted=True makes it a weight total in the sum's dtype, for any weights >= 0."""
        _check_int("batch_size", batch_size, 0)
        if dtype is None:
            dtype = self._state_dtype()
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"pom_ext.PoM: argument 'dtype' of the state must be torch.float32 or torch.float64, "
                             f"got {dtype}")
        if device is None:
            device = self.po_coeff.device
        return PoMState.allocate(batch_size, self.state_width, device=device, dtype=dtype, weighted=bool(weighted))

    def _as_state(self, state, batch: int, device) -> Tuple[PoMState, bool]:
        if state is None:
            return self.allocate_state(batch, device), False
        if isinstance(state, PoMState):
            if tuple(state.sum.shape) != (batch, self.state_width):
                raise ValueError(f"pom_ext.PoM: argument 'state' holds a sum of shape {tuple(state.sum.shape)}, "
                                 f"expected (B, E) = {(batch, self.state_width)}")
            return state, False
        return PoMState.from_reference(state, batch, self.state_width, device, self._state_dtype()), True

    def state_forward(self, xq: torch.Tensor, xc: Optional[torch.Tensor] = None,
                      state: Union[None, PoMState, Dict[str, Any]] = None, weight: Optional[torch.Tensor] = None):
        """Append a chunk and read it: every token of the chunk sees the state including the whole chunk.

        xq: (B, T, D), xc: (B, N, D) or None; weight: (B, N) weights of the chunk's context tokens (a padding mask,
        or any weights >= 0 with a weighted state). Returns (out (B, T, D), new_state); the state is not modified
        (autograd flows through it). A reference-style dict {'h', 'n'} is accepted and returned as such.
        """
        self._check_x("xq", xq, False)
        if xc is not None:
            self._check_x("xc", xc, False)
            if xc.shape[0] != xq.shape[0]:
                raise ValueError(f"pom_ext.PoM: 'xc' and 'xq' must have the same batch size, got "
                                 f"{xc.shape[0]} and {xq.shape[0]}")
        st, as_dict = self._as_state(state, xq.shape[0], xq.device)
        h, s = self.project(xq, xc)
        H, new_sum, new_count = self._update(h, st, weight)
        new = PoMState(new_sum, new_count)
        return self._out(s, H), (new.to_reference() if as_dict else new)

    def _update(self, h: torch.Tensor, state: PoMState, weight: Optional[torch.Tensor]):
        """(H, new_sum, new_count) of appending h (B, T, E), with token weights (B, T) or None."""
        if weight is None and not state.count.is_floating_point():
            PF.check_state(h, self.po_coeff, state.sum, state.count)
            return ops.poly_state_update(h, self.po_coeff, state.sum, state.count)
        return PF.weighted_state_update(h, self.po_coeff, state.sum, state.count, weight)

    def step(self, x: torch.Tensor, state: PoMState, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Decode: x (B, T, D) (usually T = 1) appended to `state`, which is updated in place. weight: (B, T)
        weights of the new tokens (a padding mask: 0 / False adds nothing to the state), or None."""
        if not isinstance(state, PoMState):
            raise ValueError(f"pom_ext.PoM.step: argument 'state' must be a PoMState (see allocate_state), "
                             f"got {type(state).__name__}")
        self._check_x("x", x, False)
        h, s = self.project(x)
        if weight is None and not state.count.is_floating_point() and \
                not (torch.is_grad_enabled() and (h.requires_grad or state.sum.requires_grad)):
            PF.check_state(h, self.po_coeff, state.sum, state.count)
            return self._out(s, ops.poly_state_step_(h, self.po_coeff, state.sum, state.count))
        H, new_sum, new_count = self._update(h, state, weight)
        if torch.is_grad_enabled() and (h.requires_grad or state.sum.requires_grad):
            state.sum, state.count = new_sum, new_count
        else:
            state.sum.copy_(new_sum)
            state.count.copy_(new_count)
        return self._out(s, H)
