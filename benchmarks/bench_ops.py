"""Per-op bandwidth of the pom_ext kernels against the machine's limits, measured in one run.

For every op, forward and backward, at B in {1, 8}, N in {4096, 65536}, E in {1024, 4096}, K in {2, 4}
(bf16 on GPU): the median time, the bytes the op must move (every input read once, every output written
once) and the achieved bandwidth as a fraction of the device-to-device copy bandwidth measured in the same
run (plus the GEMM rate, for context). Each forward also runs through a baseline on the same inputs:
torch.compile of pom_ext/reference.py on GPU, the eager reference on CPU. (The paper's own kernels are
layer-level in its `pom` package: pom-bench compares the layers, as `pom_paper`, when it is importable.)

    python benchmarks/bench_ops.py                       # CUDA: the full grid, JSON to benchmarks/results/
    python benchmarks/bench_ops.py --device cpu --quick  # a smoke run of the script itself
"""
import argparse
import datetime
import json
import os
import sys

import torch

from pom_ext import ops, reference
from pom_ext.bench.common import Timer, environment, measure, summarize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def copy_bandwidth(device, repeat):
    """Bytes read + written per second by a 1 GiB (256 MiB on CPU) copy into a preallocated buffer."""
    n = (1 << 28) if device.type == "cuda" else (1 << 26)
    src = torch.empty(n, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    s = summarize(Timer(device).samples(lambda: dst.copy_(src), repeat))
    return 2 * n * 4 / s["median_s"]


def gemm_rate(device, dtype, repeat):
    """Flops per second of a square matmul (8192 on GPU, 2048 on CPU)."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    s = summarize(Timer(device).samples(lambda: a @ b, repeat))
    return 2 * n ** 3 / s["median_s"]


def cases(B, N, E, K, device, dtype):
    """(name, forward fn, backward fn or None, bytes fwd, bytes bwd, reference fn on the same inputs)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    h = (torch.randn(B, N, E, generator=g) * 2).to(device, dtype)
    c = (torch.randn(E, K, generator=g) * 0.1).to(device, torch.float32)
    w = torch.rand(B, N, generator=g).to(device, dtype)
    el = h.element_size()
    x = B * N * E * el  # one (B, N, E) tensor
    gH_full = torch.randn_like(h)
    gH_row = torch.randn(B, E, device=device, dtype=dtype)
    lengths = torch.full((B,), N, dtype=torch.int32)
    cu = torch.cat([torch.zeros(1, dtype=torch.int32), lengths.cumsum(0)]).to(device, torch.int32)
    hp = h.reshape(B * N, E)
    H_mean = ops.poly_mean(h, c)
    H_w = ops.poly_mean(h, c, w)
    s_sum = torch.zeros(B, E, device=device)
    count = torch.zeros(B, dtype=torch.long, device=device)
    hs = torch.cat([h, (torch.randn(B, N, E, generator=g)).to(device, dtype)], -1)
    o = torch.ops.pom_ext
    out = [
        ("eval", lambda: o.poly_eval(h, c), lambda: o.poly_eval_backward(gH_full, h, c), 2 * x, 3 * x,
         lambda: reference.poly_eval(h, c)),
        ("mean", lambda: o.poly_mean(h, c, None, None),
         lambda: o.poly_mean_backward(gH_row, H_mean, h, c, None, None, False), x, 2 * x,
         lambda: reference.poly_mean(h, c)),
        ("weighted mean", lambda: o.poly_mean(h, c, w, None),
         lambda: o.poly_mean_backward(gH_row, H_w, h, c, w, None, True), x, 2 * x,
         lambda: reference.poly_mean(h, c, w)),
        ("varlen mean", lambda: o.poly_mean(hp, c, None, cu),
         lambda: o.poly_mean_backward(gH_row, H_mean.reshape(B, E), hp, c, None, cu, False), x, 2 * x,
         lambda: reference.poly_mean(hp, c, None, cu)),
        ("causal", lambda: o.poly_causal(h, c, 1, None), lambda: o.poly_causal_backward(gH_full, h, c, 1, None),
         2 * x, 3 * x, lambda: reference.poly_causal(h, c)),
        ("block-causal F=16", lambda: o.poly_causal(h, c, 16, None),
         lambda: o.poly_causal_backward(gH_full, h, c, 16, None), 2 * x, 3 * x,
         lambda: reference.poly_causal(h, c, 16)),
        ("varlen causal", lambda: o.poly_causal(hp, c, 1, cu),
         lambda: o.poly_causal_backward(gH_full.reshape(B * N, E), hp, c, 1, cu), 2 * x, 3 * x,
         lambda: reference.poly_causal(hp, c, 1, cu)),
        ("state update", lambda: o.poly_state_update(h, c, s_sum, count),
         lambda: o.poly_state_update_backward(gH_row, s_sum, h, c, count), x, 2 * x,
         lambda: reference.poly_state_update(h, c, s_sum, count)),
    ]
    if ops.has_kernel("poly_causal_gated", device):
        out.append(("gated causal", lambda: o.poly_causal_gated(hs, c, None, 1, None),
                    lambda: o.poly_causal_gated_backward(gH_full, hs, c, None, 1, None), 3 * x, 5 * x,
                    lambda: reference.poly_causal_gated(hs, c)))
    return out


def baseline(ref_fn, device):
    """The per-op baseline: torch.compile of the reference on GPU, the eager reference on CPU."""
    if device.type != "cuda":
        return ref_fn, "pure-PyTorch reference (eager)"
    return torch.compile(ref_fn, dynamic=False), "torch.compile(pom_ext/reference.py)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="one small shape, few repeats (a smoke run)")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if not ops.native_available():
        print("pom_ext: compiled kernels are not loaded; rebuild with: " + ops.REBUILD, file=sys.stderr)
        return 1
    if args.quick:
        grid, args.repeat, args.warmup = [(1, 256, 64, 2)], 3, 1
    else:
        grid = [(B, N, E, K) for B in (1, 8) for N in (4096, 65536) for E in (1024, 4096) for K in (2, 4)]
    bw = copy_bandwidth(device, args.repeat)
    flops = gemm_rate(device, dtype, max(3, args.repeat // 4))
    print(f"copy bandwidth {bw / 1e9:.1f} GB/s (read + write), GEMM {flops / 1e12:.1f} TFLOP/s ({dtype})",
          file=sys.stderr)
    rows = []
    for (B, N, E, K) in grid:
        try:
            todo = cases(B, N, E, K, device, dtype)
        except torch.OutOfMemoryError:
            rows.append({"shape": [B, N, E, K], "status": "oom"})
            continue
        for name, fwd, bwd, nb_f, nb_b, ref in todo:
            for direction, fn, nbytes in (("fwd", fwd, nb_f), ("bwd", bwd, nb_b)):
                r = measure(fn, device, args.repeat, args.warmup, memory=False)
                row = {"op": name, "dir": direction, "shape": [B, N, E, K], "bytes": nbytes, **r}
                if r["status"] == "ok":
                    row["GBps"] = nbytes / r["median_s"] / 1e9
                    row["fraction_of_copy"] = nbytes / r["median_s"] / bw
                if direction == "fwd" and not args.no_baseline:
                    base, base_name = baseline(ref, device)
                    b = measure(base, device, max(3, args.repeat // 4), args.warmup, memory=False)
                    row["baseline"] = base_name
                    row["baseline_median_s"] = b.get("median_s")
                    if b["status"] == "ok" and r["status"] == "ok":
                        row["speedup"] = b["median_s"] / r["median_s"]
                rows.append(row)
                frac = f"{100 * row['fraction_of_copy']:5.1f}%" if "fraction_of_copy" in row else row["status"]
                sp = f"  {row['speedup']:6.1f}x vs baseline" if "speedup" in row else ""
                print(f"{name:18s} {direction} B={B} N={N:6d} E={E:5d} K={K}: "
                      f"{row.get('median_s', float('nan')) * 1e3:8.3f} ms  {row.get('GBps', 0):7.1f} GB/s {frac}{sp}")
        del todo
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result = {**environment(device), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "dtype": str(dtype), "copy_bandwidth_GBps": bw / 1e9, "gemm_TFLOPs": flops / 1e12, "results": rows}
    out = args.out or os.path.join(ROOT, "benchmarks", "results",
                                   f"ops_{device.type}{'_quick' if args.quick else ''}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1, default=str)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
