"""Python <-> C++ interop.

- Weights of pom_ext.PoM load into the C++ module pom_ext::PoM (examples/cpp/interop.cpp) and give the same
  outputs and gradients in every mask mode; weights trained in C++ load back into Python (strict).
- A model scripted in Python (torch.jit.script) trains in a C++ program with libpom_ext's registered autograd:
  gradients equal Python's, and a double backward raises (tests/cpp/script_train.cpp).
- An AOTInductor package compiled in Python runs in C++ (tests/cpp/aoti_run.cpp).
- libpom_ext (through a library linked to it) and `import pom_ext` live in one process, in either order.

The C++ side is built as a user of the CMake package builds it: the library installed with CMake, the programs
compiled as C++17 against the installed package (tests/cpp/build.sh, into build/cpp, reused across runs);
POM_EXT_CPP_BUILD points at a directory that script already built instead.
"""
import ctypes  # noqa: F401  (used by the one-process scripts' source below)
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import torch._inductor
import torch.jit._pickle
import torch.nn as nn
from torch.utils import cpp_extension

import pom_ext
from conftest import assert_close, rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = os.path.join(ROOT, "build", "cpp")
jit_deprecated = pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated:DeprecationWarning")


def _missing_toolchain():
    if shutil.which("cmake") is None:
        return "cmake is not installed"
    if shutil.which(os.environ.get("CXX", "c++")) is None and shutil.which("g++") is None:
        return "no C++ compiler (c++ / g++) is installed"
    if torch.version.cuda is not None and cpp_extension.CUDA_HOME is None:
        return (f"torch is a CUDA build (CUDA {torch.version.cuda}), whose CMake package needs the CUDA toolkit, "
                f"and none was found (set CUDA_HOME to its directory)")
    return None


@pytest.fixture(scope="module")
def cpp_build():
    prebuilt = os.environ.get("POM_EXT_CPP_BUILD")
    if prebuilt:
        return prebuilt
    reason = _missing_toolchain()
    if reason:
        pytest.skip(f"the C++ interop tests need cmake and a C++ compiler: {reason}")
    r = subprocess.run(["bash", os.path.join(ROOT, "tests", "cpp", "build.sh"), BUILD], capture_output=True,
                       text=True, env={**os.environ, "PYTHON": sys.executable})
    assert r.returncode == 0, f"tests/cpp/build.sh failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return BUILD


@pytest.fixture(scope="module")
def interop_bin(cpp_build):
    return os.path.join(cpp_build, "examples", "pom_interop")


def _load(path):
    # torch::pickle_save tags the dict's type (Dict[str, Tensor]) with restore_type_tag.
    with torch.serialization.safe_globals([torch.jit._pickle.restore_type_tag]):
        return torch.load(path)


CONFIGS = [
    # dim, degree, expand, n_groups, n_sel_heads, bias, dtype
    (12, 2, 2, 1, 1, False, torch.float64),
    (12, 3, 2, 1, 4, True, torch.float64),
    (12, 2, 2, 2, 1, True, torch.float64),
    (12, 5, 2, 2, 4, False, torch.float64),
    (10, 2, 3, 2, 0, True, torch.float32),
    (12, 3, 2, 1, 4, False, torch.float32),
]


def _inputs(layer, dtype, B=3, T=9, N=7):
    D = layer.dim
    g = torch.Generator().manual_seed(1)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=dtype)
    weights = torch.rand(B, N, generator=g, dtype=dtype)
    weights[1] = 0  # a row whose weights sum to 0
    pad = torch.rand(B, T, generator=g) > 0.3
    pad[:, 0] = True
    lengths = [4, 0, 6, 5]
    return {
        "x": rnd(B, T, D), "xc": rnd(B, N, D), "r": rnd(B, T, D),
        "weights": torch.rand(B, T, generator=g, dtype=dtype), "cross_w": weights,
        "pad": pad,
        "mask3": (torch.rand(B, T, T, generator=g) > 0.4).to(dtype),
        "xmask3": (torch.rand(B, T, N, generator=g) > 0.4).to(dtype),
        "xp": rnd(sum(lengths), D),
        "cu": torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32),
    }


def _python_outputs(layer, t, q=None, cx=None, packed=True):
    """Outputs of every mask mode and the gradients of sum <out, r>; q: the query-position keywords of a rotary
    layer (self-mixing: one set), cx: its context-position keywords for cross-mixing; packed=False leaves out the
    packed sequences."""
    x, xc = t["x"], t["xc"]
    q, cx = q or {}, cx or {}
    outs = {
        "none": layer(x, **q),
        "causal": layer(x, mask="causal", **q),
        "block3": layer(x, mask="causal", block_size=3, **q),
        "weights": layer(x, mask=t["weights"], **q),
        "pad": layer(x, mask=t["pad"], **q),
        "mask3": layer(x, mask=t["mask3"], **q),
        "cross_none": layer(x, xc, **q, **cx),
        "cross_weights": layer(x, xc, mask=t["cross_w"], **q, **cx),
        "cross_mask3": layer(x, xc, mask=t["xmask3"], **q, **cx),
    }
    if packed:
        outs["packed_none"] = layer(t["xp"], cu_seqlens=t["cu"])
        outs["packed_causal"] = layer(t["xp"], mask="causal", cu_seqlens=t["cu"])
        outs["packed_block2"] = layer(t["xp"], mask="causal", block_size=2, cu_seqlens=t["cu"])
    loss = sum((v * t["r"]).sum() for v in outs.values() if v.shape == t["r"].shape)
    layer.zero_grad()
    loss.backward()
    grads = {k: p.grad.clone() for k, p in layer.named_parameters()}
    return {k: v.detach() for k, v in outs.items()}, grads


def _run_cpp(interop_bin, tmp_path, layer, t, cfg, rope=()):
    dim, degree, expand, n_groups, n_sel_heads, bias, _ = cfg
    blob = {"config": torch.tensor([dim, degree, expand, n_groups, n_sel_heads, int(bias), *rope])}
    blob.update({f"param.{k}": v.detach().clone() for k, v in layer.state_dict().items()})
    blob.update(t)
    src, dst = tmp_path / "in.pt", tmp_path / "out.pt"
    torch.save(blob, src)
    r = subprocess.run([interop_bin, str(src), str(dst)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"pom_interop failed:\n{r.stdout}\n{r.stderr}"
    return _load(dst)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"D{c[0]}K{c[1]}x{c[2]}g{c[3]}G{c[4]}b{int(c[5])}-"
                         f"{str(c[6]).split('.')[-1]}")
def test_python_weights_in_cpp(interop_bin, tmp_path, cfg):
    dim, degree, expand, n_groups, n_sel_heads, bias, dtype = cfg
    torch.manual_seed(0)
    layer = pom_ext.PoM(dim, degree, expand, n_groups=n_groups, n_sel_heads=n_sel_heads, bias=bias).to(dtype)
    with torch.no_grad():
        layer.po_coeff.copy_(torch.randn_like(layer.po_coeff) * 0.5)  # far from the tiny init: real polynomials
        for name, p in layer.named_parameters():
            if "bias" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    t = _inputs(layer, dtype)
    out = _run_cpp(interop_bin, tmp_path, layer, t, cfg)

    # Same parameter names, shapes and registration order.
    order = sorted((int(k.split(".")[1]), k.split(".", 2)[2]) for k in out if k.startswith("param_order."))
    assert [n for _, n in order] == [k for k, _ in layer.named_parameters()]

    ref, grads = _python_outputs(layer, t)
    for k, v in ref.items():
        assert_close(out[k], v, dtype, f"output '{k}'")
    for k, g in grads.items():
        assert_close(out[f"grad.{k}"], g, dtype, f"gradient of '{k}'")

    with torch.no_grad():
        st = layer.allocate_state(t["x"].shape[0])
        steps = torch.cat([layer.step(t["x"][:, i:i + 1], st) for i in range(t["x"].shape[1])], 1)
        o1, s1 = layer.state_forward(t["x"][:, :3])
        o2, s2 = layer.state_forward(t["x"][:, 3:], state=s1)
    assert_close(out["step"], steps, dtype, "step")
    # The state's sum has the layer's precision (float64 for a float64 layer).
    assert out["step_sum"].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(out["step"], ref["causal"], dtype, "step vs causal forward")
    assert torch.equal(out["step_count"], st.count)
    assert_close(out["chunked"], torch.cat([o1, o2], 1), dtype, "state_forward in chunks")
    assert_close(out["chunked_sum"], s2.sum, dtype, "state sum after chunks")

    # Weights trained in C++ load back into Python (strict) and give C++'s output.
    trained = {k[len("trained."):]: v for k, v in out.items() if k.startswith("trained.")}
    back = pom_ext.PoM(dim, degree, expand, n_groups=n_groups, n_sel_heads=n_sel_heads, bias=bias).to(dtype)
    back.load_state_dict(trained, strict=True)
    assert any(not torch.equal(trained[k], v) for k, v in layer.state_dict().items()), "training changed nothing"
    with torch.no_grad():
        assert_close(out["trained_out"], back(t["x"], mask="causal"), dtype, "output after C++ training")


ROPE_CONFIGS = [
    # dim, degree, expand, n_groups, n_sel_heads, bias, dtype, rope_2d
    (12, 2, 2, 1, 1, False, torch.float64, False),
    (12, 3, 2, 2, 4, True, torch.float64, False),
    (16, 2, 2, 1, 8, True, torch.float64, True),
    (12, 2, 2, 1, 0, False, torch.float32, True),
]


@pytest.mark.parametrize("cfg", ROPE_CONFIGS, ids=lambda c: f"D{c[0]}K{c[1]}G{c[4]}g{c[3]}-{'2d' if c[7] else '1d'}")
def test_rope_layer_in_cpp(interop_bin, tmp_path, cfg):
    """PoMOptions.rope: the C++ module builds the Python PoMRoPE's tables bit for bit, loads its state dict, and
    gives its outputs, gradients, decoding and chunked state at the same positions."""
    dim, degree, expand, n_groups, n_sel_heads, bias, dtype, two = cfg
    torch.manual_seed(0)
    layer = pom_ext.PoMRoPE(dim, degree, expand, n_groups, n_sel_heads, bias, max_seq_len=24, max_h=5, max_w=6,
                            rope_2d=two).to(dtype)
    with torch.no_grad():
        layer.po_coeff.copy_(torch.randn_like(layer.po_coeff) * 0.5)
    t = _inputs(layer, dtype)
    g = torch.Generator().manual_seed(2)
    T, N = t["x"].shape[1], t["xc"].shape[1]
    if two:
        t["pos"] = torch.stack([torch.randint(0, 5, (T,), generator=g), torch.randint(0, 6, (T,), generator=g)], -1)
        t["ctx_pos"] = torch.stack([torch.randint(0, 5, (N,), generator=g), torch.randint(0, 6, (N,), generator=g)],
                                   -1)
        q, cx = {"positions_hw": t["pos"]}, {"ctx_positions_hw": t["ctx_pos"]}
    else:
        t["pos"], t["ctx_pos"] = torch.randperm(24, generator=g)[:T], torch.randint(0, 24, (N,), generator=g)
        q, cx = {"positions": t["pos"]}, {"ctx_positions": t["ctx_pos"]}
    out = _run_cpp(interop_bin, tmp_path, layer, t, cfg[:7], rope=(2 if two else 1, 24, 5, 6))
    for k, v in layer.named_buffers():
        assert torch.equal(out[f"table.{k}"], v.float()), f"table {k}"
    ref, grads = _python_outputs(layer, t, q, cx, packed=not two)  # packed 2-D sequences need grid positions
    assert two != ("packed_none" in out)
    for k, v in ref.items():
        assert_close(out[k], v, dtype, f"output '{k}'")
    for k, gr in grads.items():
        assert_close(out[f"grad.{k}"], gr, dtype, f"gradient of '{k}'")
    at = (lambda a, b: {"positions_hw": t["pos"][a:b]}) if two else (lambda a, b: {})
    with torch.no_grad():
        st = layer.allocate_state(t["x"].shape[0])
        steps = torch.cat([layer.step(t["x"][:, i:i + 1], st, **at(i, i + 1)) for i in range(T)], 1)
        o1, s1 = layer.state_forward(t["x"][:, :3], **at(0, 3))
        o2, s2 = layer.state_forward(t["x"][:, 3:], state=s1, **at(3, T))
    assert_close(out["step"], steps, dtype, "step")
    if not two:  # 1-D decoding at positions 0..T-1 is the causal forward at those positions
        assert_close(out["step"], layer(t["x"], mask="causal"), dtype, "step vs causal forward")
    assert_close(out["chunked"], torch.cat([o1, o2], 1), dtype, "state_forward in chunks")
    assert_close(out["chunked_sum"], s2.sum, dtype, "state sum after chunks")


# ---- a TorchScript model trained in C++ ----

class ScriptedModel(nn.Module):
    """Three PoM layers (causal with gate heads, block-causal with groups and biases, a padding mask) between a
    linear stem and head: the model of a C++ training stack that loads a model scripted in Python."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.stem = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.causal = pom_ext.PoM(dim, 2, 2, n_sel_heads=4)
        self.block = pom_ext.PoM(dim, 3, 2, n_groups=2, bias=True)
        self.padded = pom_ext.PoM(dim, 2, 2)
        self.head = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.causal(self.norm(x), mask="causal")
        x = x + self.block(x, mask="causal", block_size=3)
        x = x + self.padded(x, mask=pad)
        return self.head(x)


def _scripted_model():
    torch.manual_seed(0)
    model = ScriptedModel()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, pom_ext.PoM):
                m.po_coeff.normal_(0, 0.5)  # far from the tiny init: real polynomials, real gradients
    g = torch.Generator().manual_seed(1)
    pad = torch.rand(3, 10, generator=g) > 0.3
    pad[:, 0] = True
    data = {"x": torch.randn(3, 10, 16, generator=g), "pad": pad, "target": torch.randn(3, 10, 16, generator=g),
            "lr": torch.tensor(0.05), "steps": torch.tensor(4)}
    return model, data


@jit_deprecated
def test_scripted_model_trains_in_cpp(cpp_build, tmp_path):
    """torch.jit.script + save in Python, torch::jit::load + train() + backward in C++: every parameter's gradient
    equals Python's (the ops' autograd is registered in libpom_ext, not only by the Python package), a few SGD
    steps follow Python's losses, and a gradient of a gradient raises in C++ as it does in Python."""
    model, data = _scripted_model()
    torch.jit.save(torch.jit.script(model), str(tmp_path / "model.pt"))
    torch.save(data, tmp_path / "in.pt")
    exe = os.path.join(cpp_build, "tests", "pom_script_train")
    r = subprocess.run([exe, str(tmp_path / "model.pt"), str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"pom_script_train failed:\n{r.stdout}\n{r.stderr}"
    assert "pom_ext" not in r.stderr, f"a warning from pom_ext in the C++ run:\n{r.stderr}"
    out = _load(tmp_path / "out.pt")

    x, pad, target = data["x"], data["pad"], data["target"]
    y = model(x, pad)
    loss = (y - target).pow(2).mean()
    loss.backward()
    assert_close(out["out"], y.detach(), torch.float32, "output")
    for name, p in model.named_parameters():
        assert f"grad.{name}" in out, f"C++ reported no gradient for {name}"
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} has no gradient in Python"
        assert_close(out[f"grad.{name}"], p.grad, torch.float32, f"gradient of {name}")

    losses = []
    for _ in range(int(data["steps"])):
        model.zero_grad()
        loss = (model(x, pad) - target).pow(2).mean()
        loss.backward()
        losses.append(loss.item())
        with torch.no_grad():
            for p in model.parameters():
                p -= float(data["lr"]) * p.grad
    assert losses[-1] < losses[0], f"SGD did not lower the loss in Python: {losses}"
    err = rel_err(out["losses"], torch.tensor(losses, dtype=torch.float64))
    assert err < 1e-5, f"C++ SGD losses {out['losses'].tolist()} differ from Python's {losses} ({err:.2e})"

    assert int(out["double_backward_raised"]) == 1, "a double backward through the pom_ext ops did not raise in C++"
    assert "double backward (a gradient of a gradient) is not supported" in r.stdout, r.stdout


def test_double_backward_raises_in_python():
    model, data = _scripted_model()
    loss = (model(data["x"], data["pad"]) - data["target"]).pow(2).mean()
    grads = torch.autograd.grad(loss, list(model.parameters()), create_graph=True)
    with pytest.raises(RuntimeError, match=r"pom_ext::poly_\w+_backward: double backward"):
        sum(g.pow(2).sum() for g in grads).backward()


# ---- an AOTInductor package run in C++ ----

@pytest.mark.skipif(not hasattr(torch._inductor, "aoti_compile_and_package"),
                    reason="AOTInductor packages (aoti_compile_and_package) need torch >= 2.6")
@pytest.mark.skipif(os.environ.get("POM_EXT_SKIP_AOTI") == "1", reason="POM_EXT_SKIP_AOTI=1")
def test_aoti_package_runs_in_cpp(cpp_build, tmp_path):
    """A model exported and compiled by AOTInductor in Python runs in a C++ program linked to libpom_ext (the
    package calls the registered ops), with Python's output."""
    from torch._inductor import aoti_compile_and_package

    from test_export import _model, _x

    m, x = _model("causal", n_groups=2, n_sel_heads=4), _x()
    with torch.no_grad():
        path = aoti_compile_and_package(torch.export.export(m, (x,)), package_path=str(tmp_path / "pom.pt2"))
        ref = m(x)
    torch.save({"x": x}, tmp_path / "in.pt")
    exe = os.path.join(cpp_build, "tests", "pom_aoti_run")
    r = subprocess.run([exe, path, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, f"pom_aoti_run failed:\n{r.stdout}\n{r.stderr}"
    assert_close(_load(tmp_path / "out.pt")["out"], ref, torch.float32, "AOTInductor package in C++")


# ---- libpom_ext and the Python package in one process ----

_ONE_PROCESS = textwrap.dedent("""
    import ctypes, math, sys
    import torch
    probe_first = sys.argv[2] == "probe-first"

    def load_probe():
        lib = ctypes.CDLL(sys.argv[1])
        lib.pom_ext_probe_version.restype = ctypes.c_char_p
        lib.pom_ext_probe_error.restype = ctypes.c_char_p
        lib.pom_ext_probe_causal.restype = ctypes.c_double
        lib.pom_ext_probe_causal.argtypes = [ctypes.c_int64] * 4
        return lib

    lib = load_probe() if probe_first else None
    try:
        import pom_ext
    except ImportError as e:
        print("IMPORT-ERROR", e)
        sys.exit(0)
    if lib is None:
        lib = load_probe()
    print("BUILD", torch.ops.pom_ext.build_info())
    print("VERSION", lib.pom_ext_probe_version().decode())
    B, N, E, K = 2, 7, 5, 3
    cpp = lib.pom_ext_probe_causal(B, N, E, K)
    assert not math.isnan(cpp), lib.pom_ext_probe_error().decode()
    h = (torch.arange(B * N * E, dtype=torch.float64) * 0.1).sin().view(B, N, E).requires_grad_()
    k = torch.arange(K, dtype=torch.float64)
    coeff = (torch.arange(E, dtype=torch.float64)[:, None] + k).cos() / (k + 1)
    y = pom_ext.ops.poly_causal(h, coeff)
    y.sum().backward()
    py = y.sum().item() + h.grad.sum().item()
    print("RESULT", cpp, py)
    assert abs(cpp - py) <= 1e-12 * max(1.0, abs(py)), (cpp, py)
    print("OK")
""")


@pytest.mark.parametrize("order", ["probe-first", "pom_ext-first"])
def test_one_process(cpp_build, order, tmp_path):
    """A C++ library linked to libpom_ext (tests/cpp/probe.cpp) and `import pom_ext` in one process, in either
    order: the copy loaded second registers nothing (no abort), both run the same ops. Builds that cannot share a
    process (the CMake library without the CUDA kernels of a CUDA Python build, loaded first) make the import raise
    an ImportError that names both builds."""
    probe = os.path.join(cpp_build, "tests", "libpom_ext_probe.so")
    script = tmp_path / "one_process.py"
    script.write_text(_ONE_PROCESS)
    r = subprocess.run([sys.executable, str(script), probe, order], capture_output=True, text=True, timeout=300,
                       cwd=str(tmp_path))
    assert r.returncode == 0, f"the process failed (exit {r.returncode}):\n{r.stdout}\n{r.stderr}"
    python_build = torch.ops.pom_ext.build_info()
    if order == "probe-first" and python_build.endswith("+cuda"):
        # tests/cpp/build.sh builds the CMake library without CUDA kernels.
        assert "IMPORT-ERROR" in r.stdout and python_build in r.stdout, r.stdout
        return
    assert "OK" in r.stdout, r.stdout
    assert f"VERSION {pom_ext.__version__}" in r.stdout, r.stdout


def test_cpp_api_checks(cpp_build):
    """The C++ API's checks and C++-only parts (tests/cpp/api_checks.cpp): inputs of another dtype or device than
    the layer's parameters and a (B, T, N) mask of the wrong T name the argument; malformed cu_seqlens print on
    one line; a negative state count is refused; the state's sum follows the layer's dtype; state_forward's
    defaults; the differentiable gated op; cpu_isa(); the meta device."""
    r = subprocess.run([os.path.join(cpp_build, "tests", "pom_api_checks")], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, f"pom_api_checks failed:\n{r.stdout}\n{r.stderr}"
    assert "passed 0" in r.stdout, r.stdout
