"""The PoM layer against the SPEC written out in pom_ext.reference.pom_layer, and its recurrent state."""
import copy
import importlib.util

import pytest
import torch

import pom_ext
from pom_ext import PoM, PoMState, reference as R

from conftest import DEVICES, assert_close, rel_err

CONFIGS = [(1, 1, False), (1, 0, False), (1, 4, True), (2, 1, True), (2, 4, False)]
MASKS = ["none", "weights", "padding", "causal", "block5", "full", "varlen", "varlen_causal"]


def make_layer(dim, degree, n_groups, n_sel_heads, bias, dtype=torch.float64, device="cpu", seed=0):
    torch.manual_seed(seed)
    layer = PoM(dim, degree, 2, n_groups=n_groups, n_sel_heads=n_sel_heads, bias=bias).to(device, dtype)
    with torch.no_grad():  # coefficients of order one so that every degree matters in the comparison
        layer.po_coeff.copy_(torch.randn_like(layer.po_coeff) * 0.5)
        if bias:
            layer.ag_proj.bias.normal_()
    return layer


def call(layer, mask, xq, xc=None, *, ref=False):
    """Runs the layer (or the reference) with one of the MASKS on (B, T, D) inputs."""
    B, T, _ = xq.shape
    N = T if xc is None else xc.shape[1]
    g = torch.Generator().manual_seed(11)
    kw = {}
    if mask == "none":
        m = None
    elif mask == "weights":
        m = torch.rand(B, N, generator=g, dtype=torch.float64).to(xq.device, xq.dtype)
    elif mask == "padding":
        m = torch.rand(B, N, generator=g) > 0.3
        m[0] = False  # an all-padding row gives 0, never NaN
        m = m.to(xq.device)
    elif mask in ("causal", "block5"):
        m = "causal"
        if mask == "block5":
            kw["block_size"] = 5
    elif mask == "full":
        m = (torch.rand(B, T, N, generator=g) > 0.5).to(xq.device)
    else:
        total = B * T
        kw["cu_seqlens"] = torch.tensor([0, 1, total // 2, total // 2, total], dtype=torch.int32, device=xq.device)
        m = "causal" if mask == "varlen_causal" else None
        xq = xq.reshape(total, -1)
        xc = None if xc is None else xc.reshape(total, -1)
    if ref:
        return R.pom_layer(layer, xq, xc, m, kw.get("block_size"), kw.get("cu_seqlens"))
    return layer(xq, xc, mask=m, **kw)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"g{c[0]}h{c[1]}{'b' if c[2] else ''}")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_layer_matches_reference(dtype, config, mask, device):
    layer = make_layer(48, 3, *config, device=device)
    x = torch.randn(2, 63, 48, dtype=torch.float64, device=device)
    ref = call(layer, mask, x, ref=True)
    low = copy.deepcopy(layer).to(dtype)
    out = call(low, mask, x.to(dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert rel_err(out, ref) < {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 3e-2}[dtype]


@pytest.mark.parametrize("mask", ["none", "weights", "full", "causal"])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"g{c[0]}h{c[1]}{'b' if c[2] else ''}")
def test_cross_mixing(config, mask):
    """xq != xc with T != N (causal needs T == N: queries and context of equal length but distinct)."""
    layer = make_layer(48, 4, *config)
    xq = torch.randn(2, 63 if mask == "causal" else 17, 48, dtype=torch.float64)
    xc = torch.randn(2, 63, 48, dtype=torch.float64)
    assert_close(call(layer, mask, xq, xc), call(layer, mask, xq, xc, ref=True), torch.float64, mask)


@pytest.mark.parametrize("degree", [1, 2, 5, 8, 13])
def test_layer_degrees(degree):
    layer = make_layer(96, degree, 1, 4, False)
    x = torch.randn(2, 33, 96, dtype=torch.float64)
    for mask in ("none", "causal"):
        assert_close(call(layer, mask, x), call(layer, mask, x, ref=True), torch.float64, f"K={degree} {mask}")


@pytest.mark.parametrize("T", [3, 70])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"g{c[0]}h{c[1]}{'b' if c[2] else ''}")
def test_output_shortcut(config, T):
    """Non-causal output projection without forming y (SPEC §3), both below and above T = D."""
    layer = make_layer(48, 3, *config)
    x = torch.randn(3, T, 48, dtype=torch.float64)
    assert_close(layer(x), R.pom_layer(layer, x), torch.float64, "shortcut")


@pytest.mark.parametrize("mask", ["none", "weights", "causal", "block5", "full", "varlen_causal"])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"g{c[0]}h{c[1]}{'b' if c[2] else ''}")
def test_layer_gradients(config, mask):
    layer = make_layer(24, 3, *config)
    x = torch.randn(2, 15, 24, dtype=torch.float64, requires_grad=True)
    params = [p for p in layer.parameters()]
    seed = torch.randn_like(call(layer, mask, x))
    got = torch.autograd.grad(call(layer, mask, x), [x] + params, seed)
    ref = torch.autograd.grad(call(layer, mask, x, ref=True), [x] + params, seed)
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    for n, a, b in zip(names, got, ref):
        assert_close(a, b, torch.float64, f"grad {n}")


@pytest.mark.parametrize("mask", ["none", "causal", "weights"])
def test_layer_gradcheck(mask):
    layer = make_layer(8, 2, 1, 2, True)
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: call(layer, mask, x), (x,))


def test_weight_mask_gradient():
    """Float weights are differentiable too."""
    layer = make_layer(8, 3, 1, 1, False)
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    w = torch.rand(2, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w: layer(x, mask=w), (w,))


# ---- recurrent state (SPEC §2) ----

def decoder(n_sel_heads=4, dtype=torch.float64):
    return make_layer(32, 3, 1, n_sel_heads, True, dtype=dtype)


def f64_state(layer, B):
    """The state of a float64 layer: its running sum is float64 (SPEC §2), so decoding is exact to 1e-15."""
    s = layer.allocate_state(B)
    assert s.sum.dtype == torch.float64 and s.count.dtype == torch.int64
    return s


def test_state_dtype_follows_layer():
    """A float64 layer keeps a float64 running sum (gradcheck-style use: the decode equals the causal forward to
    float64 precision); float32, bfloat16 and float16 layers a float32 one; dtype= overrides."""
    for dtype, want in ((torch.float64, torch.float64), (torch.float32, torch.float32),
                        (torch.bfloat16, torch.float32), (torch.float16, torch.float32)):
        assert decoder(dtype=dtype).allocate_state(2).sum.dtype == want
    layer = decoder()
    assert layer.allocate_state(2, dtype=torch.float32).sum.dtype == torch.float32
    x = torch.randn(2, 12, 32, dtype=torch.float64)
    with torch.no_grad():
        state = layer.allocate_state(2)
        steps = torch.cat([layer.step(x[:, t:t + 1], state) for t in range(12)], 1)
        assert rel_err(steps, layer(x, mask="causal")) < 1e-13
        out, st = layer.state_forward(x[:, :5], state={"h": 0.0, "n": 0})
        assert st["h"].dtype == torch.float64


@pytest.mark.parametrize("mask", ["none", "weights", "padding", "causal", "block5", "full"])
def test_meta_device(mask):
    """On the meta device (shapes only, through the ops' Meta kernels) the layer gives the shapes it gives on the
    CPU, forward and backward, and so do the state methods."""
    layer = make_layer(16, 3, 1, 4, True, dtype=torch.float32)
    x = torch.randn(2, 7, 16)
    want = call(layer, mask, x)
    meta = copy.deepcopy(layer).to("meta")
    xm = x.to("meta").requires_grad_()
    y = call(meta, mask, xm)
    assert y.device.type == "meta" and y.shape == want.shape and y.dtype == want.dtype
    y.sum().backward()
    assert xm.grad.shape == x.shape and meta.po_coeff.grad.shape == meta.po_coeff.shape
    with torch.no_grad():
        state = meta.allocate_state(2)
        assert state.sum.device.type == "meta"
        assert meta.step(xm[:, :1], state).shape == (2, 1, 16)


@pytest.mark.parametrize("n_sel_heads", [0, 1, 4])
def test_token_decode_equals_causal(n_sel_heads):
    layer = decoder(n_sel_heads)
    x = torch.randn(3, 40, 32, dtype=torch.float64)
    state = f64_state(layer, 3)
    steps = torch.cat([layer.step(x[:, t:t + 1], state) for t in range(40)], 1)
    assert_close(steps, layer(x, mask="causal"), torch.float64, "decode")
    assert state.count.tolist() == [40, 40, 40]


def test_frames_equal_block_causal():
    layer = decoder()
    x = torch.randn(2, 36, 32, dtype=torch.float64)
    state = f64_state(layer, 2)
    frames = torch.cat([layer.step(x[:, t:t + 6], state) for t in range(0, 36, 6)], 1)
    assert_close(frames, layer(x, mask="causal", block_size=6), torch.float64, "frames")


@pytest.mark.parametrize("as_dict", [False, True])
def test_unequal_chunks_weight_tokens_equally(as_dict):
    """Chunks of 7, 3, 1 and 5 tokens: the last token of each chunk sees the causal mean of all tokens so far."""
    layer = decoder()
    x = torch.randn(2, 16, 32, dtype=torch.float64)
    full = layer(x, mask="causal")
    state = {"h": 0.0, "n": 0} if as_dict else PoMState.allocate(2, 64, dtype=torch.float64)
    ends, start = [], 0
    for size in (7, 3, 1, 5):
        out, state = layer.state_forward(x[:, start:start + size], state=state)
        start += size
        ends.append(start)
        assert rel_err(out[:, -1], full[:, start - 1]) < 1e-10
    if as_dict:
        assert isinstance(state, dict) and state["n"].tolist() == [16, 16]
    else:
        assert state.count.tolist() == [16, 16]


def test_state_forward_chunk_sees_whole_chunk():
    layer = decoder()
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    out, _ = layer.state_forward(x)
    assert_close(out, layer(x), torch.float64, "one chunk == non-causal")


def test_state_gradients():
    """Autograd through state_forward reaches the inputs, the parameters and the incoming state."""
    layer = make_layer(8, 2, 1, 2, False)
    x1 = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    x2 = torch.randn(2, 4, 8, dtype=torch.float64, requires_grad=True)
    s0 = torch.randn(2, 16, dtype=torch.float64, requires_grad=True)
    n0 = torch.tensor([2, 0])

    def run(x1, x2, s0):
        o1, st = layer.state_forward(x1, state=PoMState(s0, n0))
        o2, st = layer.state_forward(x2, state=st)
        return o1, o2, st.sum

    assert torch.autograd.gradcheck(run, (x1, x2, s0))


def test_step_with_grad_keeps_graph():
    layer = decoder()
    x = torch.randn(2, 5, 32, dtype=torch.float64, requires_grad=True)
    state = f64_state(layer, 2)
    outs = [layer.step(x[:, t:t + 1], state) for t in range(5)]
    torch.cat(outs, 1).sum().backward()
    ref = x.detach().clone().requires_grad_()
    layer(ref, mask="causal").sum().backward()
    assert_close(x.grad, ref.grad, torch.float64, "step gradient")


def test_step_updates_preallocated_state_in_place():
    layer = decoder(dtype=torch.float32)
    state = layer.allocate_state(4)
    ptrs = (state.sum.data_ptr(), state.count.data_ptr())
    with torch.no_grad():
        for _ in range(3):
            layer.step(torch.randn(4, 1, 32), state)
    assert (state.sum.data_ptr(), state.count.data_ptr()) == ptrs
    assert state.count.tolist() == [3, 3, 3, 3]
    ref = PoMState.from_reference(state.to_reference(), 4, 64)
    assert torch.allclose(ref.sum, state.sum, rtol=1e-6, atol=1e-6)


# ---- parameters and compatibility ----

@pytest.mark.parametrize("n_groups,n_sel_heads,bias", [(1, 1, False), (1, 4, True), (2, 0, True), (4, 8, False)])
def test_parameter_names_and_shapes(n_groups, n_sel_heads, bias):
    D, K, x = 32, 3, 2
    E = D * x
    S = n_sel_heads if n_sel_heads > 1 else E
    expected = {"po_coeff": (E, K), "ag_proj.weight": (D, E)}
    if n_groups == 1:
        expected.update({"qc_proj.weight": (E + S, D), "se_bias": (S,)})
    else:
        expected.update({"po_proj.weight": (E, D // n_groups, 1), "se_proj.weight": (S, D), "se_proj.bias": (S,)})
        if bias:
            expected["po_proj.bias"] = (E,)
    if bias:
        expected["ag_proj.bias"] = (D,)
    layer = PoM(D, K, x, n_groups=n_groups, n_sel_heads=n_sel_heads, bias=bias)
    assert {k: tuple(v.shape) for k, v in layer.state_dict().items()} == expected
    assert layer.po_coeff.abs().max() <= 1e-3
    if n_groups == 1:
        assert torch.equal(layer.se_bias, torch.zeros(S))
    PoM(D, K, x, n_groups=n_groups, n_sel_heads=n_sel_heads, bias=bias).load_state_dict(layer.state_dict())


@pytest.mark.skipif(importlib.util.find_spec("pom") is None, reason="the reference package `pom` is not installed")
@pytest.mark.parametrize("n_groups,n_sel_heads,bias", [(1, 1, False), (1, 4, True), (2, 0, True)])
def test_reference_state_dicts_load_both_ways(n_groups, n_sel_heads, bias):
    import pom

    ref = pom.PoM(32, 3, 2, n_groups, n_sel_heads, bias).double()
    ours = PoM(32, 3, 2, n_groups=n_groups, n_sel_heads=n_sel_heads, bias=bias).double()
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 11, 32, dtype=torch.float64)
    for mask in (None, "causal"):
        assert_close(ours(x, mask=mask), ref(x, mask=mask), torch.float64, f"vs pom.PoM {mask}")


def test_compile_fullgraph():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = PoM(16, 3, 2, n_sel_heads=4)
            self.b = PoM(16, 2, 2)

        def forward(self, x, w):
            return self.b(self.a(x, mask="causal") + x, mask=w)

    torch._dynamo.reset()
    net = Net()
    x = torch.randn(2, 12, 16, requires_grad=True)
    w = torch.rand(2, 12)
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    out = compiled(x, w)
    assert torch.allclose(out, net(x, w), rtol=1e-5, atol=1e-6)
    out.sum().backward()
    g = x.grad.clone()
    x.grad = None
    net(x, w).sum().backward()
    assert torch.allclose(g, x.grad, rtol=1e-5, atol=1e-6)


# ---- bad arguments ----

def _raises(fn, arg):
    with pytest.raises(ValueError) as info:
        fn()
    assert f"'{arg}'" in str(info.value), str(info.value)


def test_constructor_errors():
    _raises(lambda: PoM(32, 0, 2), "degree")
    _raises(lambda: PoM(32, 2.5, 2), "degree")
    _raises(lambda: PoM(32, True, 2), "degree")
    _raises(lambda: PoM(0, 3, 2), "dim")
    _raises(lambda: PoM(32, 3, 0), "expand")
    _raises(lambda: PoM(30, 3, 2, n_groups=4), "dim")
    _raises(lambda: PoM(32, 3, 2, n_sel_heads=5), "n_sel_heads")
    _raises(lambda: PoM(32, 3, 2, n_sel_heads=-1), "n_sel_heads")


def test_forward_errors():
    layer = PoM(16, 3, 2)
    x = torch.randn(2, 7, 16)
    _raises(lambda: layer(x[0]), "xq")
    _raises(lambda: layer(torch.randn(2, 7, 15)), "xq")
    _raises(lambda: layer(x.long()), "xq")
    _raises(lambda: layer(x, torch.randn(3, 7, 16)), "xc")
    _raises(lambda: layer(x, torch.randn(2, 7, 8)), "xc")
    _raises(lambda: layer(x, torch.randn(2, 9, 16), mask="causal"), "xq")
    _raises(lambda: layer(x, mask="future"), "mask")
    _raises(lambda: layer(x, mask=torch.ones(2, 8, dtype=torch.bool)), "mask")
    _raises(lambda: layer(x, mask=torch.ones(2, 7, 9)), "mask")
    _raises(lambda: layer(x, block_size=3), "block_size")
    _raises(lambda: layer(x.reshape(14, 16), cu_seqlens=torch.tensor([0, 5, 15], dtype=torch.int32)), "cu_seqlens")
    _raises(lambda: layer(x, cu_seqlens=torch.tensor([0, 14], dtype=torch.int32)), "xq")
    _raises(lambda: layer.step(x, {"h": 0.0, "n": 0}), "state")
    _raises(lambda: layer.step(x, PoMState.allocate(3, 32)), "state_sum")
    _raises(lambda: layer.state_forward(x, state=PoMState.allocate(2, 31)), "state")
    _raises(lambda: layer.state_forward(x, state={"mean": 0}), "state")


# ---- token weights with causal masks (padding) ----

def _weighted_reference(layer, x, w, block_size):
    """ag_proj(select(s, H)) with H the float64 reference of the weighted block-causal prefix means."""
    h, s = layer.project(x)
    H = R.poly_causal_weighted(h, layer.po_coeff, w, block_size)
    return layer.ag_proj(R.select(s, H, layer.n_sel_heads))


@pytest.mark.parametrize("block_size", [None, 4])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"g{c[0]}h{c[1]}{'b' if c[2] else ''}")
def test_causal_weights_match_reference(config, block_size):
    layer = make_layer(16, 3, *config)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 21, 16, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, 21, generator=g, dtype=torch.float64)
    w[w < 0.3] = 0
    w[2, :6] = 0  # a prefix of zero weight reads 0
    got = layer(x, mask="causal", block_size=block_size, weight=w)
    want = _weighted_reference(layer, x, w, 1 if block_size is None else block_size)
    assert_close(got, want, torch.float64, "weighted causal layer")
    gy = torch.randn_like(got)
    params = [x] + list(layer.parameters())
    for a, b, name in zip(torch.autograd.grad(got, params, gy), torch.autograd.grad(want, params, gy),
                          ["x"] + [n for n, _ in layer.named_parameters()]):
        assert_close(a, b, torch.float64, f"weighted causal grad {name}")


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"g{c[0]}h{c[1]}{'b' if c[2] else ''}")
def test_left_padded_batch_rows_equal_rows_alone(config):
    """A left-padded batch with its (integer, 0 / 1) attention mask: every row's outputs and gradients are the
    ones it has alone; decoding on from the padded prompt's state continues each row exactly."""
    layer = make_layer(16, 3, *config)
    g = torch.Generator().manual_seed(6)
    lengths = [9, 4, 1]
    N = max(lengths)
    rows = [torch.randn(1, n, 16, generator=g, dtype=torch.float64) for n in lengths]
    x = torch.randn(3, N, 16, generator=g, dtype=torch.float64) * 50  # padding content must not matter
    mask = torch.zeros(3, N, dtype=torch.long)
    for b, (r, n) in enumerate(zip(rows, lengths)):
        x[b, N - n:] = r[0]
        mask[b, N - n:] = 1
    x.requires_grad_()
    out = layer(x, mask="causal", weight=mask)
    gys = [torch.randn(1, n, 16, generator=g, dtype=torch.float64) for n in lengths]
    gy = torch.zeros_like(out)
    for b, n in enumerate(lengths):
        gy[b, N - n:] = gys[b][0]
    (gx,) = torch.autograd.grad(out, x, gy)
    nxt = torch.randn(3, 2, 16, generator=g, dtype=torch.float64)
    state = f64_state(layer, 3)
    with torch.no_grad():
        layer.step(x.detach(), state, weight=mask)  # the prompt, T = N tokens in one chunk: the state after it
        cont = torch.cat([layer.step(nxt[:, t:t + 1], state) for t in range(2)], 1)
    assert state.count.tolist() == [n + 2 for n in lengths]
    for b, (r, n) in enumerate(zip(rows, lengths)):
        xa = r.clone().requires_grad_()
        alone = layer(xa, mask="causal")
        (ga,) = torch.autograd.grad(alone, xa, gys[b])
        assert_close(out[b, N - n:], alone[0], torch.float64, f"row {b}")
        assert_close(gx[b, N - n:], ga[0], torch.float64, f"row {b} gradient")
        assert torch.equal(gx[b, :N - n], torch.zeros(N - n, 16, dtype=torch.float64))
        full = layer(torch.cat([r, nxt[b:b + 1]], 1), mask="causal")
        assert_close(cont[b], full[0, n:], torch.float64, f"row {b} continued")


def test_weighted_state_equals_weighted_causal():
    """A weighted state (fractional weights, weight total as count): decoding token by token with the weights
    equals the weighted causal forward; chunks see the whole chunk as with plain states."""
    layer = decoder()
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 15, 32, generator=g, dtype=torch.float64)
    w = torch.rand(2, 15, generator=g, dtype=torch.float64)
    w[0, :3] = 0
    state = layer.allocate_state(2, weighted=True)
    assert state.count.dtype == torch.float64
    steps = torch.cat([layer.step(x[:, t:t + 1], state, weight=w[:, t:t + 1]) for t in range(15)], 1)
    assert_close(steps, layer(x, mask="causal", weight=w), torch.float64, "weighted decode")
    assert_close(state.count, w.sum(1), torch.float64, "weight total")
    out, st = layer.state_forward(x[:, :5], weight=w[:, :5], state=layer.allocate_state(2, weighted=True))
    assert_close(out, layer(x[:, :5], mask="causal", block_size=5, weight=w[:, :5]), torch.float64, "chunk")


def test_weight_errors_name_the_argument():
    layer = decoder()
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    _raises(lambda: layer(x, mask="causal", weight=torch.ones(2, 4)), "weight")
    _raises(lambda: layer(x, mask="causal", weight=torch.ones(2, 5, dtype=torch.complex64)), "weight")
    _raises(lambda: layer(x, mask=torch.ones(2, 5), weight=torch.ones(2, 5)), "weight")
    _raises(lambda: layer.step(x, layer.allocate_state(2), weight=torch.full((2, 5), 0.5, dtype=torch.float64)),
            "weight")
    _raises(lambda: layer.step(x, layer.allocate_state(2), weight=torch.ones(2, 4)), "weight")
    # mask=None with weights is the weighted mean
    w = torch.rand(2, 5, dtype=torch.float64)
    assert_close(layer(x, weight=w), layer(x, mask=w), torch.float64, "weighted mean")
