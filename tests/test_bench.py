"""pom-bench: a --quick run of the CLI writes complete results; out-of-memory points are recorded, not fatal."""
import csv
import json
import os
import subprocess
import sys

import pytest
import torch

import pom_ext
from pom_ext.bench import decode, layer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAT_FIELDS = ("median_s", "p10_s", "p90_s", "min_s", "max_s")
ENV_FIELDS = ("device", "device_name", "cpu_model", "threads", "torch", "cuda", "pom_ext", "git_commit", "date",
              "loadavg_start", "loadavg_end")

pytestmark = pytest.mark.skipif(not pom_ext.native_available(), reason="compiled kernels not built")

try:
    import matplotlib  # noqa: F401
    HAVE_MPL = True
except ImportError:
    HAVE_MPL = False


def check_points(points, keys):
    assert points
    for p in points:
        for k in keys:
            assert k in p, f"{k} missing from {p}"
        if p["status"] == "ok":
            for k in STAT_FIELDS:
                assert isinstance(p[k], float) and p[k] > 0, p
            assert p["p10_s"] <= p["median_s"] <= p["p90_s"], p
            assert p["tokens_per_s"] > 0, p
        else:
            assert p["status"] == "oom" or p["status"].startswith("skipped: "), p


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pom_bench")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "pom_ext.bench", "--quick", "--device", "cpu", "--what", "all",
                           "--threads", "1", "--out", str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_quick_run_writes_results(quick_run):
    out, proc = quick_run
    names = ["layer.json", "layer.csv", "decode.json", "decode.csv", "summary.md"]
    if HAVE_MPL:
        names += ["layer_time.png", "layer_memory.png", "layer_speedup.png", "decode.png"]
    for name in names:
        assert (out / name).stat().st_size > 0, name
    assert "non-causal, fwd+bwd" in proc.stdout and "decode, 2 layers" in proc.stdout  # tables on stdout
    assert "[  1/" in proc.stderr  # progress on stderr
    assert "| N | B | pom_ext |" in (out / "summary.md").read_text()

    lay = json.loads((out / "layer.json").read_text())
    assert lay["schema"] == "pom-bench/1"
    for k in ENV_FIELDS:
        assert k in lay["env"], k
    assert lay["env"]["device"] == "cpu" and lay["env"]["threads"] == 1
    assert lay["config"]["dim"] == 64 and lay["config"]["seq_lens"] == [128, 256]
    assert lay["methods"]["pom_ext"]["status"] == "ok" and lay["methods"]["sdpa"]["status"] == "ok"
    check_points(lay["points"], ("method", "mode", "pass", "n", "batch", "status"))
    ok = [p for p in lay["points"] if p["status"] == "ok"]
    assert {(p["method"], p["mode"], p["pass"]) for p in ok} >= {
        (m, mode, pas) for m in ("pom_ext", "sdpa") for mode in layer.MODES for pas in layer.PASSES}
    assert all(p["peak_bytes"] > 0 for p in ok)
    assert lay["speedups"] and all(r["speedup"] > 0 for r in lay["speedups"])

    dec = json.loads((out / "decode.json").read_text())
    check_points(dec["points"], ("method", "context", "batch", "layers", "status", "cache_bytes"))
    by = {(p["method"], p["batch"], p["context"]): p for p in dec["points"]}
    assert by[("pom_ext", 1, 256)]["cache_bytes"] == by[("pom_ext", 1, 1024)]["cache_bytes"]  # constant state
    assert by[("attention_sdpa", 1, 1024)]["cache_bytes"] == 4 * by[("attention_sdpa", 1, 256)]["cache_bytes"]

    with open(out / "layer.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(lay["points"]) and {"median_s", "peak_bytes", "status"} <= set(rows[0])


def test_oom_is_recorded_and_the_sweep_goes_on(monkeypatch):
    calls = {"n": 0}
    real = layer.MHA.forward

    def forward(self, x, causal):
        if x.shape[1] == 32:
            calls["n"] += 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB (simulated)")
        return real(self, x, causal)

    monkeypatch.setattr(layer.MHA, "forward", forward)
    cfg = layer.LayerConfig(device=torch.device("cpu"), dtype=torch.float32, seq_lens=[16, 32, 64], dim=16,
                            heads=2, tokens=64, modes=["causal"], methods=["pom_ext", "sdpa"], repeats=2,
                            warmup=0)
    res = layer.run(cfg, progress=lambda msg: None)
    status = {(p["method"], p["pass"], p["n"]): p["status"] for p in res["points"]}
    assert calls["n"] == 2  # fwd and fwd+bwd at N=32 each failed once
    assert status[("sdpa", "fwd", 32)] == "oom" and status[("sdpa", "fwd+bwd", 32)] == "oom"
    assert all(s == "ok" for k, s in status.items() if k[2] != 32 or k[0] == "pom_ext")


def test_decode_oom_is_recorded(monkeypatch):
    real = decode.AttentionStack.allocate

    def allocate(self, layers, batch, context, capacity):
        if context > 64:
            raise torch.OutOfMemoryError("simulated")
        return real(self, layers, batch, context, capacity)

    monkeypatch.setattr(decode.AttentionStack, "allocate", allocate)
    cfg = decode.DecodeConfig(device=torch.device("cpu"), dtype=torch.float32, contexts=[64, 128], batches=[1],
                              layers=2, dim=16, heads=2, steps=2, warmup=1, methods=["pom_ext", "attention_sdpa"])
    res = decode.run(cfg, progress=lambda msg: None)
    status = {(p["method"], p["context"]): p["status"] for p in res["points"]}
    assert status == {("pom_ext", 64): "ok", ("attention_sdpa", 64): "ok", ("pom_ext", 128): "ok",
                      ("attention_sdpa", 128): "oom"}


def test_decode_cache_too_large_for_the_stack(monkeypatch):
    """A KV cache that fits for one layer of two is measured on one and scaled; none fitting is 'oom'."""
    cfg = decode.DecodeConfig(device=torch.device("cpu"), dtype=torch.float32, contexts=[64, 4096], batches=[1],
                              layers=2, dim=16, heads=2, steps=2, warmup=1, methods=["attention_sdpa"])
    one_layer = 2 * (64 + 4) * 16 * 4  # K and V of one layer at context 64, + warmup, steps and the memory step
    free = int(1.5 * one_layer / decode._CACHE_SHARE["cpu"])
    monkeypatch.setattr(decode, "available_memory_bytes", lambda device: free)
    res = decode.run(cfg, progress=lambda msg: None)
    small, large = res["points"]
    assert small["status"] == "ok" and small["layers_measured"] == 1 and small["note"].startswith("extrapolated")
    assert large["status"] == "oom" and large["layers_measured"] == 0 and "predicted" in large["note"]


def test_failed_cuda_graph_capture_falls_back_to_eager_steps():
    calls = []
    step, why_not = decode._graphed(lambda: calls.append(1))
    if torch.cuda.is_available():
        assert why_not is None
    else:
        assert "capture failed" in why_not
        step()
        assert calls  # the eager step is what runs
