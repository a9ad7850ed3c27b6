"""Graph capture of models with PoM layers: torch.export (eager-equal outputs), AOTInductor
on CPU, torch.compile(fullgraph=True), and TorchScript."""
import os
from typing import Optional

import pytest
import torch
import torch._inductor
import torch.nn as nn

import pom_ext
from conftest import assert_close
from pom_ext import functional as PF
from pom_ext.models import PolymorpherBlock


class Mixer(nn.Module):
    """Two pre-norm residual PoM blocks around a linear stem and head."""

    def __init__(self, dim=24, mask=None, n_groups=1, n_sel_heads=1):
        super().__init__()
        self.mask = mask
        self.stem = nn.Linear(dim, dim)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.pom1 = pom_ext.PoM(dim, 2, 2)
        self.pom2 = pom_ext.PoM(dim, 3, 2, n_groups=n_groups, n_sel_heads=n_sel_heads, bias=True)
        self.head = nn.Linear(dim, dim)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.pom1(self.norm1(x), mask=self.mask)
        x = x + self.pom2(self.norm2(x), mask=self.mask)
        return self.head(x)


def _model(mask, **kw):
    torch.manual_seed(0)
    m = Mixer(mask=mask, **kw).eval()
    with torch.no_grad():
        for layer in (m.pom1, m.pom2):
            layer.po_coeff.copy_(torch.randn_like(layer.po_coeff) * 0.5)
    return m


def _x(B=2, T=11, D=24):
    return torch.randn(B, T, D, generator=torch.Generator().manual_seed(1))


MASKS = [None, "causal"]


@pytest.mark.parametrize("mask", MASKS, ids=str)
@pytest.mark.parametrize("heads", [(1, 1), (2, 4)], ids=["g1G1", "g2G4"])
def test_export_matches_eager(mask, heads):
    m, x = _model(mask, n_groups=heads[0], n_sel_heads=heads[1]), _x()
    ep = torch.export.export(m, (x,))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert any("pom_ext" in t for t in targets), f"no pom_ext op in the exported graph: {sorted(targets)}"
    with torch.no_grad():
        assert_close(ep.module()(x), m(x), torch.float32, "exported program")
        x2 = _x(B=3)
        assert_close(ep.module()(x2[:2]), m(x2[:2]), torch.float32, "exported program, new input")


@pytest.mark.parametrize("mask", MASKS, ids=str)
def test_export_dynamic_batch(mask):
    m = _model(mask)
    batch = torch.export.Dim("batch", min=1, max=64)
    ep = torch.export.export(m, (_x(B=2),), dynamic_shapes={"x": {0: batch}})
    with torch.no_grad():
        for B in (1, 5):
            x = _x(B=B)
            assert_close(ep.module()(x), m(x), torch.float32, f"exported program, batch {B}")


@pytest.mark.parametrize("mask", MASKS, ids=str)
def test_export_backward(mask):
    """The exported (training) graph keeps the ops differentiable: gradients equal eager."""
    m, x = _model(mask), _x()
    ep = torch.export.export(m, (x,))
    g = torch.randn(2, 11, 24)
    mod = ep.module()
    mod(x).backward(g)
    m(x).backward(g)
    exported = dict(mod.named_parameters())
    for name, p in m.named_parameters():
        assert_close(exported[name].grad, p.grad, torch.float32, f"gradient of {name}")


@pytest.mark.skipif(not hasattr(torch._inductor, "aoti_compile_and_package"),
                    reason="AOTInductor packages (aoti_compile_and_package) need torch >= 2.6")
@pytest.mark.skipif(os.environ.get("POM_EXT_SKIP_AOTI") == "1", reason="POM_EXT_SKIP_AOTI=1")
@pytest.mark.parametrize("mask", MASKS, ids=str)
def test_aot_inductor_cpu(mask, tmp_path):
    from torch._inductor import aoti_compile_and_package, aoti_load_package

    m, x = _model(mask), _x()
    with torch.no_grad():
        ep = torch.export.export(m, (x,))
        path = aoti_compile_and_package(ep, package_path=str(tmp_path / f"pom_{mask}.pt2"))
        runner = aoti_load_package(path)
        assert_close(runner(x), m(x), torch.float32, "AOTInductor")


@pytest.mark.parametrize("mask", MASKS, ids=str)
def test_compile_fullgraph(mask):
    torch._dynamo.reset()
    m, x = _model(mask, n_groups=2, n_sel_heads=4), _x()
    compiled = torch.compile(m, fullgraph=True)
    with torch.no_grad():
        assert_close(compiled(x), m(x), torch.float32, "torch.compile")
    xr = x.clone().requires_grad_()
    compiled(xr).sum().backward()
    xe = x.clone().requires_grad_()
    m(xe).sum().backward()
    assert_close(xr.grad, xe.grad, torch.float32, "torch.compile gradient")


# ---- TorchScript ----

SCRIPT_MASKS = ["none", "causal", "block4", "padding", "weights", "full", "varlen", "varlen_causal"]
SCRIPT_CONFIGS = [(1, 1, False), (1, 0, True), (2, 1, True), (2, 4, False)]
jit_deprecated = pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated:DeprecationWarning")


def _script_layer(n_groups, n_sel_heads, bias, dim=12):
    torch.manual_seed(0)
    layer = pom_ext.PoM(dim, 3, 2, n_groups=n_groups, n_sel_heads=n_sel_heads, bias=bias)
    with torch.no_grad():
        layer.po_coeff.copy_(torch.randn_like(layer.po_coeff) * 0.5)
        if bias:
            layer.ag_proj.bias.normal_()
    return layer


def _script_args(mask, B=2, T=17, N=17, D=12):
    """(args, kwargs, tensors to differentiate) of one layer call with one of SCRIPT_MASKS."""
    g = torch.Generator().manual_seed(3)
    xq = torch.randn(B, T, D, generator=g, requires_grad=True)
    if mask == "none":
        return (xq,), {}, [xq]
    if mask in ("causal", "block4"):
        return (xq, None, "causal"), ({"block_size": 4} if mask == "block4" else {}), [xq]
    if mask == "padding":  # self-mixing, T > D: the output shortcut
        m = torch.rand(B, N, generator=g) > 0.3
        m[0] = False  # an all-padding row
        return (xq, None, m), {}, [xq]
    if mask in ("weights", "full"):  # cross-mixing, 5 queries over N context tokens
        xq5 = torch.randn(B, 5, D, generator=g, requires_grad=True)
        xc = torch.randn(B, N, D, generator=g, requires_grad=True)
        m = torch.rand(B, N, generator=g) if mask == "weights" else torch.rand(B, 5, N, generator=g) > 0.5
        m.requires_grad_(m.is_floating_point())
        return (xq5, xc, m), {}, [xq5, xc] + ([m] if m.requires_grad else [])
    total = B * T
    packed = torch.randn(total, D, generator=g, requires_grad=True)
    cu = torch.tensor([0, 1, total // 2, total // 2, total], dtype=torch.int32)
    return (packed, None, "causal" if mask == "varlen_causal" else None), {"cu_seqlens": cu}, [packed]


def _run(module, args, kwargs, inputs, params):
    """Output and the gradients of a fixed cotangent with respect to inputs and params."""
    out = module(*args, **kwargs)
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    return out, torch.autograd.grad(out, inputs + params, cot)


def _same(a, b, what):
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=lambda m: f"{what}: {m}")


@jit_deprecated
@pytest.mark.parametrize("mask", SCRIPT_MASKS)
@pytest.mark.parametrize("config", SCRIPT_CONFIGS, ids=lambda c: f"g{c[0]}h{c[1]}{'b' if c[2] else ''}")
def test_torchscript_layer(config, mask, tmp_path):
    """A scripted PoM computes the eager output and gradients (through the ops' registered autograd), for every
    mask form, and survives torch.jit.save / torch.jit.load."""
    layer = _script_layer(*config)
    scripted = torch.jit.script(layer)
    assert "pom_ext::" in str(scripted.inlined_graph), "the scripted forward does not call the pom_ext ops"
    args, kwargs, inputs = _script_args(mask)
    params = list(layer.parameters())
    out, grads = _run(scripted, args, kwargs, inputs, params)
    ref, ref_grads = _run(layer, args, kwargs, inputs, params)
    _same(out, ref, "scripted output")
    names = [f"input {i}" for i in range(len(inputs))] + [n for n, _ in layer.named_parameters()]
    for name, a, b in zip(names, grads, ref_grads):
        _same(a, b, f"scripted gradient of {name}")

    path = tmp_path / "pom.pt"
    torch.jit.save(scripted, str(path))
    loaded = torch.jit.load(str(path))
    loaded_out, loaded_grads = _run(loaded, args, kwargs, inputs, [])
    _same(loaded_out, ref, "reloaded output")
    for name, a, b in zip(names, loaded_grads, ref_grads):
        _same(a, b, f"reloaded gradient of {name}")


@jit_deprecated
def test_torchscript_bad_arguments():
    """Mask forms the scripted forward cannot run raise and name the argument instead of running something else."""
    scripted = torch.jit.script(_script_layer(1, 1, False))
    x = torch.randn(2, 9, 12)
    cases = [
        (dict(mask="full"), "'mask'"),
        (dict(mask=torch.rand(2, 9, 9, 1)), "'mask'"),
        (dict(block_size=3), "'block_size'"),
        (dict(mask=torch.rand(18), cu_seqlens=torch.tensor([0, 9, 18], dtype=torch.int32)), "'mask'"),
        (dict(xc=torch.randn(2, 5, 12), mask="causal"), "'xq'"),
        (dict(xc=torch.randn(3, 9, 12)), "'xc' and 'xq'"),
    ]
    for kwargs, name in cases:
        xq = x.reshape(18, 12) if "cu_seqlens" in kwargs else x
        with pytest.raises(torch.jit.Error, match=name):
            scripted(xq, **kwargs)


class PoMStack(nn.Module):
    """PolymorpherBlocks (with and without the short convolution and the MLP) under a final norm."""

    def __init__(self, dim=16):
        super().__init__()
        self.blocks = nn.ModuleList([
            PolymorpherBlock(dim, conv_size=4),
            PolymorpherBlock(dim, degree=3, n_groups=2, n_sel_heads=4, mlp_ratio=0, bias=True),
        ])
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, mask: PF.Mask = None, block_size: Optional[int] = None) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, mask, block_size)
        return self.norm(x)


@jit_deprecated
@pytest.mark.parametrize("mask", ["none", "causal", "block4", "padding", "full"])
def test_torchscript_model(mask, tmp_path):
    """Models of PoM blocks script: a stack of PolymorpherBlocks (mask passed through) and the Mixer above."""
    torch.manual_seed(0)
    model = PoMStack()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, pom_ext.PoM):
                m.po_coeff.normal_(0, 0.5)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 13, 16, generator=g, requires_grad=True)
    m = {"none": None, "causal": "causal", "block4": "causal", "padding": torch.rand(2, 13, generator=g) > 0.3,
         "full": torch.rand(2, 13, 13, generator=g) > 0.5}[mask]
    args = (x, m, 4 if mask == "block4" else None)
    params = list(model.parameters())
    scripted = torch.jit.script(model)
    out, grads = _run(scripted, args, {}, [x], params)
    ref, ref_grads = _run(model, args, {}, [x], params)
    _same(out, ref, "scripted model output")
    names = ["x"] + [n for n, _ in model.named_parameters()]
    for name, a, b in zip(names, grads, ref_grads):
        _same(a, b, f"scripted model gradient of {name}")
    path = tmp_path / "stack.pt"
    torch.jit.save(scripted, str(path))
    with torch.no_grad():
        _same(torch.jit.load(str(path))(*args), ref, "reloaded model output")

    if mask in ("none", "causal"):
        mixer = _model(m, n_groups=2, n_sel_heads=4)
        sequential = nn.Sequential(PolymorpherBlock(24), PolymorpherBlock(24, conv_size=3)).eval()
        with torch.no_grad():
            for eager in (mixer, sequential):
                _same(torch.jit.script(eager)(_x()), eager(_x()), f"scripted {type(eager).__name__}")
