"""The Python entry points of the pom_ext ops.

Everything about an op lives in the compiled library (`pom_ext._C`; schemas in csrc/registration.cpp): its
kernel per device, its Meta kernel (shapes, for the meta device and fake tensors) and its autograd, registered
with the dispatcher, so Python, C++ and TorchScript callers get the same gradients. When that library cannot be
loaded, the same entry points run `pom_ext.reference` and warn once, at first use, with the command that
rebuilds it. The entry points are scriptable: under torch.jit.script they call the registered ops (so scripting
needs the compiled library).
"""
import warnings
from typing import Optional, Tuple

import torch

from . import reference

REBUILD = "pip install --no-build-isolation --no-deps --force-reinstall ."

_load_error: Optional[BaseException] = None
try:
    from . import _C  # loads the op library, which registers the ops with their kernels, autograd and shapes
except (ImportError, OSError) as e:  # missing or broken build
    _load_error = e
else:
    if _C.registration_error():
        # Another build of the op library (libpom_ext loaded by a C++ library in this process) registered the
        # ops first: its kernels would run in place of this package's.
        raise ImportError(_C.registration_error())

_warned = False


def native_available() -> bool:
    """True when the compiled kernels are loaded."""
    return _load_error is None


def cpu_isa() -> str:
    """The CPU build of the compiled kernels that calls take now: "avx512", "avx2" or "base" (the best this
    CPU runs, capped by the environment variable POM_EXT_CPU_ISA), or "reference" without the compiled library."""
    return torch.ops.pom_ext.cpu_isa() if _load_error is None else "reference"


def _native() -> bool:
    global _warned
    if _load_error is None:
        return True
    if not _warned:
        _warned = True
        warnings.warn(
            f"pom_ext: the compiled kernels could not be loaded ({_load_error}); running the pure-PyTorch "
            f"reference instead, which is much slower. Rebuild from the source tree with:\n    {REBUILD}",
            RuntimeWarning,
            stacklevel=3,
        )
    return False


# Fake tensors, autograd and the refusal of double backward are registered by the compiled library itself
# (csrc/meta.cpp, csrc/autograd.cpp), for Python and C++ callers alike: nothing is registered here.


# ---- entry points ----

def poly_eval(h: torch.Tensor, coeff: torch.Tensor) -> torch.Tensor:
    """p = poly(act(h)) element-wise. h: (..., E), coeff: (E, K) -> (..., E)."""
    if not torch.jit.is_scripting():
        if not _native():
            return reference.poly_eval(h, coeff)
    return torch.ops.pom_ext.poly_eval(h, coeff)


def poly_mean(h: torch.Tensor, coeff: torch.Tensor, weight: Optional[torch.Tensor] = None,
              cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Weighted mean of p over the sequence. h: (B, N, E) or packed (total, E) -> (B, E)."""
    if not torch.jit.is_scripting():
        if not _native():
            return reference.poly_mean(h, coeff, weight, cu_seqlens)
    return torch.ops.pom_ext.poly_mean(h, coeff, weight, cu_seqlens)


def poly_causal(h: torch.Tensor, coeff: torch.Tensor, block_size: int = 1,
                cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Block-causal prefix mean of p (block_size 1: token-causal); output has h's shape."""
    if not torch.jit.is_scripting():
        if not _native():
            return reference.poly_causal(h, coeff, block_size, cu_seqlens)
    return torch.ops.pom_ext.poly_causal(h, coeff, block_size, cu_seqlens)


def poly_causal_weighted(h: torch.Tensor, coeff: torch.Tensor, weight: torch.Tensor, block_size: int = 1,
                         cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Weighted block-causal prefix mean: H_t = sum_{n <= end(t)} w_n p_n / sum_{n <= end(t)} w_n (0 where that sum
    is 0; end(t) the last token of t's block). weight: (B, N) (or (total,) packed), bool padding or floating >= 0;
    padded tokens (w = 0) contribute nothing. Output has h's shape; gradients for h, coeff and a floating weight."""
    if not torch.jit.is_scripting():
        if not _native() or not has_kernel("poly_causal_weighted", h.device):
            return reference.poly_causal_weighted(h, coeff, weight, block_size, cu_seqlens)
    return torch.ops.pom_ext.poly_causal_weighted(h, coeff, weight, block_size, cu_seqlens)


def poly_causal_gated(hs: torch.Tensor, coeff: torch.Tensor, gate_bias: Optional[torch.Tensor] = None,
                      block_size: int = 1, cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The causal mixer in one pass: hs = [h | pre] with E = coeff.shape[0] context columns then S gate columns
    (S = E, or S dividing E: one gate per group of E / S channels) -> y = hardsigmoid(pre + gate_bias) * H,
    H the block-causal prefix mean of p(h); y has E columns. Its gradient w.r.t. hs is one tensor."""
    if not torch.jit.is_scripting():
        if not _native():
            return reference.poly_causal_gated(hs, coeff, gate_bias, block_size, cu_seqlens)
    return torch.ops.pom_ext.poly_causal_gated(hs, coeff, gate_bias, block_size, cu_seqlens)


def _check_rope(h: torch.Tensor, coeff: torch.Tensor, E: int, cos: torch.Tensor, sin: torch.Tensor,
                positions: torch.Tensor, cu_seqlens: Optional[torch.Tensor], block_size: Optional[int] = None,
                h_arg: str = "h") -> None:
    """The compiled rope ops' argument rules (csrc/internal/pom_ext/checks.h), for the calls that run the
    reference instead (no compiled library, or a device without a kernel): the reference indexes the tables with
    the positions as given, so a negative one would wrap around and a float one be truncated."""
    from . import functional as PF  # functional imports this module
    fail = PF._fail
    packed = cu_seqlens is not None
    if not isinstance(h, torch.Tensor) or not h.is_floating_point() or h.dim() != (2 if packed else 3):
        fail(h_arg, "a floating-point tensor " + ("(total, E) with cu_seqlens" if packed else "(B, N, E)"),
             tuple(h.shape) if isinstance(h, torch.Tensor) else type(h))
    PF.check_coeff(coeff, E)
    if packed:
        PF.check_cu_seqlens(cu_seqlens, h.shape[0], h.device)
    if block_size is not None:
        PF._check_block_size(block_size)
    for name, t in (("coeff", coeff), ("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            fail(name, "a floating-point tensor", t.dtype if isinstance(t, torch.Tensor) else type(t))
        if t.device != h.device:
            fail(name, f"on {h.device} like '{h_arg}'", t.device)
    if cos.dim() != 2 or sin.shape != cos.shape:
        fail("cos", "(L, P), and 'sin' of the same shape", f"{tuple(cos.shape)} and {tuple(sin.shape)}")
    L, P = cos.shape
    if P < 1 or E % (2 * P):
        fail("cos", f"(L, P) with 2 P dividing the width E = {E} of the features", tuple(cos.shape))
    S = E // (2 * P)
    if not isinstance(positions, torch.Tensor) or positions.dtype not in (torch.int64, torch.int32):
        fail("positions", "an int64 or int32 tensor",
             positions.dtype if isinstance(positions, torch.Tensor) else type(positions))
    if positions.device != h.device:
        fail("positions", f"on {h.device} like '{h_arg}'", positions.device)
    wants = [(h.shape[0], S)] if packed else [(h.shape[1], S), (h.shape[0], h.shape[1], S)]
    if tuple(positions.shape) not in wants:
        fail("positions", f"{'(total, S)' if packed else '(N, S) or (B, N, S)'} = {' or '.join(map(str, wants))} "
                          f"(S = E / (2 P) = {S} rotation sections)", tuple(positions.shape))
    if positions.numel() and positions.device.type != "meta" and not torch.compiler.is_compiling():
        lo, hi = (int(v) for v in torch.aminmax(positions))
        if lo < 0 or hi >= L:
            raise ValueError(f"pom_ext: argument 'positions' must lie in [0, {L}) (the rows of the cos / sin tables), "
                             f"got values from {lo} to {hi}")


def _check_gate_rope(hs: torch.Tensor, coeff: torch.Tensor, gate_bias: Optional[torch.Tensor], cos: torch.Tensor,
                     gate_cos: torch.Tensor, gate_sin: torch.Tensor) -> None:
    """The gated rope op's rules for its gates (after _check_rope on its features)."""
    E = coeff.shape[0]
    S = hs.shape[-1] - E
    for name, t in (("gate_cos", gate_cos), ("gate_sin", gate_sin), ("gate_bias", gate_bias)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.device != hs.device:
            raise ValueError(f"pom_ext: argument '{name}' must be a floating-point tensor on {hs.device} like "
                             f"'hs', got {t.dtype if isinstance(t, torch.Tensor) else type(t)}"
                             f"{' on ' + str(t.device) if isinstance(t, torch.Tensor) else ''}")
    sections = E // (2 * cos.shape[1])
    if gate_cos.dim() != 2 or gate_sin.shape != gate_cos.shape or gate_cos.shape[0] != cos.shape[0] or \
            S < 1 or E % S or gate_cos.shape[1] * 2 * sections != S:
        raise ValueError(f"pom_ext: argument 'gate_cos' must be (L, Pg) = ({cos.shape[0]}, Pg), and 'gate_sin' of "
                         f"the same shape, with 2 Pg gates in each of the {sections} rotation sections of the "
                         f"S = {S} gate columns of 'hs' (S dividing E = {E}), got {tuple(gate_cos.shape)} and "
                         f"{tuple(gate_sin.shape)}")
    if gate_bias is not None and tuple(gate_bias.shape) != (S,):
        raise ValueError(f"pom_ext: argument 'gate_bias' must be (S,) = ({S},), got {tuple(gate_bias.shape)}")


def poly_mean_rope(h: torch.Tensor, coeff: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   positions: torch.Tensor, weight: Optional[torch.Tensor] = None,
                   cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """poly_mean of the rotated features p~_n = R(positions_n) p_n. cos, sin: (L, P) tables with E = 2 P S (S
    sections of 2 P channels, pair i of section s = channels 2Ps + i and 2Ps + P + i); positions: (N, S) or (B, N, S)
    integer rows of the tables ((total, S) when packed) -> (B, E)."""
    if not torch.jit.is_scripting():
        if not _native() or not has_kernel("poly_mean_rope", h.device):
            _check_rope(h, coeff, h.shape[-1] if isinstance(h, torch.Tensor) else 0, cos, sin, positions,
                        cu_seqlens)
            if weight is not None:
                from . import functional as PF
                PF.check_weight(weight, h, cu_seqlens is not None, None)
            return reference.poly_mean_rope(h, coeff, cos, sin, positions, weight, cu_seqlens)
    return torch.ops.pom_ext.poly_mean_rope(h, coeff, cos, sin, positions, weight, cu_seqlens)


def poly_causal_rope(h: torch.Tensor, coeff: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     positions: torch.Tensor, block_size: int = 1,
                     cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """poly_causal of the rotated features (tables and positions as in poly_mean_rope); output has h's shape."""
    if not torch.jit.is_scripting():
        if not _native() or not has_kernel("poly_causal_rope", h.device):
            _check_rope(h, coeff, h.shape[-1] if isinstance(h, torch.Tensor) else 0, cos, sin, positions,
                        cu_seqlens, block_size)
            return reference.poly_causal_rope(h, coeff, cos, sin, positions, block_size, cu_seqlens)
    return torch.ops.pom_ext.poly_causal_rope(h, coeff, cos, sin, positions, block_size, cu_seqlens)


def poly_causal_gated_rope(hs: torch.Tensor, coeff: torch.Tensor, gate_bias: Optional[torch.Tensor],
                           cos: torch.Tensor, sin: torch.Tensor, gate_cos: torch.Tensor, gate_sin: torch.Tensor,
                           positions: torch.Tensor, block_size: int = 1,
                           cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """poly_causal_gated with rotary positions, in one pass: hs = [h | pre] as in poly_causal_gated; the features
    turn by (cos, sin) as in poly_causal_rope, the S gates hardsigmoid(pre + gate_bias) by (gate_cos, gate_sin)
    (L, Pg) at the same positions (2 Pg gates per section, gate j paired with j + Pg) -> y = s~ * H~ (E columns).
    Its gradient w.r.t. hs is one tensor; none for the tables."""
    if not torch.jit.is_scripting():
        if not _native() or not has_kernel("poly_causal_gated_rope", hs.device):
            _check_rope(hs, coeff, coeff.shape[0] if isinstance(coeff, torch.Tensor) else 0, cos, sin, positions,
                        cu_seqlens, block_size, h_arg="hs")
            _check_gate_rope(hs, coeff, gate_bias, cos, gate_cos, gate_sin)
            return reference.poly_causal_gated_rope(hs, coeff, gate_bias, cos, sin, gate_cos, gate_sin, positions,
                                                    block_size, cu_seqlens)
    return torch.ops.pom_ext.poly_causal_gated_rope(hs, coeff, gate_bias, cos, sin, gate_cos, gate_sin, positions,
                                                    block_size, cu_seqlens)


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The PoM block's causal depthwise convolution in the (B, T, D) layout: x (B, T, D), weight (D, K), bias (D,)
    or None -> y[b, t, d] = bias[d] + sum_k weight[d, k] x[b, t - K + 1 + k, d] (zeros before the first row), as
    nn.Conv1d(D, D, K, groups=D) on the left-padded, transposed input, without the transposes. On a device without
    a kernel of the op (not CPU, CUDA or meta), that convolution itself (pom_ext.reference)."""
    if not torch.jit.is_scripting():
        if not _native() or not has_kernel("causal_conv1d", x.device):
            return reference.causal_conv1d(x, weight, bias)
    return torch.ops.pom_ext.causal_conv1d(x, weight, bias)


def _kernel_devices():
    """{op: device types with a compiled kernel (meta: the Meta kernels)}, read once from the dispatcher (a constant
    for torch.compile)."""
    if not native_available():
        return {}
    ops = [name[len("pom_ext::"):] for name in torch._C._dispatch_get_all_op_names() if name.startswith("pom_ext::")]
    return {op: frozenset(dev for dev, key in (("cpu", "CPU"), ("cuda", "CUDA"), ("meta", "Meta"))
                          if torch._C._dispatch_has_kernel_for_dispatch_key(f"pom_ext::{op}", key)) for op in ops}


_KERNEL_DEVICES = _kernel_devices()


def has_kernel(op: str, device: torch.device) -> bool:
    """Whether the compiled library has a kernel of `op` (e.g. "poly_causal_gated") for `device`."""
    return device.type in _KERNEL_DEVICES.get(op, ())


def poly_state_update(h: torch.Tensor, coeff: torch.Tensor, state_sum: torch.Tensor,
                      count: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Append h: (B, T, E) to (state_sum (B, E), count (B,)) -> (H (B, E), new_sum, new_count)."""
    if not torch.jit.is_scripting():
        if not _native():
            return reference.poly_state_update(h, coeff, state_sum, count)
    return torch.ops.pom_ext.poly_state_update(h, coeff, state_sum, count)


def poly_state_step_(h: torch.Tensor, coeff: torch.Tensor, state_sum: torch.Tensor,
                     count: torch.Tensor) -> torch.Tensor:
    """In-place form of poly_state_update for decoding (no autograd): updates state_sum and count, returns H."""
    if not torch.jit.is_scripting():
        if not _native():
            H, new_sum, new_count = reference.poly_state_update(h, coeff, state_sum, count)
            state_sum.copy_(new_sum)
            count.copy_(new_count)
            return H
    return torch.ops.pom_ext.poly_state_step_(h, coeff, state_sum, count)
