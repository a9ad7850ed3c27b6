"""The pom_ext ops: fake (meta) implementations, autograd, and the Python entry points.

Kernels live in the compiled library (`pom_ext._C`, schemas in csrc/registration.cpp,
one implementation per device registered with the dispatcher). When that library
cannot be loaded, the same entry points run `pom_ext.reference` and warn once, at
first use, with the command that rebuilds it. The entry points are scriptable: under
torch.jit.script they call the registered ops (so scripting needs the compiled library).
"""
import warnings
from typing import Optional, Tuple

import torch

from . import reference

REBUILD = "pip install --no-build-isolation --no-deps --force-reinstall ."

_load_error: Optional[BaseException] = None
try:
    from . import _C  # noqa: F401  (loads the library, which registers the ops)
except (ImportError, OSError) as e:  # missing or broken build
    _load_error = e

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


def _batch(h: torch.Tensor, cu_seqlens: Optional[torch.Tensor]) -> int:
    return cu_seqlens.shape[0] - 1 if cu_seqlens is not None else h.shape[0]


def _weight_grad_dtype(h: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    return h.dtype if weight.dtype == torch.bool else weight.dtype


def _one_device(op: str, h: torch.Tensor, **others) -> None:
    """The device rule of the kernels, for the fake implementations too: a call with one argument on the
    meta device (or under fake tensors) is routed here, and must fail as the kernels would."""
    for name, t in others.items():
        if isinstance(t, torch.Tensor) and t.device != h.device:
            raise RuntimeError(f"pom_ext::{op}: argument '{name}' is on {t.device} but 'h' is on {h.device}; "
                               f"move both to one device")


if native_available():
    _ops = torch.ops.pom_ext

    # ---- fake implementations (shapes only) ----

    @torch.library.register_fake("pom_ext::poly_eval")
    def _(h, coeff):
        _one_device("poly_eval", h, coeff=coeff)
        return h.new_empty(h.shape)

    @torch.library.register_fake("pom_ext::poly_eval_backward")
    def _(grad_p, h, coeff):
        _one_device("poly_eval_backward", h, coeff=coeff, grad_p=grad_p)
        return h.new_empty(h.shape), coeff.new_empty(coeff.shape)

    @torch.library.register_fake("pom_ext::poly_mean")
    def _(h, coeff, weight=None, cu_seqlens=None):
        _one_device("poly_mean", h, coeff=coeff, weight=weight, cu_seqlens=cu_seqlens)
        return h.new_empty((_batch(h, cu_seqlens), h.shape[-1]))

    @torch.library.register_fake("pom_ext::poly_mean_backward")
    def _(grad_H, H, h, coeff, weight, cu_seqlens, weight_grad):
        _one_device("poly_mean_backward", h, coeff=coeff, weight=weight, cu_seqlens=cu_seqlens, grad_H=grad_H, H=H)
        if weight_grad:
            gw = h.new_empty(weight.shape, dtype=_weight_grad_dtype(h, weight))
        else:
            gw = h.new_empty((0,))
        return h.new_empty(h.shape), coeff.new_empty(coeff.shape), gw

    @torch.library.register_fake("pom_ext::poly_causal")
    def _(h, coeff, block_size=1, cu_seqlens=None):
        _one_device("poly_causal", h, coeff=coeff, cu_seqlens=cu_seqlens)
        return h.new_empty(h.shape)

    @torch.library.register_fake("pom_ext::poly_causal_backward")
    def _(grad_H, h, coeff, block_size, cu_seqlens):
        _one_device("poly_causal_backward", h, coeff=coeff, cu_seqlens=cu_seqlens, grad_H=grad_H)
        return h.new_empty(h.shape), coeff.new_empty(coeff.shape)

    @torch.library.register_fake("pom_ext::poly_causal_gated")
    def _(hs, coeff, gate_bias=None, block_size=1, cu_seqlens=None):
        _one_device("poly_causal_gated", hs, coeff=coeff, gate_bias=gate_bias, cu_seqlens=cu_seqlens)
        return hs.new_empty(hs.shape[:-1] + (coeff.shape[0],))

    @torch.library.register_fake("pom_ext::poly_causal_gated_backward")
    def _(grad_y, hs, coeff, gate_bias, block_size, cu_seqlens):
        _one_device("poly_causal_gated_backward", hs, coeff=coeff, gate_bias=gate_bias, cu_seqlens=cu_seqlens,
                    grad_y=grad_y)
        S = hs.shape[-1] - coeff.shape[0]
        gb = hs.new_empty((S,), dtype=hs.dtype if gate_bias is None else gate_bias.dtype)
        return hs.new_empty(hs.shape), coeff.new_empty(coeff.shape), gb

    @torch.library.register_fake("pom_ext::poly_state_update")
    def _(h, coeff, state_sum, count):
        _one_device("poly_state_update", h, coeff=coeff, state_sum=state_sum, count=count)
        return h.new_empty((h.shape[0], h.shape[2])), state_sum.new_empty(state_sum.shape), count.new_empty(count.shape)

    @torch.library.register_fake("pom_ext::poly_state_update_backward")
    def _(grad_H, grad_state_sum, h, coeff, count):
        _one_device("poly_state_update_backward", h, coeff=coeff, count=count, grad_H=grad_H,
                    grad_state_sum=grad_state_sum)
        return h.new_empty(h.shape), coeff.new_empty(coeff.shape), grad_state_sum.new_empty(grad_state_sum.shape)

    @torch.library.register_fake("pom_ext::poly_state_step_")
    def _(h, coeff, state_sum, count):
        _one_device("poly_state_step_", h, coeff=coeff, state_sum=state_sum, count=count)
        return h.new_empty((h.shape[0], h.shape[2]))

    # ---- autograd: every backward is an op too ----

    def _eval_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def _eval_backward(ctx, grad_p):
        h, coeff = ctx.saved_tensors
        gh, gc = _ops.poly_eval_backward(grad_p, h, coeff)
        return gh, gc

    torch.library.register_autograd("pom_ext::poly_eval", _eval_backward, setup_context=_eval_setup)

    def _mean_setup(ctx, inputs, output):
        h, coeff, weight, cu_seqlens = inputs
        ctx.save_for_backward(h, coeff, weight, cu_seqlens, output)

    def _mean_backward(ctx, grad_H):
        h, coeff, weight, cu_seqlens, H = ctx.saved_tensors
        weight_grad = weight is not None and ctx.needs_input_grad[2]
        gh, gc, gw = _ops.poly_mean_backward(grad_H, H, h, coeff, weight, cu_seqlens, weight_grad)
        return gh, gc, gw if weight_grad else None, None

    torch.library.register_autograd("pom_ext::poly_mean", _mean_backward, setup_context=_mean_setup)

    def _causal_setup(ctx, inputs, output):
        h, coeff, block_size, cu_seqlens = inputs
        ctx.block_size = block_size
        ctx.save_for_backward(h, coeff, cu_seqlens)

    def _causal_backward(ctx, grad_H):
        h, coeff, cu_seqlens = ctx.saved_tensors
        gh, gc = _ops.poly_causal_backward(grad_H, h, coeff, ctx.block_size, cu_seqlens)
        return gh, gc, None, None

    torch.library.register_autograd("pom_ext::poly_causal", _causal_backward, setup_context=_causal_setup)

    def _gated_setup(ctx, inputs, output):
        hs, coeff, gate_bias, block_size, cu_seqlens = inputs
        ctx.block_size = block_size
        ctx.save_for_backward(hs, coeff, gate_bias, cu_seqlens)

    def _gated_backward(ctx, grad_y):
        hs, coeff, gate_bias, cu_seqlens = ctx.saved_tensors
        ghs, gc, gb = _ops.poly_causal_gated_backward(grad_y, hs, coeff, gate_bias, ctx.block_size, cu_seqlens)
        return ghs, gc, gb if gate_bias is not None else None, None, None

    torch.library.register_autograd("pom_ext::poly_causal_gated", _gated_backward, setup_context=_gated_setup)

    def _state_setup(ctx, inputs, output):
        h, coeff, state_sum, count = inputs
        ctx.save_for_backward(h, coeff, state_sum, count)

    def _state_backward(ctx, grad_H, grad_sum, grad_count):
        h, coeff, state_sum, count = ctx.saved_tensors
        if grad_H is None:
            grad_H = h.new_zeros((h.shape[0], h.shape[2]))
        if grad_sum is None:
            grad_sum = torch.zeros_like(state_sum)
        gh, gc, gs = _ops.poly_state_update_backward(grad_H, grad_sum, h, coeff, count)
        return gh, gc, gs, None

    torch.library.register_autograd("pom_ext::poly_state_update", _state_backward, setup_context=_state_setup)

    def _no_double_backward(name):
        def backward(ctx, *grads):
            raise RuntimeError(f"pom_ext::{name}: double backward (a gradient of a gradient) is not supported")
        return backward

    for _name in ("poly_eval_backward", "poly_mean_backward", "poly_causal_backward", "poly_causal_gated_backward",
                  "poly_state_update_backward"):
        torch.library.register_autograd(f"pom_ext::{_name}", _no_double_backward(_name))


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


def poly_causal_gated(hs: torch.Tensor, coeff: torch.Tensor, gate_bias: Optional[torch.Tensor] = None,
                      block_size: int = 1, cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The causal mixer in one pass: hs = [h | pre] with E = coeff.shape[0] context columns then S gate columns
    (S = E, or S dividing E: one gate per group of E / S channels) -> y = hardsigmoid(pre + gate_bias) * H,
    H the block-causal prefix mean of p(h); y has E columns. Its gradient w.r.t. hs is one tensor."""
    if not torch.jit.is_scripting():
        if not _native():
            return reference.poly_causal_gated(hs, coeff, gate_bias, block_size, cu_seqlens)
    return torch.ops.pom_ext.poly_causal_gated(hs, coeff, gate_bias, block_size, cu_seqlens)


def _kernel_devices():
    """{op: device types with a compiled kernel}, read once from the dispatcher (a constant for torch.compile)."""
    if not native_available():
        return {}
    ops = [name[len("pom_ext::"):] for name in torch._C._dispatch_get_all_op_names() if name.startswith("pom_ext::")]
    return {op: frozenset(dev for dev, key in (("cpu", "CPU"), ("cuda", "CUDA"))
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
