"""Python <-> C++ interop of the PoM layer: weights of pom_ext.PoM load into the C++ module
pom_ext::PoM (examples/cpp/interop.cpp) and give the same outputs and gradients in every
mask mode; weights trained in C++ load back into Python (strict) and give C++'s outputs.

The C++ program is built with CMake (library + examples, in tree) into build/cpp-interop,
reused across runs; POM_EXT_INTEROP_BIN points at a prebuilt pom_interop instead.
"""
import os
import shutil
import subprocess

import pytest
import torch
import torch.jit._pickle

import pom_ext
from conftest import assert_close

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = os.path.join(ROOT, "build", "cpp-interop")


def _missing_toolchain():
    if shutil.which("cmake") is None:
        return "cmake is not installed"
    if shutil.which(os.environ.get("CXX", "c++")) is None and shutil.which("g++") is None:
        return "no C++ compiler (c++ / g++) is installed"
    return None


@pytest.fixture(scope="module")
def interop_bin():
    prebuilt = os.environ.get("POM_EXT_INTEROP_BIN")
    if prebuilt:
        return prebuilt
    reason = _missing_toolchain()
    if reason:
        pytest.skip(f"the C++ interop test needs cmake and a C++ compiler: {reason}")
    configure = ["cmake", "-S", ROOT, "-B", BUILD, "-DCMAKE_BUILD_TYPE=Release", "-DPOM_EXT_BUILD_EXAMPLES=ON",
                 f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"]
    if shutil.which("ninja"):
        configure += ["-G", "Ninja"] if not os.path.exists(os.path.join(BUILD, "CMakeCache.txt")) else []
    jobs = os.environ.get("MAX_JOBS", "2")
    for cmd in (configure, ["cmake", "--build", BUILD, "-j", jobs, "--target", "pom_interop"]):
        r = subprocess.run(cmd, capture_output=True, text=True)
        assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return os.path.join(BUILD, "examples", "cpp", "pom_interop")


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


def _python_outputs(layer, t):
    x, xc = t["x"], t["xc"]
    outs = {
        "none": layer(x),
        "causal": layer(x, mask="causal"),
        "block3": layer(x, mask="causal", block_size=3),
        "weights": layer(x, mask=t["weights"]),
        "pad": layer(x, mask=t["pad"]),
        "mask3": layer(x, mask=t["mask3"]),
        "cross_none": layer(x, xc),
        "cross_weights": layer(x, xc, mask=t["cross_w"]),
        "cross_mask3": layer(x, xc, mask=t["xmask3"]),
        "packed_none": layer(t["xp"], cu_seqlens=t["cu"]),
        "packed_causal": layer(t["xp"], mask="causal", cu_seqlens=t["cu"]),
        "packed_block2": layer(t["xp"], mask="causal", block_size=2, cu_seqlens=t["cu"]),
    }
    loss = sum((v * t["r"]).sum() for v in outs.values() if v.shape == t["r"].shape)
    layer.zero_grad()
    loss.backward()
    grads = {k: p.grad.clone() for k, p in layer.named_parameters()}
    return {k: v.detach() for k, v in outs.items()}, grads


def _run_cpp(interop_bin, tmp_path, layer, t, cfg):
    dim, degree, expand, n_groups, n_sel_heads, bias, _ = cfg
    blob = {"config": torch.tensor([dim, degree, expand, n_groups, n_sel_heads, int(bias)])}
    blob.update({f"param.{k}": v.detach().clone() for k, v in layer.state_dict().items()})
    blob.update(t)
    src, dst = tmp_path / "in.pt", tmp_path / "out.pt"
    torch.save(blob, src)
    r = subprocess.run([interop_bin, str(src), str(dst)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"pom_interop failed:\n{r.stdout}\n{r.stderr}"
    # torch::pickle_save tags the dict's type (Dict[str, Tensor]) with restore_type_tag.
    with torch.serialization.safe_globals([torch.jit._pickle.restore_type_tag]):
        return torch.load(dst)


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
    assert_close(out["step"], ref["causal"], torch.float32, "step (fp32 state) vs causal forward")
    assert torch.equal(out["step_count"], st.count)
    assert_close(out["chunked"], torch.cat([o1, o2], 1), dtype, "state_forward in chunks")
    assert_close(out["chunked_sum"], s2.sum, torch.float32, "state sum after chunks")

    # Weights trained in C++ load back into Python (strict) and give C++'s output.
    trained = {k[len("trained."):]: v for k, v in out.items() if k.startswith("trained.")}
    back = pom_ext.PoM(dim, degree, expand, n_groups=n_groups, n_sel_heads=n_sel_heads, bias=bias).to(dtype)
    back.load_state_dict(trained, strict=True)
    assert any(not torch.equal(trained[k], v) for k, v in layer.state_dict().items()), "training changed nothing"
    with torch.no_grad():
        assert_close(out["trained_out"], back(t["x"], mask="causal"), dtype, "output after C++ training")
