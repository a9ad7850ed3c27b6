"""The CUDA kernels of the rope ops (poly_mean_rope, poly_causal_rope, poly_causal_gated_rope and their backward)
against the float64 reference: every dtype, table widths that do and do not fill whole 16-byte vectors, 1-D and
2-D sections, weights (float and bool), a gate per channel and gate heads, token-, block- and split-block-causal,
packed sequences with an empty one, positions shared or per row (int32 and int64), strided views, determinism,
opcheck, the layer on CUDA against the same layer on the CPU, bad positions.

Collected everywhere; skipped without a GPU or without CUDA kernels in the build (uninitialised allocations are
NaN-poisoned by conftest, so an element a kernel forgets to write fails the comparison)."""
import pytest
import torch

from pom_ext import PoMRoPE, ops, reference

from conftest import NEEDS_CUDA, TOL, assert_close, rel_err

pytestmark = NEEDS_CUDA

R = torch.ops.pom_ext
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# B, N, E, P, K: P a multiple of every dtype's vector width (the tables read 16 bytes at a time), P not one
# (per-channel table reads), several sections, the generic degree, rows enough for several chunks, one row.
CASES = [
    (2, 37, 64, 32, 2),
    (1, 300, 48, 8, 3),     # 3 sections
    (2, 130, 24, 6, 4),     # P = 6: no whole vectors
    (3, 5, 16, 2, 5),       # generic degree
    (1, 5000, 32, 16, 2),   # several chunks
    (2, 1, 8, 4, 1),
]


def tables(L, P, g, dtype=torch.float32):
    return torch.randn(L, P, generator=g, dtype=dtype), torch.randn(L, P, generator=g, dtype=dtype)


def assert_grads(out, ref, ins, rins, up, dtype, names):
    """The gradients of out (on the GPU) and of ref (float64, CPU) for the upstream gradient up (rounded to dtype
    for both) agree within the dtype's tolerance (10x for the 16-bit types: the backward adds a pass)."""
    scale = 10 if dtype in (torch.bfloat16, torch.float16) else 1
    u = up.to(dtype)
    for a, b, name in zip(torch.autograd.grad(out, ins, u.to(out.device)), torch.autograd.grad(ref, rins, u.double()),
                          names):
        err = rel_err(a, b)
        assert err < TOL[dtype] * scale, f"grad {name}: {err:.2e} ({dtype})"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("weight", [None, "float", "bool"])
def test_cuda_mean_rope_matches_reference(case, dtype, weight):
    B, N, E, P, K = case
    g = torch.Generator().manual_seed(N + E + K)
    h64 = 2 * torch.randn(B, N, E, generator=g, dtype=torch.float64)
    c64 = torch.randn(E, K, generator=g, dtype=torch.float64) * torch.tensor([3.0 ** -(k + 1) for k in range(K)],
                                                                              dtype=torch.float64)
    w64 = None
    if weight == "float":
        w64 = torch.rand(B, N, generator=g, dtype=torch.float64) + 0.1
    elif weight == "bool":
        w64 = torch.rand(B, N, generator=g) > 0.3
    cos, sin = tables(N + 5, P, g)
    pos = torch.randint(0, N + 5, (B, N, E // (2 * P)), generator=g)
    for p in (pos, pos[0].to(torch.int32)):  # per batch row (int64), shared (int32)
        h = h64.to(dtype).cuda().requires_grad_()
        c = c64.to(dtype).cuda().requires_grad_()
        w = None if w64 is None else (w64.cuda() if weight == "bool" else w64.to(dtype).cuda().requires_grad_())
        out = ops.poly_mean_rope(h, c, cos.cuda(), sin.cuda(), p.cuda(), w)
        href = h64.to(dtype).double().requires_grad_()
        cref = c64.to(dtype).double().requires_grad_()
        wref = None if w64 is None else (w64 if weight == "bool" else w64.to(dtype).double().requires_grad_())
        ref = reference.poly_mean_rope(href, cref, cos, sin, p, wref)
        assert out.dtype == dtype
        assert_close(out, ref, dtype, "forward")
        ins, rins = [h, c], [href, cref]
        if weight == "float" and N > 1:  # one token: the weight cancels out of the mean, its gradient is 0
            ins.append(w)
            rins.append(wref)
        assert_grads(out, ref, ins, rins, torch.randn(out.shape, generator=g, dtype=torch.float64), dtype, "hcw")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_cuda_mean_rope_packed_2d(dtype):
    """Packed sequences (an empty one, a one-token one) with 2-D positions (2 sections), weights."""
    g = torch.Generator().manual_seed(11)
    cu = torch.tensor([0, 0, 1, 40, 300], dtype=torch.int32)
    E, P, K = 32, 8, 2
    h64 = torch.randn(300, E, generator=g, dtype=torch.float64)
    c64 = torch.randn(E, K, generator=g, dtype=torch.float64) * 0.5
    w64 = torch.rand(300, generator=g, dtype=torch.float64)
    cos, sin = tables(24, P, g)
    pos = torch.randint(0, 24, (300, 2), generator=g)
    h = h64.to(dtype).cuda().requires_grad_()
    c = c64.to(dtype).cuda().requires_grad_()
    w = w64.to(dtype).cuda().requires_grad_()
    out = ops.poly_mean_rope(h, c, cos.cuda(), sin.cuda(), pos.cuda(), w, cu.cuda())
    href, cref, wref = (t.to(dtype).double().requires_grad_() for t in (h64, c64, w64))
    ref = reference.poly_mean_rope(href, cref, cos, sin, pos, wref, cu)
    assert_close(out, ref, dtype, "forward")
    assert torch.equal(out[0].float().cpu(), torch.zeros(E)), "an empty sequence's mean is 0"
    assert_grads(out, ref, (h, c, w), (href, cref, wref), torch.randn(out.shape, generator=g, dtype=torch.float64),
                 dtype, "hcw")


def test_cuda_mean_rope_strided_and_deterministic():
    g = torch.Generator().manual_seed(6)
    big = torch.randn(2, 80, 48, generator=g).cuda()
    h = big[:, ::2, 4:36]  # strided rows and a channel offset: no 16-byte rows
    c = torch.randn(32, 3, generator=g).cuda()
    cos, sin = (t.cuda() for t in tables(40, 8, g))
    pos = torch.randint(0, 40, (40, 2), generator=g).cuda()
    a, b = ops.poly_mean_rope(h, c, cos, sin, pos), ops.poly_mean_rope(h.contiguous(), c, cos, sin, pos)
    assert torch.equal(a, ops.poly_mean_rope(h, c, cos, sin, pos))
    assert rel_err(a, b) < 1e-6
    ref = reference.poly_mean_rope(h.double().cpu(), c.double().cpu(), cos.cpu(), sin.cpu(), pos.cpu())
    assert_close(a, ref, torch.float32, "strided")
    H = a.detach()
    gH = torch.randn(H.shape, generator=g).cuda()
    r1 = R.poly_mean_rope_backward(gH, H, h, c, cos, sin, pos, None, None, False)
    r2 = R.poly_mean_rope_backward(gH, H, h, c, cos, sin, pos, None, None, False)
    assert all(torch.equal(x, y) for x, y in zip(r1[:2], r2[:2]))


def test_cuda_mean_rope_opcheck():
    g = torch.Generator().manual_seed(5)
    d = dict(dtype=torch.float64, device="cuda")
    h = torch.randn(2, 17, 16, generator=g, dtype=torch.float64).to(**d).requires_grad_()
    c = torch.randn(16, 3, generator=g, dtype=torch.float64).to(**d).requires_grad_()
    w = torch.rand(2, 17, generator=g, dtype=torch.float64).to(**d).requires_grad_()
    cos, sin = (t.to(**d) for t in tables(20, 4, g, torch.float64))
    pos = torch.randint(0, 20, (17, 2), generator=g).cuda()
    hp = torch.randn(34, 16, generator=g, dtype=torch.float64).to(**d).requires_grad_()
    pp = torch.randint(0, 20, (34, 2), generator=g).cuda()
    cu = torch.tensor([0, 3, 3, 34], dtype=torch.int32, device="cuda")
    H = R.poly_mean_rope(h, c, cos, sin, pos, w, None).detach()
    for args in ((h, c, cos, sin, pos, None, None), (h, c, cos, sin, pos, w, None), (hp, c, cos, sin, pp, None, cu)):
        torch.library.opcheck(R.poly_mean_rope, args)
    gH = torch.randn(2, 16, generator=g, dtype=torch.float64).to(**d)
    torch.library.opcheck(R.poly_mean_rope_backward, (gH, H, h.detach(), c.detach(), cos, sin, pos, w.detach(), None,
                                                      True))


@pytest.mark.parametrize("rope_2d", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_cuda_layer_mean_matches_cpu(rope_2d, weighted):
    """PoMRoPE with no mask (the encoders' path) on CUDA against the same layer on the CPU, float64."""
    torch.manual_seed(0)
    kw = dict(max_h=8, max_w=8, rope_2d=True) if rope_2d else dict(max_seq_len=64)
    cpu = PoMRoPE(32, 2, 2, n_sel_heads=4, **kw).double()
    gpu = PoMRoPE(32, 2, 2, n_sel_heads=4, **kw).double().cuda()
    gpu.load_state_dict(cpu.state_dict())
    x = torch.randn(2, 40, 32, dtype=torch.float64)
    extra = {}
    if rope_2d:
        extra["positions_hw"] = torch.stack([torch.arange(40) // 8, torch.arange(40) % 8], -1)
    mask = (torch.rand(2, 40) > 0.2) if weighted else None
    xc, xg = x.clone().requires_grad_(), x.cuda().requires_grad_()
    yc = cpu(xc, mask=mask, **extra)
    yg = gpu(xg, mask=None if mask is None else mask.cuda(), **{k: v.cuda() for k, v in extra.items()})
    assert rel_err(yg, yc) < 1e-12
    up = torch.randn(yc.shape, dtype=torch.float64)
    (yc * up).sum().backward()
    (yg * up.cuda()).sum().backward()
    assert rel_err(xg.grad, xc.grad) < 1e-12
    for (name, a), b in zip(gpu.named_parameters(), cpu.parameters()):
        assert rel_err(a.grad, b.grad) < 1e-10, name


@pytest.mark.parametrize("bad,match", [
    (lambda p: p + 100, r"'positions' must lie in \[0, 20\)"),
    (lambda p: p - 30, r"'positions' must lie in \[0, 20\)"),
])
def test_cuda_mean_rope_bad_positions(bad, match):
    g = torch.Generator().manual_seed(9)
    cos, sin = (t.cuda() for t in tables(20, 2, g))
    pos = bad(torch.randint(0, 20, (17, 2), generator=g)).cuda()
    h, c = torch.randn(2, 17, 8, device="cuda"), torch.randn(8, 3, device="cuda")
    with pytest.raises(RuntimeError, match=match):
        R.poly_mean_rope(h, c, cos, sin, pos, None, None)
    with pytest.raises(RuntimeError, match=match):
        R.poly_mean_rope_backward(torch.randn(2, 8, device="cuda"), torch.randn(2, 8, device="cuda"), h, c, cos, sin,
                                  pos, None, None, False)
    torch.cuda.synchronize()  # the context is still usable
    assert ops.poly_mean_rope(h, c, cos, sin, pos.clamp(0, 19)).isfinite().all()


# ---- poly_causal_rope ----

# B, N, E, P, K, F: token-causal, whole blocks, blocks larger than a chunk (split: N = 5000, F = 700), P not a
# multiple of the vector width, several sections (lanes idle past the last pair vector), the generic degree.
CAUSAL_CASES = [
    (2, 37, 64, 32, 2, 1),
    (2, 300, 48, 8, 3, 1),
    (1, 5000, 32, 16, 2, 1),
    (2, 130, 24, 6, 4, 3),
    (3, 70, 16, 2, 5, 64),
    (1, 5000, 64, 16, 2, 700),
    (2, 1, 8, 4, 1, 1),
]


def causal_case(case, dtype, per_row, seed=0):
    B, N, E, P, K, F = case
    g = torch.Generator().manual_seed(seed + N + E + F)
    h64 = 2 * torch.randn(B, N, E, generator=g, dtype=torch.float64)
    c64 = torch.randn(E, K, generator=g, dtype=torch.float64) * torch.tensor([3.0 ** -(k + 1) for k in range(K)],
                                                                              dtype=torch.float64)
    cos, sin = tables(N + 5, P, g)
    pos = torch.randint(0, N + 5, (B, N, E // (2 * P)), generator=g)
    return h64, c64, cos, sin, (pos if per_row else pos[0].to(torch.int32)), g


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CAUSAL_CASES, ids=str)
@pytest.mark.parametrize("per_row", [False, True])
def test_cuda_causal_rope_matches_reference(case, dtype, per_row):
    F = case[-1]
    h64, c64, cos, sin, pos, g = causal_case(case, dtype, per_row)
    h = h64.to(dtype).cuda().requires_grad_()
    c = c64.to(dtype).cuda().requires_grad_()
    out = ops.poly_causal_rope(h, c, cos.cuda(), sin.cuda(), pos.cuda(), F)
    href = h64.to(dtype).double().requires_grad_()
    cref = c64.to(dtype).double().requires_grad_()
    ref = reference.poly_causal_rope(href, cref, cos, sin, pos, F)
    assert out.dtype == dtype
    assert_close(out, ref, dtype, "forward")
    assert_grads(out, ref, (h, c), (href, cref), torch.randn(out.shape, generator=g, dtype=torch.float64), dtype,
                 "hc")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("F", [1, 4, 300])
def test_cuda_causal_rope_packed_2d(dtype, F):
    """Packed sequences (an empty one, a one-token one, a long one) with 2-D positions (2 sections)."""
    g = torch.Generator().manual_seed(12 + F)
    cu = torch.tensor([0, 0, 1, 40, 3000], dtype=torch.int64)
    E, P, K = 32, 8, 2
    h64 = torch.randn(3000, E, generator=g, dtype=torch.float64)
    c64 = torch.randn(E, K, generator=g, dtype=torch.float64) * 0.5
    cos, sin = tables(24, P, g)
    pos = torch.randint(0, 24, (3000, 2), generator=g)
    h = h64.to(dtype).cuda().requires_grad_()
    c = c64.to(dtype).cuda().requires_grad_()
    out = ops.poly_causal_rope(h, c, cos.cuda(), sin.cuda(), pos.cuda(), F, cu.cuda())
    href, cref = (t.to(dtype).double().requires_grad_() for t in (h64, c64))
    ref = reference.poly_causal_rope(href, cref, cos, sin, pos, F, cu)
    assert_close(out, ref, dtype, "forward")
    assert_grads(out, ref, (h, c), (href, cref), torch.randn(out.shape, generator=g, dtype=torch.float64), dtype,
                 "hc")


def test_cuda_causal_rope_strided_and_deterministic():
    g = torch.Generator().manual_seed(7)
    big = torch.randn(2, 600, 48, generator=g).cuda()
    h = big[:, ::2, 4:36]  # strided rows and a channel offset: no 16-byte rows
    c = torch.randn(32, 3, generator=g).cuda()
    cos, sin = (t.cuda() for t in tables(300, 8, g))
    pos = torch.randint(0, 300, (300, 2), generator=g).cuda()
    for F in (1, 5):
        a = ops.poly_causal_rope(h, c, cos, sin, pos, F)
        assert torch.equal(a, ops.poly_causal_rope(h, c, cos, sin, pos, F))
        assert rel_err(a, ops.poly_causal_rope(h.contiguous(), c, cos, sin, pos, F)) < 1e-6
        ref = reference.poly_causal_rope(h.double().cpu(), c.double().cpu(), cos.cpu(), sin.cpu(), pos.cpu(), F)
        assert_close(a, ref, torch.float32, "strided")
        gH = torch.randn(h.shape, generator=g).cuda()
        r1 = R.poly_causal_rope_backward(gH, h, c, cos, sin, pos, F, None)
        r2 = R.poly_causal_rope_backward(gH, h, c, cos, sin, pos, F, None)
        assert all(torch.equal(x, y) for x, y in zip(r1, r2))


def test_cuda_causal_rope_opcheck():
    g = torch.Generator().manual_seed(15)
    d = dict(dtype=torch.float64, device="cuda")
    h = torch.randn(2, 17, 16, generator=g, dtype=torch.float64).to(**d).requires_grad_()
    c = torch.randn(16, 3, generator=g, dtype=torch.float64).to(**d).requires_grad_()
    cos, sin = (t.to(**d) for t in tables(20, 4, g, torch.float64))
    pos = torch.randint(0, 20, (17, 2), generator=g).cuda()
    hp = torch.randn(34, 16, generator=g, dtype=torch.float64).to(**d).requires_grad_()
    pp = torch.randint(0, 20, (34, 2), generator=g).cuda()
    cu = torch.tensor([0, 3, 3, 34], dtype=torch.int32, device="cuda")
    for args in ((h, c, cos, sin, pos, 1, None), (h, c, cos, sin, pos.expand(2, 17, 2).contiguous(), 4, None),
                 (hp, c, cos, sin, pp, 2, cu)):
        torch.library.opcheck(R.poly_causal_rope, args)
    torch.library.opcheck(R.poly_causal_rope_backward, (torch.randn_like(h), h.detach(), c.detach(), cos, sin, pos,
                                                        3, None))


@pytest.mark.parametrize("block_size", [None, 8])
@pytest.mark.parametrize("heads", [1, 4])
def test_cuda_layer_causal_matches_cpu(block_size, heads):
    """PoMRoPE with mask='causal' on CUDA against the CPU layer (both the fused gated rope op), float64: outputs
    and every gradient; a gate per channel and gate heads."""
    torch.manual_seed(1)
    cpu = PoMRoPE(32, 2, 2, n_sel_heads=heads, max_seq_len=64).double()
    gpu = PoMRoPE(32, 2, 2, n_sel_heads=heads, max_seq_len=64).double().cuda()
    gpu.load_state_dict(cpu.state_dict())
    x = torch.randn(2, 48, 32, dtype=torch.float64)
    xc, xg = x.clone().requires_grad_(), x.cuda().requires_grad_()
    yc = cpu(xc, mask="causal", block_size=block_size)
    yg = gpu(xg, mask="causal", block_size=block_size)
    assert rel_err(yg, yc) < 1e-12
    up = torch.randn(yc.shape, dtype=torch.float64)
    (yc * up).sum().backward()
    (yg * up.cuda()).sum().backward()
    assert rel_err(xg.grad, xc.grad) < 1e-12
    for (name, a), b in zip(gpu.named_parameters(), cpu.parameters()):
        assert rel_err(a.grad, b.grad) < 1e-10, name


def test_cuda_causal_rope_bad_positions():
    g = torch.Generator().manual_seed(19)
    cos, sin = (t.cuda() for t in tables(20, 2, g))
    pos = (torch.randint(0, 20, (17, 2), generator=g) + 100).cuda()
    h, c = torch.randn(2, 17, 8, device="cuda"), torch.randn(8, 3, device="cuda")
    with pytest.raises(RuntimeError, match=r"'positions' must lie in \[0, 20\)"):
        R.poly_causal_rope(h, c, cos, sin, pos, 1, None)
    with pytest.raises(RuntimeError, match=r"'positions' must lie in \[0, 20\)"):
        R.poly_causal_rope_backward(torch.randn_like(h), h, c, cos, sin, pos, 1, None)
    assert ops.poly_causal_rope(h, c, cos, sin, pos - 100, 1).isfinite().all()


# ---- poly_causal_gated_rope: y = R_g(pos) hardsigmoid(pre + bias) * H~ ----

# B, N, E, P, Pg, K, F: a gate per channel (Pg = P: the gate columns read 16 bytes a row), gate heads (q = P / Pg
# channels a gate), P not a multiple of the vector width, 3 sections, several chunks, split blocks (N = 5000,
# F = 700; with gate heads and P = 6 too), the generic degree, one row.
GATED_CASES = [
    (2, 37, 64, 32, 32, 2, 1),
    (2, 37, 64, 32, 4, 2, 1),
    (2, 300, 48, 8, 8, 3, 1),
    (2, 130, 24, 6, 3, 4, 3),
    (1, 5000, 32, 16, 2, 2, 1),
    (1, 5000, 64, 16, 16, 2, 700),
    (1, 5000, 48, 6, 2, 2, 700),   # split blocks with gate heads (q = 3), P = 6: no whole vectors
    (3, 70, 16, 2, 1, 5, 64),
    (2, 1, 8, 4, 4, 1, 1),
]


def gated_case(case, per_row, seed=0):
    B, N, E, P, Pg, K, F = case
    g = torch.Generator().manual_seed(seed + N + E + Pg + F)
    sec = E // (2 * P)
    S = 2 * Pg * sec
    hs64 = 2 * torch.randn(B, N, E + S, generator=g, dtype=torch.float64)
    c64 = torch.randn(E, K, generator=g, dtype=torch.float64) * torch.tensor([3.0 ** -(k + 1) for k in range(K)],
                                                                              dtype=torch.float64)
    b64 = torch.randn(S, generator=g, dtype=torch.float64)
    cos, sin = tables(N + 5, P, g)
    gcos, gsin = tables(N + 5, Pg, g)
    pos = torch.randint(0, N + 5, (B, N, sec), generator=g)
    return hs64, c64, b64, (cos, sin, gcos, gsin), (pos if per_row else pos[0].to(torch.int32)), g


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", GATED_CASES, ids=str)
@pytest.mark.parametrize("per_row", [False, True])
def test_cuda_causal_gated_rope_matches_reference(case, dtype, per_row):
    """Per-row positions with a gate bias, shared positions without."""
    F = case[-1]
    hs64, c64, b64, tabs, pos, g = gated_case(case, per_row)
    leaves = [hs64.to(dtype).cuda().requires_grad_(), c64.to(dtype).cuda().requires_grad_()]
    rleaves = [hs64.to(dtype).double().requires_grad_(), c64.to(dtype).double().requires_grad_()]
    if per_row:
        leaves.append(b64.to(dtype).cuda().requires_grad_())
        rleaves.append(b64.to(dtype).double().requires_grad_())
    b, rb = (leaves[2], rleaves[2]) if per_row else (None, None)
    out = ops.poly_causal_gated_rope(leaves[0], leaves[1], b, *(t.cuda() for t in tabs), pos.cuda(), F)
    ref = reference.poly_causal_gated_rope(rleaves[0], rleaves[1], rb, *tabs, pos, F)
    assert out.dtype == dtype and out.shape == ref.shape
    assert_close(out, ref, dtype, "forward")
    assert_grads(out, ref, leaves, rleaves, torch.randn(out.shape, generator=g, dtype=torch.float64), dtype,
                 ["hs", "coeff", "gate_bias"])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("F", [1, 4, 300])
@pytest.mark.parametrize("Pg", [8, 2])
def test_cuda_causal_gated_rope_packed_2d(dtype, F, Pg):
    """Packed sequences (an empty one, a one-token one, a long one) with 2-D positions (2 sections)."""
    g = torch.Generator().manual_seed(13 + F + Pg)
    cu = torch.tensor([0, 0, 1, 40, 3000], dtype=torch.int64)
    E, P, K = 32, 8, 2
    S = 4 * Pg
    hs64 = torch.randn(3000, E + S, generator=g, dtype=torch.float64)
    c64 = torch.randn(E, K, generator=g, dtype=torch.float64) * 0.5
    b64 = torch.randn(S, generator=g, dtype=torch.float64)
    tabs = tables(24, P, g) + tables(24, Pg, g)
    pos = torch.randint(0, 24, (3000, 2), generator=g)
    leaves = [t.to(dtype).cuda().requires_grad_() for t in (hs64, c64, b64)]
    rleaves = [t.to(dtype).double().requires_grad_() for t in (hs64, c64, b64)]
    out = ops.poly_causal_gated_rope(*leaves, *(t.cuda() for t in tabs), pos.cuda(), F, cu.cuda())
    ref = reference.poly_causal_gated_rope(*rleaves, *tabs, pos, F, cu)
    assert_close(out, ref, dtype, "forward")
    assert_grads(out, ref, leaves, rleaves, torch.randn(out.shape, generator=g, dtype=torch.float64), dtype,
                 ["hs", "coeff", "gate_bias"])


def test_cuda_causal_gated_rope_strided_and_deterministic():
    g = torch.Generator().manual_seed(8)
    big = torch.randn(2, 600, 48, generator=g).cuda()
    hs = big[:, ::2, 4:44]  # E = 32 features + S = 8 gates: strided rows and a channel offset, no 16-byte rows
    c = torch.randn(32, 3, generator=g).cuda()
    b = torch.randn(8, generator=g).cuda()
    tabs = tuple(t.cuda() for t in tables(300, 8, g) + tables(300, 2, g))
    pos = torch.randint(0, 300, (300, 2), generator=g).cuda()
    for F in (1, 5):
        a = ops.poly_causal_gated_rope(hs, c, b, *tabs, pos, F)
        assert torch.equal(a, ops.poly_causal_gated_rope(hs, c, b, *tabs, pos, F))
        assert rel_err(a, ops.poly_causal_gated_rope(hs.contiguous(), c, b, *tabs, pos, F)) < 1e-6
        ref = reference.poly_causal_gated_rope(hs.double().cpu(), c.double().cpu(), b.double().cpu(),
                                               *(t.cpu() for t in tabs), pos.cpu(), F)
        assert_close(a, ref, torch.float32, "strided")
        gy = torch.randn(a.shape, generator=g).cuda()
        r1 = R.poly_causal_gated_rope_backward(gy, hs, c, b, *tabs, pos, F, None)
        r2 = R.poly_causal_gated_rope_backward(gy, hs, c, b, *tabs, pos, F, None)
        assert all(torch.equal(x, y) for x, y in zip(r1, r2))


def test_cuda_causal_gated_rope_opcheck():
    g = torch.Generator().manual_seed(16)
    d = dict(dtype=torch.float64, device="cuda")
    hs = torch.randn(2, 17, 24, generator=g, dtype=torch.float64).to(**d).requires_grad_()  # E = 16, S = 8
    c = torch.randn(16, 3, generator=g, dtype=torch.float64).to(**d).requires_grad_()
    b = torch.randn(8, generator=g, dtype=torch.float64).to(**d).requires_grad_()
    tabs = tuple(t.to(**d) for t in tables(20, 4, g, torch.float64) + tables(20, 2, g, torch.float64))
    pos = torch.randint(0, 20, (17, 2), generator=g).cuda()
    hp = torch.randn(34, 24, generator=g, dtype=torch.float64).to(**d).requires_grad_()
    pp = torch.randint(0, 20, (34, 2), generator=g).cuda()
    cu = torch.tensor([0, 3, 3, 34], dtype=torch.int32, device="cuda")
    for args in ((hs, c, b, *tabs, pos, 1, None), (hs, c, None, *tabs, pos.expand(2, 17, 2).contiguous(), 4, None),
                 (hp, c, b, *tabs, pp, 2, cu)):
        torch.library.opcheck(R.poly_causal_gated_rope, args)
    torch.library.opcheck(R.poly_causal_gated_rope_backward,
                          (torch.randn(2, 17, 16, generator=g, dtype=torch.float64).to(**d), hs.detach(), c.detach(),
                           b.detach(), *tabs, pos, 3, None))


def test_cuda_causal_gated_rope_bad_positions():
    g = torch.Generator().manual_seed(20)
    tabs = tuple(t.cuda() for t in tables(20, 2, g) + tables(20, 1, g))
    pos = (torch.randint(0, 20, (17, 2), generator=g) + 100).cuda()
    hs, c = torch.randn(2, 17, 12, device="cuda"), torch.randn(8, 3, device="cuda")  # E = 8, S = 4
    with pytest.raises(RuntimeError, match=r"'positions' must lie in \[0, 20\)"):
        R.poly_causal_gated_rope(hs, c, None, *tabs, pos, 1, None)
    with pytest.raises(RuntimeError, match=r"'positions' must lie in \[0, 20\)"):
        R.poly_causal_gated_rope_backward(torch.randn(2, 17, 8, device="cuda"), hs, c, None, *tabs, pos, 1, None)
    assert ops.poly_causal_gated_rope(hs, c, None, *tabs, pos - 100, 1).isfinite().all()
