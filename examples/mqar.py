r"""Multi-query associative recall (MQAR) as the Zoology benchmark runs it, for Polymorpher LMs.

The task (Zoology's generator, written here): a sequence starts with num_kv key-value pairs (k1 v1 k2 v2 ...;
keys distinct, from the lower half of the vocabulary, values from the upper half); then every key is queried
once, followed by its value, at an even offset after the pairs drawn from Zoology's power law (offset gaps with
probability proportional to gap^(a - 1), a = 0.01: most queries come soon after the pairs, some far); every other
position holds the token 0. The model must predict the value at each query; accuracy is over all queries of a
held-out set. The loss and the predictions read the model's last hidden state at the query positions only, so
the 8192-token vocabulary costs num_kv rows of the head per sequence, not seq_len.

Runs: every (model, width, length, learning rate, seed) of the command line is one run, appended to
OUT/results.jsonl as it finishes; a run already there is skipped, so a sweep stops and resumes at will (and
several processes may share OUT if they run different models). Each run trains with AdamW (weight decay 0.1,
linear warm-up over 10% of the steps, then cosine decay) on fresh batches, evaluates every --eval-every steps and
stops early once the held-out accuracy reaches --target; the best held-out accuracy is its result. The final
model's held-out accuracy is also kept by the order in which the keys are queried (quarters of the ranks): the
last queries can be answered by ruling out the values already shown, without binding keys to values, so the
first ones measure recall (the report's second table, beside what elimination alone scores).

Models: "attention" (rotary multi-head attention, 1 head per 64 channels, at least 1) and "pom-KxE",
"pom-KxE-hS", "pom-KxE-cC" or "pom-KxE-hS-cC" (PoM degree K, expand E, S gate heads (default 1), a causal
convolution of C tokens (default --conv-size)). Every model: 2 layers (--depth), each with its MLP; PoM layers
keep their short causal convolution. The recurrent state's size is measured on the
model's own decoding cache after a prefill of seq_len tokens (bytes per sequence, in the training dtype): PoM
the running sums, counts and convolution tail of every layer (constant in the length), attention its KV cache.

    # Zoology's grid (vocabulary 8192; lengths 64-512 with 4-32 pairs; a learning-rate sweep):
    PYTHONPATH=. python examples/mqar.py --models attention --dims 64,128 --out benchmarks/results/mqar_zoology
    PYTHONPATH=. python examples/mqar.py --models pom-1x2,pom-2x2,pom-4x2 --dims 64 \
        --out benchmarks/results/mqar_zoology
    # seeds 1, 2 at each (model, width)'s best learning rate of seed 0:
    PYTHONPATH=. python examples/mqar.py --models pom-2x2 --dims 64 --lrs best --seeds 1,2 --out ...
    # the table, the JSON summary and the accuracy-vs-state-size plot of everything in OUT:
    PYTHONPATH=. python examples/mqar.py --report --out benchmarks/results/mqar_zoology
    PYTHONPATH=. python examples/mqar.py --quick --out /tmp/mqar_quick       # a smoke run, well under a minute
"""
import argparse
import datetime
import json
import math
import pathlib
import platform
import re
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from pom_ext.models import PolymorpherLM  # noqa: E402

ZOOLOGY_LRS = "1e-4,4.6e-4,2.2e-3,1e-2"  # Zoology's sweep: logspace(-4, -2, 4)
CONV_SIZE = 4  # PoM's causal convolution when the model's name does not give one
MODEL_RE = re.compile(r"^(attention|pom-(\d+)x(\d+)(?:-h(\d+))?(?:-c(\d+))?(?:-l([PA]+))?)$")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="attention,pom-2x2",
                   help="comma-separated: attention, pom-KxE[-hS][-cC][-lLAYERS] (degree K, expand E, S gate "
                        "heads, convolution of C tokens; LAYERS: a hybrid's layers in order, P for PoM, A for "
                        "attention, one letter per layer of --depth)")
    p.add_argument("--dims", default="64", help="model widths, comma-separated")
    p.add_argument("--seq-lens", default="64,128,256,512")
    p.add_argument("--num-kv", default="4,8,16,32", help="key-value pairs, one per length (or one for all)")
    p.add_argument("--lrs", default=ZOOLOGY_LRS,
                   help="learning rates, comma-separated, or 'best': each (model, width)'s best of seed 0 in OUT")
    p.add_argument("--seeds", default="0")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--conv-size", type=int, default=CONV_SIZE,
                   help="PoM's causal convolution where a name gives none (-cC); a run is kept under the name with it")
    p.add_argument("--coeff-std", type=float, default=0.0,
                   help="PoM's polynomial coefficients drawn from N(0, std^2) instead of the layer's own initial "
                        "values (the reference's, within +-1e-3); 0 keeps those")
    p.add_argument("--steps", type=int, default=4000, help="training steps at most (fewer once --target is met)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--test-size", type=int, default=1024, help="held-out sequences")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--target", type=float, default=0.99, help="stop a run once its held-out accuracy reaches this")
    p.add_argument("--power-a", type=float, default=0.01, help="Zoology's query-offset power law")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="runs/mqar")
    p.add_argument("--report", action="store_true", help="train nothing: summarize OUT/results.jsonl")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    if "--quick" in (sys.argv[1:] if argv is None else argv):  # small defaults; explicit arguments still win
        p.set_defaults(seq_lens="32,64", num_kv="4", vocab=64, dims="32", steps=40, batch_size=16, test_size=64,
                       eval_every=20, lrs="3e-3")
    args = p.parse_args(argv)
    try:
        args.models = [m.strip() for m in args.models.split(",") if m.strip()]
        args.dims = [int(v) for v in args.dims.split(",")]
        args.seq_lens = [int(v) for v in args.seq_lens.split(",")]
        kv = [int(v) for v in args.num_kv.split(",")]
        args.seeds = [int(v) for v in args.seeds.split(",")]
        args.lrs = "best" if args.lrs == "best" else [float(v) for v in args.lrs.split(",")]
    except ValueError:
        p.error("--dims, --seq-lens, --num-kv and --seeds take integers, --lrs numbers or 'best'")
    for m in args.models:
        match = MODEL_RE.match(m)
        if not match:
            p.error(f"--models: {m!r} is not 'attention' or 'pom-KxE[-hS][-cC][-lLAYERS]'")
        layers = match.group(6)
        if layers is not None and (len(layers) != args.depth or "P" not in layers):
            p.error(f"--models: {m!r}: LAYERS must have one letter per layer of --depth ({args.depth}) and at least "
                    "one P (all attention is 'attention')")
    if args.conv_size < 0:
        p.error(f"--conv-size: expected an integer >= 0, got {args.conv_size}")
    if not (args.coeff_std >= 0 and math.isfinite(args.coeff_std)):
        p.error(f"--coeff-std: expected a number >= 0, got {args.coeff_std}")
    args.models = [canonical(m, args.conv_size) for m in args.models]
    if len(kv) not in (1, len(args.seq_lens)):
        p.error(f"--num-kv: give one value or one per length ({len(args.seq_lens)}), got {len(kv)}")
    args.num_kv = kv * len(args.seq_lens) if len(kv) == 1 else kv
    for L, n in zip(args.seq_lens, args.num_kv):
        if 4 * n > L or n > args.vocab // 2 - 1:
            p.error(f"--num-kv: {n} pairs do not fit length {L} (4 num_kv <= seq_len) or vocabulary {args.vocab} "
                    f"(num_kv < vocab / 2)")
    return args


# ---- the task ----

def mqar_batch(batch: int, seq_len: int, num_kv: int, vocab: int, g: torch.Generator, power_a: float = 0.01):
    """(inputs (B, L), targets (B, L)): targets are -100 except at the query positions, where they hold the value."""
    half = vocab // 2
    keys = torch.argsort(torch.rand(batch, half - 1, generator=g), dim=1)[:, :num_kv] + 1
    values = torch.randint(half, vocab, (batch, num_kv), generator=g)
    ctx = 2 * num_kv
    x = torch.zeros(batch, seq_len, dtype=torch.long)
    y = torch.full((batch, seq_len), -100, dtype=torch.long)
    x[:, 0:ctx:2], x[:, 1:ctx:2] = keys, values
    space = (seq_len - ctx) // 2  # query slots: even offsets after the pairs, each followed by its value
    gap = torch.arange(1, space + 1, dtype=torch.float64)
    prob = power_a * gap ** (power_a - 1)
    slots = torch.multinomial((prob / prob.sum()).expand(batch, space), num_kv, replacement=False, generator=g)
    pos = ctx + 2 * slots
    x.scatter_(1, pos, keys)
    x.scatter_(1, pos + 1, values)
    y.scatter_(1, pos, values)
    return x, y


# ---- models ----

def spec(model: str) -> dict:
    m = MODEL_RE.match(model)
    if m.group(1) == "attention":
        return {"kind": "attention"}
    s = {"kind": "pom", "degree": int(m.group(2)), "expand": int(m.group(3)), "gate_heads": int(m.group(4) or 1),
         "conv_size": int(m.group(5) or CONV_SIZE)}
    if m.group(6) and "A" in m.group(6):  # a hybrid; all P is the plain PoM model
        s["layers"] = m.group(6)
    return s


def canonical(model: str, conv_size: int) -> str:
    """The name under which a run is kept: the convolution in it (-cC) unless it is the default, CONV_SIZE, and a
    hybrid's layers (-lLAYERS; all P is the plain PoM model)."""
    if model == "attention":
        return model
    s = spec(model)
    if not MODEL_RE.match(model).group(5):
        s["conv_size"] = conv_size
    name = f"pom-{s['degree']}x{s['expand']}" + (f"-h{s['gate_heads']}" if s["gate_heads"] != 1 else "")
    name += f"-c{s['conv_size']}" if s["conv_size"] != CONV_SIZE else ""
    return name + (f"-l{s['layers']}" if "layers" in s else "")


def build(model: str, dim: int, args) -> PolymorpherLM:
    s = spec(model)
    common = dict(num_tokens=args.vocab, dim=dim, depth=args.depth)
    if s["kind"] == "attention":
        return PolymorpherLM(**common, layer_pattern="A", n_heads=max(1, dim // 64))
    hybrid = {"layer_pattern": s["layers"], "n_heads": max(1, dim // 64)} if "layers" in s else {}
    lm = PolymorpherLM(**common, degree=s["degree"], expand=s["expand"], n_sel_heads=s["gate_heads"],
                       conv_size=s["conv_size"], **hybrid)
    if getattr(args, "coeff_std", 0.0) > 0:
        with torch.no_grad():
            for name, p in lm.named_parameters():
                if name.endswith("po_coeff"):
                    p.normal_(0.0, args.coeff_std)
    return lm


def query_logits(lm: PolymorpherLM, x: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
    """Logits at the positions sel (B, L) only: the head multiplies num_kv rows per sequence."""
    h = lm.embed(x)
    for block in lm.blocks:
        h = block(h, mask="causal")
    return lm.head(lm.norm(h[sel]))


@torch.no_grad()
def state_bytes(lm: PolymorpherLM, seq_len: int) -> int:
    """Bytes per sequence of the decoding cache after a prefill of seq_len tokens."""
    cache = lm.allocate_cache(1)
    lm.step(torch.zeros(1, seq_len, dtype=torch.long), cache)
    return sum(t.numel() * t.element_size() for c in cache for t in c.tensors())


def elimination(num_kv: int, first: int, last: int) -> float:
    """Mean accuracy on the queries of ranks first..last (1-based, in the order asked) of a model that knows the
    values of the pairs but not which key each belongs to, and rules out the values already answered: the r-th
    query has num_kv - r + 1 values left. Over all the queries: H(num_kv) / num_kv (0.521 for 4 pairs)."""
    return sum(1 / (num_kv - r + 1) for r in range(first, last + 1)) / (last - first + 1)


@torch.no_grad()
def rank_counts(lm, test, num_kv: int, bins: int = 4) -> tuple:
    """(right, asked): the held-out queries answered right and asked, per span of their ranks (the order in which
    the keys are queried, each key once, its value shown after it), min(bins, num_kv) spans, int64 tensors."""
    lm.eval()
    bins = min(bins, num_kv)
    right, asked = torch.zeros(bins, dtype=torch.long), torch.zeros(bins, dtype=torch.long)
    for x, y in test:
        sel = y != -100
        ok = query_logits(lm, x, sel).argmax(-1) == y[sel]
        span = (sel.cumsum(1) - 1)[sel] * bins // num_kv  # the queries of a sequence in order: 0 .. num_kv - 1
        right += torch.bincount(span[ok], minlength=bins)
        asked += torch.bincount(span, minlength=bins)
    lm.train()
    return right, asked


def accuracy(counts: tuple) -> float:
    right, asked = counts
    return right.sum().item() / max(asked.sum().item(), 1)


def by_rank(counts: tuple, num_kv: int) -> list:
    """[[first rank, last rank (1-based), accuracy, queries, elimination's accuracy], ...] of rank_counts' spans.
    Binding a key to its value answers every rank alike; ruling out the values already answered does better on
    the late ranks only, so the first ranks measure recall."""
    right, asked = counts
    bins = len(asked)
    spans = [(-(-i * num_kv // bins) + 1, -(-(i + 1) * num_kv // bins)) for i in range(bins)]
    return [[lo, hi, right[i].item() / max(asked[i].item(), 1), asked[i].item(), elimination(num_kv, lo, hi)]
            for i, (lo, hi) in enumerate(spans)]


def accuracy_by_rank(lm, test, num_kv: int, bins: int = 4) -> list:
    """Held-out accuracy by the order in which the keys are queried, in spans of the ranks (by_rank)."""
    return by_rank(rank_counts(lm, test, num_kv, bins), num_kv)


def lr_at(step: int, steps: int, lr: float) -> float:
    warm = max(1, steps // 10)
    if step < warm:
        return lr * (step + 1) / warm
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


def run_one(args, model: str, dim: int, seq_len: int, num_kv: int, lr: float, seed: int) -> dict:
    torch.manual_seed(seed)
    lm = build(model, dim, args)
    opt = torch.optim.AdamW(lm.parameters(), lr=lr, weight_decay=0.1)
    g_test = torch.Generator().manual_seed(10_000 + seq_len)  # the same held-out set for every model
    test = [mqar_batch(min(args.batch_size, args.test_size), seq_len, num_kv, args.vocab, g_test, args.power_a)
            for _ in range(max(1, args.test_size // args.batch_size))]
    g = torch.Generator().manual_seed(seed)
    curve, best, reached, t0, step = [], 0.0, None, time.time(), 0
    counts, counted_at = None, -1
    while step < args.steps:
        x, y = mqar_batch(args.batch_size, seq_len, num_kv, args.vocab, g, args.power_a)
        sel = y != -100
        loss = F.cross_entropy(query_logits(lm, x, sel).float(), y[sel])
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        opt.step()
        step += 1
        if not math.isfinite(loss.item()):
            break
        if step % args.eval_every == 0 or step == args.steps:
            counts, counted_at = rank_counts(lm, test, num_kv), step
            acc = accuracy(counts)
            curve.append([step, round(loss.item(), 4), acc])
            best = max(best, acc)
            if acc >= args.target:
                reached = step
                break
    if counted_at != step:  # the final model not evaluated yet (a non-finite loss, or no step)
        counts = rank_counts(lm, test, num_kv)
    s = spec(model)
    return {"model": model, **s, "dim": dim, "depth": args.depth, "seq_len": seq_len, "num_kv": num_kv,
            "vocab": args.vocab, "lr": lr, "seed": seed, "batch_size": args.batch_size, "max_steps": args.steps,
            **({"coeff_std": args.coeff_std} if s["kind"] == "pom" and args.coeff_std > 0 else {}),
            "steps": step, "reached_target_at": reached, "accuracy": best, "final_accuracy": curve[-1][2]
            if curve else 0.0, "final_by_rank": by_rank(counts, num_kv), "curve": curve, "params": lm.num_params(),
            "state_bytes": state_bytes(lm, seq_len), "train_s": round(time.time() - t0, 1)}


# ---- results ----

def key(r: dict) -> tuple:
    return (r["model"], r["dim"], r["seq_len"], r["num_kv"], r["vocab"], r["lr"], r["seed"], r["max_steps"],
            r["batch_size"], r["depth"], r.get("coeff_std", 0.0))


def load(out: pathlib.Path) -> list:
    f = out / "results.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()] if f.exists() else []


def longest(results: list) -> list:
    """The runs to report: of the runs of one seed that differ only in --steps, the longest."""
    keep = {}
    for r in results:
        k = key(r)[:7] + key(r)[8:]
        if k not in keep or r["max_steps"] > keep[k]["max_steps"]:
            keep[k] = r
    return list(keep.values())


def best_lrs(results: list) -> dict:
    """(model, dim) -> the learning rate of seed 0 with the highest mean accuracy over the lengths it ran."""
    by = {}
    for r in results:
        if r["seed"] == 0:
            by.setdefault((r["model"], r["dim"]), {}).setdefault(r["lr"], []).append(r["accuracy"])
    return {k: max(v, key=lambda lr: (sum(v[lr]) / len(v[lr]), len(v[lr]))) for k, v in by.items()}


def summarize(results: list) -> list:
    """One row per (model, dim, seq_len) at the (model, dim)'s best learning rate: accuracy over its seeds."""
    best = best_lrs(results)
    rows = {}
    for r in results:
        if best.get((r["model"], r["dim"])) != r["lr"]:
            continue
        row = rows.setdefault((r["model"], r["dim"], r["seq_len"]), {
            "model": r["model"], "dim": r["dim"], "seq_len": r["seq_len"], "num_kv": r["num_kv"], "lr": r["lr"],
            "state_bytes": r["state_bytes"], "params": r["params"], "accuracies": [], "seeds": []})
        row["accuracies"].append(r["accuracy"])
        row["seeds"].append(r["seed"])
        if "final_by_rank" in r:  # runs from before it was kept have none
            row.setdefault("by_rank_runs", []).append(r["final_by_rank"])
            row.setdefault("by_rank_seeds", []).append(r["seed"])
    out = []
    for row in rows.values():
        a = row["accuracies"]
        row["mean"] = sum(a) / len(a)
        row["std"] = (sum((v - row["mean"]) ** 2 for v in a) / len(a)) ** 0.5
        runs = row.pop("by_rank_runs", None)
        if runs:  # each span's accuracy over the runs' queries in it
            row["by_rank"] = [[b[0], b[1], sum(r[i][2] * r[i][3] for r in runs) / max(sum(r[i][3] for r in runs), 1),
                               sum(r[i][3] for r in runs), b[4]] for i, b in enumerate(runs[0])]
        out.append(row)
    return sorted(out, key=lambda r: (r["model"] != "attention", r["model"], r["dim"], r["seq_len"]))


def table(rows: list) -> str:
    lens = sorted({r["seq_len"] for r in rows})
    lines = ["| model | width | lr | state (bytes/seq) | " + " | ".join(f"L={L}" for L in lens) + " |",
             "|---|---|---|---|" + "---|" * len(lens)]
    groups = {}
    for r in rows:
        groups.setdefault((r["model"], r["dim"]), {})[r["seq_len"]] = r
    for (model, dim), by_len in groups.items():
        first = next(iter(by_len.values()))
        state = "KV: " + ", ".join(f"{by_len[L]['state_bytes']:,}" for L in lens if L in by_len) \
            if model == "attention" else f"{first['state_bytes']:,}"
        cells = [f"{by_len[L]['mean']:.3f}" + (f" ± {by_len[L]['std']:.3f} (n={len(by_len[L]['accuracies'])})"
                                                 if len(by_len[L]['accuracies']) > 1 else "") if L in by_len else ""
                 for L in lens]
        lines.append(f"| {model} | {dim} | {first['lr']:g} | {state} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def rank_table(rows: list) -> str:
    """The final models' held-out accuracy by the order in which the keys are queried (rows whose runs kept it)."""
    kept = [r for r in rows if "by_rank" in r]
    if not kept:
        return ""
    lines = ["Final held-out accuracy by the order in which the keys are queried (ranks 1-based; in brackets what "
             "ruling out the values already answered gives without any binding of keys to values):", "",
             "| model | width | L | pairs | seeds | first queries | | | last queries |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in kept:
        cells = [f"{acc:.3f} ({f'rank {lo}' if lo == hi else f'ranks {lo}–{hi}'}; {elim:.3f})"
                 for lo, hi, acc, _, elim in r["by_rank"]]
        cells += [""] * (4 - len(cells))
        seeds = ", ".join(map(str, r["by_rank_seeds"]))
        lines.append(f"| {r['model']} | {r['dim']} | {r['seq_len']} | {r['num_kv']} | {seeds} | " + " | ".join(cells)
                     + " |")
    return "\n".join(lines)


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None (and a note) when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    return plt


def plot(rows: list, path: pathlib.Path) -> bool:
    """Accuracy against the recurrent state's bytes per sequence, one panel per length (Zoology's figure): PoM
    coloured by degree (the degrees of one state size side by side), marker by width, hollow with several gate
    heads, its expand written once per state size; hybrids a cross, their layers written; attention a star at its
    KV cache."""
    plt = pyplot()
    if plt is None:
        return False
    from matplotlib.lines import Line2D
    lens = sorted({r["seq_len"] for r in rows})
    pom = [spec(r["model"]) for r in rows if spec(r["model"])["kind"] == "pom"]
    degrees = sorted({s["degree"] for s in pom})
    widths = sorted({r["dim"] for r in rows})
    markers = dict(zip(widths, "os^Dv"))
    fig, axes = plt.subplots(1, len(lens), figsize=(4.4 * len(lens), 4.2), squeeze=False, sharex=True, sharey=True)
    for ax, L in zip(axes[0], lens):
        at = [r for r in rows if r["seq_len"] == L]
        labelled = set()
        for r in sorted(at, key=lambda r: -r["mean"]):
            s = spec(r["model"])
            m = "X" if "layers" in s else markers.get(r["dim"], "o")
            if s["kind"] == "attention":
                ax.scatter(r["state_bytes"], r["mean"], marker="*", s=140, color="k", zorder=3)
                ax.annotate(f"d={r['dim']}", (r["state_bytes"], r["mean"]), textcoords="offset points",
                            xytext=(0, -13), ha="center", fontsize=7)
                continue
            i = degrees.index(s["degree"])
            x = r["state_bytes"] * 2 ** (0.12 * (i - (len(degrees) - 1) / 2))  # the degrees side by side
            c = f"C{i % 10}"
            hollow = s["gate_heads"] > 1
            ax.errorbar(x, r["mean"], yerr=r["std"], fmt=m, color=c, ms=5, mfc="none" if hollow else c, capsize=2,
                        lw=1)
            group = (s["expand"], r["dim"], s["gate_heads"], s["conv_size"], s.get("layers"))
            if group not in labelled:
                labelled.add(group)
                tag = f"e{s['expand']}" + (f" h{s['gate_heads']}" if hollow else "") + \
                    (f" c{s['conv_size']}" if s["conv_size"] != CONV_SIZE else "") + \
                    (f" {s['layers']}" if "layers" in s else "")
                ax.annotate(tag, (x, r["mean"]), textcoords="offset points", xytext=(5, 3), fontsize=6)
        if at:  # what a model scores without binding keys to values
            K = at[0]["num_kv"]
            ax.axhline(elimination(K, 1, K), ls="--", lw=0.8, color="0.5", zorder=1)
            ax.axhline(1 / K, ls=":", lw=0.8, color="0.5", zorder=1)
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.02, 1.05)
        ax.set_title(f"L={L}, {at[0]['num_kv']} pairs" if at else f"L={L}")
        ax.set_xlabel("recurrent state (bytes / sequence)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("MQAR accuracy (held out)")
    handles = [Line2D([], [], marker="*", ls="", color="k", ms=10, label="attention (KV cache)")]
    handles += [Line2D([], [], marker="o", ls="", color=f"C{i % 10}", label=f"PoM degree {k}")
                for i, k in enumerate(degrees)]
    if len(widths) > 1:
        handles += [Line2D([], [], marker=markers.get(w, "o"), ls="", color="0.4", label=f"width {w}")
                    for w in widths]
    if any("layers" in s for s in pom):
        handles.append(Line2D([], [], marker="X", ls="", color="0.4", label="hybrid (P: PoM, A: attention layer)"))
    if any(s["gate_heads"] > 1 for s in pom):
        handles.append(Line2D([], [], marker="o", ls="", color="0.4", mfc="none", label="several gate heads"))
    handles += [Line2D([], [], ls="--", lw=0.8, color="0.5", label="no recall: ruling out answered values"),
                Line2D([], [], ls=":", lw=0.8, color="0.5", label="no recall: any value of the pairs")]
    fig.legend(handles=handles, loc="lower center", ncol=(len(handles) + 1) // 2, fontsize=7, frameon=False)
    fig.suptitle("multi-query associative recall: accuracy vs state size (eN: expand, hN: gate heads, cN: convolution)")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def report(out: pathlib.Path) -> None:
    results = longest(load(out))
    if not results:
        raise SystemExit(f"no results in {out / 'results.jsonl'}")
    rows = summarize(results)
    md = table(rows)
    ranks = rank_table(rows)
    if ranks:
        md += "\n\n" + ranks
    inits = sorted({r["coeff_std"] for r in results if r.get("coeff_std")})
    if inits:
        md = (f"PoM's polynomial coefficients initialized from N(0, s^2), s = {', '.join(f'{v:g}' for v in inits)} "
              "(not the layer's own initial values).\n\n" + md)
    (out / "mqar.md").write_text(md + "\n")
    (out / "mqar.json").write_text(json.dumps({"best_lr": {f"{m} d={d}": lr for (m, d), lr in
                                                           best_lrs(results).items()},
                                               "rows": rows, "runs": len(results)}, indent=1))
    drew = plot(rows, out / "mqar.png")
    print(md)
    print(f"{len(results)} runs -> {out / 'mqar.md'}, {out / 'mqar.json'}" + (f", {out / 'mqar.png'}" if drew else ""))


def run_meta(threads: int) -> dict:
    """What every result line records of the machine and the run."""
    return {"machine": platform.processor() or platform.machine(), "threads": threads, "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat()}


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.report:
        report(out)
        return
    previous = load(out)
    inits = {r.get("coeff_std", 0.0) for r in previous if r["kind"] == "pom"}
    if inits - {args.coeff_std}:
        sys.exit(f"--coeff-std {args.coeff_std:g}: {out} holds PoM runs with coefficients initialized otherwise "
                 f"({', '.join(f'{v:g}' for v in sorted(inits))}; 0: the layer's own); give another --out")
    done = {key(r) for r in previous}
    best = best_lrs(longest(previous)) if args.lrs == "best" else None
    jobs = []
    for model in args.models:
        for dim in args.dims:
            if best is not None and (model, dim) not in best:
                print(f"--lrs best: no seed-0 results of {model} d={dim} in {out}: skipped")
                continue
            for L, kv in zip(args.seq_lens, args.num_kv):
                for lr in ([best[(model, dim)]] if best is not None else args.lrs):
                    for seed in args.seeds:
                        jobs.append((model, dim, L, kv, lr, seed))
    meta = run_meta(args.threads)
    for i, (model, dim, L, kv, lr, seed) in enumerate(jobs, 1):
        k = (model, dim, L, kv, args.vocab, lr, seed, args.steps, args.batch_size, args.depth,
             args.coeff_std if spec(model)["kind"] == "pom" else 0.0)
        if k in done:
            continue
        r = run_one(args, model, dim, L, kv, lr, seed)
        r.update(meta)
        with open(out / "results.jsonl", "a") as f:
            f.write(json.dumps(r) + "\n")
        print(f"[{i}/{len(jobs)}] {model:14s} d={dim:3d} L={L:4d} kv={kv:2d} lr={lr:g} seed={seed} "
              f"acc={r['accuracy']:.3f} steps={r['steps']} state={r['state_bytes']:,} B ({r['train_s']:.0f} s)",
              flush=True)
    report(out)


if __name__ == "__main__":
    main()
