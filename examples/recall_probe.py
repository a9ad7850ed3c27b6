r"""One mixing layer's state as an associative memory: key-value pairs handed to the layer whole, keys queried.

MQAR (examples/mqar.py) asks a model to learn three things at once: to bring each key to its value (a shift,
through the short convolution or a first layer), to store the pairs in its state, and to read a key's value
back. This probe keeps only the last two, the part that depends on the mixing layer's state. A sequence holds
P pairs (k_i, v_i): distinct keys from --keys keys, values from --values values (separate vocabularies). The
layer's context is one token per pair, emb_k(k_i) + emb_v(v_i), its queries the P keys in a random order,
emb_k(k); one layer mixes the queries with the context and a linear head reads each query's value:

    PoM:       head(PoM(queries, context))          (cross-mixing: the mean over the pairs, read through the gate)
    attention: head(softmax attention(queries, context))    (q, k, v and output projections, 1 head)

The queries do not see each other, so no query is answered by ruling out the values of the others: a model that
knows which values the pairs hold but not which key holds which scores 1 / P (the plot's dotted line), one that
does not even read the pairs 1 / --values. The state is the layer's own per sequence, in bytes of the training
dtype: PoM the running sum of width E = expand * dim and the count (constant in P; measured with allocate_state),
attention the P keys and values it attends over. The degree does not change PoM's state, so the PoM runs of one
expand compare degrees at equal state: the prediction of the polynomial-attention line of work is that degree 2
or more recalls more than degree 1, and that recall rises with the degree up to a point.

Runs: every (model, pairs, learning rate, seed) is one run (AdamW, weight decay 0.1, warm-up then cosine decay,
gradients clipped to norm 1, fresh batches, --steps steps), appended to OUT/results.jsonl; a run already there is
skipped. Its result is the held-out accuracy of the final model (--test-size sequences rounded down to whole
batches, the same for every model of one --batch-size). --report writes OUT/probe.md (each model at its best
rate — the rates compared on the seeds they all ran — with all that rate's seeds), probe.json and probe.png
(accuracy against state bytes, one panel per number of pairs, width and budget).

    PYTHONPATH=. python examples/recall_probe.py --models attention,pom-1x4,pom-2x4,pom-3x4 --pairs 8 \
        --out benchmarks/results/recall_probe
    PYTHONPATH=. python examples/recall_probe.py --report --out benchmarks/results/recall_probe
    PYTHONPATH=. python examples/recall_probe.py --quick --out /tmp/probe       # a smoke run, seconds
"""
import argparse
import json
import pathlib
import re
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from mqar import load, lr_at, pyplot, run_meta  # noqa: E402  (results, schedule, plots: as MQAR's)
from pom_ext import PoM  # noqa: E402

MODEL_RE = re.compile(r"^(attention|pom-(\d+)x(\d+))$")


def spec(model: str) -> dict:
    m = MODEL_RE.match(model)
    if m is None:
        raise SystemExit(f"--models: unknown model {model!r}; expected attention or pom-KxE (degree K, expand E)")
    if m.group(1) == "attention":
        return {"kind": "attention"}
    degree, expand = int(m.group(2)), int(m.group(3))
    if degree < 1 or expand < 1:
        raise SystemExit(f"--models: {model!r}: the degree and the expand must be >= 1")
    return {"kind": "pom", "degree": degree, "expand": expand}


class Probe(nn.Module):
    """Key and value embeddings, one mixing layer (queries over the context of pairs), a head over the values."""

    def __init__(self, model: str, dim: int, keys: int, values: int):
        super().__init__()
        s = spec(model)
        self.kind, self.dim = s["kind"], dim
        self.emb_k, self.emb_v = nn.Embedding(keys, dim), nn.Embedding(values, dim)
        if self.kind == "pom":
            self.mixer = PoM(dim, degree=s["degree"], expand=s["expand"], n_sel_heads=1)
        else:
            self.qkv, self.out = nn.Linear(dim, 3 * dim, bias=False), nn.Linear(dim, dim, bias=False)
        self.head = nn.Linear(dim, values)

    def forward(self, k: torch.Tensor, v: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """k, v: (B, P) the pairs; q: (B, P) the queried keys -> (B, P, values) logits."""
        ctx, qry = self.emb_k(k) + self.emb_v(v), self.emb_k(q)
        if self.kind == "pom":
            y = self.mixer(qry, ctx)
        else:
            wq, wk, wv = self.qkv.weight.chunk(3)
            y = self.out(F.scaled_dot_product_attention(F.linear(qry, wq), F.linear(ctx, wk), F.linear(ctx, wv)))
        return self.head(y)

    def state_bytes(self, pairs: int) -> int:
        """The layer's state per sequence: PoM's running sum and count (allocate_state), attention's keys and
        values of the pairs."""
        if self.kind == "attention":
            return 2 * pairs * self.dim * self.head.weight.element_size()
        st = self.mixer.allocate_state(1)
        return sum(t.numel() * t.element_size() for t in (st.sum, st.count))


def batch(n: int, pairs: int, keys: int, values: int, g: torch.Generator):
    """n sequences: distinct keys, values drawn with replacement, the keys queried in a random order."""
    k = torch.rand(n, keys, generator=g).argsort(1)[:, :pairs]
    v = torch.randint(0, values, (n, pairs), generator=g)
    order = torch.rand(n, pairs, generator=g).argsort(1)
    return k, v, k.gather(1, order), v.gather(1, order)


def accuracy(net: Probe, test) -> float:
    with torch.no_grad():
        right = sum((net(k, v, q).argmax(-1) == a).sum().item() for k, v, q, a in test)
    return right / sum(a.numel() for *_, a in test)


def run_one(args, model: str, pairs: int, lr: float, seed: int) -> dict:
    torch.manual_seed(seed)
    net = Probe(model, args.dim, args.keys, args.values)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.1)
    g_test = torch.Generator().manual_seed(10_000 + pairs)  # the same held-out set for every model
    test = [batch(args.batch_size, pairs, args.keys, args.values, g_test)
            for _ in range(max(1, args.test_size // args.batch_size))]
    g = torch.Generator().manual_seed(seed)
    curve, t0 = [], time.time()
    for step in range(args.steps):
        k, v, q, a = batch(args.batch_size, pairs, args.keys, args.values, g)
        loss = F.cross_entropy(net(k, v, q).flatten(0, 1), a.flatten())
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            curve.append([step + 1, round(loss.item(), 4), accuracy(net, test)])
    return {"model": model, **spec(model), "dim": args.dim, "pairs": pairs, "keys": args.keys,
            "values": args.values, "lr": lr, "seed": seed, "steps": args.steps, "batch_size": args.batch_size,
            "accuracy": curve[-1][2], "curve": curve, "state_bytes": net.state_bytes(pairs),
            "params": sum(p.numel() for p in net.parameters()), "train_s": round(time.time() - t0, 1)}


# ---- results ----

def key(r: dict) -> tuple:
    return (r["model"], r["dim"], r["pairs"], r["keys"], r["values"], r["lr"], r["seed"], r["steps"],
            r["batch_size"])


def best_lrs(results: list, args) -> dict:
    """(model, pairs) -> the rate of seed 0's most accurate run among those of args' sizes and budget."""
    best = {}
    for r in results:
        if r["seed"] == 0 and key(r)[1:2] + key(r)[3:5] + key(r)[7:] == (
                args.dim, args.keys, args.values, args.steps, args.batch_size):
            k = (r["model"], r["pairs"])
            if k not in best or r["accuracy"] > best[k][0]:
                best[k] = (r["accuracy"], r["lr"])
    return {k: lr for k, (_, lr) in best.items()}


def summarize(results: list) -> list:
    """One row per (model, dim, pairs, budget): its best rate — the rates compared on the mean accuracy of the seeds
    they all ran (seed 0 when only the best rate got more seeds) — with all its seeds, and every rate's mean."""
    groups = {}
    for r in results:
        groups.setdefault(key(r)[:5] + key(r)[7:], {}).setdefault(r["lr"], []).append(r)
    rows = []
    for (model, dim, pairs, keys, values, steps, bs), by_lr in groups.items():
        means = {lr: statistics.fmean(r["accuracy"] for r in rs) for lr, rs in by_lr.items()}
        shared = set.intersection(*({r["seed"] for r in rs} for rs in by_lr.values()))
        lr = max(by_lr, key=lambda x: statistics.fmean(r["accuracy"] for r in by_lr[x]
                                                       if r["seed"] in shared or not shared))
        accs = [r["accuracy"] for r in sorted(by_lr[lr], key=lambda r: r["seed"])]
        rows.append({"model": model, **spec(model), "dim": dim, "pairs": pairs, "keys": keys, "values": values,
                     "steps": steps, "batch_size": bs, "lr": lr, "accuracies": accs, "mean": means[lr],
                     "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                     "state_bytes": by_lr[lr][0]["state_bytes"], "rates": {f"{x:g}": m for x, m in means.items()}})
    order = {"attention": (0, 0, 0)}
    return sorted(rows, key=lambda r: (r["pairs"], r["dim"], order.get(r["model"]) or
                                       (1, r["expand"], r["degree"])))


def table(rows: list) -> str:
    lines = ["| model | dim | pairs | state (bytes / sequence) | best lr | accuracy (seeds) | mean "
             "| other rates (mean) |",
             "|---|---:|---:|---:|---:|---|---:|---|"]
    for r in rows:
        name = "attention" if r["kind"] == "attention" else f"PoM degree {r['degree']}, expand {r['expand']}"
        others = ", ".join(f"{m:.3f} at {x}" for x, m in r["rates"].items() if float(x) != r["lr"])
        lines.append(f"| {name} | {r['dim']} | {r['pairs']} | {r['state_bytes']:,} | {r['lr']:g} | "
                     f"{', '.join(f'{a:.3f}' for a in r['accuracies'])} | {r['mean']:.3f} | {others} |")
    return "\n".join(lines)


def plot(rows: list, path: pathlib.Path) -> bool:
    """Accuracy against state bytes, one panel per (pairs, dim, steps): PoM one line per degree across expands,
    attention a star; any value of the pairs without binding (1 / P) dotted."""
    plt = pyplot()
    if plt is None:
        return False
    panels = sorted({(r["pairs"], r["dim"], r["steps"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.2), squeeze=False, sharey=True)
    for ax, (P, dim, steps) in zip(axes[0], panels):
        at = [r for r in rows if (r["pairs"], r["dim"], r["steps"]) == (P, dim, steps)]
        for i, d in enumerate(sorted({r["degree"] for r in at if r["kind"] == "pom"})):
            pts = sorted((r["state_bytes"], r["mean"], r["std"]) for r in at if r.get("degree") == d)
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", ms=4,
                        capsize=2, lw=1.2, color=f"C{i % 10}", label=f"PoM degree {d}")
        for r in at:
            if r["kind"] == "attention":
                ax.scatter(r["state_bytes"], r["mean"], marker="*", s=140, color="k", zorder=3,
                           label="attention (keys, values)")
        ax.axhline(1 / P, ls=":", lw=0.8, color="0.5")
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.02, 1.05)
        ax.set_title(f"{P} pairs, dim {dim}, {steps} steps")
        ax.set_xlabel("state (bytes / sequence)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("recall accuracy (held out)")
    fig.suptitle("one layer's state as an associative memory\n"
                 "(pairs given whole; dotted: any value of the pairs, 1 / P)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def report(out: pathlib.Path) -> None:
    results = load(out)
    if not results:
        raise SystemExit(f"no results in {out / 'results.jsonl'}")
    rows = summarize(results)
    md = table(rows)
    (out / "probe.md").write_text(md + "\n")
    (out / "probe.json").write_text(json.dumps({"rows": rows, "runs": len(results)}, indent=1))
    drew = plot(rows, out / "probe.png")
    print(md)
    print(f"{len(results)} runs -> {out / 'probe.md'}, {out / 'probe.json'}" +
          (f", {out / 'probe.png'}" if drew else ""))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="attention,pom-1x4,pom-2x4", help="attention, pom-KxE; comma-separated")
    p.add_argument("--pairs", default="8", help="key-value pairs per sequence, comma-separated")
    p.add_argument("--lrs", default="1e-3,3e-3,1e-2",
                   help="learning rates, comma-separated; 'best': each (model, pairs)'s best rate of seed 0 in OUT")
    p.add_argument("--seeds", default="0")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--keys", type=int, default=4096)
    p.add_argument("--values", type=int, default=4096)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--test-size", type=int, default=2048, help="held-out sequences")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/recall_probe")
    p.add_argument("--report", action="store_true", help="train nothing: summarize OUT/results.jsonl")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    if "--quick" in (sys.argv[1:] if argv is None else argv):  # small defaults; explicit arguments still win
        p.set_defaults(pairs="2", keys=16, values=16, lrs="1e-2", steps=40, batch_size=32, test_size=64,
                       eval_every=20)
    args = p.parse_args(argv)

    def ints(name, text, lo):
        try:
            vals = [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            p.error(f"--{name}: expected comma-separated integers, got {text!r}")
        if not vals or min(vals) < lo:
            p.error(f"--{name}: expected integers >= {lo}, got {text!r}")
        return vals

    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in args.models:
        try:
            spec(m)
        except SystemExit as e:
            p.error(str(e))
    args.pairs, args.seeds = ints("pairs", args.pairs, 1), ints("seeds", args.seeds, 0)
    if args.lrs != "best":
        try:
            args.lrs = [float(x) for x in args.lrs.split(",") if x.strip()]
        except ValueError:
            p.error(f"--lrs: expected comma-separated numbers or best, got {args.lrs!r}")
        if not args.lrs or min(args.lrs) <= 0:
            p.error("--lrs: expected positive learning rates")
    for name in ("dim", "keys", "values", "steps", "batch_size", "test_size", "eval_every", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if max(args.pairs) > args.keys:
        p.error(f"--pairs: at most --keys = {args.keys} distinct keys a sequence, got {max(args.pairs)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.report:
        report(out)
        return
    previous = load(out)
    done = {key(r) for r in previous}
    best = best_lrs(previous, args) if args.lrs == "best" else None
    jobs = []
    for P in args.pairs:
        for m in args.models:
            if best is not None and (m, P) not in best:
                print(f"--lrs best: no seed-0 run of {m} with {P} pairs and these sizes in {out}: skipped")
                continue
            jobs += [(m, P, lr, s) for lr in ([best[(m, P)]] if best is not None else args.lrs) for s in args.seeds]
    meta = run_meta(args.threads)
    for i, (model, P, lr, seed) in enumerate(jobs, 1):
        k = (model, args.dim, P, args.keys, args.values, lr, seed, args.steps, args.batch_size)
        if k in done:
            continue
        done.add(k)
        r = run_one(args, model, P, lr, seed)
        r.update(meta)
        with open(out / "results.jsonl", "a") as f:
            f.write(json.dumps(r) + "\n")
        print(f"[{i}/{len(jobs)}] {model:10s} pairs={P:3d} lr={lr:g} seed={seed} acc={r['accuracy']:.3f} "
              f"state={r['state_bytes']:,} B ({r['train_s']:.0f} s)", flush=True)
    report(out)


if __name__ == "__main__":
    main()
