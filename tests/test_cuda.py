"""CUDA kernels against the float64 CPU reference: every op forward and backward, odd shapes, strides,
varlen with empty sequences, long sequences, determinism, CUDA-graph capture of the decode step, opcheck.

Collected everywhere; skipped without a GPU or without CUDA kernels in the build."""
import pytest
import torch

from pom_ext import ops, reference as R

from conftest import NEEDS_CUDA, TOL, rel_err

pytestmark = NEEDS_CUDA

DEVICES = ["cuda"]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
FWD_MODES = ["eval", "mean", "weighted", "bool", "causal", "block4", "block7", "varlen_mean", "varlen_weighted",
             "varlen_causal1", "varlen_causal4", "state", "wcausal1", "wcausal5", "wpad1", "wpad4",
             "varlen_wcausal1", "varlen_wcausal4"]
BWD_MODES = [m for m in FWD_MODES if m != "bool"]


def weighted_causal(mode):
    """(block size, packed, padding) of a poly_causal_weighted mode ("wcausalF": float weights, "wpadF": a bool
    left-padding mask, "varlen_wcausalF": packed), or None for the other ops."""
    for prefix, packed, pad in (("varlen_wcausal", True, False), ("wcausal", False, False), ("wpad", False, True)):
        if mode.startswith(prefix):
            return int(mode[len(prefix):]), packed, pad
    return None


def check(a, b, dtype, what):
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    err = rel_err(a, b)
    assert err < TOL[dtype], f"{what}: relative error {err:.3e} >= {TOL[dtype]:.0e} ({dtype})"


def offsets(total, dtype):
    """Packed offsets over `total` rows with an empty sequence first and a one-row sequence."""
    cuts = sorted({0, min(1, total), total // 3, total})
    return torch.tensor([0, 0] + cuts[1:], dtype=dtype)


class Case:
    """Inputs of one mode, as float64 CPU tensors (the reference's view, h rounded to `dtype`)
    and as device tensors of the tested dtypes."""

    def __init__(self, mode, B, N, E, K, dtype, device, seed=0, coeff_dtype=torch.float64, cu_dtype=torch.int32,
                 h_view=None):
        g = torch.Generator().manual_seed(seed)
        self.mode, self.dtype = mode, dtype
        h = torch.randn(B, N, E, generator=g, dtype=torch.float64) * 3
        scale = torch.tensor([3.0 ** -(k + 1) for k in range(K)], dtype=torch.float64)
        c = torch.randn(E, K, generator=g, dtype=torch.float64) * scale
        self.h_dev = h.to(dtype).to(device)
        if h_view is not None:
            self.h_dev = h_view(self.h_dev)
        self.h_ref = h.to(dtype).double()
        self.c_dev = c.to(coeff_dtype).to(device)
        self.c_ref = c.to(coeff_dtype).double()
        self.aux_ref, self.aux_dev = {}, {}
        if mode in ("weighted", "varlen_weighted"):
            w = torch.rand(B, N, generator=g, dtype=torch.float64)
            if mode == "varlen_weighted":
                w = w.reshape(-1)
            self.aux_ref["w"], self.aux_dev["w"] = w, w.to(device)
        if mode == "bool":
            w = torch.rand(B, N, generator=g) > 0.4
            self.aux_ref["w"], self.aux_dev["w"] = w, w.to(device)
        wc = weighted_causal(mode)
        if wc is not None:
            if wc[2]:  # row b is left-padded by 3 b tokens (all of it when N <= 3 b)
                w = torch.arange(N).expand(B, N) >= 3 * torch.arange(B).unsqueeze(1)
            else:  # float weights, some exactly 0 (an empty prefix where the first ones are)
                w = torch.rand(B, N, generator=g, dtype=torch.float64) * (torch.rand(B, N, generator=g) > 0.2)
                w = w.reshape(-1) if wc[1] else w
            self.aux_ref["w"], self.aux_dev["w"] = w, w.to(device)
        if mode.startswith("varlen"):
            cu = offsets(B * N, cu_dtype)
            self.aux_ref["cu"], self.aux_dev["cu"] = cu, cu.to(device)
        if mode == "state":
            s = torch.randn(B, E, generator=g, dtype=torch.float64)
            n = torch.randint(0, 50, (B,), generator=g)
            self.aux_ref.update(s=s, n=n)
            self.aux_dev.update(s=s.to(device), n=n.to(device))

    def inputs(self, ref, requires_grad=False, cpu=False):
        h = self.h_ref if ref else self.h_dev
        c = self.c_ref if ref else self.c_dev
        aux = dict(self.aux_ref if ref else self.aux_dev)
        h, c = h.detach(), c.detach()
        if cpu:
            h, c = h.cpu(), c.cpu()
            aux = {k: v.cpu() for k, v in aux.items()}
        if requires_grad:
            h.requires_grad_()
            c.requires_grad_()
            for k in ("w", "s"):
                if k in aux and aux[k].is_floating_point():
                    aux[k] = aux[k].detach().requires_grad_()
        return h, c, aux

    def run(self, impl, h, c, aux):
        m = self.mode
        E = h.shape[-1]
        if m == "eval":
            return [impl.poly_eval(h, c)]
        if m == "mean":
            return [impl.poly_mean(h, c)]
        if m in ("weighted", "bool"):
            return [impl.poly_mean(h, c, aux["w"])]
        if m == "causal":
            return [impl.poly_causal(h, c, 1)]
        if m.startswith("block"):
            return [impl.poly_causal(h, c, int(m[5:]))]
        if m == "varlen_mean":
            return [impl.poly_mean(h.reshape(-1, E), c, None, aux["cu"])]
        if m == "varlen_weighted":
            return [impl.poly_mean(h.reshape(-1, E), c, aux["w"], aux["cu"])]
        if m.startswith("varlen_causal"):
            return [impl.poly_causal(h.reshape(-1, E), c, int(m[len("varlen_causal"):]), aux["cu"])]
        if m == "state":
            return list(impl.poly_state_update(h, c, aux["s"], aux["n"]))
        wc = weighted_causal(m)
        if wc is not None:
            F, packed, _ = wc
            if packed:
                return [impl.poly_causal_weighted(h.reshape(-1, E), c, aux["w"], F, aux["cu"])]
            return [impl.poly_causal_weighted(h, c, aux["w"], F)]
        raise AssertionError(m)


def check_forward(case):
    ref = case.run(R, *case.inputs(True))
    got = case.run(ops, *case.inputs(False))
    for i, (a, b) in enumerate(zip(got, ref)):
        assert a.device.type == "cuda"
        if not b.is_floating_point():
            assert torch.equal(a.cpu(), b), f"{case.mode}: output {i}"
            continue
        if i == 0:
            assert a.dtype == case.dtype, f"{case.mode}: output dtype {a.dtype}"
        check(a, b, case.dtype, f"{case.mode} output {i}")


def grads_of(case, impl, ref, cpu=False):
    h, c, aux = case.inputs(ref, requires_grad=True, cpu=cpu)
    outs = case.run(impl, h, c, aux)
    gen = torch.Generator().manual_seed(1)
    pairs = []
    for o in outs:
        if o.is_floating_point():
            seed = torch.randn(o.shape, generator=gen, dtype=torch.float64)
            pairs.append((o, seed.to(o.device, o.dtype)))
    diff = [h, c] + [aux[k] for k in ("w", "s") if k in aux and aux[k].requires_grad]
    got = torch.autograd.grad([o for o, _ in pairs], diff, [s for _, s in pairs], allow_unused=True)
    return diff, got


def check_backward(case):
    _, ref = grads_of(case, R, True)
    diff, got = grads_of(case, ops, False)
    if "w" in case.aux_dev and case.dtype in (torch.bfloat16, torch.float16) and len(ref) > 2:
        # grad_w = <gbar, p_n> - <gbar, H> cancels, and H is the rounded output: in 16-bit dtypes it is
        # checked against the CPU kernels in the same dtype (the same function) instead of float64.
        ref = ref[:2] + grads_of(case, ops, False, cpu=True)[1][2:]
    names = ["h", "coeff", "aux"]
    for i, (a, b) in enumerate(zip(got, ref)):
        if b is None:
            continue
        assert a is not None, f"{case.mode}: no gradient for {names[min(i, 2)]}"
        assert a.dtype == diff[i].dtype and a.device == diff[i].device
        if i >= 2 and b.double().norm().item() < 1e-9:
            # grad_w is exactly 0 for a one-token sequence: only rounding noise is left to compare.
            assert a.double().norm().item() < 1e-3, f"{case.mode}: grad aux should vanish"
            continue
        check(a, b, case.dtype, f"{case.mode} grad {names[min(i, 2)]}")


# ---- every op, every dtype, degrees (fixed and generic), odd shapes ----

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("K", [1, 2, 3, 4, 6])
@pytest.mark.parametrize("mode", FWD_MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_degrees(dtype, mode, K, device):
    check_forward(Case(mode, 2, 63, 48, K, dtype, device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B,N,E", [(3, 1, 48), (2, 63, 96), (2, 129, 48), (1, 129, 4100), (3, 5, 7)])
@pytest.mark.parametrize("mode", FWD_MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_shapes(dtype, mode, B, N, E, device):
    check_forward(Case(mode, B, N, E, 3, dtype, device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("K", [1, 2, 3, 4, 6])
@pytest.mark.parametrize("mode", BWD_MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_degrees(dtype, mode, K, device):
    check_backward(Case(mode, 2, 63, 48, K, dtype, device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B,N,E", [(3, 1, 48), (2, 129, 96), (1, 63, 4100), (3, 5, 7)])
@pytest.mark.parametrize("mode", BWD_MODES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_backward_shapes(dtype, mode, B, N, E, device):
    check_backward(Case(mode, B, N, E, 3, dtype, device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["eval", "mean", "causal", "block7", "state"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_coeff_in_h_dtype(dtype, mode, device):
    """Coefficients in h's low-precision dtype (not only float64)."""
    case = Case(mode, 2, 63, 96, 3, dtype, device, coeff_dtype=dtype)
    check_forward(case)
    check_backward(case)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cu_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("mode", ["varlen_mean", "varlen_weighted", "varlen_causal1", "varlen_causal4",
                                  "varlen_causal7"])
def test_varlen_offsets(mode, cu_dtype, device):
    """cu_seqlens in int32 and int64, with an empty and a one-token sequence."""
    case = Case(mode, 3, 257, 96, 3, torch.float32, device, cu_dtype=cu_dtype)
    check_forward(case)
    check_backward(case)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("F", [1, 4, 7])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_block_sizes(dtype, F, device):
    case = Case(f"block{F}", 2, 1000, 40, 3, dtype, device)
    check_forward(case)
    check_backward(case)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("F", [100, 256, 999, 1000, 4096])
@pytest.mark.parametrize("mode", ["block", "varlen_block", "wblock", "varlen_wblock", "wpad"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_large_block_sizes(dtype, mode, F, device):
    """Blocks larger than the rows a chunk holds (csrc/cuda/plan.h: split blocks, several chunks a block), dense
    and packed, weighted or not, the last block short; the grid stays full where whole-block chunks would collapse
    it."""
    name = {"block": f"block{F}", "varlen_block": f"varlen_causal{F}", "wblock": f"wcausal{F}",
            "varlen_wblock": f"varlen_wcausal{F}", "wpad": f"wpad{F}"}[mode]
    case = Case(name, 2, 2500, 40, 3, dtype, device)
    check_forward(case)
    check_backward(case)


# ---- strided inputs: no copies, vector loads only where valid ----

VIEWS = {
    # a slice of a wider last dim, start aligned to 16 bytes for float32 (vector path, row stride E + 8)
    "slice_aligned": lambda h: torch.cat([h.new_zeros(*h.shape[:-1], 4), h, h.new_zeros(*h.shape[:-1], 4)], -1)[..., 4:4 + h.shape[-1]],
    # a slice starting at an odd element (scalar path)
    "slice_odd": lambda h: torch.cat([h.new_zeros(*h.shape[:-1], 3), h, h.new_zeros(*h.shape[:-1], 5)], -1)[..., 3:3 + h.shape[-1]],
    # channels not contiguous
    "transposed": lambda h: h.transpose(1, 2).contiguous().transpose(1, 2),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("view", list(VIEWS))
@pytest.mark.parametrize("mode", ["eval", "mean", "weighted", "causal", "block4", "state"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_strided_inputs(dtype, mode, view, device):
    case = Case(mode, 2, 63, 48, 3, dtype, device, h_view=VIEWS[view])
    assert not case.h_dev.is_contiguous()
    check_forward(case)
    check_backward(case)


@pytest.mark.parametrize("device", DEVICES)
def test_expanded_gradient(device):
    """An expanded (stride 0) upstream gradient, as autograd produces for broadcasts."""
    h = torch.randn(2, 50, 24, dtype=torch.float64, requires_grad=True)
    c = torch.randn(24, 3, dtype=torch.float64, requires_grad=True)
    gH = torch.randn(1, 1, 24, dtype=torch.float64)
    ref = torch.autograd.grad(R.poly_causal(h, c, 3), (h, c), gH.expand(2, 50, 24))
    hd, cd = h.detach().to(device).requires_grad_(), c.detach().to(device).requires_grad_()
    got = torch.autograd.grad(ops.poly_causal(hd, cd, 3), (hd, cd), gH.to(device).expand(2, 50, 24))
    for a, b in zip(got, ref):
        check(a, b, torch.float64, "expanded grad")


# ---- long sequences: the sequence is split across blocks ----

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("F", [1, 7])
def test_long_causal_b1(F, device):
    """B = 1, N = 65536: chunked scan with carries; sampled rows compared."""
    g = torch.Generator().manual_seed(11)
    N, E, K = 65536, 64, 3
    h = torch.randn(1, N, E, generator=g, dtype=torch.float64) * 3
    c = torch.randn(E, K, generator=g, dtype=torch.float64) * 0.1
    gH = torch.randn(1, N, E, generator=g, dtype=torch.float64)
    rows = torch.cat([torch.arange(0, 8), torch.randint(0, N, (256,), generator=g), torch.arange(N - 8, N)])
    hr, cr = h.float().double().requires_grad_(), c.clone().requires_grad_()
    ref = R.poly_causal(hr, cr, F)
    ref_gh, ref_gc = torch.autograd.grad(ref, (hr, cr), gH)
    hd = h.float().to(device).requires_grad_()
    cd = c.to(device).requires_grad_()
    out = ops.poly_causal(hd, cd, F)
    gh, gc = torch.autograd.grad(out, (hd, cd), gH.float().to(device))
    check(out[:, rows], ref[:, rows], torch.float32, "long causal rows")
    check(gh[:, rows], ref_gh[:, rows], torch.float32, "long causal grad_h rows")
    check(gc, ref_gc, torch.float32, "long causal grad_coeff")


@pytest.mark.parametrize("device", DEVICES)
def test_wide_state_and_mean(device):
    """E = 2048 over several channel tiles and many chunks; long state chunks take the two-stage path."""
    for mode in ("mean", "weighted", "state", "causal"):
        case = Case(mode, 1, 3000, 2048, 2, torch.float32, device, seed=4)
        check_forward(case)
        check_backward(case)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T", [0, 1, 5, 32, 33, 700])
@pytest.mark.parametrize("sum_dtype", [torch.float32, torch.float64], ids=str)
def test_state_chunk_lengths(T, sum_dtype, device):
    """Short chunks run in one kernel, long ones in two stages; float32 and float64 running sums."""
    g = torch.Generator().manual_seed(T)
    B, E = 3, 40
    h = torch.randn(B, T, E, generator=g, dtype=torch.float64)
    c = torch.randn(E, 3, generator=g, dtype=torch.float64)
    s = torch.randn(B, E, generator=g, dtype=torch.float64).to(sum_dtype)
    n = torch.tensor([0, 3, 1000])
    H_ref, s_ref, n_ref = R.poly_state_update(h.float().double(), c, s.double(), n)
    H, s_new, n_new = ops.poly_state_update(h.float().to(device), c.to(device), s.to(device), n.to(device))
    check(H, H_ref, torch.float32, "H")
    assert s_new.dtype == sum_dtype
    check(s_new, s_ref, torch.float32, "sum")
    assert torch.equal(n_new.cpu(), n_ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T", [1, 4, 100])
def test_state_step_in_place(T, device):
    g = torch.Generator().manual_seed(7)
    h = torch.randn(4, T, 12, generator=g).to(device)
    c = torch.randn(12, 3, generator=g).to(device)
    s = torch.randn(4, 12, generator=g).to(device)
    n = torch.tensor([0, 1, 7, 100], device=device)
    H_ref, s_ref, n_ref = ops.poly_state_update(h, c, s, n)
    s2, n2 = s.clone(), n.clone()
    ptr = s2.data_ptr()
    H = ops.poly_state_step_(h, c, s2, n2)
    assert torch.equal(H, H_ref) and torch.equal(s2, s_ref) and torch.equal(n2, n_ref)
    assert s2.data_ptr() == ptr


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("K", [3, 6])
def test_state_step_cuda_graph(K, device):
    """The decode step captured in a CUDA graph and replayed equals eager stepping."""
    g = torch.Generator().manual_seed(8)
    B, E = 3, 200
    h = torch.randn(B, 1, E, generator=g).to(device)
    c = (torch.randn(E, K, generator=g) * 0.1).to(device)
    s0 = torch.randn(B, E, generator=g).to(device)
    n0 = torch.tensor([0, 5, 17], device=device)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        ops.poly_state_step_(h, c, s0.clone(), n0.clone())
    torch.cuda.current_stream().wait_stream(side)
    s_g, n_g = s0.clone(), n0.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        H_g = ops.poly_state_step_(h, c, s_g, n_g)
    s_e, n_e = s0.clone(), n0.clone()
    for step in range(4):
        h.copy_(torch.randn(B, 1, E, generator=g).to(device))
        graph.replay()
        H_e = ops.poly_state_step_(h, c, s_e, n_e)
        torch.cuda.synchronize()
        assert torch.equal(H_g, H_e), f"step {step}: H"
        assert torch.equal(s_g, s_e), f"step {step}: state_sum"
        assert torch.equal(n_g, n_e), f"step {step}: count"
    assert torch.equal(n_e.cpu(), n0.cpu() + 4)


@pytest.mark.parametrize("device", DEVICES)
def test_decode_matches_causal(device):
    """Token-by-token stepping reproduces the causal forward."""
    g = torch.Generator().manual_seed(9)
    B, N, E = 2, 40, 24
    h = torch.randn(B, N, E, generator=g).to(device)
    c = (torch.randn(E, 3, generator=g) * 0.2).to(device)
    full = ops.poly_causal(h, c)
    s = torch.zeros(B, E, device=device)
    n = torch.zeros(B, dtype=torch.long, device=device)
    steps = torch.stack([ops.poly_state_step_(h[:, t:t + 1], c, s, n) for t in range(N)], 1)
    check(steps, full.double(), torch.float32, "decode vs causal")


@pytest.mark.parametrize("device", DEVICES)
def test_empty_inputs(device):
    c = torch.randn(5, 2, device=device)
    cu = torch.tensor([0, 0, 0], dtype=torch.int32, device=device)
    h = torch.randn(0, 5, device=device)
    assert torch.equal(ops.poly_mean(h, c, None, cu).cpu(), torch.zeros(2, 5))
    assert ops.poly_causal(h, c, 1, cu).shape == (0, 5)
    H, s, n = ops.poly_state_update(torch.randn(2, 0, 5, device=device), c, torch.zeros(2, 5, device=device),
                                    torch.zeros(2, dtype=torch.long, device=device))
    assert torch.equal(H.cpu(), torch.zeros(2, 5)) and torch.equal(n.cpu(), torch.zeros(2, dtype=torch.long))
    assert ops.poly_mean(torch.randn(2, 0, 5, device=device), c).abs().sum().item() == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_zero_weight_rows_give_zero(dtype, device):
    h = torch.randn(3, 10, 8, dtype=dtype, device=device, requires_grad=True)
    c = torch.randn(8, 2, dtype=dtype, device=device, requires_grad=True)
    w = torch.rand(3, 10, dtype=dtype, device=device)
    w[1] = 0
    H = ops.poly_mean(h, c, w)
    assert torch.equal(H[1].cpu(), torch.zeros(8, dtype=dtype)) and torch.isfinite(H).all()
    H.sum().backward()
    assert torch.isfinite(h.grad).all() and torch.equal(h.grad[1].cpu(), torch.zeros(10, 8, dtype=dtype))
    assert torch.isfinite(c.grad).all()


# ---- determinism ----

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["eval", "mean", "weighted", "causal", "block7", "varlen_causal4", "varlen_mean",
                                  "state", "wcausal1", "varlen_wcausal4"])
def test_bitwise_deterministic(mode, device):
    case = Case(mode, 2, 3000, 96, 3, torch.float32, device)

    def run():
        h, c, aux = case.inputs(False, requires_grad=True)
        outs = case.run(ops, h, c, aux)
        fl = [o for o in outs if o.is_floating_point()]
        diff = [h, c] + [aux[k] for k in ("w", "s") if k in aux and aux[k].requires_grad]
        grads = torch.autograd.grad(fl, diff, [torch.ones_like(o) for o in fl])
        return [o.detach() for o in outs] + list(grads)

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


# ---- opcheck ----

def opcheck_cases(device):
    g = torch.Generator().manual_seed(5)
    t = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(device).requires_grad_()
    h, c = t(2, 17, 8), t(8, 3)
    w = torch.rand(2, 17, generator=g, dtype=torch.float64).to(device).requires_grad_()
    hp = t(34, 8)
    cu = torch.tensor([0, 3, 3, 34], dtype=torch.int32, device=device)
    s = t(2, 8)
    n = torch.tensor([4, 0], device=device)
    o = torch.ops.pom_ext
    H = ops.poly_mean(h, c, w).detach()
    return [
        ("eval", o.poly_eval, (h, c)),
        ("eval_bwd", o.poly_eval_backward, (torch.randn_like(h), h, c)),
        ("mean", o.poly_mean, (h, c, None, None)),
        ("mean_weighted", o.poly_mean, (h, c, w, None)),
        ("mean_bool", o.poly_mean, (h, c, w.detach() > 0.5, None)),
        ("mean_varlen", o.poly_mean, (hp, c, None, cu)),
        ("mean_bwd", o.poly_mean_backward, (torch.randn(2, 8, dtype=torch.float64, device=device), H, h, c, w, None,
                                             True)),
        ("causal", o.poly_causal, (h, c, 1, None)),
        ("block", o.poly_causal, (h, c, 4, None)),
        ("causal_varlen", o.poly_causal, (hp, c, 2, cu)),
        ("causal_bwd", o.poly_causal_backward, (torch.randn_like(h), h, c, 3, None)),
        ("causal_weighted", o.poly_causal_weighted, (h, c, w, 1, None)),
        ("causal_weighted_varlen", o.poly_causal_weighted, (hp, c, w.reshape(-1), 4, cu)),
        ("causal_weighted_bwd", o.poly_causal_weighted_backward,
         (torch.randn_like(h), o.poly_causal_weighted(h, c, w, 3, None).detach(), h, c, w, 3, None, True)),
        ("state", o.poly_state_update, (h, c, s, n)),
        ("state_bwd", o.poly_state_update_backward, (torch.randn(2, 8, dtype=torch.float64, device=device),
                                                     torch.randn_like(s), h, c, n)),
        ("state_step", o.poly_state_step_, (h.detach(), c.detach(), s.detach().clone(), n.clone())),
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index", range(17))
def test_opcheck(index, device):
    name, op, args = opcheck_cases(device)[index]
    if name.endswith("_bwd"):
        args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(op, args)


def packed_call(op: str, h, c, cu, HB):
    """A call of op on the packed rows h (20 rows) with offsets cu (HB: the (B, E) gradient of the mean)."""
    o = torch.ops.pom_ext
    return {
        "mean": lambda: o.poly_mean(h, c, None, cu),
        "causal": lambda: o.poly_causal(h, c, 2, cu),
        "gated": lambda: o.poly_causal_gated(torch.cat([h, h], -1), c, None, 1, cu),
        "weighted": lambda: o.poly_causal_weighted(h, c, torch.ones(20, device="cuda"), 1, cu),
        "mean_backward": lambda: o.poly_mean_backward(HB, HB, h, c, None, cu, False),
        "causal_backward": lambda: o.poly_causal_backward(h, h, c, 1, cu),
    }[op]


@pytest.mark.parametrize("op", ["mean", "causal", "gated", "weighted", "mean_backward", "causal_backward"])
def test_bad_cu_seqlens_is_an_ordinary_error(op):
    """Offsets that do not start at 0, decrease, or end elsewhere than the number of rows raise an error naming
    cu_seqlens (checked on the host once per tensor), and the CUDA context stays usable afterwards."""
    h = torch.randn(20, 8, device="cuda")
    c = torch.randn(8, 2, device="cuda") * 0.3
    for values in ([1, 5, 20], [0, 9, 4, 20], [0, 5, 19]):
        cu = torch.tensor(values, dtype=torch.int32, device="cuda")
        HB = torch.zeros(len(values) - 1, 8, device="cuda")
        call = packed_call(op, h, c, cu, HB)
        with pytest.raises(RuntimeError, match="cu_seqlens"):
            call()
    good = torch.tensor([0, 5, 20], dtype=torch.int32, device="cuda")
    check(ops.poly_causal(h, c, 1, good).cpu(), R.poly_causal(h.cpu().double(), c.cpu().double(), 1, good.cpu()),
          torch.float32, "after the errors")
    # The validated tensor, changed in place, is validated again.
    good[1] = 30
    with pytest.raises(RuntimeError, match="cu_seqlens"):
        ops.poly_causal(h, c, 1, good)
    torch.cuda.synchronize()


@pytest.mark.parametrize("op", ["mean", "causal", "gated", "weighted", "mean_backward", "causal_backward"])
def test_offsets_changed_behind_the_cache_stay_in_bounds(op):
    """A write through `.data` does not move the version counter, so the host check (cached per tensor) does not
    see it; the kernels read the offsets made safe on the device (their running maximum, clamped to the rows), so
    the call stays in bounds: no fault at the synchronization, and the context usable afterwards (compute-sanitizer
    in benchmarks/gpu_check.sh sees every access)."""
    h = torch.randn(20, 8, device="cuda")
    c = torch.randn(8, 2, device="cuda") * 0.3
    cu = torch.tensor([0, 5, 20], dtype=torch.int32, device="cuda")
    HB = torch.zeros(2, 8, device="cuda")
    call = packed_call(op, h, c, cu, HB)
    call()  # validated, and kept as checked
    version = cu._version
    for bad in ([0, 50, 20], [0, -7, 20], [3, 1, 99], [0, 2 ** 30, -(2 ** 30)]):
        cu.data.copy_(torch.tensor(bad, dtype=torch.int32))
        assert cu._version == version  # unseen by the cache
        call()
        torch.cuda.synchronize()
    cu.data.copy_(torch.tensor([0, 5, 20], dtype=torch.int32))
    check(ops.poly_causal(h, c, 1, cu).cpu(), R.poly_causal(h.cpu().double(), c.cpu().double(), 1, cu.cpu()),
          torch.float32, "after the unseen writes")


def test_eval_more_channel_tiles_than_grid_y():
    """A row wider than 65535 channel tiles (E > 65535 * 512): the tiles continue in the grid's z."""
    E = 65535 * 512 + 520
    h = torch.randn(1, E, device="cuda", dtype=torch.bfloat16)
    c = torch.randn(E, 2, device="cuda") * 0.3
    hk = h.clone().requires_grad_()
    p = ops.poly_eval(hk, c)
    check(p.cpu(), R.poly_eval(h.cpu().double(), c.cpu().double()), torch.bfloat16, "forward")
    (gh,) = torch.autograd.grad(p, hk, torch.ones_like(p))
    hr = h.cpu().double().requires_grad_()
    (ghr,) = torch.autograd.grad(R.poly_eval(hr, c.cpu().double()), hr, torch.ones(1, E, dtype=torch.float64))
    check(gh.cpu(), ghr, torch.bfloat16, "backward")
