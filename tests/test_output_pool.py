"""Large CPU op outputs come from a bounded pool of freed outputs (csrc/cpu/output_pool.cpp): a freed output is
reused, already mapped, by the next output of its size class; POM_EXT_CPU_POOL_MB=0 turns the pool off."""
import io
import os
import subprocess
import sys

import pytest
import torch

import pom_ext
from pom_ext import reference as R

from conftest import assert_close

native = pytest.mark.skipif(not pom_ext.native_available(), reason="compiled kernels not built")


def inputs(N=1024, E=384, seed=0):  # (2, 1024, 384) float32: 3 MiB, two 2-MiB classes
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, N, E, generator=g), torch.randn(E, 3, generator=g) * 0.1


@native
def test_freed_output_is_reused_and_fully_rewritten():
    h, c = inputs()
    first = torch.ops.pom_ext.poly_causal(h, c, 1, None)
    ptr = first.data_ptr()
    first.fill_(float("nan"))  # what the next user of the buffer finds in it
    del first
    h2, _ = inputs(seed=1)
    again = torch.ops.pom_ext.poly_causal(h2, c, 1, None)
    assert again.data_ptr() == ptr
    assert_close(again, R.poly_causal(h2.double(), c.double()), torch.float32, "reused output")


@native
def test_pooled_outputs_behave_like_tensors():
    h, c = inputs()
    h.requires_grad_()
    y = pom_ext.ops.poly_causal(h, c)
    y.backward(torch.ones_like(y))
    assert h.grad.is_contiguous() and h.grad.shape == h.shape
    h.grad.add_(1.0)  # in place, as optimizers do
    buf = io.BytesIO()
    torch.save(y.detach(), buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf), y.detach())
    assert not y.untyped_storage().resizable()  # pooled: a fixed buffer
    small = pom_ext.ops.poly_causal(h[:, :4].detach(), c)  # under 1 MiB: torch's allocator
    assert small.untyped_storage().resizable()


@native
def test_pool_off():
    code = ("import torch, pom_ext; h = torch.randn(2, 1024, 384); c = torch.randn(384, 3);"
            "y = torch.ops.pom_ext.poly_causal(h, c, 1, None); print(y.untyped_storage().resizable())")
    env = dict(os.environ, POM_EXT_CPU_POOL_MB="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
