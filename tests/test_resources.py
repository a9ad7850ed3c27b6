"""Determinism, thread safety and resource use.

Fast: two forward + backward runs are bitwise identical for every op and the layer at 1 and 2 threads (and
the layer on CUDA; the ops' CUDA determinism is in test_cuda.py); four Python threads calling the layer
concurrently get the sequential results.
Slow (--runslow or POM_EXT_SLOW=1): 10,000 training iterations and 100,000 decode steps with flat memory: RSS
on CPU, memory allocated by torch on CUDA.
"""
import gc
import os
import threading

import pytest
import torch

import pom_ext
from pom_ext import PoM, functional as PF, ops

from conftest import CPU_AND_CUDA, NEEDS_CUDA

pytestmark = pytest.mark.skipif(not pom_ext.native_available(), reason="compiled kernels not built")


def op_cases(N):
    """name -> (fn(h, c, w) -> outputs, packed): every op, B = 1 and long enough that the causal scan
    and the mean reductions are split across threads."""
    cu = torch.tensor([0, 5, 5, N // 2, N], dtype=torch.int32)
    s, n = torch.randn(1, 24, dtype=torch.float64), torch.tensor([17])
    return {
        "eval": (lambda h, c, w: [ops.poly_eval(h, c)], False),
        "mean": (lambda h, c, w: [ops.poly_mean(h, c)], False),
        "weighted": (lambda h, c, w: [ops.poly_mean(h, c, w)], False),
        "causal": (lambda h, c, w: [ops.poly_causal(h, c)], False),
        "block": (lambda h, c, w: [ops.poly_causal(h, c, 7)], False),
        "varlen_mean": (lambda h, c, w: [ops.poly_mean(h, c, None, cu)], True),
        "varlen_causal": (lambda h, c, w: [ops.poly_causal(h, c, 3, cu)], True),
        "masked": (lambda h, c, w: [PF.aggregate(h, c, (w[:, None, :] > 0.3).expand(1, 5, N))], False),
        "state": (lambda h, c, w: list(ops.poly_state_update(h, c, s.float().requires_grad_(), n)[:2]), False),
    }


def forward_backward(fn, packed, N, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(1, N, 24, generator=g) * 3).to(dtype)
    h = (h.reshape(N, 24) if packed else h).requires_grad_()
    c = (torch.randn(24, 3, generator=g) * 0.3).requires_grad_()
    w = torch.rand(1, N, generator=g, dtype=torch.float64).requires_grad_()
    outs = [o for o in fn(h, c, w) if o.is_floating_point()]
    seeds = [torch.randn(o.shape, generator=g).to(o.dtype) for o in outs]
    leaves = [h, c, w]
    grads = torch.autograd.grad(outs, leaves, seeds, allow_unused=True)
    return [o.detach() for o in outs] + [x for x in grads if x is not None]


@pytest.mark.parametrize("nthreads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(op_cases(8)))
def test_ops_bitwise_deterministic(threads, nthreads, dtype, case):
    threads(nthreads)
    N = 5000
    fn, packed = op_cases(N)[case]
    a = forward_backward(fn, packed, N, dtype)
    b = forward_backward(fn, packed, N, dtype)
    assert len(a) == len(b) and len(a) >= 2
    for i, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x, y), f"{case}: tensor {i} differs between two runs at {nthreads} threads"


def layer_run(layer, mask, x, seed=0):
    kw = {}
    if mask == "varlen_causal":
        kw["cu_seqlens"] = torch.tensor([0, 3, x.shape[0] * x.shape[1]], dtype=torch.int32, device=x.device)
        x = x.reshape(-1, x.shape[-1])
        mask = "causal"
    x = x.detach().requires_grad_()
    out = layer(x, mask=mask, **kw)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.device)
    grads = torch.autograd.grad(out, [x] + list(layer.parameters()), g)
    return [out.detach()] + list(grads)


@pytest.mark.parametrize("device,nthreads", [("cpu", 1), ("cpu", 2), pytest.param("cuda", 1, marks=NEEDS_CUDA)])
@pytest.mark.parametrize("mask", [None, "causal", "varlen_causal"])
def test_layer_bitwise_deterministic(threads, device, nthreads, mask):
    threads(nthreads)
    torch.manual_seed(0)
    layer = PoM(32, 4, 2, n_sel_heads=4, bias=True).to(device)
    x = torch.randn(2, 3000, 32).to(device)
    for a, b in zip(layer_run(layer, mask, x), layer_run(layer, mask, x)):
        assert torch.equal(a, b)


def test_concurrent_python_threads():
    """Four Python threads calling the layer (forward and backward) at once get the sequential results."""
    torch.manual_seed(0)
    layer = PoM(32, 3, 2, n_sel_heads=4)
    jobs = [(mask, torch.randn(2, 700 + 100 * i, 32, generator=torch.Generator().manual_seed(i)))
            for i, mask in enumerate([None, "causal", "varlen_causal", None, "causal", "varlen_causal", None, "causal"])]
    results = [None] * len(jobs)
    errors = []

    def worker(k):
        try:
            for j in range(k, len(jobs), 4):
                for _ in range(3):
                    results[j] = layer_run(layer, *jobs[j], seed=j)
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    # Sequential results in one extra Python thread, so the OpenMP thread count of the caller is the same.
    expected = [None] * len(jobs)
    t = threading.Thread(target=lambda: [expected.__setitem__(j, layer_run(layer, *jobs[j], seed=j))
                                         for j in range(len(jobs))])
    t.start()
    t.join()
    workers = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors, errors
    for j, (got, exp) in enumerate(zip(results, expected)):
        for a, b in zip(got, exp):
            assert torch.equal(a, b), f"job {j} ({jobs[j][0]}): concurrent result differs from sequential"


# ---- memory ----

def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def memory_mib(device):
    """The process's RSS on CPU; on CUDA, the device memory allocated through torch (after the queue drains)."""
    if device == "cpu":
        return rss_mib()
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated() / 2 ** 20


# Growth allowed after warm-up: RSS moves with the allocator's arenas; allocated CUDA memory should not move.
GROWTH_MIB = {"cpu": 8.0, "cuda": 1.0}


def measure(step, iters, warmup, device, checkpoints=5):
    """Memory (MiB) after `warmup` iterations and at `checkpoints` evenly spaced points until `iters`."""
    for _ in range(warmup):
        step()
    gc.collect()
    marks = [memory_mib(device)]
    per = (iters - warmup) // checkpoints
    for _ in range(checkpoints):
        for _ in range(per):
            step()
        gc.collect()
        marks.append(memory_mib(device))
    return marks


def assert_flat(marks, device):
    assert marks[-1] - marks[0] < GROWTH_MIB[device], marks
    assert not all(b > a + GROWTH_MIB[device] / 16 for a, b in zip(marks[1:], marks[2:])), \
        f"memory climbs steadily: {marks}"


@pytest.mark.slow
@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_training_iterations_flat_memory(device):
    """10,000 forward + backward + optimizer steps of a small layer (every mask kind in turn): memory flat after
    1,000 warm-up iterations (growth < 8 MiB of RSS on CPU, < 1 MiB allocated on CUDA, and no steady climb
    across the checkpoints)."""
    torch.manual_seed(0)
    layer = PoM(32, 4, 2, n_sel_heads=4, bias=True).to(device)
    opt = torch.optim.SGD(layer.parameters(), lr=1e-4)
    x = torch.randn(2, 64, 32).to(device)
    w = torch.rand(2, 64).to(device)
    cu = torch.tensor([0, 10, 10, 128], dtype=torch.int32, device=device)
    calls = [lambda: layer(x), lambda: layer(x, mask="causal"), lambda: layer(x, mask="causal", block_size=4),
             lambda: layer(x, mask=w), lambda: layer(x.reshape(128, 32), mask="causal", cu_seqlens=cu),
             lambda: layer(x, x[:, :9], mask=(w[:, None, :9] > 0.5).expand(2, 64, 9))]
    i = [0]

    def step():
        out = calls[i[0] % len(calls)]()
        i[0] += 1
        opt.zero_grad(set_to_none=True)
        out.square().mean().backward()
        opt.step()

    start = memory_mib(device)
    marks = measure(step, 10_000, 1_000, device)
    print(f"\ntraining ({device}): memory at start {start:.1f} MiB, after warm-up {marks[0]:.1f} MiB, checkpoints "
          f"{[round(m, 1) for m in marks[1:]]} MiB")
    assert_flat(marks, device)


@pytest.mark.slow
@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_decode_steps_flat_memory(device):
    """100,000 decode steps (in place, no autograd) of a small layer: memory flat after 10,000 warm-up steps."""
    torch.manual_seed(0)
    layer = PoM(32, 4, 2, n_sel_heads=4, bias=True).to(device)
    state = layer.allocate_state(2)
    x = torch.randn(2, 1, 32).to(device)

    def step():
        with torch.no_grad():
            layer.step(x, state)

    start = memory_mib(device)
    marks = measure(step, 100_000, 10_000, device)
    print(f"\ndecode ({device}): memory at start {start:.1f} MiB, after warm-up {marks[0]:.1f} MiB, checkpoints "
          f"{[round(m, 1) for m in marks[1:]]} MiB; count {int(state.count[0])}")
    assert int(state.count[0]) == 100_000
    assert torch.isfinite(state.sum).all()
    assert_flat(marks, device)
