"""Tensors past 2^31 elements: every element offset must be 64-bit.

h is float16 (1, N, 16) with N * 16 = 2^31 + 304 (4 GiB; about 8.5 GiB peak with the output). Its rows
follow a pattern whose prefix means are known in closed form, so sampled positions (and every position
of the last rows and around element 2^31) are checked exactly, without a float64 copy of h.
On CPU, and on CUDA when the GPU and the CUDA kernels are there. Slow: run with --runslow or POM_EXT_SLOW=1.
"""
import resource
import time

import pytest
import torch

import pom_ext
from pom_ext import ops

from conftest import CPU_AND_CUDA

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not pom_ext.native_available(), reason="compiled kernels not built")]

E = 16
N = (1 << 27) + 19  # divisible by 3; N * E = 2^31 + 304
TAIL = 4096  # the last rows hold 4 + e / 8 instead of the pattern
CH = torch.arange(E, dtype=torch.float64) / 8  # channel e adds e / 8 to every row


def pattern_sum(m):
    """sum_{n < m} (n mod 3) for the pattern rows."""
    q, r = divmod(m, 3)
    return 3 * q + (1 if r == 2 else 0)


def expected_prefix_mean(t):
    """(E,) float64: mean of rows 0..t of h (act is the identity on [0, 6], coefficients (1, 0))."""
    head = N - TAIL
    s = pattern_sum(min(t + 1, head)) + 4.0 * max(0, t + 1 - head)
    return s / (t + 1) + CH


@pytest.fixture(scope="module")
def big_h():
    h = torch.empty(1, N, E, dtype=torch.float16)
    tile = (torch.arange(3, dtype=torch.float64)[:, None] + CH).to(torch.float16)
    h.view(N // 3, 3, E).copy_(tile.expand(N // 3, 3, E))
    h[0, N - TAIL:] = (4 + CH).to(torch.float16)
    assert h.numel() > 2 ** 31
    return h


def positions():
    g = torch.Generator().manual_seed(0)
    rnd = torch.randint(0, N, (2000,), generator=g).tolist()
    edge = (1 << 31) // E  # the row holding element 2^31
    return sorted(t for t in set(rnd + list(range(64)) + list(range(edge - 64, edge + 64)) + list(range(N - TAIL - 64, N)))
                  if t < N)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_causal_and_mean_past_2_31_elements(big_h, device):
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        if free < 10 * 2 ** 30:
            pytest.skip(f"needs about 10 GiB of free GPU memory, {free / 2 ** 30:.1f} GiB free")
        torch.cuda.reset_peak_memory_stats()
    h = big_h.to(device)  # on CUDA a copy: 4 GiB of device memory, 8.5 GiB with the output
    c = torch.zeros(E, 2, device=device)
    c[:, 0] = 1  # p = act(h) = h for h in [0, 6]
    out, t_causal = timed(lambda: ops.poly_causal(h, c), device)
    pos = positions()
    got = out[0, pos].double().cpu()
    exp = torch.stack([expected_prefix_mean(t) for t in pos])
    del out
    err = ((got - exp).abs() / exp.abs().clamp_min(1)).max().item()
    assert err < 2e-3, f"causal: worst relative error {err:.2e} (float16 output rounding is 4.9e-4)"
    H, t_mean = timed(lambda: ops.poly_mean(h, c), device)
    err = ((H[0].double().cpu() - expected_prefix_mean(N - 1)).abs() / expected_prefix_mean(N - 1)).max().item()
    assert err < 2e-3, f"mean: relative error {err:.2e}"
    p, t_eval = timed(lambda: ops.poly_eval(h, c), device)
    assert torch.equal(p[0, pos], h[0, pos]), "eval: p = h expected exactly"
    assert torch.equal(p[0, -TAIL:], h[0, -TAIL:])
    del p
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20 if device == "cpu"
            else torch.cuda.max_memory_allocated() / 2 ** 30)
    print(f"\nlarge ({device}): N*E = {N * E} elements; causal {t_causal:.1f}s, mean {t_mean:.1f}s, "
          f"eval {t_eval:.1f}s; peak {'RSS' if device == 'cpu' else 'allocated'} {peak:.2f} GiB")


def timed(fn, device):
    """(fn(), seconds it took, the device's queue drained)."""
    t0 = time.time()
    out = fn()
    if device != "cpu":
        torch.cuda.synchronize()
    return out, time.time() - t0
