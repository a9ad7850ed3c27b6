"""Plot the curves of several train_lm.py runs into one PNG and print a bits-per-byte table (markdown).

    python examples/plot_lm.py runs/lm_pom runs/lm_hybrid runs/lm_attention --out runs/lm_curves.png
"""
import argparse
import json
import math
import pathlib


def load(run: str) -> dict:
    path = pathlib.Path(run)
    path = path / "log.json" if path.is_dir() else path
    log = json.loads(path.read_text())
    log["name"] = path.parent.name
    return log


def moving_mean(values, k: int):
    out, acc = [], []
    for v in values:
        acc.append(v)
        if len(acc) > k:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


def table(logs) -> str:
    rows = ["| run | model | layers | params (M) | steps | train time (s) | last train bpb | final val bpb "
            "| best val bpb | generate (tok/s) |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for log in logs:
        recs = log["records"]
        train = [r["train_loss"] / math.log(2) for r in recs if r.get("train_loss") is not None]
        vals = [r["val_bpb"] for r in recs if r.get("val_bpb") is not None]
        final = log.get("final", {})
        last = recs[-1] if recs else {"step": 0, "time_s": 0.0}
        fval = final.get("val_bpb", vals[-1] if vals else float("nan"))
        gen = final.get("generate_tokens_per_s")
        rows.append(f"| {log['name']} | {log['args']['model']} | {log.get('pattern', '')} | "
                    f"{log['params'] / 1e6:.2f} | {last['step']} | {last['time_s']:.0f} | "
                    f"{train[-1] if train else float('nan'):.3f} | {fval:.3f} | "
                    f"{min(vals) if vals else float('nan'):.3f} | {'' if gen is None else f'{gen:.0f}'} |")
    return "\n".join(rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories (or their log.json)")
    p.add_argument("--out", default="lm_curves.png")
    p.add_argument("--smooth", type=int, default=10, help="moving-average window of the train curve (records)")
    args = p.parse_args(argv)
    logs = [load(r) for r in args.runs]
    print(table(logs))
    plot(logs, args.out, args.smooth)
    print(f"\nwrote {args.out}")


def plot(logs, out, smooth: int = 10):
    """Train (smoothed over `smooth` records) and validation curves of the logs, against training time and step,
    into the PNG `out`; each log labelled by its "name". Needs matplotlib."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, log in enumerate(logs):
        color = f"C{i}"
        recs = log["records"]
        tr = [r for r in recs if r.get("train_loss") is not None]
        va = [r for r in recs if r.get("val_bpb") is not None]
        label = f"{log['name']} ({log['args']['model']}, {log['params'] / 1e6:.2f} M)"
        for ax, key in ((axes[0], "time_s"), (axes[1], "step")):
            scale = 60.0 if key == "time_s" else 1.0
            ax.plot([r[key] / scale for r in tr], moving_mean([r["train_loss"] / math.log(2) for r in tr], smooth),
                    color=color, alpha=0.45, label=f"{label} train")
            ax.plot([r[key] / scale for r in va], [r["val_bpb"] for r in va], "o-", color=color, ms=3,
                    label=f"{label} val")
    axes[0].set_xlabel("training time (min)")
    axes[1].set_xlabel("step")
    for ax in axes:
        ax.set_ylabel("bits per byte")
        ax.grid(alpha=0.3)
    ymax = min(8.0, max(r["val_bpb"] for log in logs for r in log["records"] if r.get("val_bpb") is not None) + 0.2)
    for ax in axes:
        ax.set_ylim(top=ymax)
    axes[1].legend(fontsize=7)
    fig.suptitle("byte-level LM on the Python standard library")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    main()
