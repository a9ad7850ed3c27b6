"""The fused gated causal op (poly_causal_gated) against the float64 reference.

y = hardsigmoid(pre + gate_bias) * H, with hs = [h | pre]: one gate per channel (S = E) or per group of
E / S channels, token- and block-causal, dense and packed; gradients of hs (as one tensor), coeff, gate_bias.
"""
import pytest
import torch

import pom_ext
from pom_ext import ops, reference as R

from conftest import DEVICES, DTYPES, assert_close

native = pytest.mark.skipif(not pom_ext.native_available(), reason="compiled kernels not built")


def needs_kernel(device, cpu_isa="native"):
    """Skips a device without a gated kernel, and the baseline CPU build on other devices (it is CPU-only)."""
    if not ops.has_kernel("poly_causal_gated", torch.device(device)):
        pytest.skip(f"no poly_causal_gated kernel for {device} (the layer takes the unfused path there)")
    if device != "cpu" and cpu_isa == "base":
        pytest.skip("the baseline ISA build is a CPU variant")

# (E, S): per-channel gating, 4 gate heads, and groups wider than a CPU channel block.
GATINGS = [(48, 48), (48, 4), (1200, 2)]


def make(B, N, E, S, K, bias=True, packed=False, device="cpu", seed=0):
    """float64 inputs (hs, coeff, gate_bias, cu_seqlens); packed cases have an empty and a one-token sequence."""
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(B, N, E + S, generator=g, dtype=torch.float64) * 3
    scale = torch.tensor([3.0 ** -(k + 1) for k in range(K)], dtype=torch.float64)
    c = torch.randn(E, K, generator=g, dtype=torch.float64) * scale
    b = torch.randn(S, generator=g, dtype=torch.float64) if bias else None
    cu = None
    if packed:
        hs = hs.reshape(B * N, E + S)
        total = B * N
        cu = torch.tensor([0, 0, 1, max(1, total // 3), total], dtype=torch.int32)
    to = lambda t: None if t is None else t.to(device)
    return to(hs), to(c), to(b), to(cu)


def run(hs, c, b, F, cu, impl, seed_grad):
    """y and the gradients of (hs, coeff, gate_bias) for the upstream gradient seed_grad."""
    leaves = [t.detach().requires_grad_() for t in (hs, c)] + ([b.detach().requires_grad_()] if b is not None else [])
    y = impl.poly_causal_gated(leaves[0], leaves[1], leaves[2] if b is not None else None, F, cu)
    grads = torch.autograd.grad(y, leaves, seed_grad.to(y.dtype))
    return y.detach(), grads


def check(B, N, E, S, K, F, dtype, bias=True, packed=False, device="cpu"):
    needs_kernel(device)
    hs, c, b, cu = make(B, N, E, S, K, bias, packed, device)
    hs_q = hs.to(dtype).double()  # the reference sees h rounded as the kernel does
    g = torch.randn((hs.shape[:-1] + (E,)), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    g = g.to(dtype).double().to(device)  # rounded like hs: the comparison measures the kernel's arithmetic
    y_ref, g_ref = run(hs_q, c, b, F, cu, R, g)
    y, got = run(hs.to(dtype), c, b, F, cu, ops, g)
    assert y.dtype == dtype and y.shape == y_ref.shape
    what = f"E={E} S={S} K={K} F={F} {dtype} bias={bias} packed={packed}"
    assert_close(y, y_ref, dtype, f"y {what}")
    for name, a, r in zip(["hs", "coeff", "gate_bias"], got, g_ref):
        assert_close(a, r, dtype, f"grad {name} {what}")


@native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("F", [1, 4])
@pytest.mark.parametrize("E,S", GATINGS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gated_matches_reference(dtype, E, S, F, device):
    check(2, 63, E, S, 3, F, dtype, device=device)


@native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("F", [300, 2000])
@pytest.mark.parametrize("E,S", GATINGS[:2])
def test_gated_large_blocks(E, S, F, device):
    """Blocks larger than a chunk (split blocks on CUDA): the gate's gradient reads H from the block sums."""
    check(2, 2100, E, S, 3, F, torch.float32, device=device)


@native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("N", [1, 129])
@pytest.mark.parametrize("K", [1, 2, 5, 13])
@pytest.mark.parametrize("bias", [True, False])
def test_gated_shapes_degrees(N, K, bias, device):
    check(3, N, 96, 96, K, 1, torch.float64, bias=bias, device=device)
    check(2, N, 96, 8, K, 3, torch.float32, bias=bias, device=device)
    check(2, N, 45, 3, K, 2, torch.float32, bias=bias, device=device)  # no 16-byte rows: scalar loads


@native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("E,S", GATINGS)
@pytest.mark.parametrize("F", [1, 3])
def test_gated_packed(E, S, F, device):
    check(2, 40, E, S, 3, F, torch.float64, packed=True, device=device)
    check(2, 40, E, S, 3, F, torch.float32, packed=True, device=device)


@native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("E,S,F", [(40, 40, 1), (40, 8, 7), (1200, 2, 1)])
def test_gated_long_sequence_split(cpu_isa, E, S, F, device):
    """Batch 1: the sequence is cut into chunks with carries, forward and both backward scans."""
    needs_kernel(device, cpu_isa)
    check(1, 9000, E, S, 3, F, torch.float32, device=device)
    check(1, 5000, E, S, 2, F, torch.float64, device=device)


@native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("E,S,F,packed", [(6, 6, 1, False), (8, 2, 3, False), (6, 3, 2, True)])
def test_gated_gradcheck(E, S, F, packed, device):
    needs_kernel(device)
    hs, c, b, cu = make(2, 7, E, S, 3, True, packed, device)
    inputs = [t.requires_grad_() for t in (hs, c, b)]
    assert torch.autograd.gradcheck(lambda hs, c, b: ops.poly_causal_gated(hs, c, b, F, cu), inputs)


@native
@pytest.mark.parametrize("device", DEVICES)
def test_gated_opcheck(device):
    needs_kernel(device)
    hs, c, b, cu = make(2, 17, 8, 4, 3, True, device=device)
    for args in [(hs, c, b, 1, None), (hs.float(), c.float(), None, 3, None)]:
        args = [t.requires_grad_() if isinstance(t, torch.Tensor) else t for t in args]
        torch.library.opcheck(torch.ops.pom_ext.poly_causal_gated.default, tuple(args))
    hp, c, b, cu = make(2, 9, 8, 8, 2, True, packed=True, device=device)
    torch.library.opcheck(torch.ops.pom_ext.poly_causal_gated.default,
                          (hp.requires_grad_(), c.requires_grad_(), b.requires_grad_(), 2, cu))


@native
@pytest.mark.parametrize("device", DEVICES)
def test_gated_strided_hs(cpu_isa, device):
    """hs as a slice of a wider tensor (row stride > E + S) and as a transposed view (channel stride > 1)."""
    needs_kernel(device, cpu_isa)
    hs, c, b, _ = make(2, 33, 24, 6, 3, device=device)
    g = torch.randn(2, 33, 24, dtype=torch.float64).to(device)
    y_ref, g_ref = run(hs, c, b, 2, None, R, g)
    wide = torch.randn(2, 33, 40, dtype=torch.float64).to(device)
    wide[..., 5:35] = hs
    for view in (wide[..., 5:35], hs.transpose(1, 2).contiguous().transpose(1, 2)):
        assert not view.is_contiguous()
        y, got = run(view, c, b, 2, None, ops, g)
        assert_close(y, y_ref, torch.float64, "strided y")
        for a, r in zip(got, g_ref):
            assert_close(a, r, torch.float64, "strided grad")


@native
@pytest.mark.parametrize("device", DEVICES)
def test_gated_bitwise_deterministic(cpu_isa, device):
    needs_kernel(device, cpu_isa)
    hs, c, b, _ = make(2, 700, 96, 4, 3, device=device)
    g = torch.randn(2, 700, 96, dtype=torch.float64).to(device)
    a = run(hs.float(), c.float(), b.float(), 1, None, ops, g)
    r = run(hs.float(), c.float(), b.float(), 1, None, ops, g)
    assert torch.equal(a[0], r[0])
    for x, y in zip(a[1], r[1]):
        assert torch.equal(x, y)


@native
@pytest.mark.parametrize("device", DEVICES)
def test_gated_nan_propagates_like_the_reference(device):
    needs_kernel(device)
    hs, c, b, _ = make(1, 9, 6, 6, 2, device=device)
    hs[0, 4, 1] = float("nan")  # context channel 1 of token 4: H from token 4 on
    hs[0, 2, 6 + 3] = float("inf")  # gate 3 of token 2 saturates to 1
    assert_close(ops.poly_causal_gated(hs, c, b), R.poly_causal_gated(hs, c, b), torch.float64, "nan/inf")


@native
def test_gated_errors_name_the_argument():
    o = torch.ops.pom_ext
    hs, c, b = torch.randn(2, 5, 12), torch.randn(8, 3), torch.randn(4)

    def raises(fn, arg):
        with pytest.raises(RuntimeError) as info:
            fn()
        assert f"'{arg}'" in str(info.value), str(info.value)

    raises(lambda: o.poly_causal_gated(hs[0], c, b), "hs")
    raises(lambda: o.poly_causal_gated(torch.randn(2, 5, 11), c, torch.randn(3)), "hs")  # S = 3 does not divide 8
    raises(lambda: o.poly_causal_gated(torch.randn(2, 5, 8), c, None), "hs")  # no gate columns
    raises(lambda: o.poly_causal_gated(hs, c, torch.randn(5)), "gate_bias")
    raises(lambda: o.poly_causal_gated(hs, c, b.long()), "gate_bias")
    raises(lambda: o.poly_causal_gated(hs, torch.randn(8, 0), b), "coeff")
    raises(lambda: o.poly_causal_gated(hs, c, b, 0), "block_size")
    raises(lambda: o.poly_causal_gated(torch.randn(10, 12), c, b, 1, torch.tensor([0, 11], dtype=torch.int32)),
           "cu_seqlens")
    raises(lambda: o.poly_causal_gated_backward(torch.randn(2, 5, 12), hs, c, b, 1, None), "grad_y")


@native
def test_has_kernel():
    assert ops.has_kernel("poly_causal_gated", torch.device("cpu"))
    assert ops.has_kernel("poly_causal_gated", torch.device("meta"))  # the Meta kernel: shapes and checks
    assert not ops.has_kernel("poly_causal_gated", torch.device("xpu"))
    if torch._C._dispatch_has_kernel_for_dispatch_key("pom_ext::poly_causal", "CUDA"):  # a build with CUDA kernels
        assert ops.has_kernel("poly_causal_gated", torch.device("cuda"))
