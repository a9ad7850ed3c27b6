"""The CUDA kernels of the rope mean (poly_mean_rope and its backward) against the float64 reference: every
dtype, table widths that do and do not fill whole 16-byte vectors, 1-D and 2-D sections, weights (float and
bool), packed sequences with an empty one, positions shared or per row (int32 and int64), strided views,
determinism, opcheck, the layer on CUDA against the same layer on the CPU, bad positions.

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


def grads(out, inputs, up):
    return torch.autograd.grad(out, inputs, up)


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
        up = torch.randn(out.shape, generator=g, dtype=torch.float64)
        ins, rins = [h, c], [href, cref]
        if weight == "float" and N > 1:  # one token: the weight cancels out of the mean, its gradient is 0
            ins.append(w)
            rins.append(wref)
        for a, b, name in zip(grads(out, ins, up.to(dtype).cuda()), grads(ref, rins, up.to(dtype).double()), "hcw"):
            err = rel_err(a, b)
            assert err < TOL[dtype] * (10 if dtype in (torch.bfloat16, torch.float16) else 1), f"grad {name}: {err:.2e}"


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
    up = torch.randn(out.shape, generator=g, dtype=torch.float64)
    scale = 10 if dtype == torch.bfloat16 else 1
    for a, b, name in zip(grads(out, (h, c, w), up.to(dtype).cuda()), grads(ref, (href, cref, wref), up), "hcw"):
        assert rel_err(a, b) < TOL[dtype] * scale, name


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
