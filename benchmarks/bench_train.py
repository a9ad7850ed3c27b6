"""Training throughput of Polymorpher language models: tokens per second of one full training step (forward,
backward, AdamW) for PoM, a hybrid and attention at several sequence lengths, in one run; and where a PoM step's
time goes (its parts timed alone, forward + backward, at the step's shapes), and the PoM step with the block's
convolution through the causal_conv1d op against its nn.Conv1d (the path before the op), in alternation.

    python benchmarks/bench_train.py                        # T = 256, 1k, 4k, 16k; the LM table's models
    python benchmarks/bench_train.py --quick                # a smoke run

The models are those of the README's byte-level LM table (dim 128, depth 6, 8 gate heads, expand 2, a causal
convolution of 4, MLP ratio 4; attention: 4 heads, rotary positions): layers PPPPPP, PPAPPA and AAAAAA. Every
point has the same number of tokens per step (batch = tokens / T, at least 1). Results: printed, and JSON under
benchmarks/results/ (machine, threads, torch, commit, date, every point).
"""
import argparse
import contextlib
import datetime
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import pom_ext  # noqa: E402
from pom_ext import ops  # noqa: E402
from pom_ext.bench.common import cpu_name, fwd_bwd, git_commit, median_time  # noqa: E402
from pom_ext.models import PolymorpherLM  # noqa: E402
from pom_ext.models.blocks import PolymorpherBlock  # noqa: E402

PATTERNS = {"pom": "PPPPPP", "hybrid": "PPAPPA", "attention": "AAAAAA"}


def median_ms(fn, repeat: int) -> float:
    return median_time(fn, repeat)[0] * 1e3


def build(args, pattern: str) -> PolymorpherLM:
    torch.manual_seed(0)
    return PolymorpherLM(num_tokens=256, dim=args.dim, depth=len(pattern), degree=args.degree, expand=args.expand,
                         n_sel_heads=args.n_sel_heads, conv_size=args.conv_size, layer_pattern=pattern,
                         n_heads=args.n_heads)


def step_fn(model, opt, tokens, targets):
    def step():
        opt.zero_grad(set_to_none=True)
        _, loss = model(tokens, targets)
        loss.backward()
        opt.step()
    return step


def batch(B: int, T: int):
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, 256, (B, T + 1), generator=g)
    return data[:, :-1], data[:, 1:]


def breakdown(args, model: PolymorpherLM, opt, tokens, targets, repeat: int) -> dict:
    """The parts of a PoM step timed alone (forward + backward at the step's shapes), per model; 'other' is the
    step's median minus their sum (residual adds, autograd and allocation overhead, timing noise)."""
    B, T = tokens.shape
    D = args.dim
    block = model.blocks[0]
    depth = len(model.blocks)
    x = torch.randn(B, T, D, requires_grad=True)
    mixer = block.mixer
    params = [p for p in mixer.parameters()]
    hs_fn = lambda: mixer._gated_input(x, None)[0]  # noqa: E731
    hs, bias = mixer._gated_input(x, None)
    hs = hs.detach().requires_grad_()
    y = torch.randn(B, T, mixer.state_width, requires_grad=True)
    parts = {
        "layer norms": median_ms(fwd_bwd(lambda: block.norm2(block.norm1(x)), x), repeat),
        "convolution": median_ms(fwd_bwd(lambda: block._conv(x), x), repeat) if block.conv is not None else 0.0,
        "PoM projections (in, out)": median_ms(fwd_bwd(hs_fn, x, *params), repeat)
        + median_ms(fwd_bwd(lambda: mixer.ag_proj(y), y, *params), repeat),
        "PoM mixer op (poly_causal_gated)": median_ms(
            fwd_bwd(lambda: ops.poly_causal_gated(hs, mixer.po_coeff, bias), hs, mixer.po_coeff), repeat),
        "MLP": median_ms(fwd_bwd(lambda: block.mlp(x), x, *block.mlp.parameters()), repeat),
    }
    parts = {k: v * depth for k, v in parts.items()}
    logits_in = torch.randn(B, T, D, requires_grad=True)
    parts["embedding, head, loss"] = median_ms(fwd_bwd(
        lambda: F.cross_entropy(model.head(model.norm(logits_in)).flatten(0, 1), targets.flatten()).unsqueeze(0),
        logits_in, *model.head.parameters()), repeat) + median_ms(
        fwd_bwd(lambda: model.embed(tokens), *model.embed.parameters()), repeat)
    # The optimizer alone, on gradients from one step.
    opt.zero_grad(set_to_none=True)
    model(tokens, targets)[1].backward()
    parts["optimizer (AdamW)"] = median_ms(opt.step, repeat)
    return parts


@contextlib.contextmanager
def module_conv():
    """PoM blocks computing their causal convolution as they did before the causal_conv1d op: their nn.Conv1d on
    the transposed, left-padded activations (the same function; the module's own kernel and two copies)."""
    native = PolymorpherBlock._conv

    def conv(self, u):
        if self.conv is None:
            return u
        return self.conv(F.pad(u.transpose(1, 2), (self.conv_size - 1, 0))).transpose(1, 2)

    PolymorpherBlock._conv = conv
    try:
        yield
    finally:
        PolymorpherBlock._conv = native


def conv_comparison(step, repeat: int) -> dict:
    """The PoM step with the causal_conv1d op and with the block's nn.Conv1d, timed in alternation (one warm-up
    step each round), medians over the rounds."""
    ts = {"causal_conv1d": [], "nn_conv1d": []}
    for _ in range(max(3, repeat)):
        for name in ts:
            with module_conv() if name == "nn_conv1d" else contextlib.nullcontext():
                step()
                t0 = time.perf_counter()
                step()
                ts[name].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in ts.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-lens", default="256,1024,4096,16384")
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per step (batch = max(1, tokens / T))")
    ap.add_argument("--models", default="pom,hybrid,attention")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--degree", type=int, default=2)
    ap.add_argument("--expand", type=int, default=2)
    ap.add_argument("--n-sel-heads", type=int, default=8)
    ap.add_argument("--conv-size", type=int, default=4)
    ap.add_argument("--n-heads", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "train_bench.json"))
    args = ap.parse_args()
    if args.quick:
        args.seq_lens, args.tokens, args.repeat = "64,256", 512, 2
    torch.set_num_threads(args.threads)
    seq_lens = [int(s) for s in args.seq_lens.split(",")]
    models = args.models.split(",")
    for m in models:
        if m not in PATTERNS:
            raise SystemExit(f"--models: each of {sorted(PATTERNS)}, got {m!r}")
    rows, breakdowns, convs = [], {}, {}
    print(f"training step (forward, backward, AdamW), {args.tokens} tokens per step, {args.threads} threads; "
          f"median of {args.repeat} steps")
    print(f"{'T':>6} {'B':>4} " + " ".join(f"{m + ' ms':>14} {m + ' tok/s':>16}" for m in models))
    for T in seq_lens:
        B = max(1, args.tokens // T)
        tokens, targets = batch(B, T)
        line = f"{T:>6} {B:>4} "
        for m in models:
            model = build(args, PATTERNS[m])
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            ms = median_ms(step_fn(model, opt, tokens, targets), args.repeat)
            rows.append({"model": m, "layers": PATTERNS[m], "T": T, "B": B, "step_ms": ms,
                         "tokens_per_s": B * T / ms * 1e3})
            line += f"{ms:>14.1f} {B * T / ms * 1e3:>16.0f}"
            if m == "pom":
                parts = breakdown(args, model, opt, tokens, targets, args.repeat)
                parts["other"] = ms - sum(parts.values())
                breakdowns[T] = {"step_ms": ms, "parts_ms": parts}
                if args.conv_size > 1:
                    convs[T] = conv_comparison(step_fn(model, opt, tokens, targets), args.repeat)
        print(line)
    print("\nwhere a PoM step's time goes (its parts timed alone, forward + backward, ms per step):")
    names = list(next(iter(breakdowns.values()))["parts_ms"]) if breakdowns else []
    print(f"{'part':<34}" + "".join(f"{'T=' + str(T):>12}" for T in breakdowns))
    for n in names:
        print(f"{n:<34}" + "".join(f"{b['parts_ms'][n]:>9.1f} ms" for b in breakdowns.values()))
    print(f"{'step (measured)':<34}" + "".join(f"{b['step_ms']:>9.1f} ms" for b in breakdowns.values()))
    if convs:
        print("\nthe PoM step with the block's convolution through causal_conv1d and through its nn.Conv1d (the "
              "former path), in alternation:")
        for T, c in convs.items():
            print(f"T={T:<6} causal_conv1d {c['causal_conv1d']:8.1f} ms   nn.Conv1d {c['nn_conv1d']:8.1f} ms   "
                  f"({100 * (1 - c['causal_conv1d'] / c['nn_conv1d']):.1f}% less)")
    out = {
        "device": cpu_name(), "cpu_isa": pom_ext.cpu_isa(),
        "threads": args.threads, "torch": torch.__version__, "cuda": torch.version.cuda,
        "git_commit": git_commit(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": {k: v for k, v in vars(args).items() if k != "out"}, "results": rows,
        "pom_breakdown": breakdowns, "pom_step_ms_by_convolution": convs,
    }
    if not args.quick:
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
