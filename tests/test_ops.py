"""Every op against the float64 reference: forward, gradients, opcheck, strides, determinism, errors."""
import platform
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import pom_ext
from pom_ext import functional as PF
from pom_ext import ops, reference as R

from conftest import DEVICES, DTYPES, TOL, assert_close, hardware_isa, rel_err

native = pytest.mark.skipif(not pom_ext.native_available(), reason="compiled kernels not built")

MODES = ["eval", "mean", "weighted", "bool", "causal", "block4", "block7", "varlen_mean", "varlen_causal",
         "masked", "state", "wcausal", "wblock5", "wpad", "varlen_wcausal"]
DEGREES = [1, 2, 3, 4, 5, 6, 7, 8, 13]


def offsets(B, N, device):
    """Packed lengths with an empty and a one-token sequence: B*N tokens over B + 2 sequences."""
    total = B * N
    cuts = sorted({0, min(1, total), total // 3, total})
    cu = [0, 0] + cuts[1:] if total else [0, 0]
    return torch.tensor(cu, dtype=torch.int32, device=device)


def make_case(mode, B, N, E, K, dtype, device="cpu", seed=0, requires_grad=False):
    """(fn, inputs): fn(*inputs, impl) runs the op through `impl` (ops or reference)."""
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(B, N, E, generator=g, dtype=torch.float64) * 3).to(device)
    # Coefficient k scaled by 3^-(k+1): high powers matter but stay representable in float16.
    scale = torch.tensor([3.0 ** -(k + 1) for k in range(K)], dtype=torch.float64)
    c = (torch.randn(E, K, generator=g, dtype=torch.float64) * scale).to(device)
    extra = []
    if mode == "eval":
        fn = lambda h, c, impl: impl.poly_eval(h, c)
    elif mode == "mean":
        fn = lambda h, c, impl: impl.poly_mean(h, c)
    elif mode == "weighted":
        extra = [torch.rand(B, N, generator=g, dtype=torch.float64).to(device)]
        fn = lambda h, c, w, impl: impl.poly_mean(h, c, w)
    elif mode == "bool":
        extra = [(torch.rand(B, N, generator=g) > 0.4).to(device)]
        fn = lambda h, c, w, impl: impl.poly_mean(h, c, w)
    elif mode.startswith("block") or mode == "causal":
        f = int(mode[5:]) if mode.startswith("block") else 1
        fn = lambda h, c, impl: impl.poly_causal(h, c, f)
    elif mode in ("wcausal", "wblock5", "wpad"):
        f = 5 if mode == "wblock5" else 1
        if mode == "wpad":
            # Left padding (bool): row b starts with (5 b + 2) mod (N + 1) padded tokens, so prefixes of nothing
            # but padding occur (H = 0 there).
            pad = torch.tensor([(5 * b + 2) % (N + 1) for b in range(B)])
            extra = [(torch.arange(N)[None, :] >= pad[:, None]).to(device)]
        else:
            # Float weights with zeros inside (never the first token: the gradient w.r.t. w is defined).
            w = torch.rand(B, N, generator=g, dtype=torch.float64)
            w[w < 0.2] = 0
            w[:, 0] += 0.5
            extra = [w.to(device)]
        fn = lambda h, c, w, impl: impl.poly_causal_weighted(h, c, w, f)
    elif mode.startswith("varlen"):
        h = h.reshape(B * N, E)
        cu = offsets(B, N, device)
        if mode == "varlen_mean":
            fn = lambda h, c, impl: impl.poly_mean(h, c, None, cu)
        elif mode == "varlen_wcausal":
            w = torch.rand(B * N, generator=g, dtype=torch.float64)
            w[w < 0.2] = 0
            w[cu[:-1].long().clamp(max=max(B * N - 1, 0))] += 0.5  # every sequence's first token weighs > 0
            extra = [w.to(device)]
            fn = lambda h, c, w, impl: impl.poly_causal_weighted(h, c, w, 3, cu)
        else:
            fn = lambda h, c, impl: impl.poly_causal(h, c, 3, cu)
    elif mode == "masked":
        extra = [(torch.rand(B, max(N - 2, 1), N, generator=g) > 0.5).to(device)]
        fn = lambda h, c, m, impl: (PF.aggregate(h, c, m) if impl is ops else R.poly_masked(h, c, m))
    elif mode == "state":
        extra = [torch.randn(B, E, generator=g, dtype=torch.float64).to(device),
                 torch.randint(0, 50, (B,), generator=g).to(device)]
        fn = lambda h, c, s, n, impl: impl.poly_state_update(h, c, s, n)
    else:
        raise AssertionError(mode)
    inputs = [h, c] + extra
    if requires_grad:
        for t in inputs:
            if t.is_floating_point():
                t.requires_grad_()
    return fn, inputs


def cast(inputs, dtype):
    """Low-precision copy of h; coefficients, weights and the state stay as they are."""
    out = [inputs[0].detach().to(dtype).requires_grad_(inputs[0].requires_grad)] + list(inputs[1:])
    return out


def quantize(inputs, dtype):
    """The float64 inputs the reference sees: h rounded to `dtype` first, so that the comparison
    measures the kernel's arithmetic, not the rounding of its input (which degree 13 amplifies)."""
    h = inputs[0].detach().to(dtype).double().requires_grad_(inputs[0].requires_grad)
    return [h] + list(inputs[1:])


def outputs(res):
    return list(res) if isinstance(res, (tuple, list)) else [res]


def check_forward(mode, B, N, E, K, dtype, device="cpu"):
    fn, inputs = make_case(mode, B, N, E, K, torch.float64, device)
    ref = outputs(fn(*quantize(inputs, dtype), R))
    got = outputs(fn(*cast(inputs, dtype), ops))
    for i, (a, b) in enumerate(zip(got, ref)):
        if not b.is_floating_point():
            assert torch.equal(a, b), f"{mode}: output {i}"
            continue
        assert a.dtype == (dtype if i == 0 else b.dtype), f"{mode}: output {i} dtype {a.dtype}"
        assert_close(a, b, dtype, f"{mode} output {i}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("K", DEGREES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_degrees(dtype, mode, K, device):
    check_forward(mode, 2, 63, 48, K, dtype, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("N,E", [(1, 48), (63, 96), (129, 48), (129, 96), (5, 7)])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_shapes(dtype, mode, N, E, device):
    check_forward(mode, 3, N, E, 3, dtype, device)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_forward_cpu_isas(cpu_isa, dtype, mode):
    """Both CPU builds (AVX2 when the CPU has it, and the baseline) compute the same function."""
    for K in (3, 6):
        check_forward(mode, 2, 129, 600, K, dtype)


@pytest.mark.parametrize("mode", ["mean", "causal", "block7"])
def test_long_sequence_split(cpu_isa, mode):
    """B * channel blocks below the thread count: the sequence is cut into chunks with carries."""
    check_forward(mode, 1, 9000, 40, 3, torch.float32)
    check_grads(mode, 1, 9000, 40, 3, torch.float64)


def check_grads(mode, B, N, E, K, dtype, device="cpu"):
    fn, inputs = make_case(mode, B, N, E, K, torch.float64, device, requires_grad=True)
    inputs = quantize(inputs, dtype)
    ref = outputs(fn(*inputs, R))
    gen = torch.Generator().manual_seed(1)
    seeds = [torch.randn(r.shape, generator=gen, dtype=torch.float64).to(device) if r.is_floating_point() else None
             for r in ref]
    diff = [t for t in inputs if t.requires_grad]
    ref_g = torch.autograd.grad([r for r, s in zip(ref, seeds) if s is not None],
                                diff, [s for s in seeds if s is not None], allow_unused=True)
    low = cast(inputs, dtype)
    low_diff = [t for t in low if t.requires_grad]
    got = outputs(fn(*low, ops))
    got_g = torch.autograd.grad([r for r, s in zip(got, seeds) if s is not None], low_diff,
                                [s.to(r.dtype) for r, s in zip(got, seeds) if s is not None], allow_unused=True)
    names = ["h", "coeff", "weight", "state_sum"]
    for i, (a, b) in enumerate(zip(got_g, ref_g)):
        if b is None:
            continue
        assert a is not None, f"{mode}: no gradient for input {i}"
        assert a.dtype == low_diff[i].dtype
        assert_close(a, b, dtype, f"{mode} grad {names[i] if i < len(names) else i}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("K", [1, 3, 4, 7])
@pytest.mark.parametrize("mode", [m for m in MODES if m not in ("bool",)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gradients(dtype, mode, K, device):
    check_grads(mode, 2, 63, 48, K, dtype, device)


@pytest.mark.parametrize("mode", ["mean", "weighted", "causal", "block7", "varlen_causal", "state", "wcausal",
                                  "wblock5", "wpad"])
def test_gradients_cpu_isas(cpu_isa, mode):
    check_grads(mode, 2, 129, 600, 3, torch.float32)


@pytest.mark.parametrize("mode", [m for m in MODES if m not in ("bool", "wpad")])
@pytest.mark.parametrize("K", [2, 5])
def test_gradcheck(mode, K):
    fn, inputs = make_case(mode, 2, 9, 5, K, torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *x: fn(*x, ops), inputs, fast_mode=False)


def test_gradcheck_through_state_update():
    """Gradients reach h, coeff and the state's running sum across two chained updates."""
    g = torch.Generator().manual_seed(3)
    h1 = torch.randn(2, 4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    h2 = torch.randn(2, 3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    c = torch.randn(6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    s0 = torch.randn(2, 6, generator=g, dtype=torch.float64, requires_grad=True)
    n0 = torch.tensor([5, 0])

    def chain(h1, h2, c, s0):
        H1, s1, n1 = ops.poly_state_update(h1, c, s0, n0)
        H2, s2, _ = ops.poly_state_update(h2, c, s1, n1)
        return H1, H2, s2

    assert torch.autograd.gradcheck(chain, (h1, h2, c, s0))


def opcheck_cases():
    g = torch.Generator().manual_seed(5)
    h = torch.randn(2, 17, 8, generator=g, dtype=torch.float64, requires_grad=True)
    c = torch.randn(8, 3, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.rand(2, 17, generator=g, dtype=torch.float64, requires_grad=True)
    hp = torch.randn(34, 8, generator=g, dtype=torch.float64, requires_grad=True)
    cu = torch.tensor([0, 3, 3, 34], dtype=torch.int32)
    s = torch.randn(2, 8, generator=g, dtype=torch.float64, requires_grad=True)
    n = torch.tensor([4, 0])
    o = torch.ops.pom_ext
    H = ops.poly_mean(h, c, w).detach()
    return [
        ("eval", o.poly_eval, (h, c)),
        ("eval_bwd", o.poly_eval_backward, (torch.randn_like(h), h, c)),
        ("mean", o.poly_mean, (h, c, None, None)),
        ("mean_weighted", o.poly_mean, (h, c, w, None)),
        ("mean_bool", o.poly_mean, (h, c, w.detach() > 0.5, None)),
        ("mean_varlen", o.poly_mean, (hp, c, None, cu)),
        ("mean_bwd", o.poly_mean_backward, (torch.randn(2, 8, dtype=torch.float64), H, h, c, w, None, True)),
        ("causal", o.poly_causal, (h, c, 1, None)),
        ("block", o.poly_causal, (h, c, 4, None)),
        ("causal_varlen", o.poly_causal, (hp, c, 2, cu)),
        ("causal_bwd", o.poly_causal_backward, (torch.randn_like(h), h, c, 3, None)),
        ("causal_weighted", o.poly_causal_weighted, (h, c, w, 1, None)),
        ("block_weighted", o.poly_causal_weighted, (h, c, w, 4, None)),
        ("causal_weighted_bool", o.poly_causal_weighted, (h, c, w.detach() > 0.5, 3, None)),
        ("causal_weighted_varlen", o.poly_causal_weighted, (hp, c, torch.rand(34, dtype=torch.float64), 2, cu)),
        ("causal_weighted_bwd", o.poly_causal_weighted_backward,
         (torch.randn_like(h), ops.poly_causal_weighted(h, c, w).detach(), h, c, w, 1, None, True)),
        ("state", o.poly_state_update, (h, c, s, n)),
        ("state_bwd", o.poly_state_update_backward, (torch.randn(2, 8, dtype=torch.float64), torch.randn_like(s), h, c,
                                                     n)),
        ("state_step", o.poly_state_step_, (h.detach(), c.detach(), s.detach().clone(), n.clone())),
    ]


@native
@pytest.mark.parametrize("case", opcheck_cases(), ids=lambda c: c[0])
def test_opcheck(case):
    name, op, args = case
    if name.endswith("_bwd"):  # backward ops are not differentiable themselves
        args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(op, args)


@native
def test_double_backward_is_a_clear_error():
    h = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    c = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(ops.poly_causal(h, c).sum(), h, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()


@pytest.mark.parametrize("mode", ["mean", "causal", "block4", "state", "eval"])
def test_strided_inputs(cpu_isa, mode):
    """h as a slice of a wider projection (row stride > E), and as a transposed view (channel stride > 1)."""
    fn, (h, c, *rest) = make_case(mode, 2, 33, 24, 3, torch.float64)
    ref = outputs(fn(h, c, *rest, R))
    wide = torch.randn(2, 33, 40, dtype=torch.float64)
    wide[..., 5:29] = h
    sliced = wide[..., 5:29]
    transposed = h.transpose(1, 2).contiguous().transpose(1, 2)
    for view in (sliced, transposed):
        assert not view.is_contiguous()
        for a, b in zip(outputs(fn(view, c, *rest, ops)), ref):
            if b.is_floating_point():
                assert_close(a, b, torch.float64, f"{mode} strided")


def test_strided_gradient():
    """An expanded (stride 0) upstream gradient, as autograd produces for broadcasts."""
    h = torch.randn(2, 20, 6, dtype=torch.float64, requires_grad=True)
    c = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    gH = torch.randn(1, 1, 6, dtype=torch.float64).expand(2, 20, 6)
    a = torch.autograd.grad(ops.poly_causal(h, c), (h, c), gH)
    b = torch.autograd.grad(R.poly_causal(h, c), (h, c), gH)
    for x, y in zip(a, b):
        assert_close(x, y, torch.float64, "expanded grad")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_zero_weight_rows_give_zero(dtype):
    h = torch.randn(3, 10, 8, dtype=dtype, requires_grad=True)
    c = torch.randn(8, 2, dtype=dtype, requires_grad=True)
    w = torch.rand(3, 10, dtype=dtype)
    w[1] = 0
    H = ops.poly_mean(h, c, w)
    assert torch.equal(H[1], torch.zeros(8, dtype=dtype))
    assert torch.isfinite(H).all()
    H.sum().backward()
    assert torch.isfinite(h.grad).all() and torch.equal(h.grad[1], torch.zeros_like(h.grad[1]))
    assert torch.isfinite(c.grad).all()
    m = torch.zeros(3, 4, 10, dtype=torch.bool)
    m[0, 1, 3] = True
    H3 = PF.aggregate(h, c, m)
    assert torch.isfinite(H3).all() and H3[1].abs().sum() == 0


@pytest.mark.parametrize("block_size", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_causal_weighted_padding_is_invisible(dtype, block_size):
    """A row behind left padding (or before right padding) gives the outputs and gradients it gives alone; the
    padded positions read 0 until a real token arrives and get no gradient."""
    g = torch.Generator().manual_seed(11)
    E, n, pad = 24, 13, 8  # pad a multiple of the block size: blocks stay aligned with the row alone
    x = torch.randn(1, n, E, generator=g, dtype=dtype)
    junk = torch.randn(1, pad, E, generator=g, dtype=dtype) * 100
    c = torch.randn(E, 3, generator=g, dtype=dtype)
    gy = torch.randn(1, n, E, generator=g, dtype=dtype)
    for left in (True, False):
        h = (torch.cat([junk, x], 1) if left else torch.cat([x, junk], 1)).requires_grad_()
        w = torch.ones(1, n + pad, dtype=torch.bool)
        real = slice(pad, None) if left else slice(0, n)
        w[:, slice(0, pad) if left else slice(n, None)] = False
        H = ops.poly_causal_weighted(h, c, w, block_size)
        gfull = torch.zeros(1, n + pad, E, dtype=dtype)
        gfull[:, real] = gy
        (gh,) = torch.autograd.grad(H, h, gfull)
        xa = x.clone().requires_grad_()
        Ha = ops.poly_causal(xa, c, block_size)
        (ga,) = torch.autograd.grad(Ha, xa, gy)
        assert_close(H[:, real], Ha, dtype, "padded row")
        assert_close(gh[:, real], ga, dtype, "padded row gradient")
        assert torch.equal(gh[:, slice(0, pad) if left else slice(n, None)], torch.zeros(1, pad, E, dtype=dtype))
        if left:
            assert torch.equal(H[:, :pad], torch.zeros(1, pad, E, dtype=dtype))


def test_empty_sequences():
    h = torch.randn(0, 5, dtype=torch.float32)
    c = torch.randn(5, 2)
    cu = torch.tensor([0, 0, 0], dtype=torch.int32)
    assert torch.equal(ops.poly_mean(h, c, None, cu), torch.zeros(2, 5))
    assert ops.poly_causal(h, c, 1, cu).shape == (0, 5)
    H, s, n = ops.poly_state_update(torch.randn(2, 0, 5), c, torch.zeros(2, 5), torch.zeros(2, dtype=torch.long))
    assert torch.equal(H, torch.zeros(2, 5)) and torch.equal(n, torch.zeros(2, dtype=torch.long))


def test_state_step_in_place_matches_functional():
    g = torch.Generator().manual_seed(7)
    h = torch.randn(4, 1, 12, generator=g)
    c = torch.randn(12, 3, generator=g)
    s = torch.randn(4, 12, generator=g)
    n = torch.tensor([0, 1, 7, 100])
    H_ref, s_ref, n_ref = ops.poly_state_update(h, c, s, n)
    s2, n2 = s.clone(), n.clone()
    ptr = s2.data_ptr()
    H = ops.poly_state_step_(h, c, s2, n2)
    assert torch.equal(H, H_ref) and torch.equal(s2, s_ref) and torch.equal(n2, n_ref)
    assert s2.data_ptr() == ptr


@pytest.mark.parametrize("mode", ["mean", "weighted", "causal", "block7", "varlen_causal", "state", "wcausal",
                                  "wblock5"])
def test_bitwise_deterministic(cpu_isa, mode):
    fn, inputs = make_case(mode, 2, 700, 96, 3, torch.float64, requires_grad=True)
    inputs = cast(inputs, torch.float32)

    def run():
        out = outputs(fn(*inputs, ops))
        diff = [t for t in inputs if t.requires_grad]
        grads = torch.autograd.grad([o for o in out if o.is_floating_point()], diff,
                                    [torch.ones_like(o) for o in out if o.is_floating_point()])
        return [o.detach() for o in out] + list(grads)

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


@native
def test_cpu_isa_selection(monkeypatch):
    """POM_EXT_CPU_ISA caps the CPU build the kernels run; an unknown value is an error naming the variable."""
    order = ["base", "avx2", "avx512"]
    best = hardware_isa()
    assert best in order
    for cap in order:
        monkeypatch.setenv("POM_EXT_CPU_ISA", cap)
        assert pom_ext.cpu_isa() == order[min(order.index(cap), order.index(best))]
    monkeypatch.delenv("POM_EXT_CPU_ISA")
    assert pom_ext.cpu_isa() == best
    monkeypatch.setenv("POM_EXT_CPU_ISA", "avx1024")
    for call in (pom_ext.cpu_isa, lambda: ops.poly_causal(torch.randn(1, 3, 4), torch.randn(4, 2))):
        with pytest.raises(RuntimeError, match="POM_EXT_CPU_ISA must be one of base, avx2, avx512.*'avx1024'"):
            call()


@native
@pytest.mark.skipif(platform.machine() != "x86_64" or shutil.which("objdump") is None,
                    reason="needs x86-64 and objdump")
def test_vector_instructions_only_in_their_builds():
    """The baseline kernels must run on any x86-64 CPU: no function outside the avx2 and avx512 builds may hold
    a VEX or EVEX instruction (as it would when the linker kept an AVX copy of shared inline code)."""
    lib = pom_ext._C.__file__
    asm = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", lib], capture_output=True, text=True,
                         check=True).stdout
    func, offenders, vector_ins, isa_funcs = None, set(), 0, 0
    for line in asm.splitlines():
        head = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if head:
            func = head.group(1)
            isa_funcs += "::avx2::" in func or "::avx512::" in func
            continue
        ins = re.match(r"^\s+[0-9a-f]+:\s+(\S+)", line)
        if func is None or not ins or not re.match(r"^(v(?!err|erw)[a-z0-9]+|k[a-z]+[bwdq])$", ins.group(1)):
            continue
        if "::avx2::" in func or "::avx512::" in func:
            vector_ins += 1
        else:
            offenders.add(func)
    if isa_funcs:  # none in a build without them (POM_EXT_CPU_ISAS=base)
        assert vector_ins > 0, "no vector code found in the avx2/avx512 builds: the check would be vacuous"
    assert not offenders, f"vector instructions outside the avx2/avx512 builds: {sorted(offenders)[:5]}"


# ---- bad inputs: every error names the argument ----

def _raises(fn, arg):
    with pytest.raises((ValueError, RuntimeError, TypeError)) as info:
        fn()
    assert f"'{arg}'" in str(info.value), f"error does not name '{arg}': {info.value}"


@native
def test_op_errors_name_the_argument():
    o = torch.ops.pom_ext
    h, c = torch.randn(2, 5, 4), torch.randn(4, 3)
    _raises(lambda: o.poly_mean(h[0], c), "h")
    _raises(lambda: o.poly_mean(h.long(), c), "h")
    _raises(lambda: o.poly_mean(h, torch.randn(5, 3)), "coeff")
    _raises(lambda: o.poly_mean(h, torch.randn(4, 0)), "coeff")
    _raises(lambda: o.poly_mean(h, torch.randn(4)), "coeff")
    _raises(lambda: o.poly_mean(h, c, torch.rand(2, 6)), "weight")
    _raises(lambda: o.poly_mean(h, c, torch.ones(2, 5, dtype=torch.long)), "weight")
    _raises(lambda: o.poly_causal(h, c, 0), "block_size")
    _raises(lambda: o.poly_causal(h, c, 1, torch.tensor([0, 10], dtype=torch.int32)), "h")
    hp = torch.randn(10, 4)
    _raises(lambda: o.poly_causal(hp, c, 1, torch.tensor([0, 11], dtype=torch.int32)), "cu_seqlens")
    _raises(lambda: o.poly_causal(hp, c, 1, torch.tensor([1, 10], dtype=torch.int32)), "cu_seqlens")
    _raises(lambda: o.poly_causal(hp, c, 1, torch.tensor([0, 6, 4, 10], dtype=torch.int32)), "cu_seqlens")
    _raises(lambda: o.poly_causal(hp, c, 1, torch.tensor([0., 10.])), "cu_seqlens")
    _raises(lambda: o.poly_causal(hp, c, 1, torch.tensor([0], dtype=torch.int32)), "cu_seqlens")
    _raises(lambda: o.poly_causal_backward(torch.randn(2, 4, 4), h, c, 1, None), "grad_H")
    w = torch.rand(2, 5)
    _raises(lambda: o.poly_causal_weighted(h, c, torch.rand(2, 4)), "weight")
    _raises(lambda: o.poly_causal_weighted(h, c, torch.rand(5)), "weight")
    _raises(lambda: o.poly_causal_weighted(h, c, torch.ones(2, 5, dtype=torch.long)), "weight")
    _raises(lambda: o.poly_causal_weighted(h, c, w, 0), "block_size")
    _raises(lambda: o.poly_causal_weighted(hp, c, torch.rand(2, 5), 1, torch.tensor([0, 10], dtype=torch.int32)),
            "weight")
    _raises(lambda: o.poly_causal_weighted(h.long(), c, w), "h")
    _raises(lambda: o.poly_causal_weighted_backward(torch.randn(2, 4, 4), h, h, c, w, 1, None, False), "grad_H")
    _raises(lambda: o.poly_causal_weighted_backward(h, h[:, :4], h, c, w, 1, None, False), "H")
    s, n = torch.zeros(2, 4), torch.zeros(2, dtype=torch.long)
    _raises(lambda: o.poly_state_update(h, c, torch.zeros(3, 4), n), "state_sum")
    _raises(lambda: o.poly_state_update(h, c, torch.zeros(2, 5), n), "state_sum")
    _raises(lambda: o.poly_state_update(h, c, s.half(), n), "state_sum")
    _raises(lambda: o.poly_state_update(h, c, s, n.int()), "count")
    _raises(lambda: o.poly_state_update(h, c, s, torch.zeros(3, dtype=torch.long)), "count")
    _raises(lambda: o.poly_state_step_(h, c, torch.zeros(4, 2).t(), n), "state_sum")


def test_functional_errors_name_the_argument():
    h, c = torch.randn(2, 5, 4), torch.randn(4, 3)
    _raises(lambda: PF.aggregate(h, c, "causl"), "mask")
    _raises(lambda: PF.aggregate(h, c, torch.rand(2, 4)), "mask")
    _raises(lambda: PF.aggregate(h, c, torch.rand(3, 2, 5)), "mask")
    _raises(lambda: PF.aggregate(h, c, torch.ones(2, 5, dtype=torch.long)), "mask")
    _raises(lambda: PF.aggregate(h, c, torch.rand(2, 5, 5, 1)), "mask")
    _raises(lambda: PF.aggregate(h, c, None, block_size=2), "block_size")
    _raises(lambda: PF.aggregate(h, c, "causal", block_size=0), "block_size")
    _raises(lambda: PF.aggregate(h, c, "causal", block_size=2.5), "block_size")
    _raises(lambda: PF.aggregate(h, torch.randn(4, 0)), "coeff")
    _raises(lambda: PF.aggregate(h, c.to("meta")), "coeff")
    _raises(lambda: PF.aggregate(h, c, torch.rand(2, 5, device="meta")), "mask")
    _raises(lambda: PF.aggregate(h.reshape(10, 4), c, cu_seqlens=torch.tensor([0, 11])), "cu_seqlens")
    _raises(lambda: PF.aggregate(h.reshape(10, 4), c, cu_seqlens=torch.tensor([0, 6, 5, 10])), "cu_seqlens")
    _raises(lambda: PF.aggregate(h.reshape(10, 4), c, cu_seqlens=torch.tensor([0., 10.])), "cu_seqlens")
    _raises(lambda: PF.aggregate(h, c, cu_seqlens=torch.tensor([0, 10])), "h")
    _raises(lambda: PF.aggregate(h.reshape(10, 4), c, torch.rand(10), cu_seqlens=torch.tensor([0, 10])), "mask")
    _raises(lambda: PF.select(torch.rand(2, 5, 3), torch.rand(2, 5, 4)), "s")
    _raises(lambda: PF.select(torch.rand(2, 5, 3), torch.rand(2, 5, 4), n_sel_heads=3), "s")
    _raises(lambda: PF.pom(h, torch.rand(2, 3, 4), c, "causal"), "s")
    _raises(lambda: PF.state_update(h, c, torch.zeros(2, 4, dtype=torch.int32), torch.zeros(2, dtype=torch.long)),
            "state_sum")
    _raises(lambda: PF.state_update(h, c, torch.zeros(2, 4), torch.zeros(2, dtype=torch.int32)), "count")
    _raises(lambda: PF.state_update(h, c, torch.zeros(2, 4), torch.zeros(2, dtype=torch.float64)), "count")
    _raises(lambda: PF.weighted_state_update(h, c, torch.zeros(2, 4), torch.zeros(2, dtype=torch.long),
                                             torch.full((2, 5), 0.5)), "weight")
    _raises(lambda: PF.weighted_state_update(h, c, torch.zeros(2, 4), torch.zeros(2, dtype=torch.long),
                                             torch.ones(2, 4)), "weight")


def test_fallback_warns_once_at_first_use():
    """Without the compiled library pom_ext runs on the reference, warning once at first use, not at import."""
    code = textwrap.dedent("""
        import sys, warnings
        sys.modules["pom_ext._C"] = None  # the import of the compiled library fails
        with warnings.catch_warnings(record=True) as at_import:
            warnings.simplefilter("always")
            import torch, pom_ext
        assert not pom_ext.native_available()
        assert not [w for w in at_import if "pom_ext" in str(w.message)], "warned at import"
        with warnings.catch_warnings(record=True) as at_use:
            warnings.simplefilter("always")
            layer = pom_ext.PoM(16, 3, 2)
            x = torch.randn(2, 9, 16)
            y = layer(x, mask="causal")
            layer(x).sum().backward()
        msgs = [str(w.message) for w in at_use if "pom_ext" in str(w.message)]
        assert len(msgs) == 1, msgs
        assert "pip install --no-build-isolation" in msgs[0], msgs[0]
        ref = pom_ext.reference.pom_layer(layer, x, mask="causal")
        assert torch.allclose(y, ref, rtol=1e-5, atol=1e-6)
        print("fallback ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "fallback ok" in out.stdout, out.stdout + out.stderr


def test_causal_precision_long_sequence():
    """A 2^17-token causal mean in fp32 stays within the fp32 tolerance of float64 at every position."""
    h = torch.randn(1, 1 << 17, 8, dtype=torch.float64) * 3
    c = torch.rand(8, 2, dtype=torch.float64)
    ref = R.poly_causal(h, c)
    got = ops.poly_causal(h.float(), c)
    assert_close(got, ref, torch.float32, "long causal")
    assert rel_err(got[:, -1], ref[:, -1]) < TOL[torch.float32]
