"""pom-bench: PoM against attention on this machine — speed, memory and decoding.

    pom-bench                          layer sweep (CUDA when available, else CPU)
    pom-bench --decode                 layer sweep, then the decode benchmark
    pom-bench --what decode            decode benchmark only
    pom-bench --quick --out /tmp/pb    a smoke run of everything in well under a minute
    python -m pom_ext.bench ...        the same

Defaults, GPU: bf16, D=1024, 16 heads, N = 1k..128k, batch max(1, 65536 // N), SDPA flash / cuDNN /
memory-efficient backends and flash-attn when installed; decode: 12 layers, context 1k..1M, batch 1 and 64.
CPU: fp32, D=256, 4 heads (head size 64, as on GPU), N = 512..16k, batch max(1, 16384 // N), SDPA; decode:
4 layers, context 1k..64k, batch 1 and 8. Progress goes to stderr, tables to stdout; JSON, CSV and PNG files to
--out. A point that runs out of memory is recorded as 'oom' and the sweep goes on.
"""
import argparse
import os
import sys
from typing import List, Optional

import torch

from . import decode as decode_bench
from . import layer as layer_bench
from . import report
from .common import environment, load_average

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}

# name: (cuda default, cpu default, quick); None: given per device below
DEFAULTS = {
    "dim": (1024, 256, 64),
    "heads": (16, 4, 2),
    "seq_lens": ([1024 * 2**i for i in range(8)], [512 * 2**i for i in range(6)], [128, 256]),
    "tokens": (65536, 16384, 512),
    "repeats": (20, 5, 2),
    "warmup": (3, 0, 0),
    "reference_max_n": (0, 2048, 0),
    "max_run_s": (10.0, 60.0, 10.0),
    "contexts": ([1024, 4096, 16384, 32768, 65536, 262144, 1048576], [1024, 4096, 16384, 65536], [256, 1024]),
    "decode_batches": ([1, 64], [1, 8], [1, 2]),
    "layers": (12, 4, 2),
    "steps": (50, 20, 3),
    "decode_warmup": (5, 2, 1),
}


def sizes(text: str) -> List[int]:
    """'512,1k,64K,1M' -> [512, 1024, 65536, 1048576]."""
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        mult = {"k": 1024, "m": 1024**2}.get(part[-1], 1)
        try:
            value = int(part[:-1] if mult > 1 else part) * mult
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected sizes like 512,1k,64k,1M, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"sizes must be >= 1, got {text!r}")
        out.append(value)
    if not out:
        raise argparse.ArgumentTypeError(f"expected at least one size, got {text!r}")
    return out


def names(text: str) -> List[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="pom-bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto (cuda when available), cuda, cuda:1, cpu")
    ap.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="auto: bf16 on GPU, fp32 on CPU")
    ap.add_argument("--what", choices=["layer", "decode", "all"], default="layer")
    ap.add_argument("--decode", action="store_true", help="also run the decode benchmark (--what all)")
    ap.add_argument("--out", default="pom-bench-results", help="folder for JSON, CSV and PNG files")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run in well under a minute")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    g = ap.add_argument_group("model")
    g.add_argument("--dim", type=int, help="model width D (GPU 1024, CPU 256)")
    g.add_argument("--heads", type=int, help="attention heads, also PoM gate heads n_sel_heads (GPU 16, CPU 4)")
    g.add_argument("--degree", type=int, default=3)
    g.add_argument("--expand", type=int, default=2)
    g = ap.add_argument_group("layer sweep")
    g.add_argument("--seq-lens", type=sizes, help="e.g. 1k,2k,4k (GPU 1k..128k, CPU 512..16k)")
    g.add_argument("--batch", type=int, help="fixed batch size (default: max(1, --tokens // N))")
    g.add_argument("--tokens", type=int, help="tokens per point when --batch is not given (GPU 65536, CPU 16384)")
    mode = g.add_mutually_exclusive_group()
    mode.add_argument("--causal", dest="modes", action="store_const", const=["causal"])
    mode.add_argument("--non-causal", dest="modes", action="store_const", const=["non-causal"])
    mode.add_argument("--both", dest="modes", action="store_const", const=["non-causal", "causal"],
                      help="causal and non-causal (the default)")
    g.add_argument("--passes", type=names, default=["fwd", "fwd+bwd"], help="fwd,fwd+bwd")
    g.add_argument("--methods", type=names,
                   help=f"layer methods among {','.join(layer_bench.ALL_METHODS)} (default: all that apply)")
    g.add_argument("--repeats", type=int, help="timed calls per point (GPU 20, CPU 5)")
    g.add_argument("--warmup", type=int, help="untimed calls before the memory call (GPU 3, CPU 0: the memory "
                                             "call is the warm-up)")
    g.add_argument("--reference-max-n", type=int,
                   help="run pom_ext_reference and pom_paper only up to this N (0: no cap; CPU default 2048)")
    g.add_argument("--max-run-s", type=float, help="skip a method at larger N once one call took longer")
    g = ap.add_argument_group("decode")
    g.add_argument("--contexts", type=sizes, help="context lengths (GPU 1k..1M, CPU 1k..64k)")
    g.add_argument("--decode-batches", type=sizes, help="batch sizes (GPU 1,64; CPU 1,8)")
    g.add_argument("--layers", type=int, help="layers in the stack (GPU 12, CPU 4)")
    g.add_argument("--steps", type=int, help="timed decoding steps per point")
    g.add_argument("--decode-warmup", type=int, help="untimed steps before them")
    g.add_argument("--decode-methods", type=names, help=f"among {','.join(decode_bench.METHODS)}")
    g.add_argument("--cuda-graph", action="store_true",
                   help="replay each decoding step from a CUDA graph (pom_ext, attention_flash; SDPA over a "
                        "growing cache prefix cannot be captured and runs eagerly)")
    args = ap.parse_args(argv)
    bad = [p for p in args.passes if p not in layer_bench.PASSES]
    if bad or not args.passes:
        ap.error(f"--passes takes {','.join(layer_bench.PASSES)}, got {','.join(args.passes) or 'nothing'}")
    if args.decode and args.what == "layer":
        args.what = "all"
    if args.modes is None:
        args.modes = ["non-causal", "causal"]
    return args


def _resolve(args: argparse.Namespace) -> torch.device:
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("pom-bench: --device cuda asked for, but torch sees no CUDA device")
    column = 2 if args.quick else 0 if device.type == "cuda" else 1
    for name, values in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, values[column])
    if args.dtype == "auto":
        args.dtype = "bf16" if device.type == "cuda" else "fp32"
    return device


def _layer_config(args, device: torch.device, dtype: torch.dtype) -> layer_bench.LayerConfig:
    return layer_bench.LayerConfig(
        device=device, dtype=dtype, seq_lens=args.seq_lens, dim=args.dim, heads=args.heads, degree=args.degree,
        expand=args.expand, batch=args.batch, tokens=args.tokens, modes=args.modes, passes=args.passes,
        methods=args.methods or layer_bench.default_methods(device), repeats=args.repeats, warmup=args.warmup,
        reference_max_n=args.reference_max_n or None, max_run_s=args.max_run_s, seed=args.seed)


def _decode_config(args, device: torch.device, dtype: torch.dtype) -> decode_bench.DecodeConfig:
    return decode_bench.DecodeConfig(
        device=device, dtype=dtype, contexts=args.contexts, batches=args.decode_batches, layers=args.layers,
        dim=args.dim, heads=args.heads, degree=args.degree, expand=args.expand, steps=args.steps,
        warmup=args.decode_warmup, methods=args.decode_methods or decode_bench.default_methods(device),
        cuda_graph=args.cuda_graph, seed=args.seed)


CONFIGS = {"layer": _layer_config, "decode": _decode_config}
# name: (module with run(), table, targets, summary for the JSON, plots)
BENCHES = {
    "layer": (layer_bench, report.layer_table, report.layer_targets,
              lambda r: {"speedups": report.layer_speedups(r)}, report.plot_layer),
    "decode": (decode_bench, report.decode_table, report.decode_targets,
               lambda r: {"ratios": report.decode_ratios(r)}, report.plot_decode),
}


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    device = _resolve(args)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    os.makedirs(args.out, exist_ok=True)
    env = environment(device)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    log(f"pom-bench: {env['device_name']} ({device}), torch {env['torch']}, CUDA {env['cuda']}, "
        f"{env['threads']} threads, pom_ext {env['pom_ext']} (compiled kernels: {env['pom_ext_native']}), "
        f"commit {env['git_commit']}")
    written, errors, summary_md = [], 0, []
    for name in ("layer", "decode"):
        if args.what not in (name, "all"):
            continue
        bench, table, targets, summary, plot = BENCHES[name]
        result = bench.run(CONFIGS[name](args, device, dtype), log)
        env["loadavg_end"] = load_average()
        checks = targets(result, env)
        print(table(result) + report.targets_table(checks), flush=True)
        summary_md.append(table(result, markdown=True) + report.targets_table(checks, markdown=True))
        written += _write(args, name, env, result, {**summary(result), "targets": checks}, plot)
        errors += sum(p["status"].startswith("error") for p in result["points"])
    written.append(os.path.join(args.out, "summary.md"))
    with open(written[-1], "w") as f:
        f.write(report.summary_header(env) + "\n".join(summary_md) + "\n")
    log("wrote " + ", ".join(written))
    if errors:
        log(f"pom-bench: {errors} point(s) failed with an error (status 'error: ...' in the JSON)")
    return 1 if errors else 0


def _write(args, name: str, env, result, extra, plot) -> List[str]:
    files = [os.path.join(args.out, f"{name}.json"), os.path.join(args.out, f"{name}.csv")]
    report.write_json(files[0], env, result, extra)
    report.write_csv(files[1], result["points"])
    if not args.no_plots:
        pngs = plot(result, env, args.out)
        if not pngs:
            print("pom-bench: matplotlib is not installed, no plots (pip install matplotlib)", file=sys.stderr)
        files += pngs
    return files


if __name__ == "__main__":
    sys.exit(main())
