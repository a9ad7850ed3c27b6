"""Property-based tests: every op and the layer, forward and backward, on random shapes, dtypes, degrees,
masks, block sizes, packed offsets and strided views, against the float64 reference.

The reference sees the same inputs as the kernels, rounded to their dtype and upcast to float64, so a
comparison measures the kernels' arithmetic and not the rounding of their inputs (SPEC §4 tolerances).

Profiles (env POM_EXT_FUZZ): "fast" (default, derandomized, for CI) and "long" (many more examples).
"""
import copy
import math
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st

import pom_ext
from pom_ext import PoM, functional as PF, ops, reference as R

from conftest import OTHER_ISAS, TOL, isa, rel_err

pytestmark = pytest.mark.skipif(not pom_ext.native_available(), reason="compiled kernels not built")

_common = dict(deadline=None, suppress_health_check=list(HealthCheck), print_blob=True,
               phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink])
settings.register_profile("pom_fast", max_examples=50, derandomize=True, database=None, **_common)
settings.register_profile("pom_long", max_examples=1000, **_common)
PROFILE = os.environ.get("POM_EXT_FUZZ", "fast")
if PROFILE not in ("fast", "long"):
    raise pytest.UsageError(f"POM_EXT_FUZZ must be 'fast' or 'long', got {PROFILE!r}")
FUZZ = settings(settings.get_profile(f"pom_{PROFILE}"))

LOW = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def coeffs(g, E, K, scale=4.0):
    """(E, K) float64, coefficient k scaled by scale^-(k+1): degree 16 stays finite in float16 for |act| <= 6."""
    s = torch.tensor([scale ** -(k + 1) for k in range(K)], dtype=torch.float64)
    return torch.randn(E, K, generator=g, dtype=torch.float64) * s


def tol_of(*dtypes):
    return max(TOL[d] for d in dtypes if d in TOL)


def err_of(a, b, floor=0.0):
    """rel_err, with one subnormal spacing of a's dtype per element forgiven: a result below the normal range
    of float16 (a mean of tiny values, a sum divided by a count of 10^6) cannot be more exact than that.
    With a floor, the error is relative to max(|b|, floor) (the size of terms that cancel in b)."""
    err = rel_err(a, b)
    if err == float("inf") or a.numel() == 0:
        return err
    fi = torch.finfo(a.dtype)
    spacing = fi.smallest_normal * fi.eps
    diff = (a.detach().double() - b.detach().double()).norm().item()
    slack = spacing * a.numel() ** 0.5
    den = max(b.detach().double().norm().item(), floor)
    return max(diff - slack, 0.0) / (den if den > 0 else 1.0)


# ---- views: strided layouts of h, applied to the reference's copy and the kernel's leaf alike ----

def view_fn(kind, dim, pad=(3, 2)):
    if kind == "contig":
        return lambda t: t
    if kind == "sliced":  # a channel window of a wider tensor: row stride > E
        return lambda t: F.pad(t, pad)[..., pad[0]:pad[0] + t.shape[-1]]
    if kind == "transposed":  # channel stride > 1
        return lambda t: t.transpose(-1, -2).contiguous().transpose(-1, -2) if t.dim() >= 2 else t
    if kind == "batch_minor" and dim == 3:  # B stride < N stride
        return lambda t: t.transpose(0, 1).contiguous().transpose(0, 1)
    if kind == "rows_step2":  # every other row of a longer tensor
        return lambda t: t.repeat_interleave(2, dim=-2)[..., ::2, :] if t.dim() >= 2 else t
    return lambda t: t


VIEWS = ["contig", "sliced", "transposed", "batch_minor", "rows_step2"]


# ---- one op call: kernel and reference on the same (rounded) inputs, forward and backward ----

def check(fn, inputs, dtypes, diff, view, gseed, expand_grad=False, what="", floors=None):
    """fn(list_of_inputs, impl) -> output(s). inputs: float64 (or int/bool) master tensors; dtypes[i]: the dtype
    the kernel sees; diff[i]: differentiate w.r.t. input i; view applies to input 0 (h).

    floors[j](ref_inputs, ref_seeds) -> the scale of the terms that cancel in the gradient of the j-th
    differentiable input, used as the denominator when larger than the gradient itself."""
    ref_in, ker_in, ref_leaves, ker_leaves = [], [], [], []
    for i, (t, d) in enumerate(zip(inputs, dtypes)):
        if t is None or not t.is_floating_point():
            ref_in.append(t)
            ker_in.append(t)
            continue
        low = t.to(d)
        r = low.detach().double().requires_grad_(diff[i])
        k = low.detach().clone().requires_grad_(diff[i])
        if diff[i]:
            ref_leaves.append(r)
            ker_leaves.append(k)
        ref_in.append(view(r) if i == 0 else r)
        ker_in.append(view(k) if i == 0 else k)
    ref = fn(ref_in, R)
    got = fn(ker_in, ops)
    ref = list(ref) if isinstance(ref, (tuple, list)) else [ref]
    got = list(got) if isinstance(got, (tuple, list)) else [got]
    tol = tol_of(*[d for t, d in zip(inputs, dtypes) if t is not None and t.is_floating_point()])
    for i, (a, b) in enumerate(zip(got, ref)):
        assert a.shape == b.shape, f"{what} output {i}: shape {tuple(a.shape)} != {tuple(b.shape)}"
        if not b.is_floating_point():
            assert torch.equal(a, b), f"{what} output {i}: {a} != {b}"
            continue
        err = err_of(a, b)
        assert err < max(tol, TOL[a.dtype]), f"{what} output {i} ({a.dtype}): relative error {err:.3e}"
    if not ker_leaves:
        return
    outs = [(a, b) for a, b in zip(got, ref) if b.is_floating_point() and b.requires_grad]
    seeds_k, seeds_r = [], []
    for a, b in outs:
        shape = (1,) * (b.dim() - 1) + b.shape[-1:] if expand_grad and b.dim() >= 2 else b.shape
        s = torch.randn(shape, generator=gseed, dtype=torch.float64).expand(b.shape).to(a.dtype)
        seeds_k.append(s)
        seeds_r.append(s.double())
    gk = torch.autograd.grad([a for a, _ in outs], ker_leaves, seeds_k, allow_unused=True)
    gr = torch.autograd.grad([b for _, b in outs], ref_leaves, seeds_r, allow_unused=True)
    for i, (a, b) in enumerate(zip(gk, gr)):
        if b is None:
            continue
        assert a is not None, f"{what}: no gradient for differentiable input {i}"
        assert a.dtype == ker_leaves[i].dtype, f"{what} grad {i}: dtype {a.dtype} != {ker_leaves[i].dtype}"
        bound = max(tol, TOL[a.dtype])
        err = err_of(a, b)
        if floors and i in floors and err < float("inf"):
            floor = floors[i]([t.detach() if isinstance(t, torch.Tensor) else t for t in ref_in], seeds_r)
            err = err_of(a, b, floor)
        assert err < bound, f"{what} grad {i} ({a.dtype}): relative error {err:.3e}"


# ---- strategies ----

dtype_st = st.sampled_from(LOW)
width_st = st.one_of(st.integers(1, 40), st.sampled_from([7, 15, 17, 31, 33, 63, 65, 511, 513, 520]))
degree_st = st.integers(1, 16)
seed_st = st.integers(0, 2 ** 31 - 1)
scale_st = st.sampled_from([0.3, 1.0, 3.0, 12.0])  # 12: many values beyond the clamps at -10 and 6
isa_st = st.sampled_from(["native"] + OTHER_ISAS)


@st.composite
def coeff_dtype(draw, h_dtype, K):
    """float64, float32, bfloat16, or h's dtype; float16 coefficients only at low degree (their gradients,
    sums of act^K over every token, overflow float16 otherwise)."""
    options = [torch.float64, torch.float32, torch.bfloat16, h_dtype]
    if h_dtype == torch.float16 and K > 3:
        options.remove(h_dtype)
    return draw(st.sampled_from(options))


def small(draw, E):
    """Keeps B * N * E modest for wide E."""
    return draw(st.integers(1, 3)), draw(st.integers(1, 24 if E <= 64 else 5))


@st.composite
def sequence_shape(draw, E):
    """(B, N): short, or occasionally long with B = 1 so the causal scan is cut into chunks with carries."""
    if E <= 8 and draw(st.integers(0, 9)) == 0:
        return 1, draw(st.integers(4096, 9000))
    return small(draw, E)


@given(st.data(), dtype_st, width_st, degree_st, seed_st, scale_st, isa_st, st.integers(1, 4),
       st.sampled_from(["contig", "sliced", "transposed", "rows_step2"]), st.booleans())
@FUZZ
def test_fuzz_eval(data, dtype, E, K, seed, scale, which, rank, view, expand_grad):
    g = torch.Generator().manual_seed(seed)
    lead = [data.draw(st.integers(0 if rank > 2 else 1, 5)) for _ in range(rank - 1)]
    h = torch.randn(*lead, E, generator=g, dtype=torch.float64) * scale
    cd = data.draw(coeff_dtype(dtype, K))
    with isa(which):
        fn = lambda x, impl: impl.poly_eval(x[0], x[1])
        check(fn, [h, coeffs(g, E, K)], [dtype, cd], [True, True], view_fn(view, h.dim()), g, expand_grad, "eval",
              floors=poly_floors(fn, [dtype, cd]))


@st.composite
def weights(draw, B, N, h_dtype, g):
    """(B, N) weights: float (dtype float64, float32 or h's) or bool; each row random, all-zero, one-token or ones."""
    kind = draw(st.sampled_from(["float", "bool"]))
    rows = draw(st.lists(st.sampled_from(["random", "zero", "one", "ones"]), min_size=B, max_size=B))
    w = torch.rand(B, N, generator=g, dtype=torch.float64)
    if kind == "bool":
        w = (w > 0.4).double()
    for b, r in enumerate(rows):
        if r == "zero":
            w[b] = 0
        elif r == "one":
            w[b] = 0
            w[b, draw(st.integers(0, N - 1))] = draw(st.sampled_from([1.0, 0.37]))
        elif r == "ones":
            w[b] = 1
    if kind == "bool":
        return w > 0, None
    return w, draw(st.sampled_from([torch.float64, torch.float32, h_dtype]))


@st.composite
def packed_offsets(draw, max_len=12):
    """cu_seqlens (B + 1,) int32 or int64 with empty sequences allowed; the total may be 0."""
    lengths = draw(st.lists(st.integers(0, max_len), min_size=1, max_size=5))
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=draw(st.sampled_from([torch.int32, torch.int64])))


@given(st.data(), dtype_st, width_st, degree_st, seed_st, scale_st, isa_st, st.sampled_from(VIEWS),
       st.sampled_from(["none", "weights", "varlen"]), st.booleans())
@FUZZ
def test_fuzz_mean(data, dtype, E, K, seed, scale, which, view, mask, expand_grad):
    g = torch.Generator().manual_seed(seed)
    cd = data.draw(coeff_dtype(dtype, K))
    c = coeffs(g, E, K)
    if mask == "varlen":
        cu = data.draw(packed_offsets())
        h = torch.randn(int(cu[-1]), E, generator=g, dtype=torch.float64) * scale
        fn = lambda x, impl: impl.poly_mean(x[0], x[1], None, cu)
        inputs, dtypes, diff = [h, c], [dtype, cd], [True, True]
    else:
        B, N = data.draw(sequence_shape(E))
        h = torch.randn(B, N, E, generator=g, dtype=torch.float64) * scale
        if mask == "none":
            fn = lambda x, impl: impl.poly_mean(x[0], x[1])
            inputs, dtypes, diff = [h, c], [dtype, cd], [True, True]
        else:
            w, wd = data.draw(weights(B, N, dtype, g))
            fn = lambda x, impl: impl.poly_mean(x[0], x[1], x[2])
            inputs = [h, c, w]
            dtypes, diff = [dtype, cd, wd], [True, True, wd is not None]
    with isa(which):
        check(fn, inputs, dtypes, diff, view_fn(view, h.dim()), g, expand_grad, f"mean/{mask}",
              floors=poly_floors(fn, [d for d in dtypes if d is not None], {2: weight_grad_scale}))


def poly_term_scales(fn, ref_in, seeds):
    """The sizes of the terms that cancel in the gradients of h and of the coefficients, (|grad_h|, |grad_c|).
    With gbar the gradient reaching p = poly(act(h)) (every op is linear in p, so gbar does not depend on p):
    grad_h = gbar act'(h) sum_k (k+1) c_k act^k sums powers of comparable size and either sign (coeffs() scales
    c_k so): its terms' size is |gbar| act'(h) sum_k (k+1) |c_k| |act|^k; grad_c[k] = sum over tokens of
    gbar act^(k+1): its terms' size is sum |gbar| |act|^(k+1). gbar itself is exact here (float64 reference);
    the kernels form it with compensated sums, so its own cancellation is not forgiven. (0, 0) when the
    outputs do not pair with the seeds."""
    h, c = ref_in[0].double(), ref_in[1].double()
    # gbar = the gradient of h where p = h: act(1) = 1, act' = 1, coefficients (1).
    ones = torch.ones(h.shape, dtype=torch.float64, requires_grad=True)
    unit = torch.ones(c.shape[0], 1, dtype=torch.float64)
    outs = fn([ones, unit] + list(ref_in[2:]), R)
    outs = [o for o in (outs if isinstance(outs, (tuple, list)) else [outs]) if o.is_floating_point()]
    if len(outs) != len(seeds) or not all(o.requires_grad for o in outs):
        return [0.0, 0.0]
    gbar = torch.autograd.grad(outs, ones, [s.double() for s in seeds])[0].abs()
    hh = h.detach().requires_grad_()
    act = R.act(hh)
    slope = torch.autograd.grad(act.sum(), hh)[0]  # act'(h), as the reference defines act
    a = act.detach().abs()
    K = c.shape[1]
    lower = torch.stack([a ** k for k in range(K)], -1)  # (..., E, K): |act|^0 .. |act|^(K-1)
    gh = gbar * slope * (lower * (torch.arange(K, dtype=h.dtype) + 1) * c.abs()).sum(-1)
    gc = (gbar.unsqueeze(-1) * lower * a.unsqueeze(-1)).reshape(-1, c.shape[0], K).sum(0)
    return [gh.norm().item(), gc.norm().item()]


def poly_floors(fn, dtypes, extra=None):
    """check()'s floors for h (leaf 0) and the coefficients (leaf 1) from poly_term_scales, plus extra. The
    kernels sum those terms in fp32 (fp64 for float64) whatever the dtypes of the inputs, so the floors are
    scaled to that precision: a 16-bit gradient is held to its dtype's tolerance of its own size and to fp32's
    of its terms' size."""
    share = min(1.0, TOL[torch.float32] / tol_of(*dtypes))
    floors = {j: (lambda ref_in, seeds, j=j: share * poly_term_scales(fn, ref_in, seeds)[j]) for j in (0, 1)}
    floors.update(extra or {})
    return floors


def weight_grad_scale(ref_in, seeds):
    """d L / d w_bn = g_b . (p_bn - H_b) / sum_n w_bn: the size of the terms before they cancel, over
    tokens and over channels, sum_e |g_be p_bne| / sum_n w_bn. (The kernels form g . H from the saved output
    H, rounded to h's dtype, so their weight gradient carries that rounding: relative to this scale.)"""
    h, c, w = ref_in[:3]
    p = R._poly(h, c)
    den = w.double().sum(1, keepdim=True)
    den = torch.where(den == 0, torch.ones_like(den), den)
    return (torch.einsum("bne,be->bn", p.abs(), seeds[0].abs()) / den).norm().item()


@given(st.data(), dtype_st, width_st, degree_st, seed_st, scale_st, isa_st, st.sampled_from(VIEWS),
       st.booleans(), st.booleans())
@FUZZ
def test_fuzz_causal(data, dtype, E, K, seed, scale, which, view, packed, expand_grad):
    g = torch.Generator().manual_seed(seed)
    cd = data.draw(coeff_dtype(dtype, K))
    c = coeffs(g, E, K)
    if packed:
        cu = data.draw(packed_offsets())
        h = torch.randn(int(cu[-1]), E, generator=g, dtype=torch.float64) * scale
        F_ = data.draw(st.integers(1, 14))
        fn = lambda x, impl: impl.poly_causal(x[0], x[1], F_, cu)
    else:
        B, N = data.draw(sequence_shape(E))
        h = torch.randn(B, N, E, generator=g, dtype=torch.float64) * scale
        F_ = data.draw(st.one_of(st.integers(1, N + 3), st.sampled_from([1, 2048, 3000])))
        fn = lambda x, impl: impl.poly_causal(x[0], x[1], F_)
    with isa(which):
        check(fn, [h, c], [dtype, cd], [True, True], view_fn(view, h.dim()), g, expand_grad,
              f"causal F={F_} packed={packed}", floors=poly_floors(fn, [dtype, cd]))


def causal_weight_grad_scale(F_):
    """The size of the terms of d L / d w_j = sum_i g_i . (p_j - H_i) / W_i over the rows i whose prefix holds j:
    sum_e |p_je| sum_i |g_ie| / W_i (W_i the weight of i's prefix, to its block's end; terms with W_i = 0 are 0)."""
    def scale(ref_in, seeds):
        h, c, w = ref_in[:3]
        p, g, w = R._poly(h, c).abs(), seeds[0].double().abs(), w.double()
        N = w.shape[1]
        idx = torch.arange(N)
        end = torch.clamp((idx // F_ + 1) * F_, max=N) - 1
        W = w.cumsum(1)[:, end]
        t = g * torch.where(W != 0, 1 / torch.where(W != 0, W, torch.ones_like(W)), torch.zeros_like(W))[..., None]
        suffix = t.flip(1).cumsum(1).flip(1)  # sum over rows >= n
        A = suffix[:, (idx // F_) * F_]        # from the start of j's block
        return (p * A).sum(-1).norm().item()
    return scale


@given(st.data(), dtype_st, width_st, degree_st, seed_st, scale_st, isa_st, st.sampled_from(VIEWS), st.booleans())
@FUZZ
def test_fuzz_causal_weighted(data, dtype, E, K, seed, scale, which, view, expand_grad):
    g = torch.Generator().manual_seed(seed)
    cd = data.draw(coeff_dtype(dtype, K))
    c = coeffs(g, E, K)
    B, N = data.draw(sequence_shape(E))
    h = torch.randn(B, N, E, generator=g, dtype=torch.float64) * scale
    F_ = data.draw(st.one_of(st.integers(1, N + 3), st.sampled_from([1, 2048])))
    w, wd = data.draw(weights(B, N, dtype, g))
    fn = lambda x, impl: impl.poly_causal_weighted(x[0], x[1], x[2], F_)
    dtypes, diff = [dtype, cd, wd], [True, True, wd is not None]
    with isa(which):
        check(fn, [h, c, w], dtypes, diff, view_fn(view, 3), g, expand_grad, f"causal_weighted F={F_}",
              floors=poly_floors(fn, [d for d in dtypes if d is not None], {2: causal_weight_grad_scale(F_)}))


@given(st.data(), dtype_st, st.integers(1, 40), degree_st, seed_st, scale_st, isa_st,
       st.sampled_from(["contig", "sliced", "transposed"]), st.sampled_from(["bool", "float"]))
@FUZZ
def test_fuzz_masked(data, dtype, E, K, seed, scale, which, view, kind):
    """The (B, T, N) mask of functional.aggregate, with empty and one-token rows."""
    g = torch.Generator().manual_seed(seed)
    B, N = small(data.draw, E)
    T = data.draw(st.integers(1, 12))
    m = torch.rand(B, T, N, generator=g, dtype=torch.float64)
    m[..., : data.draw(st.integers(0, T)), :] *= 0  # leading rows see nothing: H = 0
    if T > 1:
        m[:, -1] = 0
        m[:, -1, data.draw(st.integers(0, N - 1))] = 1
    m = m > 0.5 if kind == "bool" else m
    cd = data.draw(coeff_dtype(dtype, K))
    h = torch.randn(B, N, E, generator=g, dtype=torch.float64) * scale
    fn = lambda x, impl: PF.aggregate(x[0], x[1], x[2]) if impl is ops else R.poly_masked(x[0], x[1], x[2])
    with isa(which):
        check(fn, [h, coeffs(g, E, K), m], [dtype, cd, torch.float64], [True, True, False],
              view_fn(view, 3), g, False, f"masked/{kind}", floors=poly_floors(fn, [dtype, cd, torch.float64]))


@given(st.data(), dtype_st, width_st, degree_st, seed_st, scale_st, isa_st, st.sampled_from(VIEWS),
       st.sampled_from([torch.float32, torch.float64]))
@FUZZ
def test_fuzz_state(data, dtype, E, K, seed, scale, which, view, sum_dtype):
    """poly_state_update (forward and backward, also through the state sum) and the in-place step."""
    g = torch.Generator().manual_seed(seed)
    B, _ = small(data.draw, E)
    T = data.draw(st.integers(0, 9))
    h = torch.randn(B, T, E, generator=g, dtype=torch.float64) * scale
    s = torch.randn(B, E, generator=g, dtype=torch.float64) * data.draw(st.sampled_from([0.0, 1.0, 100.0]))
    n = torch.tensor(data.draw(st.lists(st.integers(0, 10 ** 6), min_size=B, max_size=B)), dtype=torch.int64)
    c = coeffs(g, E, K)
    cd = data.draw(coeff_dtype(dtype, K))
    with isa(which):
        check(lambda x, impl: impl.poly_state_update(x[0], x[1], x[2], x[3]), [h, c, s, n],
              [dtype, cd, sum_dtype, None], [True, True, True, False], view_fn(view, 3), g, False, "state")
        hk, ck = view_fn(view, 3)(h.to(dtype)), c.to(cd)
        sk, nk = s.to(sum_dtype), n.clone()
        H_ref, s_ref, n_ref = R.poly_state_update(hk.double(), ck.double(), sk.double(), n)
        H = ops.poly_state_step_(hk, ck, sk, nk)
        tol = tol_of(dtype, cd, sum_dtype)
        assert err_of(H, H_ref) < tol and err_of(sk, s_ref) < tol and torch.equal(nk, n_ref)


# ---- the layer ----

@st.composite
def layer_config(draw):
    n_groups = draw(st.sampled_from([1, 1, 2, 3]))
    dim = n_groups * draw(st.integers(1, 8))
    expand = draw(st.integers(1, 3))
    E = dim * expand
    heads = draw(st.sampled_from([0, 1] + [d for d in range(2, E + 1) if E % d == 0][:4]))
    return dim, draw(degree_st), expand, n_groups, heads, draw(st.booleans())


def layer_call(layer, x, xc, mask, block, cu, ref, store_dtype=None):
    if ref:
        return R.pom_layer(layer, x, xc, mask, block, cu, store_dtype)
    kw = {}
    if block is not None:
        kw["block_size"] = block
    if cu is not None:
        kw["cu_seqlens"] = cu
    return layer(x, xc, mask=mask, **kw)


def randomize_layer(layer, g):
    """Coefficients of every sign and size (coeffs) and every other 1-D parameter (biases, norms, gate scales)
    drawn from N(0, 1), so no term of the layer's function hides behind a default initialization."""
    with torch.no_grad():
        layer.po_coeff.copy_(coeffs(g, layer.state_width, layer.degree, 1.5))
        for p in layer.parameters():
            if p is not layer.po_coeff and p.dim() == 1:
                p.normal_(generator=g)


def layer_inputs(data, g, dim, mask_kind, cross, scale, self_len=False):
    """The inputs of a layer fuzz case: (xq, xc, mask, w, block, cu, (B, T, N)). mask is the string argument
    ("causal") or None; w the mask tensor of the "weights" / "padding" (B, N) and "full" (B, T, N) kinds (first
    row empty), else None; block the block size of "block" and, maybe None, of "varlen_causal"; cu the packed
    offsets of "varlen*" (B is None then).
    Without cross-mixing the context is the input, or, unless self_len, a second tensor of another length."""
    B, T = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 12))
    block, cu, w = None, None, None
    if mask_kind.startswith("varlen"):
        cu = data.draw(packed_offsets(8))
        B, T = None, int(cu[-1])
        N = T
        xq = torch.randn(T, dim, generator=g, dtype=torch.float64) * scale
        xc = torch.randn_like(xq) * scale if cross else None
        mask = "causal" if mask_kind == "varlen_causal" else None
        if mask is not None:
            block = data.draw(st.one_of(st.none(), st.integers(1, 5)))
        return xq, xc, mask, w, block, cu, (B, T, N)
    fixed = mask_kind in ("causal", "block") or (self_len and not cross)
    N = T if fixed else data.draw(st.integers(1, 12))
    xq = torch.randn(B, T, dim, generator=g, dtype=torch.float64) * scale
    xc = torch.randn(B, N, dim, generator=g, dtype=torch.float64) * scale if cross or N != T else None
    mask = "causal" if mask_kind in ("causal", "block") else None
    if mask_kind == "block":
        block = data.draw(st.integers(1, T + 2))
    elif mask_kind == "weights":
        w = torch.rand(B, N, generator=g, dtype=torch.float64)
        w[0] = 0
    elif mask_kind == "padding":
        w = torch.rand(B, N, generator=g) > 0.3
        w[0] = False
    elif mask_kind == "full":
        w = torch.rand(B, T, N, generator=g) > 0.5
    return xq, xc, mask, w, block, cu, (B, T, N)


@given(st.data(), layer_config(), dtype_st, seed_st, isa_st,
       st.sampled_from(["none", "weights", "padding", "causal", "block", "full", "varlen", "varlen_causal"]),
       st.booleans())
@FUZZ
def test_fuzz_layer(data, config, dtype, seed, which, mask_kind, cross):
    """PoM forward and backward (input, context, weights and every parameter), self- and cross-mixing.

    float64 against the float64 reference of the same (rounded) parameters within the SPEC tolerance; float32
    within the SPEC tolerance or twice the error of the plain-PyTorch reference run in float32 (high degrees
    amplify fp32 rounding), whichever is larger; float16/bfloat16, whose projections round h itself, within
    twice the error of the plain-PyTorch reference run in that dtype or of the float64 reference that rounds
    what a 16-bit layer stores (or the SPEC tolerance, whichever is largest)."""
    dim, degree, expand, n_groups, heads, bias = config
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    layer = PoM(dim, degree, expand, n_groups=n_groups, n_sel_heads=heads, bias=bias).double()
    randomize_layer(layer, g)
    x_scale = 1.0 if dtype == torch.float16 else 3.0
    xq, xc, mask, w, block, cu, _ = layer_inputs(data, g, dim, mask_kind, cross, x_scale)
    low = copy.deepcopy(layer).to(dtype)
    ref_layer = copy.deepcopy(low).double()
    tensors = [xq] + ([xc] if xc is not None else []) + ([w] if w is not None and w.is_floating_point() else [])
    ker_x = [t.to(dtype).requires_grad_() for t in tensors]
    ref_x = [t.to(dtype).double().requires_grad_() for t in tensors]
    plain_x = [t.to(dtype).requires_grad_() for t in tensors]

    def run(lay, xs, ref, store_dtype=None):
        it = iter(xs)
        q = next(it)
        c = next(it) if xc is not None else None
        m = next(it) if w is not None and w.is_floating_point() else w
        return layer_call(lay, q, c, mask if w is None else m, block, cu, ref, store_dtype)

    with isa(which):
        out = run(low, ker_x, False)
    ref = run(ref_layer, ref_x, True)
    plain = run(low, plain_x, True)
    # 16-bit: the float64 reference with the tensors a 16-bit layer stores (projections, mixer output, their
    # gradients) rounded to the dtype: the error due to the dtype alone (amplified by high degrees), which no
    # implementation of a 16-bit layer avoids.
    hq_x = [t.detach().clone().requires_grad_() for t in ref_x]
    hq = run(ref_layer, hq_x, True, dtype if dtype in (torch.float16, torch.bfloat16) else None)
    assert out.dtype == dtype and out.shape == ref.shape

    def draws(b):
        """How many elements carry the norm of the exact tensor b: (sum b^2)^2 / sum b^4, the number of rounding
        draws its relative error averages (a gradient of 16 elements where one dominates is one draw)."""
        sq = b.detach().double()[torch.isfinite(b)] ** 2
        den = (sq * sq).sum().item()
        return sq.sum().item() ** 2 / den if den > 0 else 0.0

    def pool(errors, scales):
        """sqrt(sum (error * scale)^2 / sum scale^2) of relative errors and the norms they are relative to."""
        if any(e == float("inf") for e in errors):
            return float("inf")
        top = max(scales)
        w = [s / top for s in scales]
        return math.sqrt(sum((e * x) ** 2 for e, x in zip(errors, w)) / sum(x * x for x in w))

    def bound(err_plain, err_hq, n_draws):
        if dtype == torch.float64:
            return TOL[dtype]
        if dtype == torch.float32:  # high degrees amplify fp32 rounding past 1e-5 for plain PyTorch too
            return max(TOL[dtype], 2 * err_plain)
        # A tensor whose norm a few elements carry is a few rounding draws, not a distribution of them: a path
        # that rounds at other places than plain PyTorch (the non-causal shortcut never forms y) may land a few
        # units of roundoff away where plain PyTorch happened to land close.
        few = 4 * torch.finfo(dtype).eps / 2 if n_draws <= 8 else 0.0
        return max(TOL[dtype], 2 * err_plain, 2 * err_hq, few)

    # A 16-bit case whose exact result lies beyond the dtype's range (high powers of act <= 6 in float16) is
    # outside what the dtype can hold, for plain PyTorch as for the kernels: not a test of either.
    lim = torch.finfo(dtype).max
    assume(bool(ref.detach().abs().max() <= lim) if ref.numel() else True)
    # So is a case where a tensor the 16-bit layer must store (h, the gate, y) lies beyond the range: the
    # reference that rounds those tensors to the dtype overflows.
    assume(bool(torch.isfinite(hq).all()))
    what = f"layer {config} {dtype} mask={mask_kind} block={block} cross={cross}"
    assert rel_err(out, ref) < bound(rel_err(plain, ref), rel_err(hq, ref), draws(ref)), \
        f"{what}: forward {rel_err(out, ref):.3e}"
    names = [f"input{i}" for i in range(len(ker_x))] + [n for n, _ in low.named_parameters()]

    def grad_errors(seed_g):
        """(error, plain error, dtype-rounded error, draws, the norms these errors are relative to) of every
        gradient for the upstream gradient seed_g."""
        with isa(which):
            gk = torch.autograd.grad(out, ker_x + list(low.parameters()), seed_g, retain_graph=True)
        gr = torch.autograd.grad(ref, ref_x + list(ref_layer.parameters()), seed_g.double(), retain_graph=True)
        gp = torch.autograd.grad(plain, plain_x + list(low.parameters()), seed_g, retain_graph=True)
        gq = torch.autograd.grad(hq, hq_x + list(ref_layer.parameters()), seed_g.double(), retain_graph=True)
        assume(all(bool(b.abs().max() <= lim) for b in gr if b.numel()))
        assume(all(bool(torch.isfinite(b).all()) for b in gq))
        # A bias gradient is a sum over tokens of terms that may cancel (a one-element gradient is one rounding
        # draw of such a sum): judge it relative to the size of those terms.
        floor = layer_bias_grad_scales(ref_layer, lambda lay, xs: run(lay, xs, True), ref_x, seed_g.double(),
                                       len(ker_x), xq.shape[:-1], (xq if xc is None else xc).shape[:-1])
        if w is not None and w.is_floating_point():
            # The gradient of the mask weights is a sum of terms that cancel (exactly, for a one-token row):
            # judge it relative to the size of those terms, as the op-level weighted-mean test does.
            floor[len(ker_x) - 1] = layer_weight_grad_scale(ref_layer, ref_x, xc is not None, seed_g.double())
        errs = []
        for i, (a, b, c, q) in enumerate(zip(gk, gr, gp, gq)):
            err = rel_err(a, b)
            nb = b.detach().double()[torch.isfinite(b)].norm().item()
            scale = nb if nb > 0 else 1.0  # rel_err's
            scale_k = scale
            if i in floor and err < float("inf"):
                scale_k = max(b.double().norm().item(), floor[i], 1e-300)
                err = (a.double() - b.double()).norm().item() / scale_k
            errs.append((err, rel_err(c, b), rel_err(q, b), draws(b), (scale_k, scale, scale)))
        return errs

    errs = grad_errors(torch.randn(out.shape, generator=g, dtype=torch.float64).to(dtype))
    few = [i for i, e in enumerate(errs) if e[3] <= 8]
    if dtype != torch.float64 and few:
        # A float32 or 16-bit gradient carried by a few elements is a few rounding draws (float32: one where the
        # exact gradient of a 12-element context nearly cancels measured 1.8e-5, plain float32 3.6e-6; over 100
        # upstream gradients their RMS errors are 6.2e-7 and 5.6e-7): compare errors over eight upstream
        # gradients, each a new set of draws, for the kernels, plain PyTorch and the rounded reference, pooled
        # as sqrt(sum |error|^2 / sum |exact|^2): a draw whose exact gradient nearly cancels (tiny norm, any
        # rounding a large relative error) then weighs by its absolute error, not its relative one, for each
        # implementation alike. (Its number of draws is that of the first upstream gradient's exact gradient.)
        runs = [errs] + [grad_errors(torch.randn(out.shape, generator=g, dtype=torch.float64).to(dtype))
                         for _ in range(7)]
        for i in few:
            pooled = [pool([r[i][j] for r in runs], [r[i][4][j] for r in runs]) for j in range(3)]
            errs[i] = (*pooled, errs[i][3], errs[i][4])
    for n, (err, err_plain, err_hq, n_draws, _) in zip(names, errs):
        assert err < bound(err_plain, err_hq, n_draws), \
            f"{what}: grad {n} {err:.3e} (plain {err_plain:.3e}, dtype-rounded {err_hq:.3e})"


class _PerTokenLinearBias(torch.overrides.TorchFunctionMode):
    """F.linear with a bias of one row per token (which F.linear itself does not broadcast): x W^T + bias."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.linear:
            x, w = args[0], args[1]
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            if b is not None and b.dim() > 1:
                return torch.nn.functional.linear(x, w) + b
        return func(*args, **kwargs)


def layer_bias_grad_scales(layer, run, xs, seed, offset, q_rows, c_rows):
    """{index of a bias among (inputs + parameters): || sum over tokens of |d L / d bias_token| ||}: every bias of
    the reference layer made a per-token tensor (over the rows of the query, or of the context for the context
    projection), so autograd returns the terms of the bias gradient before they are summed."""
    lay = copy.deepcopy(layer)
    names = [n for n, _ in lay.named_parameters()]
    per_token = {}
    for name, p in list(lay.named_parameters()):
        if not name.endswith("bias"):
            continue
        owner = lay.get_submodule(name.rpartition(".")[0]) if "." in name else lay
        attr = name.rpartition(".")[2]
        rows = c_rows if name.startswith("po_proj") else q_rows
        t = p.detach().expand(*rows, p.shape[0]).clone().requires_grad_()
        del owner._parameters[attr]
        setattr(owner, attr, t)
        per_token[names.index(name)] = t
    if not per_token:
        return {}
    with _PerTokenLinearBias():
        out = run(lay, [x.detach() for x in xs])
    grads = torch.autograd.grad(out, list(per_token.values()), seed, allow_unused=True)
    return {offset + i: (0.0 if gt is None else gt.abs().flatten(0, -2).sum(0).norm().item())
            for i, gt in zip(per_token, grads)}


def layer_weight_grad_scale(layer, xs, cross, seed):
    """weight_grad_scale for the layer: g = dL/dH of the reference layer for a (B, N) weight mask."""
    xq, xc, w = xs[0].detach(), (xs[1].detach() if cross else None), xs[-1].detach()
    h, s = layer.project(xq, xc)
    H = R.poly_mean(h, layer.po_coeff, w).unsqueeze(1).detach().requires_grad_()
    out = layer.ag_proj(R.select(s, H, layer.n_sel_heads))
    gH, = torch.autograd.grad(out, H, seed)
    return weight_grad_scale([h.detach(), layer.po_coeff.detach(), w], [gH[:, 0]])


@given(layer_config(), seed_st, st.lists(st.integers(1, 5), min_size=1, max_size=6), st.booleans())
@FUZZ
def test_fuzz_state_chunks(config, seed, chunks, as_dict):
    """Chunks of unequal sizes through state_forward (and step for chunks of 1) equal the block-causal
    forward where every block ends at a chunk boundary: here, the causal forward at each chunk's end."""
    dim, degree, expand, n_groups, heads, bias = config
    torch.manual_seed(seed)
    layer = PoM(dim, degree, expand, n_groups=n_groups, n_sel_heads=heads, bias=bias).double()
    with torch.no_grad():
        layer.po_coeff.normal_(0, 0.3)
    B = 2
    x = torch.randn(B, sum(chunks), dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    full = R.pom_layer(layer, x, mask="causal")
    state, t0 = ({"h": torch.zeros(B, 1, layer.state_width, dtype=torch.float64), "n": 0} if as_dict else None), 0
    for n in chunks:
        out, state = layer.state_forward(x[:, t0:t0 + n], state=state)
        # the chunk's last token sees exactly the causal prefix up to itself
        assert rel_err(out[:, -1], full[:, t0 + n - 1]) < 1e-5  # the state's sum is float32
        t0 += n
    st_ = layer.allocate_state(B)
    st_.sum = st_.sum.double()
    for t in range(x.shape[1]):
        y = layer.step(x[:, t:t + 1], st_)
        assert rel_err(y[:, 0], full[:, t]) < 1e-10


@given(st.data(), dtype_st, st.integers(1, 12), st.integers(1, 3), degree_st, seed_st, scale_st, isa_st,
       st.sampled_from(VIEWS), st.sampled_from(["causal", "mean", "weights", "gated"]), st.booleans(), st.booleans())
@FUZZ
def test_fuzz_rope(data, dtype, P, S, K, seed, scale, which, view, kind, packed, per_row):
    """The rope ops (rotation fused into the mean, the block-causal mean and the gated block-causal mixer): tables
    of any float dtype, S sections of 2 P channels, positions shared by the batch, per batch row or packed."""
    g = torch.Generator().manual_seed(seed)
    E = 2 * P * S
    cd = data.draw(coeff_dtype(dtype, K))
    c = coeffs(g, E, K)
    L = data.draw(st.integers(1, 40))
    td = data.draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    cos, sin = (torch.randn(L, P, generator=g).to(td) for _ in range(2))
    F_ = data.draw(st.integers(1, 9))
    if packed and kind != "weights":
        cu = data.draw(packed_offsets())
        h = torch.randn(int(cu[-1]), E, generator=g, dtype=torch.float64) * scale
        pos = torch.randint(0, L, (h.shape[0], S), generator=g)
    else:
        cu = None
        B, N = small(data.draw, E)
        h = torch.randn(B, N, E, generator=g, dtype=torch.float64) * scale
        pos = torch.randint(0, L, (B, N, S) if per_row else (N, S), generator=g)
    inputs, dtypes, diff, extra = [h, c], [dtype, cd], [True, True], None
    if kind == "causal":
        fn = lambda x, impl: impl.poly_causal_rope(x[0], x[1], cos, sin, pos, F_, cu)
    elif kind == "mean":
        fn = lambda x, impl: impl.poly_mean_rope(x[0], x[1], cos, sin, pos, None, cu)
    elif kind == "gated":  # hs = [h | pre]: 2 Pg gates per section, Pg dividing P
        Pg = data.draw(st.sampled_from([d for d in range(1, P + 1) if P % d == 0]))
        gcos, gsin = (torch.randn(L, Pg, generator=g).to(td) for _ in range(2))
        pre = torch.randn(*h.shape[:-1], 2 * Pg * S, generator=g, dtype=torch.float64) * 3
        bias = torch.randn(2 * Pg * S, generator=g, dtype=torch.float64) if data.draw(st.booleans()) else None
        fn = lambda x, impl: impl.poly_causal_gated_rope(x[0], x[1], x[2], cos, sin, gcos, gsin, pos, F_, cu)
        inputs, dtypes, diff = [torch.cat([h, pre], -1), c, bias], [dtype, cd, dtype], [True, True, bias is not None]
    else:
        w, wd = data.draw(weights(h.shape[0], h.shape[1], dtype, g))
        fn = lambda x, impl: impl.poly_mean_rope(x[0], x[1], cos, sin, pos, x[2])
        inputs, dtypes, diff = [h, c, w], [dtype, cd, wd], [True, True, wd is not None]

        def rotated_weight_scale(ref_in, seeds):  # weight_grad_scale of the rotated features
            h_, c_, w_ = ref_in[:3]
            p = R.rotate(R._poly(h_, c_), cos, sin, pos)
            den = w_.double().sum(1, keepdim=True)
            den = torch.where(den == 0, torch.ones_like(den), den)
            return (torch.einsum("bne,be->bn", p.abs(), seeds[0].abs()) / den).norm().item()

        extra = {2: rotated_weight_scale}
    floors = poly_floors(fn, [d for d in dtypes if d is not None], extra)
    if kind == "gated":  # the terms of the h and coefficient gradients: those of the ungated op (the gate scales them)
        proxy = poly_floors(lambda x, impl: impl.poly_causal_rope(x[0], x[1], cos, sin, pos, F_, cu),
                            [d for d in dtypes if d is not None])
        floors = {j: (lambda ref_in, seeds, f=f: f([ref_in[0][..., :E], ref_in[1]], seeds)) for j, f in proxy.items()}
    with isa(which):
        check(fn, inputs, dtypes, diff, view_fn(view, h.dim()), g, data.draw(st.booleans()),
              f"rope/{kind} P={P} S={S} F={F_} packed={cu is not None}", floors=floors)


@st.composite
def rope_layer_config(draw):
    """A valid PoMRoPE: E = expand * dim divisible by 2 (1-D) or 4 (2-D); gate heads 0, 1 or G > 1 dividing E with
    G a multiple of 2 (4) and heads at least 2 (4) channels wide."""
    two = draw(st.booleans())
    split = 4 if two else 2
    n_groups = draw(st.sampled_from([1, 1, 2]))
    dim = n_groups * draw(st.integers(1, 6))
    expand = draw(st.integers(1, 3))
    E = dim * expand
    assume(E % split == 0)
    heads = [0, 1] + [G for G in range(split, E // split + 1, split) if E % G == 0 and E // G >= split]
    return dim, draw(st.integers(1, 5)), expand, n_groups, draw(st.sampled_from(heads)), draw(st.booleans()), two


@given(st.data(), rope_layer_config(), seed_st, isa_st,
       st.sampled_from(["none", "weights", "padding", "causal", "block", "full", "varlen", "varlen_causal"]),
       st.booleans(), st.sampled_from(["default", "shared", "per_row"]))
@FUZZ
def test_fuzz_rope_layer(data, config, seed, which, mask_kind, cross, positions):
    """PoMRoPE in float64, forward and every gradient (inputs and parameters), against the reference path
    (R.pom_rope_layer) on random configurations, masks, self- and cross-mixing and positions (the default ones,
    one set for the batch, one per batch row; 2-D always takes them)."""
    dim, degree, expand, n_groups, heads, bias, two = config
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    L, side = 16, 4
    layer = pom_ext.PoMRoPE(dim, degree, expand, n_groups, heads, bias, max_seq_len=L, max_h=side, max_w=side,
                            rope_2d=two).double()
    randomize_layer(layer, g)
    xq, xc, mask, w, block, cu, (B, T, N) = layer_inputs(data, g, dim, mask_kind, cross, 3.0, self_len=True)
    packed = cu is not None
    mask = mask if w is None else w
    kw = {} if cu is None else {"cu_seqlens": cu}
    if block is not None:
        kw["block_size"] = block
    if two or positions != "default":
        lead = (B,) if positions == "per_row" and not packed else ()
        for name, n in [("positions", T)] + ([("ctx_positions", N)] if cross else []):
            if two:
                kw[name + "_hw"] = torch.randint(0, side, lead + (n, 2), generator=g)
            else:
                kw[name] = torch.randint(0, L, lead + (n,), generator=g)
    xq.requires_grad_()
    if xc is not None:
        xc.requires_grad_()
    wrt = [xq] + ([xc] if xc is not None else []) + list(layer.parameters())
    with isa(which):
        out = layer(xq, xc, mask=mask, **kw)
    ref = R.pom_rope_layer(layer, xq, xc, mask, **kw)
    assert rel_err(out, ref) < 1e-9, f"output: {rel_err(out, ref):.3g}"
    if out.numel() == 0:
        return
    up = torch.randn(out.shape, generator=g, dtype=torch.float64)
    with isa(which):
        mine = torch.autograd.grad(out, wrt, up, allow_unused=True)
    theirs = torch.autograd.grad(ref, wrt, up, allow_unused=True)
    for i, (a, b) in enumerate(zip(mine, theirs)):
        a = torch.zeros_like(wrt[i]) if a is None else a
        b = torch.zeros_like(wrt[i]) if b is None else b
        assert rel_err(a, b) < 1e-8, f"gradient {i}: {rel_err(a, b):.3g}"
