"""Extreme values: NaN and +-inf propagate as in the reference, degree 16 in float16/bfloat16 never
overflows an intermediate power, and a 2^20-token causal mean in float32 stays accurate everywhere."""
import pytest
import torch

import pom_ext
from pom_ext import functional as PF, ops, reference as R

from conftest import TOL, rel_err

pytestmark = pytest.mark.skipif(not pom_ext.native_available(), reason="compiled kernels not built")

NAN, INF = float("nan"), float("inf")


def same_values(a, b, tol, what):
    """NaN where the reference has NaN, the same infinities where it has them, and close elsewhere."""
    a, b = a.detach().double(), b.detach().double()
    assert a.shape == b.shape, what
    assert torch.equal(torch.isnan(a), torch.isnan(b)), f"{what}: NaN at {torch.isnan(a).nonzero().tolist()[:8]}, " \
                                                       f"reference {torch.isnan(b).nonzero().tolist()[:8]}"
    inf_a, inf_b = torch.isinf(a), torch.isinf(b)
    assert torch.equal(inf_a, inf_b) and torch.equal(a[inf_a], b[inf_b]), f"{what}: infinities differ"
    fin = torch.isfinite(b)
    if fin.any():
        err = rel_err(a[fin], b[fin])
        assert err < tol, f"{what}: relative error {err:.3e} on the finite elements"


def poisoned_h(B, N, E, dtype, seed=0):
    """(B, N, E) with a NaN, +inf and -inf each in one known token and channel, and huge finite values."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, N, E, generator=g, dtype=torch.float64) * 3
    h[0, 2, 1] = NAN
    h[0, 4, 3] = INF
    h[B - 1, 5, 0] = -INF
    h[B - 1, 1, 2] = 6e4  # finite in float16, far beyond the clamp at 6
    h[0, 6, 2] = -6e4
    return h.to(dtype)


CASES = ["eval", "mean", "weighted", "causal", "block3", "varlen_mean", "varlen_causal", "masked", "state"]


def run(case, h, c, impl):
    B, N, E = h.shape
    if case == "eval":
        return [impl.poly_eval(h, c)]
    if case == "mean":
        return [impl.poly_mean(h, c)]
    if case == "weighted":
        w = torch.linspace(0, 1, N, dtype=torch.float64).expand(B, N).contiguous()
        w[:, 2] = 0  # the NaN token has weight 0: 0 * NaN is still NaN
        return [impl.poly_mean(h, c, w)]
    if case.startswith("causal") or case.startswith("block"):
        return [impl.poly_causal(h, c, 1 if case == "causal" else 3)]
    if case.startswith("varlen"):
        cu = torch.tensor([0, 3, 3, B * N], dtype=torch.int32)
        hp = h.reshape(B * N, E)
        return [impl.poly_mean(hp, c, None, cu) if case == "varlen_mean" else impl.poly_causal(hp, c, 2, cu)]
    if case == "masked":
        m = torch.rand(B, 5, N, generator=torch.Generator().manual_seed(1)) > 0.5
        return [PF.aggregate(h, c, m) if impl is ops else R.poly_masked(h, c, m)]
    if case == "state":
        s = torch.randn(B, E, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        n = torch.tensor([3] * B)
        H, s2, n2 = impl.poly_state_update(h, c, s.to(torch.float32), n)
        return [H, s2]
    raise AssertionError(case)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_nan_inf_propagate_like_reference(cpu_isa, dtype, case):
    """act(+inf) = 6 and act(-inf) = -0.1 are finite; NaN stays NaN through act and every aggregation,
    in exactly the outputs (and gradients) where the reference has it."""
    h = poisoned_h(2, 9, 5, dtype)
    c = torch.randn(5, 4, dtype=torch.float64) * 0.3
    tol = TOL[dtype]
    hk = h.clone().requires_grad_()
    hr = h.double().requires_grad_()
    ck, cr = c.clone().requires_grad_(), c.clone().requires_grad_()
    got, ref = run(case, hk, ck, ops), run(case, hr, cr, R)
    for i, (a, b) in enumerate(zip(got, ref)):
        same_values(a, b, max(tol, TOL[a.dtype]), f"{case} output {i}")
    # Gradients: the kernels give NaN wherever the reference does; at a NaN input the reference's clamp
    # backward masks the slope to 0 (0 * NaN never formed), the kernels propagate NaN instead. Both are
    # accepted there, and nowhere else may a NaN or an inf appear.
    seeds = [torch.randn(b.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) for b in ref]
    gk = torch.autograd.grad(got, [hk, ck], [s.to(a.dtype) for s, a in zip(seeds, got)])
    gr = torch.autograd.grad(ref, [hr, cr], [s.to(a.dtype).double() for s, a in zip(seeds, got)])
    nan_in = torch.isnan(h)
    gh, ghr = gk[0].double(), gr[0].clone()
    ghr[nan_in & torch.isnan(gh)] = NAN
    same_values(gh, ghr, tol, f"{case} grad h")
    same_values(gk[1], gr[1], tol, f"{case} grad coeff")


@pytest.mark.parametrize("case", ["mean", "causal", "state"])
def test_nan_state_and_weights(case):
    """NaN in a weight or in the state sum poisons exactly that batch row, as in the reference."""
    h = torch.randn(3, 6, 4, dtype=torch.float64)
    c = torch.randn(4, 3, dtype=torch.float64) * 0.3
    if case == "mean":
        w = torch.rand(3, 6, dtype=torch.float64)
        w[1, 2] = NAN
        w[2, 0] = INF
        same_values(ops.poly_mean(h, c, w), R.poly_mean(h, c, w), 1e-10, "weights")
    elif case == "causal":
        c[1, 1] = NAN
        same_values(ops.poly_causal(h, c, 2), R.poly_causal(h, c, 2), 1e-10, "NaN coefficient")
    else:
        s = torch.randn(3, 4, dtype=torch.float64)
        s[1, 3] = NAN
        s[2, 0] = INF
        n = torch.tensor([1, 2, 3])
        for a, b in zip(ops.poly_state_update(h, c, s, n), R.poly_state_update(h, c, s, n)):
            if a.is_floating_point():
                same_values(a, b, 1e-10, "state")
            else:
                assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("mode", ["eval", "mean", "causal", "state"])
def test_degree16_low_precision_no_overflow(cpu_isa, dtype, mode):
    """act(h) up to 6 gives 6^16 = 2.8e12 (float16 overflows at 6.6e4): the powers are formed in float32, and
    a result that float16 can hold comes out finite and within the SPEC tolerance of float64."""
    E, K = 8, 16
    g = torch.Generator().manual_seed(4)
    h = torch.rand(2, 40, E, generator=g, dtype=torch.float64) * 8 - 1  # many at the clamp (6), some negative
    h[:, ::3] = 6.0
    c = torch.randn(E, K, generator=g, dtype=torch.float64) * torch.tensor([6.0 ** -(k + 1) for k in range(K)])
    c[:, -1] = 6.0 ** -16  # the top power alone contributes 1 at act = 6: it must be there, finite
    hl = h.to(dtype).requires_grad_()
    hr = hl.detach().double().requires_grad_()
    cf = c.float()  # float32 coefficients: their gradient, a sum of act^16, exceeds the float16 range
    cr = cf.double().requires_grad_()
    cf.requires_grad_()
    if mode == "eval":
        a, b = ops.poly_eval(hl, cf), R.poly_eval(hr, cr)
    elif mode == "mean":
        a, b = ops.poly_mean(hl, cf), R.poly_mean(hr, cr)
    elif mode == "causal":
        a, b = ops.poly_causal(hl, cf), R.poly_causal(hr, cr)
    else:
        a = ops.poly_state_update(hl, cf, torch.zeros(2, E), torch.zeros(2, dtype=torch.long))[0]
        b = R.poly_state_update(hr, cr, torch.zeros(2, E, dtype=torch.float64), torch.zeros(2, dtype=torch.long))[0]
    assert b.abs().max() < 100 and torch.isfinite(a).all(), f"{mode}: overflow"
    assert rel_err(a, b) < TOL[dtype]
    seed = torch.randn(b.shape, dtype=torch.float64, generator=g)
    ga = torch.autograd.grad(a, (hl, cf), seed.to(dtype))
    gb = torch.autograd.grad(b, (hr, cr), seed.to(dtype).double())
    assert torch.isfinite(ga[0]).all() and torch.isfinite(ga[1]).all(), f"{mode}: gradient overflow"
    assert rel_err(ga[0], gb[0]) < TOL[dtype], f"{mode}: grad h"
    assert rel_err(ga[1], gb[1]) < TOL[torch.float32], f"{mode}: grad coeff"


def test_causal_2_20_tokens_fp32_every_position():
    """2^20 tokens, float32: every position's prefix mean within 1e-5 relative error of float64
    (the scan is cut into chunks with float64 carries when B * channel blocks < threads)."""
    N, E = 1 << 20, 4
    g = torch.Generator().manual_seed(6)
    h = torch.randn(1, N, E, generator=g, dtype=torch.float64) * 3
    c = torch.rand(E, 3, generator=g, dtype=torch.float64)
    hf = h.float()
    ref = R.poly_causal(hf.double(), c)
    got = ops.poly_causal(hf, c).double()
    err = ((got - ref).norm(dim=-1) / ref.norm(dim=-1))[0]
    worst = int(err.argmax())
    assert err.max() < 1e-5, f"position {worst}: relative error {err.max():.3e}"
    mean_ref = R.poly_mean(hf.double(), c)
    assert rel_err(ops.poly_mean(hf, c), mean_ref) < 1e-5
    assert rel_err(got[:, -1], mean_ref) < 1e-5
    del ref, got
    # backward: the reverse scan over 2^20 tokens, and the coefficient gradient summed over all of them
    gH = torch.randn(1, N, E, generator=g, dtype=torch.float64) / N
    hk = hf.clone().requires_grad_()
    ck = c.float().requires_grad_()
    gk = torch.autograd.grad(ops.poly_causal(hk, ck), (hk, ck), gH.float())
    hr = hf.double().requires_grad_()
    cr = c.float().double().requires_grad_()
    gr = torch.autograd.grad(R.poly_causal(hr, cr), (hr, cr), gH.float().double())
    assert rel_err(gk[0], gr[0]) < 1e-5 and rel_err(gk[1], gr[1]) < 1e-5


@pytest.mark.parametrize("gated", [False, True])
def test_large_block_backward_fp32(cpu_isa, gated):
    """Block-causal with blocks of thousands of rows: the backward sums each block's gradient rows with
    compensation, so a constant upstream gradient (every term alike, the worst case for a plain fp32 sum)
    stays within the float32 tolerance."""
    g = torch.Generator().manual_seed(0)
    E, N, F = 64, 20000, 16384  # a plain fp32 sum of the blocks errs by 1e-4 here
    h = torch.randn(1, N, E + (E if gated else 0), generator=g, dtype=torch.float64) * 0.3
    c = torch.randn(E, 1, generator=g, dtype=torch.float64)
    seed = torch.randn(1, 1, E, generator=g, dtype=torch.float64).expand(1, N, E)
    grads = []
    for x, impl in ((h.float(), ops), (h.float().double(), R)):
        x = x.detach().requires_grad_()
        y = impl.poly_causal_gated(x, c.to(x.dtype), None, F) if gated else impl.poly_causal(x, c.to(x.dtype), F)
        grads.append(torch.autograd.grad(y, x, seed.to(x.dtype))[0])
    err = rel_err(grads[0], grads[1])
    assert err < TOL[torch.float32], f"grad h, F={F}: relative error {err:.2e}"


KINK_CASES = ["eval", "mean", "weighted", "causal", "block3", "varlen_causal", "state", "gated"]


def kink_h(B, N, E, dtype, seed=5):
    """(B, N, E) where a quarter of the elements sit exactly on each kink of act (-10, 0, 6; exact in every
    dtype) and the rest are random."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, N, E, generator=g, dtype=torch.float64) * 4
    pick = torch.randint(0, 4, (B, N, E), generator=g)
    for i, v in enumerate((-10.0, 0.0, 6.0)):
        h[pick == i] = v
    return h.to(dtype)


def test_activation_kinks_follow_torch():
    """act'(u) at its kinks is torch's own: leaky_relu's negative slope at 0, and at the clamp's bounds (-10, 6)
    whatever the installed torch's clamp gives (1 up to torch 2.13, 0 from 2.14). Degree 1 with coefficient 1
    makes the kernel's gradient of poly_eval act' itself."""
    u = torch.tensor([-10.0, -10.0 - 2 ** -20, 0.0, 6.0, 6.0 + 2 ** -20, 3.0, -3.0], dtype=torch.float64)
    ur = u.clone().requires_grad_()
    torch.nn.functional.leaky_relu(ur, 0.01).clamp(-0.1, 6.0).sum().backward()
    for dtype in (torch.float64, torch.float32):
        uk = u.to(dtype).view(1, -1).requires_grad_()
        ops.poly_eval(uk, torch.ones(uk.shape[1], 1, dtype=dtype)).sum().backward()
        assert torch.equal(uk.grad.view(-1).double(), ur.grad.to(dtype).double()), \
            f"{dtype}: act' at {u.tolist()} is {uk.grad.view(-1).tolist()}, torch's {ur.grad.tolist()}"


@pytest.mark.parametrize("case", KINK_CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_kink_gradients_match_reference(cpu_isa, dtype, case):
    """Every backward kernel at inputs that sit on the kinks (a quarter each at -10, 0 and 6) against the float64
    reference, whose act is torch's leaky_relu and clamp: one rule on every torch version."""
    h = kink_h(2, 9, 8, dtype)
    c = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(6)) * 0.3
    hk, hr = h.clone().requires_grad_(), h.double().requires_grad_()
    ck, cr = c.clone().requires_grad_(), c.clone().requires_grad_()
    if case == "gated":
        pre = torch.randn(2, 9, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(7)).to(dtype)
        hsk = torch.cat([hk, pre], -1)
        got, ref = [ops.poly_causal_gated(hsk, ck)], [R.poly_causal_gated(torch.cat([hr, pre.double()], -1), cr)]
    else:
        got, ref = run(case, hk, ck, ops), run(case, hr, cr, R)
    seeds = [torch.randn(b.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(8)) for b in ref]
    gk = torch.autograd.grad(got, [hk, ck], [s.to(a.dtype) for s, a in zip(seeds, got)])
    gr = torch.autograd.grad(ref, [hr, cr], [s.to(a.dtype).double() for s, a in zip(seeds, got)])
    assert rel_err(gk[0], gr[0]) < TOL[dtype], f"{case}: grad h at the kinks"
    assert rel_err(gk[1], gr[1]) < TOL[dtype], f"{case}: grad coeff"


WIDE_OPS = ["causal", "weighted", "gated", "gated_heads", "rope", "gated_rope", "gated_rope_heads", "rope2d",
            "gated_rope2d", "gated_rope2d_heads"]


@pytest.mark.parametrize("op", WIDE_OPS)
@pytest.mark.parametrize("nthreads", [1, 2])
@pytest.mark.parametrize("B", [1, 2, 3, "packed_even", "packed_uneven"])
@pytest.mark.parametrize("F", [1, 5])
def test_rows_wider_than_a_channel_block(threads, op, nthreads, B, F):
    """E = 1040 channels (rotary: 520 pairs): the CPU scans walk whole rows when one task per sequence shares the
    rows evenly among the threads, else blocks of at most 512 channels (256 pairs; whole gate groups: with 8 gate
    heads of 130 channels, 390 channels and 260 pairs; the last block narrower): one thread, or two with 2 equal
    sequences or 4 packed ones of about equal length, walk whole rows; two threads with 1 or 3 sequences, or with 4
    packed ones of which one holds most rows, walk blocks. Both, for every causal op, forward and gradients (the
    weights' included) against the float64 reference. 2-D rotary (two sections of 260 pairs): a task holds pairs of
    one section, all 260 where whole rows are walked, else at most 256 (with 8 gate heads, 130)."""
    E, N, K = 1040, 23, 3
    g = torch.Generator().manual_seed(WIDE_OPS.index(op) * 100 + nthreads * 10 + F + len(str(B)) * 1000)
    gated, rope, sections = op.startswith("gated"), "rope" in op, 2 if "2d" in op else 1
    S = E if op in ("gated", "gated_rope", "gated_rope2d") else 8 if op.endswith("heads") else 0
    packed = str(B).startswith("packed")
    ends = [17, 34, 52] if B == "packed_even" else [9, 10, 30]
    cu = torch.tensor([0] + ends + [3 * N], dtype=torch.int32) if packed else None
    rows = (3 * N,) if packed else (B, N)
    x = torch.randn(*rows, E + S, generator=g, dtype=torch.float64) * 2
    c = torch.randn(E, K, generator=g, dtype=torch.float64) * torch.tensor([2.0 ** -k for k in range(K)])
    b = torch.randn(S, generator=g, dtype=torch.float64) if gated else None
    if op == "weighted":  # weights >= 0, some rows 0 (a prefix may weigh nothing)
        b = torch.rand(rows, generator=g, dtype=torch.float64) * (torch.rand(rows, generator=g) > 0.2)
    L = 3 * N + 4
    tabs = [torch.randn(L, E // (2 * sections), generator=g) for _ in range(2)]
    if gated:
        tabs += [torch.randn(L, S // (2 * sections), generator=g) for _ in range(2)]
    pos = torch.randint(0, L, rows + (sections,), generator=g)

    def call(impl, xs, cs, bs=None):
        if rope and gated:
            return impl.poly_causal_gated_rope(xs, cs, bs, *tabs, pos, F, cu)
        if rope:
            return impl.poly_causal_rope(xs, cs, tabs[0], tabs[1], pos, F, cu)
        if gated:
            return impl.poly_causal_gated(xs, cs, bs, F, cu)
        if op == "weighted":
            return impl.poly_causal_weighted(xs, cs, bs, F, cu)
        return impl.poly_causal(xs, cs, F, cu)

    up = torch.randn(rows + (E,), generator=g, dtype=torch.float64)
    threads(nthreads)
    results = []
    for impl in (ops, R):
        leaves = [t.clone().requires_grad_() for t in (x, c) + ((b,) if b is not None else ())]
        y = call(impl, *leaves)
        results.append((y, torch.autograd.grad(y, leaves, up)))
    (y, grads), (y_ref, ref) = results
    assert rel_err(y, y_ref) < 1e-12, f"forward {rel_err(y, y_ref):.3g}"
    for name, a, r in zip(["input", "coeff", "gate_bias" if gated else "weight"], grads, ref):
        assert rel_err(a, r) < 1e-10, f"{name}: {rel_err(a, r):.3g}"
