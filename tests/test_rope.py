"""PoMRoPE and the rope ops: the fused kernels against the float64 reference (forward, gradients, opcheck,
strides, packed, block-causal, dtypes), the layer against its reference path (and the paper's `pom.PoMRoPE` when
installed), the recurrent state against the parallel forward, bad inputs."""
import importlib.util

import pytest
import torch

import pom_ext
from pom_ext import PoMRoPE, ops, reference
from pom_ext.rope import rope_tables_1d

from conftest import CPU_AND_CUDA, DTYPES, TOL, assert_close, rel_err

native = pytest.mark.skipif(not pom_ext.native_available(), reason="compiled kernels not available")
R = torch.ops.pom_ext


def tables(L, P, g, dtype=torch.float32):
    return torch.randn(L, P, generator=g, dtype=dtype), torch.randn(L, P, generator=g, dtype=dtype)


# ---- ops ----

OP_CASES = [  # B, N, E, P, K
    (2, 37, 16, 8, 3),
    (1, 300, 24, 4, 2),  # 3 sections
    (3, 5, 8, 2, 5),     # generic degree
    (1, 2600, 12, 3, 1),  # long enough to be cut into chunks
    (2, 1, 4, 1, 4),
]


@native
@pytest.mark.parametrize("case", OP_CASES, ids=str)
@pytest.mark.parametrize("F", [1, 3, 64])
def test_causal_rope_matches_reference(case, F):
    B, N, E, P, K = case
    g = torch.Generator().manual_seed(N + F)
    h = (2 * torch.randn(B, N, E, generator=g, dtype=torch.float64)).requires_grad_()
    c = torch.randn(E, K, generator=g, dtype=torch.float64).requires_grad_()
    cos, sin = tables(N + 5, P, g)
    pos = torch.randint(0, N + 5, (B, N, E // (2 * P)), generator=g)
    for p in (pos, pos[0]):  # per batch row, and shared
        out = ops.poly_causal_rope(h, c, cos, sin, p, F)
        ref = reference.poly_causal_rope(h, c, cos, sin, p, F)
        assert_close(out, ref, torch.float64, "forward")
        up = torch.randn(out.shape, generator=g, dtype=torch.float64)
        for a, b, name in zip(torch.autograd.grad(out, (h, c), up), torch.autograd.grad(ref, (h, c), up), "hc"):
            assert rel_err(a, b) < 1e-9, name


@native
@pytest.mark.parametrize("case", OP_CASES, ids=str)
@pytest.mark.parametrize("weighted", [False, True])
def test_mean_rope_matches_reference(case, weighted):
    B, N, E, P, K = case
    g = torch.Generator().manual_seed(N + weighted)
    h = (2 * torch.randn(B, N, E, generator=g, dtype=torch.float64)).requires_grad_()
    c = torch.randn(E, K, generator=g, dtype=torch.float64).requires_grad_()
    w = torch.rand(B, N, generator=g, dtype=torch.float64).requires_grad_() if weighted else None
    cos, sin = tables(N + 5, P, g)
    pos = torch.randint(0, N + 5, (N, E // (2 * P)), generator=g)
    out = ops.poly_mean_rope(h, c, cos, sin, pos, w)
    ref = reference.poly_mean_rope(h, c, cos, sin, pos, w)
    assert_close(out, ref, torch.float64, "forward")
    # With one token the weight cancels out of the mean: its gradient is 0 up to rounding, nothing to compare.
    inputs = (h, c) + ((w,) if weighted and N > 1 else ())
    up = torch.randn(out.shape, generator=g, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(out, inputs, up), torch.autograd.grad(ref, inputs, up)):
        assert rel_err(a, b) < 1e-9


@native
@pytest.mark.parametrize("causal", [False, True])
def test_rope_packed(causal):
    g = torch.Generator().manual_seed(3)
    cu = torch.tensor([0, 7, 7, 40, 41], dtype=torch.int32)
    h = torch.randn(41, 12, generator=g, dtype=torch.float64).requires_grad_()
    c = torch.randn(12, 3, generator=g, dtype=torch.float64).requires_grad_()
    cos, sin = tables(50, 3, g)
    pos = torch.randint(0, 50, (41, 2), generator=g)
    if causal:
        out, ref = (f(h, c, cos, sin, pos, 4, cu) for f in (ops.poly_causal_rope, reference.poly_causal_rope))
    else:
        out, ref = (f(h, c, cos, sin, pos, None, cu) for f in (ops.poly_mean_rope, reference.poly_mean_rope))
    assert_close(out, ref, torch.float64, "packed")
    up = torch.randn(out.shape, generator=g, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(out, (h, c), up), torch.autograd.grad(ref, (h, c), up)):
        assert rel_err(a, b) < 1e-9


@native
@pytest.mark.parametrize("dtype", DTYPES[1:])
def test_rope_low_precision(dtype):
    g = torch.Generator().manual_seed(4)
    h64 = torch.randn(2, 200, 32, generator=g, dtype=torch.float64)
    c64 = torch.randn(32, 3, generator=g, dtype=torch.float64) * 0.5
    cos, sin = rope_tables_1d(32, 256, 10000.0)
    pos = torch.arange(200)[:, None]
    h, c = h64.to(dtype), c64.to(dtype)
    for f, ref in ((lambda *a: ops.poly_causal_rope(*a, 2), lambda *a: reference.poly_causal_rope(*a, 2)),
                   (ops.poly_mean_rope, reference.poly_mean_rope)):
        out = f(h, c, cos, sin, pos)
        assert out.dtype == dtype
        assert_close(out, ref(h.double(), c.double(), cos, sin, pos), dtype, f"{dtype}")


@native
def test_rope_strided_and_deterministic():
    g = torch.Generator().manual_seed(6)
    big = torch.randn(2, 40, 32, generator=g)
    h = big[:, ::2, 4:20]  # strided rows and a channel offset
    c = torch.randn(16, 2, generator=g)
    cos, sin = tables(40, 4, g)
    pos = torch.randint(0, 40, (20, 2), generator=g)
    for f in (lambda x: ops.poly_causal_rope(x, c, cos, sin, pos, 3), lambda x: ops.poly_mean_rope(x, c, cos, sin, pos)):
        a, b = f(h), f(h.contiguous())
        assert torch.equal(a, b) and torch.equal(f(h), a)


def rope_opcheck_cases():
    g = torch.Generator().manual_seed(5)
    h = torch.randn(2, 17, 8, generator=g, dtype=torch.float64, requires_grad=True)
    c = torch.randn(8, 3, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.rand(2, 17, generator=g, dtype=torch.float64, requires_grad=True)
    cos, sin = tables(20, 2, g, torch.float64)
    pos = torch.randint(0, 20, (17, 2), generator=g)
    hp = torch.randn(34, 8, generator=g, dtype=torch.float64, requires_grad=True)
    pp = torch.randint(0, 20, (34, 2), generator=g)
    cu = torch.tensor([0, 3, 3, 34], dtype=torch.int32)
    H = ops.poly_mean_rope(h, c, cos, sin, pos, w).detach()
    hs = torch.randn(2, 17, 12, generator=g, dtype=torch.float64, requires_grad=True)  # 8 features, 4 gates
    hsp = torch.randn(34, 12, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    gcos, gsin = tables(20, 1, g, torch.float64)
    return [
        ("mean", R.poly_mean_rope, (h, c, cos, sin, pos, None, None)),
        ("mean_weighted", R.poly_mean_rope, (h, c, cos, sin, pos, w, None)),
        ("mean_varlen", R.poly_mean_rope, (hp, c, cos, sin, pp, None, cu)),
        ("mean_bwd", R.poly_mean_rope_backward, (torch.randn(2, 8, dtype=torch.float64), H, h, c, cos, sin, pos, w,
                                                 None, True)),
        ("causal", R.poly_causal_rope, (h, c, cos, sin, pos, 1, None)),
        ("block_batch_positions", R.poly_causal_rope, (h, c, cos, sin, pos.expand(2, 17, 2).contiguous(), 4, None)),
        ("causal_varlen", R.poly_causal_rope, (hp, c, cos, sin, pp, 2, cu)),
        ("causal_bwd", R.poly_causal_rope_backward, (torch.randn_like(h), h, c, cos, sin, pos, 3, None)),
        ("gated", R.poly_causal_gated_rope, (hs, c, b, cos, sin, gcos, gsin, pos, 1, None)),
        ("gated_block_no_bias", R.poly_causal_gated_rope, (hs, c, None, cos, sin, gcos, gsin, pos, 4, None)),
        ("gated_varlen", R.poly_causal_gated_rope, (hsp, c, b, cos, sin, gcos, gsin, pp, 2, cu)),
        ("gated_bwd", R.poly_causal_gated_rope_backward, (torch.randn_like(h), hs, c, b, cos, sin, gcos, gsin, pos,
                                                          3, None)),
    ]


@native
@pytest.mark.parametrize("case", rope_opcheck_cases(), ids=lambda c: c[0])
def test_rope_opcheck(case):
    name, op, args = case
    if name.endswith("_bwd"):
        args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(op, args)


@native
def test_rope_gradcheck():
    g = torch.Generator().manual_seed(8)
    h = torch.randn(2, 9, 8, generator=g, dtype=torch.float64, requires_grad=True)
    c = torch.randn(8, 2, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.rand(2, 9, generator=g, dtype=torch.float64, requires_grad=True)
    cos, sin = tables(9, 2, g, torch.float64)
    pos = torch.randint(0, 9, (9, 2), generator=g)
    assert torch.autograd.gradcheck(lambda a, b: ops.poly_causal_rope(a, b, cos, sin, pos, 2), (h, c))
    assert torch.autograd.gradcheck(lambda a, b, x: ops.poly_mean_rope(a, b, cos, sin, pos, x), (h, c, w))


@native
@pytest.mark.parametrize("bad,match", [
    (lambda a: a.update(pos=a["pos"] + 100), r"'positions' must lie in \[0, 20\)"),
    (lambda a: a.update(pos=a["pos"] - 30), r"'positions' must lie in \[0, 20\)"),
    (lambda a: a.update(pos=a["pos"].float()), "'positions' must be int64 or int32"),
    (lambda a: a.update(pos=a["pos"][:5]), "'positions' has size 5"),
    (lambda a: a.update(pos=a["pos"][:, :1]), "rotation sections"),
    (lambda a: a.update(cos=torch.randn(20, 3), sin=torch.randn(20, 3)), "2 P dividing the width E"),
    (lambda a: a.update(sin=a["sin"][:10]), "'cos' and 'sin' must have one shape"),
    (lambda a: a.update(cos=a["cos"].to(torch.int64)), "'cos' must be float32"),
])
def test_rope_op_bad_inputs(bad, match):
    g = torch.Generator().manual_seed(9)
    a = dict(pos=torch.randint(0, 20, (17, 2), generator=g))
    a["cos"], a["sin"] = tables(20, 2, g)
    bad(a)
    h, c = torch.randn(2, 17, 8), torch.randn(8, 3)
    with pytest.raises(RuntimeError, match=match):
        R.poly_causal_rope(h, c, a["cos"], a["sin"], a["pos"], 1, None)
    with pytest.raises(RuntimeError, match=match):
        R.poly_mean_rope(h, c, a["cos"], a["sin"], a["pos"], None, None)


# ---- positions and packed offsets are checked at every call, whatever happened to the tensor before ----

POS_ERR = r"'positions' must lie in \[0, {}\)"


def small_op_args(seed, device):
    """h (2, 17, 8), coeff (8, 2) and (20, 4) tables on device."""
    g = torch.Generator().manual_seed(seed)
    h, c = torch.randn(2, 17, 8, generator=g).to(device), torch.randn(8, 2, generator=g).to(device)
    cos, sin = (t.to(device) for t in tables(20, 4, g))
    return h, c, cos, sin


@native
@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_positions_checked_again_after_a_change(device):
    h, c, cos, sin = small_op_args(3, device)
    gH = torch.ones_like(h)
    pos = torch.arange(17, device=device)[:, None]
    for _ in range(2):
        R.poly_causal_rope(h, c, cos, sin, pos, 1, None)
        R.poly_causal_rope_backward(gH, h, c, cos, sin, pos, 1, None)
    # The same tensor, valid for 20 table rows, fails against 10.
    with pytest.raises(RuntimeError, match=POS_ERR.format(10)):
        R.poly_causal_rope(h, c, cos[:10], sin[:10], pos, 1, None)
    # Changed in place, directly or through the tensor it views: caught, forward and backward.
    pos[3, 0] = 20
    with pytest.raises(RuntimeError, match=POS_ERR.format(20)):
        R.poly_causal_rope(h, c, cos, sin, pos, 1, None)
    with pytest.raises(RuntimeError, match=POS_ERR.format(20)):
        R.poly_causal_rope_backward(gH, h, c, cos, sin, pos, 1, None)
    with pytest.raises(RuntimeError, match=POS_ERR.format(20)):
        R.poly_mean_rope(h, c, cos, sin, pos, None, None)
    pos[3, 0] = 3
    torch.testing.assert_close(R.poly_causal_rope(h, c, cos, sin, pos, 1, None),
                               R.poly_causal_rope(h, c, cos, sin, torch.arange(17, device=device)[:, None], 1, None))
    # Writes that bypass the version counter are caught as well: nothing is taken as checked from an earlier call.
    pos.data[3, 0] = 20
    with pytest.raises(RuntimeError, match=POS_ERR.format(20)):
        R.poly_causal_rope(h, c, cos, sin, pos, 1, None)
    base = torch.arange(17, device=device)
    view = base[:, None]
    R.poly_causal_rope(h, c, cos, sin, view, 1, None)
    base[5] = -1
    with pytest.raises(RuntimeError, match=POS_ERR.format(20)):
        R.poly_causal_rope(h, c, cos, sin, view, 1, None)


@native
@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_positions_checked_in_inference_mode(device):
    """Inference tensors (positions, packed offsets) keep no version counter: their checks must not read one (the CUDA
    offsets check keeps the offsets it validated by version, and raised on inference tensors)."""
    h, c, cos, sin = small_op_args(4, device)
    with torch.inference_mode():
        cu = torch.tensor([0, 9, 17], device=device)
        pos = torch.arange(17, device=device)[:, None]
        for _ in range(2):
            R.poly_causal_rope(h, c, cos, sin, pos, 1, None)
            R.poly_causal_rope(h[0], c, cos, sin, pos, 1, cu)
        pos[0, 0] = 25
        for _ in range(2):
            with pytest.raises(RuntimeError, match=POS_ERR.format(20)):
                R.poly_causal_rope(h, c, cos, sin, pos, 1, None)


# ---- the gated op: y = R_g(pos) hardsigmoid(pre + bias) * H~ ----

# B, N, E, P, Pg, K: P pairs of features and Pg of gates per section (sections E / (2 P); q = P / Pg channels per
# gate): one gate per channel (Pg = P), gate heads, 2 and 3 sections, a generic degree, a chunked long sequence.
GATED_CASES = [
    (2, 37, 16, 8, 8, 3),
    (2, 37, 16, 8, 2, 3),
    (1, 50, 16, 4, 1, 2),
    (3, 29, 24, 4, 2, 5),
    (1, 2600, 40, 20, 5, 2),
    (2, 1, 4, 2, 1, 4),
]


def gated_inputs(B, N, E, P, Pg, K, g, packed=False):
    sec = E // (2 * P)
    S = 2 * Pg * sec
    rows = (B * N,) if packed else (B, N)
    hs = 2 * torch.randn(*rows, E + S, generator=g, dtype=torch.float64)
    c = torch.randn(E, K, generator=g, dtype=torch.float64) * torch.tensor([2.0 ** -k for k in range(K)])
    b = torch.randn(S, generator=g, dtype=torch.float64)
    cos, sin = tables(N + 5, P, g)
    gcos, gsin = tables(N + 5, Pg, g)
    pos = torch.randint(0, N + 5, rows + (sec,), generator=g)
    return hs, c, b, cos, sin, gcos, gsin, pos


def gated_run(impl, hs, c, b, tabs, pos, F, cu, up):
    leaves = [t.detach().requires_grad_() for t in (hs, c)] + ([b.detach().requires_grad_()] if b is not None else [])
    y = impl.poly_causal_gated_rope(leaves[0], leaves[1], leaves[2] if b is not None else None, *tabs, pos, F, cu)
    return y.detach(), torch.autograd.grad(y, leaves, up.to(y.dtype))


@native
@pytest.mark.parametrize("case", GATED_CASES, ids=str)
@pytest.mark.parametrize("F", [1, 3, 64])
def test_gated_rope_matches_reference(case, F, cpu_isa):
    g = torch.Generator().manual_seed(case[1] + F)
    hs, c, b, cos, sin, gcos, gsin, pos = gated_inputs(*case, g)
    up = torch.randn(hs.shape[:-1] + (case[2],), generator=g, dtype=torch.float64)
    for p, bias in ((pos, b), (pos[0], None)):  # per batch row with a bias, shared without
        y, grads = gated_run(ops, hs, c, bias, (cos, sin, gcos, gsin), p, F, None, up)
        y_ref, ref = gated_run(reference, hs, c, bias, (cos, sin, gcos, gsin), p, F, None, up)
        assert_close(y, y_ref, torch.float64, "forward")
        for a, r, name in zip(grads, ref, ["hs", "coeff", "gate_bias"]):
            assert rel_err(a, r) < 1e-9, name


@native
@pytest.mark.parametrize("dtype", DTYPES[1:], ids=str)
@pytest.mark.parametrize("Pg", [8, 2])
@pytest.mark.parametrize("F", [1, 4])
def test_gated_rope_dtypes(dtype, Pg, F):
    g = torch.Generator().manual_seed(Pg + F)
    hs, c, b, cos, sin, gcos, gsin, pos = gated_inputs(2, 63, 32, 8, Pg, 3, g)
    hs_q = hs.to(dtype).double()  # the reference sees hs rounded as the kernel does
    up = torch.randn(2, 63, 32, generator=g, dtype=torch.float64).to(dtype).double()
    y, grads = gated_run(ops, hs.to(dtype), c, b, (cos, sin, gcos, gsin), pos, F, None, up)
    y_ref, ref = gated_run(reference, hs_q, c, b, (cos, sin, gcos, gsin), pos, F, None, up)
    assert y.dtype == dtype
    assert_close(y, y_ref, dtype, f"y {dtype}")
    for a, r, name in zip(grads, ref, ["hs", "coeff", "gate_bias"]):
        assert_close(a, r, dtype, f"grad {name} {dtype}")


@native
@pytest.mark.parametrize("F", [1, 3])
def test_gated_rope_packed(F):
    g = torch.Generator().manual_seed(11)
    hs, c, b, cos, sin, gcos, gsin, pos = gated_inputs(2, 40, 24, 4, 2, 3, g, packed=True)
    cu = torch.tensor([0, 0, 1, 30, 80], dtype=torch.int32)
    up = torch.randn(80, 24, generator=g, dtype=torch.float64)
    y, grads = gated_run(ops, hs, c, b, (cos, sin, gcos, gsin), pos, F, cu, up)
    y_ref, ref = gated_run(reference, hs, c, b, (cos, sin, gcos, gsin), pos, F, cu, up)
    assert_close(y, y_ref, torch.float64, "packed")
    for a, r in zip(grads, ref):
        assert rel_err(a, r) < 1e-9


@native
def test_gated_rope_strided_and_deterministic():
    g = torch.Generator().manual_seed(12)
    big = torch.randn(2, 60, 40, generator=g)
    hs = big[:, ::2, 3:23]  # E = 16 features + S = 4 gates: strided rows, a channel offset
    c = torch.randn(16, 2, generator=g)
    b = torch.randn(4, generator=g)
    cos, sin = tables(40, 4, g)
    gcos, gsin = tables(40, 1, g)
    pos = torch.randint(0, 40, (30, 2), generator=g)
    f = lambda x: ops.poly_causal_gated_rope(x, c, b, cos, sin, gcos, gsin, pos, 3)
    a, b2 = f(hs), f(hs.contiguous())
    assert torch.equal(a, b2) and torch.equal(f(hs), a)


@native
def test_gated_rope_gradcheck():
    g = torch.Generator().manual_seed(13)
    hs = torch.randn(2, 9, 12, generator=g, dtype=torch.float64, requires_grad=True)  # E = 8, S = 4
    c = torch.randn(8, 2, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    cos, sin = tables(9, 2, g, torch.float64)
    gcos, gsin = tables(9, 1, g, torch.float64)
    pos = torch.randint(0, 9, (9, 2), generator=g)
    for F in (1, 2):
        assert torch.autograd.gradcheck(
            lambda x, y, z: ops.poly_causal_gated_rope(x, y, z, cos, sin, gcos, gsin, pos, F), (hs, c, b))


@native
@pytest.mark.parametrize("bad,match", [
    (lambda a: a.update(gcos=torch.randn(20, 2), gsin=torch.randn(20, 2)), "2 Pg gates in each of the 2 rotation"),
    (lambda a: a.update(gcos=a["gcos"][:10], gsin=a["gsin"][:10]), "number of rows L of 'cos'"),
    (lambda a: a.update(gsin=a["gsin"][:, :0]), "'gate_cos' and 'gate_sin' must have one shape"),
    (lambda a: a.update(gcos=a["gcos"].long()), "'gate_cos' must be float32"),
    (lambda a: a.update(gcos=a["gcos"][0]), "'gate_cos' must be a 2-D tensor"),
    (lambda a: a.update(pos=a["pos"] + 20), r"'positions' must lie in \[0, 20\)"),
    (lambda a: a.update(hs=torch.randn(2, 17, 11)), r"'hs' must hold E \+ S columns"),
    (lambda a: a.update(b=torch.randn(3)), "'gate_bias' has size 3"),
])
def test_gated_rope_bad_inputs(bad, match):
    g = torch.Generator().manual_seed(14)
    a = dict(pos=torch.randint(0, 20, (17, 2), generator=g), hs=torch.randn(2, 17, 12), b=torch.randn(4))
    a["cos"], a["sin"] = tables(20, 2, g)
    a["gcos"], a["gsin"] = tables(20, 1, g)
    bad(a)
    c = torch.randn(8, 3)
    args = (a["hs"], c, a["b"], a["cos"], a["sin"], a["gcos"], a["gsin"], a["pos"])
    with pytest.raises(RuntimeError, match=match):
        R.poly_causal_gated_rope(*args, 1, None)
    with pytest.raises(RuntimeError, match=match):
        R.poly_causal_gated_rope_backward(torch.randn(2, 17, 8), *args, 1, None)


# ---- the layer ----

LAYERS = [  # dim, degree, expand, n_groups, n_sel_heads, bias, rope_2d
    (16, 3, 2, 1, 1, False, False),
    (16, 2, 2, 1, 0, True, False),
    (16, 3, 2, 1, 4, False, False),
    (16, 3, 2, 2, 8, True, False),
    (16, 3, 2, 1, 1, False, True),
    (16, 2, 2, 2, 4, True, True),
    (16, 3, 2, 1, 8, False, True),
    (16, 2, 2, 1, 0, False, True),
]


def make(cfg, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    D, K, X, ng, G, bias, two = cfg
    return PoMRoPE(D, K, X, ng, G, bias, max_seq_len=64, max_h=8, max_w=8, rope_2d=two).to(dtype)


def positions_for(layer, n, g, batch=None):
    lead = () if batch is None else (batch,)
    if layer.rope_2d:
        return dict(positions_hw=torch.randint(0, 8, lead + (n, 2), generator=g))
    return dict(positions=torch.randint(0, 64, lead + (n,), generator=g))


def check_layer(layer, args, kwargs, ref_kwargs=None):
    """Output and every gradient (input and parameters) of the layer against reference.pom_rope_layer."""
    x = args[0].detach().clone().requires_grad_()
    out = layer(x, *args[1:], **kwargs)
    ref = reference.pom_rope_layer(layer, x, *args[1:], **(ref_kwargs or kwargs))
    assert_close(out, ref, torch.float64, "output")
    up = torch.randn_like(ref)
    params = [x] + list(layer.parameters())
    for a, b in zip(torch.autograd.grad(out, params, up), torch.autograd.grad(ref, params, up)):
        assert rel_err(a, b) < 1e-8


@pytest.mark.parametrize("cfg", LAYERS, ids=str)
@pytest.mark.parametrize("mask", ["none", "weights", "bool", "causal", "block", "btn"])
def test_layer_matches_reference_path(cfg, mask):
    layer = make(cfg)
    g = torch.Generator().manual_seed(1)
    B, N = 2, 13
    x = torch.randn(B, N, 16, generator=g, dtype=torch.float64)
    m = {"none": None, "weights": torch.rand(B, N, generator=g, dtype=torch.float64),
         "bool": torch.rand(B, N, generator=g) > 0.4, "causal": "causal", "block": "causal",
         "btn": torch.rand(B, N, N, generator=g) > 0.3}[mask]
    kw = dict(mask=m, **positions_for(layer, N, g))
    if mask == "block":
        kw["block_size"] = 4
    check_layer(layer, (x,), kw)
    if not layer.rope_2d:  # default positions 0..N-1, and per-batch positions
        check_layer(layer, (x,), dict(kw, positions=None))
        check_layer(layer, (x,), dict(kw, **positions_for(layer, N, g, batch=B)))


@pytest.mark.parametrize("cfg", LAYERS, ids=str)
@pytest.mark.parametrize("mask", [None, "weights"])
def test_layer_cross(cfg, mask):
    layer = make(cfg)
    g = torch.Generator().manual_seed(2)
    xq = torch.randn(2, 5, 16, generator=g, dtype=torch.float64)
    xc = torch.randn(2, 11, 16, generator=g, dtype=torch.float64)
    m = torch.rand(2, 11, generator=g, dtype=torch.float64) if mask else None
    kw = dict(mask=m, **positions_for(layer, 5, g))
    ctx = positions_for(layer, 11, g)
    kw.update({"ctx_" + k: v for k, v in ctx.items()})
    check_layer(layer, (xq, xc), kw)
    if not layer.rope_2d:
        check_layer(layer, (xq, xc), dict(kw, ctx_positions=None))


@pytest.mark.parametrize("cfg", [LAYERS[0], LAYERS[3]], ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_layer_packed(cfg, causal):
    layer = make(cfg)
    g = torch.Generator().manual_seed(3)
    cu = torch.tensor([0, 4, 4, 15])
    x = torch.randn(15, 16, generator=g, dtype=torch.float64)
    kw = dict(mask="causal" if causal else None, cu_seqlens=cu)
    check_layer(layer, (x,), kw)  # positions restart in every sequence
    out = layer(x, **kw)
    for i, (a, b) in enumerate([(0, 4), (4, 15)]):
        alone = layer(x[a:b][None], mask="causal" if causal else None)[0]
        assert_close(out[a:b], alone, torch.float64, f"sequence {i} alone")


@pytest.mark.skipif(importlib.util.find_spec("pom") is None, reason="the reference package `pom` is not installed")
@pytest.mark.parametrize("cfg", LAYERS, ids=str)
@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_against_the_papers_pomrope(cfg, cross):
    """The paper's pom.PoMRoPE, state dicts loaded both ways: output and every gradient (inputs and parameters) for
    every mask form it takes, custom positions (and the default ones in 1-D)."""
    from pom.pom_rope import PoMRoPE as Paper

    D, K, X, ng, G, bias, two = cfg
    ref = Paper(D, K, X, ng, G, bias, max_seq_len=64, max_h=8, max_w=8, rope_2d=two).double()
    ours = make(cfg)
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.load_state_dict(ours.state_dict(), strict=True)
    g = torch.Generator().manual_seed(4)
    B, T = 2, 13
    N = 11 if cross else T
    xq = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    xc = torch.randn(B, N, D, generator=g, dtype=torch.float64) if cross else None
    masks = [None, torch.rand(B, N, generator=g, dtype=torch.float64) + 0.1, torch.rand(B, N, generator=g) > 0.3,
             torch.rand(B, T, N, generator=g) > 0.3] + ([] if cross else ["causal"])
    masks[2][:, 0] = masks[3][..., 0] = True
    kws = [dict(positions_for(ours, T, g), **({"ctx_" + k: v for k, v in positions_for(ours, N, g).items()}
                                             if cross else {}))]
    if not two:
        kws.append({})
    for m in masks:
        for kw in kws:
            outs, grads = [], []
            for layer in (ours, ref):
                a = xq.clone().requires_grad_()
                c = xc.clone().requires_grad_() if cross else None
                y = layer(a, c, mask=m, **kw)
                up = torch.linspace(-1, 1, y.numel(), dtype=torch.float64).view_as(y)
                outs.append(y)
                grads.append(torch.autograd.grad(y, [a] + ([c] if cross else []) + list(layer.parameters()), up))
            assert_close(outs[0], outs[1], torch.float64, "vs pom.PoMRoPE")
            for mine, theirs in zip(*grads):
                assert rel_err(mine, theirs) < 1e-8


def test_tables_and_state_dict():
    layer = PoMRoPE(16, 2, 2, max_seq_len=32)
    assert set(layer.state_dict()) >= {"freqs_cos", "freqs_sin", "po_coeff", "qc_proj.weight"}
    assert layer.freqs_cos.shape == (32, 16) and layer.freqs_cos.dtype == torch.float32
    half = 16
    angle = 5 * (1.0 / 10000.0 ** (3 / half))
    assert abs(layer.freqs_cos[5, 3].item() - torch.tensor(angle).cos().item()) < 1e-6
    two = PoMRoPE(16, 2, 2, max_h=4, max_w=6, rope_2d=True)
    assert two.row_cos.shape == (4, 8) and two.col_cos.shape == (6, 8)
    # Tables as loaded are the tables used: changing one changes the output.
    x = torch.randn(1, 5, 16)
    before = layer(x, mask="causal")
    sd = layer.state_dict()
    sd["freqs_sin"] = -sd["freqs_sin"]
    layer.load_state_dict(sd)
    assert rel_err(layer(x, mask="causal"), before) > 1e-3


@pytest.mark.parametrize("cfg", [LAYERS[0], LAYERS[2], LAYERS[4]], ids=str)
def test_state_matches_parallel(cfg):
    """Decoding token by token, and chunks of unequal size, reproduce the causal (block-causal) forward at the same
    positions; a float64 layer keeps a float64 state (1e-12)."""
    layer = make(cfg)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 12, 16, generator=g, dtype=torch.float64)
    pos = positions_for(layer, 12, g)
    full = layer(x, mask="causal", **pos)
    st = layer.allocate_state(2)
    assert st.sum.dtype == torch.float64
    steps = []
    for t in range(12):
        kw = {k: v[t:t + 1] for k, v in pos.items()}
        steps.append(layer.step(x[:, t:t + 1], st, **kw))
    assert rel_err(torch.cat(steps, 1), full) < 1e-12
    # frames of 3 tokens = block-causal with block 3, through state_forward
    blocks = layer(x, mask="causal", block_size=3, **pos)
    state, outs = None, []
    for a, b in [(0, 3), (3, 6), (6, 9), (9, 12)]:
        o, state = layer.state_forward(x[:, a:b], state=state, **{k: v[a:b] for k, v in pos.items()})
        outs.append(o)
    assert rel_err(torch.cat(outs, 1), blocks) < 1e-12


def test_state_default_positions_continue_from_count():
    layer = make(LAYERS[0])
    x = torch.randn(1, 9, 16, dtype=torch.float64)
    full = layer(x, mask="causal")
    st = layer.allocate_state(1)
    o1 = layer.step(x[:, :4], st)   # chunk of 4 at positions 0..3: every token sees all 4 (block semantics)
    o2 = layer.step(x[:, 4:5], st)  # position 4
    assert st.count.tolist() == [5]
    assert rel_err(o2, full[:, 4:5]) < 1e-12
    assert rel_err(o1[:, 3:4], full[:, 3:4]) < 1e-12
    o, _ = layer.state_forward(x[:, 5:6], state=st.to_reference())  # reference dict form, position 5
    assert rel_err(o, full[:, 5:6]) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_low_precision(dtype):
    layer = make(LAYERS[2], torch.float64)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 40, 16, generator=g, dtype=torch.float64)
    ref = {m: layer(x, mask=m) for m in (None, "causal")}
    low = make(LAYERS[2], dtype)
    low.load_state_dict(layer.state_dict())
    tol = {torch.float32: 1e-5, torch.bfloat16: 3e-2}[dtype]
    for m in (None, "causal"):
        assert rel_err(low(x.to(dtype), mask=m), ref[m]) < tol


@pytest.mark.parametrize("kwargs,match", [
    (dict(dim=16, degree=2, expand=1, n_sel_heads=3), r"'n_sel_heads' \(3\) must divide 'expand' \* 'dim' = 16"),
    (dict(dim=7, degree=2, expand=1), r"'expand' \* 'dim' = 7 must be divisible by 2 for 1-D"),
    (dict(dim=10, degree=2, expand=1, rope_2d=True), r"'expand' \* 'dim' = 10 must be divisible by 4 for 2-D"),
    (dict(dim=16, degree=2, expand=1, n_sel_heads=2, rope_2d=True), "'n_sel_heads' \\(2\\) must be divisible by 4"),
    (dict(dim=8, degree=2, expand=1, n_sel_heads=8), r"head width 'expand' \* 'dim' / 'n_sel_heads' = 1"),
    (dict(dim=8, degree=2, expand=1, max_seq_len=0), "'max_seq_len'"),
    (dict(dim=8, degree=2, expand=1, rope_base=-1.0), "'rope_base'"),
])
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PoMRoPE(**kwargs)


def test_forward_bad_inputs():
    one = PoMRoPE(8, 2, 2, max_seq_len=16)
    two = PoMRoPE(8, 2, 2, max_h=4, max_w=4, rope_2d=True)
    x = torch.randn(2, 6, 8)
    cases = [
        (one, dict(positions=torch.arange(5)), r"'positions' must be \(N,\) or \(B, N\) with N = 6"),
        (one, dict(positions=torch.arange(6.0)), "'positions' must be an integer tensor"),
        (one, dict(positions=torch.arange(6) - 1), r"'positions' must be in \[0, max_seq_len = 16\)"),
        (one, dict(positions=torch.arange(6) + 11), "larger max_seq_len"),
        (one, dict(positions_hw=torch.zeros(6, 2, dtype=torch.long)), "'positions_hw' must be None for a 1-D layer"),
        (two, dict(), "'positions_hw' must be given for 2-D"),
        (two, dict(positions_hw=torch.zeros(6, 3, dtype=torch.long)), r"'positions_hw' must be \(N, 2\)"),
        (two, dict(positions_hw=torch.full((6, 2), 4)), "columns in"),
        (two, dict(positions=torch.arange(6)), "'positions' must be None for a 2-D layer"),
        (one, dict(positions=torch.arange(6, device="meta")), "'positions' must be on cpu like the input"),
        (two, dict(positions_hw=torch.zeros(6, 2, dtype=torch.long, device="meta")),
         "'positions_hw' must be on cpu like the input"),
        (one, dict(xc=torch.randn(2, 5, 8), ctx_positions=torch.arange(5, device="meta")),
         "'ctx_positions' must be on cpu like the input"),
    ]
    for layer, kw, match in cases:
        with pytest.raises(ValueError, match=match):
            layer(x, **kw)
    with pytest.raises(ValueError, match="'positions' must be in"):
        st = one.allocate_state(2)
        for _ in range(17):
            one.step(x[:, :1], st)


def test_state_is_checked_before_its_positions():
    """step / state_forward read their default positions from the state's count: a bad state is reported as
    the state (as PoM.step reports it), never as positions the caller did not give."""
    layer = PoMRoPE(8, 2, 1, max_seq_len=8)
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match=r"'state_sum' must be a \(B, E\) = \(2, 8\) tensor"):
        layer.step(x, layer.allocate_state(3))
    st = layer.allocate_state(2)
    st.count[:] = -2
    with pytest.raises(ValueError, match="'count' must be token counts >= 0"):
        layer.step(x, st)
    with pytest.raises(ValueError, match="'state_sum' must be on cpu like the input"):
        layer.step(x, layer.allocate_state(2, device="meta"))
    st = layer.allocate_state(2)
    st.count = torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"'count' must be a tensor of shape \(B,\) = \(2,\)"):
        layer.state_forward(x, state=st)


def test_layer_on_the_meta_device():
    """Shapes without data: the forward (given, default and packed positions, 1-D and 2-D), step and
    state_forward run on meta tensors (no value is read)."""
    one = PoMRoPE(8, 2, 1, n_sel_heads=2, max_seq_len=8).to("meta")
    two = PoMRoPE(8, 2, 1, max_h=4, max_w=4, rope_2d=True).to("meta")
    x = torch.randn(2, 5, 8, device="meta")
    assert one(x, mask="causal", positions=torch.arange(5, device="meta")).shape == (2, 5, 8)
    assert one(x).shape == (2, 5, 8)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32, device="meta")
    assert one(x.reshape(10, 8), mask="causal", cu_seqlens=cu).shape == (10, 8)
    assert two(x, positions_hw=torch.zeros(5, 2, dtype=torch.long, device="meta")).shape == (2, 5, 8)
    assert one.step(x, one.allocate_state(2, device="meta")).shape == (2, 5, 8)
    out, st = one.state_forward(x)
    assert out.shape == (2, 5, 8) and st.sum.device.type == "meta"


@native
def test_rope_ops_on_meta_run_the_meta_kernels():
    """The Python entry points send meta tensors to the registered Meta kernels, so the ops' checks run there."""
    h, c = torch.randn(2, 5, 8, device="meta"), torch.randn(8, 3, device="meta")
    cos = torch.randn(16, 4, device="meta")
    pos = torch.zeros(5, 1, dtype=torch.long, device="meta")
    assert ops.poly_causal_rope(h, c, cos, cos, pos, 2).shape == (2, 5, 8)
    assert ops.poly_mean_rope(h, c, cos, cos, pos).shape == (2, 8)
    with pytest.raises(RuntimeError, match=r"'positions' must be \(N, S\) or \(B, N, S\)"):
        ops.poly_mean_rope(h, c, cos, cos, pos[:, 0])
    with pytest.raises(RuntimeError, match="'block_size' must be >= 1"):
        ops.poly_causal_rope(h, c, cos, cos, pos, 0)
    hs = torch.randn(2, 5, 16, device="meta")
    with pytest.raises(RuntimeError, match="the length N of 'hs'"):
        ops.poly_causal_gated_rope(hs, c, None, cos, cos, cos, cos, pos[:4])


@native
def test_gated_rope_messages_name_hs():
    hs, c = torch.randn(2, 5, 16), torch.randn(8, 3)
    cos = torch.randn(16, 4)
    pos = torch.zeros(5, 1, dtype=torch.long)
    with pytest.raises(RuntimeError, match="'cos' is on meta but 'hs' is on cpu"):
        R.poly_causal_gated_rope(hs, c, None, cos.to("meta"), cos, cos, cos, pos, 1, None)
    with pytest.raises(RuntimeError, match="the length N of 'hs'"):
        R.poly_causal_gated_rope(hs, c, None, cos, cos, cos, cos, pos[:4], 1, None)
    with pytest.raises(RuntimeError, match="'coeff' is on meta but 'hs' is on cpu"):
        R.poly_causal_gated_rope(hs, c.to("meta"), None, cos, cos, cos, cos, pos, 1, None)


@pytest.fixture(params=["no compiled library", "no kernel for the device"])
def reference_path(request, monkeypatch):
    """The rope entry points running the reference: without the compiled library, or (library loaded) on a
    device it has no kernel for (simulated on CPU by emptying the kernel table)."""
    if request.param == "no compiled library":
        monkeypatch.setattr(ops, "_load_error", ImportError("simulated"))
        monkeypatch.setattr(ops, "_warned", True)
    else:
        if not pom_ext.native_available():
            pytest.skip("compiled kernels not available")
        monkeypatch.setattr(ops, "_KERNEL_DEVICES", {})
    return request.param


def test_reference_path_checks_the_rope_arguments(reference_path):
    """The reference indexes the tables with the positions as given (a negative one would wrap around, a float
    one be truncated): the entry points check what the compiled ops check before running it."""
    g = torch.Generator().manual_seed(21)
    h, c = torch.randn(2, 5, 8, generator=g, dtype=torch.float64), torch.randn(8, 3, generator=g, dtype=torch.float64)
    cos, sin = rope_tables_1d(8, 16, 10000.0)
    pos = torch.arange(5)[:, None]
    mean = lambda **kw: ops.poly_mean_rope(*[kw.get(k, v) for k, v in  # noqa: E731
                                             (("h", h), ("c", c), ("cos", cos), ("sin", sin), ("pos", pos),
                                              ("w", None))])
    causal = lambda F=1, **kw: ops.poly_causal_rope(kw.get("h", h), c, cos, sin, kw.get("pos", pos), F,  # noqa: E731
                                                    kw.get("cu"))
    bad = [
        (lambda: mean(pos=pos - 5), r"'positions' must lie in \[0, 16\).*from -5 to -1"),
        (lambda: mean(pos=pos + 12), r"'positions' must lie in \[0, 16\).*from 12 to 16"),
        (lambda: mean(pos=pos.double()), "'positions' must be an int64 or int32 tensor"),
        (lambda: mean(pos=pos.bool()), "'positions' must be an int64 or int32 tensor"),
        (lambda: mean(pos=torch.arange(5)), r"'positions' must be \(N, S\) or \(B, N, S\)"),
        (lambda: mean(cos=cos[:, :1], sin=sin[:, :1]), "4 rotation sections"),
        (lambda: mean(sin=sin[:, :1]), "'sin' of the same shape"),
        (lambda: mean(cos=cos[:, :3], sin=sin[:, :3]), "2 P dividing the width E = 8"),
        (lambda: mean(w=torch.ones(3)), r"'weight' must be \(B, N\)"),
        (lambda: causal(0), "'block_size' must be an integer >= 1"),
        (lambda: causal(h=h.reshape(10, 8), pos=torch.zeros(10, 1, dtype=torch.long),
                        cu=torch.tensor([0, 6, 4, 10], dtype=torch.int32)), "'cu_seqlens' must be non-decreasing"),
    ]
    for call, match in bad:
        with pytest.raises(ValueError, match=match):
            call()
    hs, b = torch.randn(2, 5, 16, dtype=torch.float64), torch.zeros(8, dtype=torch.float64)
    gated = lambda **kw: ops.poly_causal_gated_rope(hs, c, kw.get("b", b), cos, sin, kw.get("gc", cos),  # noqa: E731
                                                    kw.get("gs", sin), kw.get("pos", pos))
    for call, match in [(lambda: gated(pos=pos - 1), r"'positions' must lie in \[0, 16\)"),
                        (lambda: gated(gc=cos[:, :1], gs=sin[:, :1]), "2 Pg gates in each of the 1 rotation"),
                        (lambda: gated(gc=cos[:4], gs=sin[:4]), r"'gate_cos' must be \(L, Pg\) = \(16, Pg\)"),
                        (lambda: gated(b=b[:3]), r"'gate_bias' must be \(S,\) = \(8,\)")]:
        with pytest.raises(ValueError, match=match):
            call()
    # valid calls still give the reference's values
    assert torch.equal(mean(), reference.poly_mean_rope(h, c, cos, sin, pos))
    assert torch.equal(causal(2), reference.poly_causal_rope(h, c, cos, sin, pos, 2))
    assert torch.equal(gated(), reference.poly_causal_gated_rope(hs, c, b, cos, sin, cos, sin, pos))


# ---- models ----

def test_lm_with_rope_decodes_as_it_trains():
    """PolymorpherLM(rope='1d', no convolution): step-by-step decoding and chunked continuation reproduce the
    full forward's logits; the loss trains (finite gradients on every parameter)."""
    from pom_ext.models import PolymorpherLM

    torch.manual_seed(0)
    lm = PolymorpherLM(50, 32, 3, degree=2, expand=2, n_sel_heads=4, conv_size=0, layer_pattern="PPA", n_heads=2,
                       rope="1d", rope_max_len=64).double()
    tokens = torch.randint(0, 50, (2, 20))
    full = lm(tokens)
    cache = lm.allocate_cache(2)
    steps = [lm.step(tokens[:, t:t + 1], cache) for t in range(20)]
    assert rel_err(torch.cat(steps, 1), full) < 1e-10
    cache = lm.allocate_cache(2)
    chunks = [lm.step(tokens[:, a:b], cache) for a, b in [(0, 7), (7, 8), (8, 20)]]
    assert rel_err(torch.cat(chunks, 1), full) < 1e-10
    logits, loss = lm(tokens, tokens)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in lm.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="sequences of at most max_seq_len = 64 tokens"):
        lm(torch.randint(0, 50, (1, 65)))


@pytest.mark.parametrize("pool", ["mean", "cls"])
def test_image_encoder_with_2d_rope(pool):
    """PolymorpherEncoder(rope='2d'): every PoM block turns its features by the patch grid (class token at (0, 0)):
    its mixer equals the layer given those positions."""
    from pom_ext.models import PolymorpherEncoder
    from pom_ext.models.blocks import grid_positions

    torch.manual_seed(1)
    enc = PolymorpherEncoder(10, 32, 2, image_size=(16, 24), patch_size=4, n_sel_heads=4, pool=pool, rope="2d")
    x = torch.randn(2, 3, 16, 24)
    logits = enc(x)
    assert logits.shape == (2, 10)
    logits.sum().backward()
    block = enc.blocks[0]
    pos = grid_positions((4, 6), pool == "cls")
    assert torch.equal(block.positions_hw, pos)
    u = torch.randn(2, pos.shape[0], 32)
    assert rel_err(block.mixer(u, positions_hw=pos), reference.pom_rope_layer(block.mixer, u, positions_hw=pos)) < 1e-5
    tokens = PolymorpherEncoder(3, 16, 1, num_tokens=20, max_len=12, rope="1d")
    assert tokens(torch.randint(0, 20, (2, 12))).shape == (2, 3)
    with pytest.raises(ValueError, match="'rope'"):
        PolymorpherEncoder(3, 16, 1, num_tokens=20, max_len=12, rope="2d")


def test_layer_packed_cross():
    """Packed cross-mixing: queries and context share the offsets, and their positions restart in every sequence."""
    layer = make(LAYERS[1])
    g = torch.Generator().manual_seed(6)
    cu = torch.tensor([0, 5, 12])
    x, xc = (torch.randn(12, 16, generator=g, dtype=torch.float64) for _ in range(2))
    for mask in (None, "causal"):
        check_layer(layer, (x, xc), dict(mask=mask, cu_seqlens=cu))
