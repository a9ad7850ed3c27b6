"""Multi-query associative recall (MQAR, after the Zoology benchmark) for Polymorpher LMs.

A sequence starts with num_kv key-value pairs (k1 v1 k2 v2 ...; keys from the lower half of the vocabulary,
values from the upper half, keys distinct), then every key is queried once at a random later position
(the other positions hold the filler token 0). At a query the model must predict the key's value; accuracy
is over all queries of a held-out set. num_kv = seq_len // 16 unless --num-kv is given.

Sweep: every sequence length x every (degree, expand) configuration, each trained for the same number of
steps on the same batches (equal training tokens). The PoM cost per token is recorded with each result:
projections 2 D (E + S) + 2 E D and the polynomial ~2 E K, E = expand D (SPEC §3). Results go to
--out/mqar.json and --out/mqar.png.

    PYTHONPATH=. python examples/mqar.py --quick --out runs/mqar_quick
    PYTHONPATH=. python examples/mqar.py --out runs/mqar
    PYTHONPATH=. python examples/mqar.py --merge runs/a/mqar.json runs/b/mqar.json --out runs/all
"""
import argparse
import json
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from pom_ext.models import PolymorpherLM  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test in well under a minute")
    p.add_argument("--seq-lens", default="64,128,256,512,1024")
    p.add_argument("--configs", default="1x2,2x2,4x2,8x2,8x1,2x4,1x8",
                   help="comma-separated DEGREExEXPAND pairs (degree sweep at expand 2, and degree x expand = 8)")
    p.add_argument("--baseline", action="store_true", help="also train an attention model of the same width")
    p.add_argument("--num-kv", type=int, default=None)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--n-sel-heads", type=int, default=1)
    p.add_argument("--conv-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--test-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="runs/mqar")
    p.add_argument("--merge", nargs="+", metavar="JSON", default=None,
                   help="train nothing: combine the mqar.json files of earlier runs into --out and plot them")
    args = p.parse_args(argv)
    if args.quick:
        args.seq_lens, args.configs = "64,128", "1x2,4x2,2x4"
        args.vocab, args.dim, args.steps, args.batch_size, args.test_size = 64, 32, 30, 16, 64
    try:
        args.seq_lens = [int(s) for s in args.seq_lens.split(",")]
        args.configs = [tuple(int(v) for v in c.lower().split("x")) for c in args.configs.split(",")]
    except ValueError:
        p.error("--seq-lens must be integers and --configs DEGREExEXPAND pairs, e.g. 2x4")
    if any(len(c) != 2 or min(c) < 1 for c in args.configs):
        p.error("--configs must be DEGREExEXPAND pairs of positive integers, e.g. 1x2,4x2")
    return args


def num_kv_for(seq_len: int, args) -> int:
    n = args.num_kv if args.num_kv is not None else max(2, seq_len // 16)
    if 4 * n > seq_len or n > args.vocab // 2 - 1:
        raise SystemExit(f"num_kv = {n} does not fit seq_len = {seq_len} (needs 4 num_kv <= seq_len) or "
                         f"vocab = {args.vocab} (needs num_kv < vocab / 2)")
    return n


def mqar_batch(batch: int, seq_len: int, num_kv: int, vocab: int, g: torch.Generator):
    """(inputs (B, L), targets (B, L)): targets are -100 except at the query positions, where they are values."""
    half = vocab // 2
    keys = torch.argsort(torch.rand(batch, half - 1, generator=g), dim=1)[:, :num_kv] + 1
    values = torch.randint(half, vocab, (batch, num_kv), generator=g)
    x = torch.zeros(batch, seq_len, dtype=torch.long)
    y = torch.full((batch, seq_len), -100, dtype=torch.long)
    x[:, 0:2 * num_kv:2], x[:, 1:2 * num_kv:2] = keys, values
    free = seq_len - 2 * num_kv
    pos = torch.argsort(torch.rand(batch, free, generator=g), dim=1)[:, :num_kv] + 2 * num_kv
    order = torch.argsort(torch.rand(batch, num_kv, generator=g), dim=1)
    x.scatter_(1, pos, keys.gather(1, order))
    y.scatter_(1, pos, values.gather(1, order))
    return x, y


def cost_per_token(dim: int, degree: int, expand: int, n_sel_heads: int) -> int:
    E = expand * dim
    S = n_sel_heads if n_sel_heads > 1 else E
    return 2 * dim * (E + S) + 2 * E * dim + 2 * E * degree


def build(args, kind: str, degree: int, expand: int) -> PolymorpherLM:
    common = dict(num_tokens=args.vocab, dim=args.dim, depth=args.depth, conv_size=args.conv_size)
    if kind == "attention":
        return PolymorpherLM(**common, layer_pattern="A", n_heads=max(1, args.dim // 32))
    return PolymorpherLM(**common, degree=degree, expand=expand, n_sel_heads=args.n_sel_heads)


@torch.no_grad()
def accuracy(model, test) -> float:
    model.eval()
    correct = total = 0
    for x, y in test:
        pred = model(x).argmax(-1)
        sel = y != -100
        correct += (pred[sel] == y[sel]).sum().item()
        total += sel.sum().item()
    model.train()
    return correct / max(total, 1)


def run_one(args, kind: str, seq_len: int, degree: int, expand: int) -> dict:
    num_kv = num_kv_for(seq_len, args)
    torch.manual_seed(args.seed)
    model = build(args, kind, degree, expand)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    g_test = torch.Generator().manual_seed(10_000 + seq_len)
    test = [mqar_batch(min(args.batch_size, args.test_size), seq_len, num_kv, args.vocab, g_test)
            for _ in range(max(1, args.test_size // args.batch_size))]
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    losses = []
    for _ in range(args.steps):
        x, y = mqar_batch(args.batch_size, seq_len, num_kv, args.vocab, g)
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    train_s = time.time() - t0
    tail = losses[-max(1, len(losses) // 10):]
    return {"model": kind, "seq_len": seq_len, "num_kv": num_kv, "degree": degree, "expand": expand,
            "dim": args.dim, "depth": args.depth, "params": model.num_params(),
            "pom_cost_per_token": None if kind == "attention" else cost_per_token(args.dim, degree, expand,
                                                                                   args.n_sel_heads),
            "accuracy": accuracy(model, test), "final_loss": sum(tail) / len(tail), "train_s": train_s}


def label(r: dict) -> str:
    return "attention" if r["model"] == "attention" else f"PoM K={r['degree']} expand={r['expand']}"


def plot(results, path: pathlib.Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = sorted({label(r) for r in results}, key=lambda s: (s == "attention", s))
    for i, lab in enumerate(labels):
        rs = sorted((r for r in results if label(r) == lab), key=lambda r: r["seq_len"])
        axes[0].plot([r["seq_len"] for r in rs], [r["accuracy"] for r in rs], "o-", color=f"C{i % 10}", label=lab)
    axes[0].set_xscale("log", base=2)
    axes[0].set_xlabel("sequence length")
    axes[0].set_ylabel("MQAR accuracy")
    axes[0].set_ylim(-0.02, 1.02)
    axes[0].legend(fontsize=7)
    pom = [r for r in results if r["model"] == "pom"]
    for j, L in enumerate(sorted({r["seq_len"] for r in pom})):
        rs = sorted((r for r in pom if r["seq_len"] == L), key=lambda r: (r["expand"], r["degree"]))
        for expand in sorted({r["expand"] for r in rs}):
            sub = [r for r in rs if r["expand"] == expand]
            if len(sub) > 1:
                axes[1].plot([r["degree"] for r in sub], [r["accuracy"] for r in sub], "o-", color=f"C{j % 10}",
                             alpha=0.4 + 0.6 * expand / max(r["expand"] for r in rs),
                             label=f"L={L}, expand={expand}")
    axes[1].set_xscale("log", base=2)
    axes[1].set_xlabel("degree K")
    axes[1].set_ylabel("MQAR accuracy")
    axes[1].set_ylim(-0.02, 1.02)
    if axes[1].lines:
        axes[1].legend(fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle("multi-query associative recall")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        runs = [json.loads(pathlib.Path(f).read_text()) for f in args.merge]
        results = [r for run in runs for r in run["results"]]
        (out / "mqar.json").write_text(json.dumps({"runs": [run["args"] for run in runs], "results": results},
                                                  indent=1))
        plot(results, out / "mqar.png")
        print(f"merged {len(results)} results from {len(runs)} runs into {out / 'mqar.json'} and {out / 'mqar.png'}")
        return
    # Shortest sequences first, every model at a length before the next length, so a partial sweep is usable.
    jobs = [job for L in args.seq_lens
            for job in [("pom", L, k, e) for k, e in args.configs] + ([("attention", L, 0, 0)] if args.baseline else [])]
    results = []
    for i, (kind, L, k, e) in enumerate(jobs, 1):
        r = run_one(args, kind, L, k, e)
        results.append(r)
        print(f"[{i}/{len(jobs)}] {label(r):24s} L={L:5d} kv={r['num_kv']:3d} params={r['params'] / 1e3:6.1f}k "
              f"acc={r['accuracy']:.3f} loss={r['final_loss']:.3f} ({r['train_s']:.0f} s)", flush=True)
        (out / "mqar.json").write_text(json.dumps({"args": {k: v for k, v in vars(args).items()},
                                                   "results": results}, indent=1))
    plot(results, out / "mqar.png")
    print(f"wrote {out / 'mqar.json'} and {out / 'mqar.png'}")


if __name__ == "__main__":
    main()
