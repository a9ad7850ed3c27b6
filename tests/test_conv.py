"""causal_conv1d, the PoM block's causal depthwise convolution: against the float64 reference (torch's conv1d on
the left-padded, transposed input) for every dtype, CPU build and device, gradients, gradcheck, opcheck, strides,
determinism over thread counts, bad inputs, and the block that uses it."""
import pytest
import torch
import torch.nn.functional as F

import pom_ext
from pom_ext import ops, reference as R
from pom_ext.models import PolymorpherBlock

from conftest import DEVICES, DTYPES, assert_close

native = pytest.mark.skipif(not pom_ext.native_available(), reason="compiled kernels not built")

SHAPES = [(2, 17, 8, 4), (1, 3, 5, 4), (3, 1, 7, 2), (2, 33, 130, 1), (1, 6, 16, 9), (2, 64, 33, 3)]


def conv1d64(x, w, b):
    """The definition (pom_ext.reference: torch's conv1d on the left-padded, transposed input) in float64."""
    return R.causal_conv1d(x.double(), w.double(), None if b is None else b.double())


def inputs(B, T, D, K, dtype, device, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, D, generator=g, dtype=torch.float64).to(device, dtype)
    w = (torch.randn(D, K, generator=g, dtype=torch.float64) / K ** 0.5).to(device, dtype)
    b = torch.randn(D, generator=g, dtype=torch.float64).to(device, dtype) if bias else None
    return x, w, b


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_and_gradients(dtype, shape, bias, device):
    x, w, b = inputs(*shape, dtype, device, bias)
    leaves = [t.requires_grad_() for t in (x, w, b) if t is not None]
    y = ops.causal_conv1d(x, w, b)
    assert y.dtype == dtype and y.shape == x.shape and y.is_contiguous()
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    b64 = None if b is None else b.detach().double().requires_grad_()
    want = conv1d64(x64, w64, b64)
    assert_close(y.double().cpu(), want.cpu(), dtype, "forward")
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = torch.autograd.grad(y, leaves, gy.to(device, dtype))
    ref = torch.autograd.grad(want, [t for t in (x64, w64, b64) if t is not None], gy.to(device))
    for name, a, r in zip(("x", "weight", "bias"), got, ref):
        assert a.dtype == dtype
        assert_close(a.double().cpu(), r.cpu(), dtype, f"gradient of {name}")


@native
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_cpu_isas(cpu_isa, dtype):
    x, w, b = inputs(2, 40, 37, 4, dtype, "cpu")
    leaves = [t.requires_grad_() for t in (x, w, b)]
    y = ops.causal_conv1d(x, w, b)
    assert_close(y.double(), conv1d64(x, w, b), dtype, f"forward ({cpu_isa})")
    gy = torch.randn_like(y)
    got = torch.autograd.grad(y, leaves, gy)
    ref = torch.autograd.grad(conv1d64(*leaves), leaves, gy.double())
    for a, r in zip(got, ref):
        assert_close(a.double(), r.double(), dtype, f"gradients ({cpu_isa})")


def test_weights_of_another_dtype():
    """bf16 activations with float32 taps (autocast-style): computed in float32, each gradient in its own dtype."""
    x, _, _ = inputs(2, 21, 12, 4, torch.bfloat16, "cpu")
    _, w, b = inputs(2, 21, 12, 4, torch.float32, "cpu")
    leaves = [t.requires_grad_() for t in (x, w, b)]
    y = ops.causal_conv1d(x, w, b)
    assert y.dtype == torch.bfloat16
    assert_close(y.double(), conv1d64(x, w, b), torch.bfloat16, "forward")
    gx, gw, gb = torch.autograd.grad(y.float().sum(), leaves)
    assert (gx.dtype, gw.dtype, gb.dtype) == (torch.bfloat16, torch.float32, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_inside_autocast(device):
    """Called in an autocast region the op computes in x's dtype (its declared output dtype), as outside."""
    x, w, b = inputs(2, 13, 8, 4, torch.float32, device)
    want = ops.causal_conv1d(x, w, b)
    low = torch.bfloat16 if device == "cpu" else torch.float16
    with torch.autocast(device_type=device, dtype=low):
        y = ops.causal_conv1d(x, w, b)
    assert y.dtype == torch.float32
    assert_close(y.double(), want.double(), torch.float32, "under autocast")


def test_gradcheck():
    x, w, b = inputs(2, 7, 5, 4, torch.float64, "cpu")
    assert torch.autograd.gradcheck(ops.causal_conv1d, (x.requires_grad_(), w.requires_grad_(), b.requires_grad_()))
    assert torch.autograd.gradcheck(lambda x, w: ops.causal_conv1d(x, w), (x, w))


@native
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    x, w, b = inputs(2, 9, 6, 3, torch.float64, device)
    o = torch.ops.pom_ext
    for args in ((x.requires_grad_(), w.requires_grad_(), b.requires_grad_()), (x, w, None)):
        torch.library.opcheck(o.causal_conv1d, args)
    g = torch.randn_like(x)
    for bias in (b.detach(), None):
        torch.library.opcheck(o.causal_conv1d_backward, (g, x.detach(), w.detach(), bias))


@native
def test_double_backward_is_a_clear_error():
    x, w, b = inputs(1, 5, 3, 2, torch.float64, "cpu")
    x.requires_grad_()
    (g,) = torch.autograd.grad(ops.causal_conv1d(x, w, b).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="causal_conv1d_backward: double backward"):
        g.sum().backward()


@pytest.mark.parametrize("layout", ["transposed", "sliced", "channel_stride"])
def test_strided_inputs(layout):
    x, w, b = inputs(3, 19, 10, 4, torch.float32, "cpu")
    if layout == "transposed":  # (B, T, D) view of a (B, D, T) tensor: channels 19 apart
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    elif layout == "sliced":  # every other row, a slice of the channels
        x = torch.randn(3, 38, 14)[:, ::2, 2:12]
    else:
        x = torch.randn(3, 19, 20)[..., ::2]
    w = w.t().contiguous().t()  # taps transposed in memory
    leaves = [t.requires_grad_() for t in (x, w, b)]
    y = ops.causal_conv1d(x, w, b)
    assert_close(y.double(), conv1d64(x, w, b), torch.float32, layout)
    gy = torch.randn(y.shape).transpose(0, 1).contiguous().transpose(0, 1)  # a strided gradient as well
    got = torch.autograd.grad(y, leaves, gy)
    ref = torch.autograd.grad(conv1d64(*leaves), leaves, gy.double())
    for a, r in zip(got, ref):
        assert_close(a.double(), r, torch.float32, f"{layout} gradients")


@native
def test_gradients_do_not_depend_on_threads(threads):
    """The weight and bias gradients are sums over fixed chunks of rows, added in order: the same bits on one
    thread and on several."""
    x, w, b = inputs(4, 700, 24, 4, torch.float32, "cpu")
    leaves = [t.requires_grad_() for t in (x, w, b)]
    gy = torch.randn(4, 700, 24)
    out = []
    for n in (1, max(2, torch.get_num_threads())):
        threads(n)
        out.append([ops.causal_conv1d(x, w, b)] + list(torch.autograd.grad(ops.causal_conv1d(x, w, b), leaves, gy)))
    for a, c in zip(*out):
        assert torch.equal(a, c)


def test_empty_inputs():
    for shape in ((0, 5, 4), (2, 0, 4), (2, 5, 0)):
        x = torch.randn(shape, requires_grad=True)
        w = torch.randn(shape[2], 3, requires_grad=True)
        b = torch.randn(shape[2], requires_grad=True)
        y = ops.causal_conv1d(x, w, b)
        assert y.shape == x.shape
        gx, gw, gb = torch.autograd.grad(y.sum(), (x, w, b), allow_unused=True)
        assert gx.shape == x.shape and torch.all(gw == 0) and torch.all(gb == 0)


@native
@pytest.mark.parametrize("case,needles", [
    (lambda x, w, b: (x[0], w, b), ["'x'", "3-D"]),
    (lambda x, w, b: (x.long(), w, b), ["'x'", "float32"]),
    (lambda x, w, b: (x, w[:3], b), ["'weight'", "channels D"]),
    (lambda x, w, b: (x, w[:, :0], b), ["'weight'", "K >= 1"]),
    (lambda x, w, b: (x, w.unsqueeze(1), b), ["'weight'", "2-D"]),
    (lambda x, w, b: (x, w.int(), b), ["'weight'", "float32"]),
    (lambda x, w, b: (x, w, b[:2]), ["'bias'", "channels D"]),
    (lambda x, w, b: (x, w, b.to("meta")), ["'bias'", "meta"]),
], ids=["x_rank", "x_dtype", "weight_width", "weight_taps", "weight_rank", "weight_dtype", "bias_width", "bias_device"])
def test_bad_inputs(case, needles):
    x, w, b = inputs(2, 5, 4, 3, torch.float32, "cpu")
    with pytest.raises(RuntimeError) as e:
        torch.ops.pom_ext.causal_conv1d(*case(x, w, b))
    msg = str(e.value)
    assert "causal_conv1d" in msg and all(n in msg for n in needles), msg


@native
def test_bad_gradient_shape():
    x, w, b = inputs(2, 5, 4, 3, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="causal_conv1d_backward: argument 'grad_y' must have the shape"):
        torch.ops.pom_ext.causal_conv1d_backward(torch.randn(2, 6, 4), x, w, b)


@pytest.mark.parametrize("conv_size", [2, 4])
def test_block_convolution_is_its_conv1d(conv_size):
    """PolymorpherBlock runs its nn.Conv1d's parameters through the op: the same values and gradients as the module
    on the transposed, left-padded input (what the block computed before the op), and decoding (which still runs
    the module on its cache) matches the parallel forward."""
    torch.manual_seed(0)
    blk = PolymorpherBlock(16, conv_size=conv_size).double()
    u = torch.randn(2, 11, 16, dtype=torch.float64, requires_grad=True)
    y = blk._conv(u)
    want = blk.conv(F.pad(u.transpose(1, 2), (conv_size - 1, 0))).transpose(1, 2)
    assert_close(y, want, torch.float64, "block convolution")
    params = [u, blk.conv.weight, blk.conv.bias]
    for a, r in zip(torch.autograd.grad(y.sum(), params), torch.autograd.grad(want.sum(), params)):
        assert_close(a, r, torch.float64, "block convolution gradients")
    x = torch.randn(2, 11, 16, dtype=torch.float64)
    full = blk(x, mask="causal")
    cache = blk.allocate_cache(2)
    steps = torch.cat([blk.step(x[:, t:t + 1], cache) for t in range(11)], dim=1)
    assert (steps - full).abs().max().item() < 1e-12
