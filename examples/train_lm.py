"""Train a byte-level language model on the Python standard library's source code (available offline).

Data: every .py file under sysconfig.get_paths()["stdlib"] (site-packages excluded), sorted by path; a file
goes to validation when crc32(path) % 100 < --val-percent, so the split is deterministic and stable.
Models at one size: --model pom (all PoM blocks), hybrid (PoM with an attention block every --attn-every
layers), attention (a transformer with rotary attention). Reports bits per byte (bpb) on validation,
checkpoints to --out/ckpt.pt (continue with --resume), logs (step, time, train loss, val bpb) to
--out/log.json and --out/log.csv, and ends with a text sample from generate().

    PYTHONPATH=. python examples/train_lm.py --model pom --minutes 15 --out runs/lm_pom

With the sequence sharded over processes (context parallelism, gloo on CPUs; every --model: attention layers
gather keys and values): every rank reads the same batches and trains on its contiguous slice of each window
through pom_ext.distributed; the
gradients are summed over the ranks, so the loss curve is the single process's (docs/distributed.md).

    PYTHONPATH=. torchrun --nproc_per_node 2 examples/train_lm.py --model pom --threads 1 --out runs/lm_cp
"""
import argparse
import csv
import json
import math
import os
import pathlib
import sys
import sysconfig
import time
import zlib
from datetime import timedelta

import torch
import torch.distributed as dist

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from pom_ext.distributed import ContextParallelLM, token_range  # noqa: E402
from pom_ext.models import PolymorpherLM  # noqa: E402

try:
    from tqdm import tqdm
except ImportError:
    tqdm = None

LN2 = math.log(2.0)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["pom", "hybrid", "attention"], default="pom")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--degree", type=int, default=2)
    p.add_argument("--expand", type=int, default=2)
    p.add_argument("--n-sel-heads", type=int, default=8,
                   help="PoM gate heads; with expand 2 and 8 heads a PoM block has about the parameters of an "
                        "attention block")
    p.add_argument("--conv-size", type=int, default=4, help="short causal convolution in PoM blocks (0: none)")
    p.add_argument("--rope", action="store_true", help="rotary positions in the PoM blocks (PoMRoPE, 1-D)")
    p.add_argument("--conv-skip", action="store_true",
                   help="PoM blocks add their convolution's output, weighted per channel, to the mixer's output")
    p.add_argument("--n-heads", type=int, default=4, help="attention heads")
    p.add_argument("--window", type=int, default=None, help="sliding-window size of attention layers")
    p.add_argument("--attn-every", type=int, default=3, help="hybrid: every k-th layer is attention")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=100, help="warmup steps")
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--minutes", type=float, default=None, help="training time budget in minutes (validation time not counted)")
    p.add_argument("--steps", type=int, default=None, help="training steps (when --minutes is not given)")
    p.add_argument("--eval-every", type=int, default=100, help="steps between validations and checkpoints")
    p.add_argument("--log-every", type=int, default=10, help="steps between train-loss log records")
    p.add_argument("--val-batches", type=int, default=16, help="batches of --batch-size windows per validation")
    p.add_argument("--val-percent", type=int, default=5)
    p.add_argument("--sample-len", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="runs/lm")
    p.add_argument("--resume", action="store_true", help="continue from --out/ckpt.pt")
    args = p.parse_args(argv)
    if args.minutes is None and args.steps is None:
        args.steps = 1000
    for name in ("dim", "depth", "seq_len", "batch_size", "eval_every", "log_every", "val_batches"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


# ---- data ----

def stdlib_files():
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.py")
                   if not skip & set(p.relative_to(root).parts))
    return root, files


def load_split(val_percent: int):
    root, files = stdlib_files()
    parts = {"train": [], "val": []}
    for rel in files:
        split = "val" if zlib.crc32(rel.encode()) % 100 < val_percent else "train"
        try:
            parts[split].append((root / rel).read_bytes() + b"\n")
        except OSError:
            continue
    data = {k: torch.frombuffer(bytearray(b"".join(v)), dtype=torch.uint8) for k, v in parts.items()}
    counts = {k: len(v) for k, v in parts.items()}
    return data, counts, str(root)


def train_batch(data: torch.Tensor, step: int, args):
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    starts = torch.randint(0, data.numel() - args.seq_len - 1, (args.batch_size,), generator=g)
    idx = starts[:, None] + torch.arange(args.seq_len + 1)
    chunk = data[idx].long()
    return chunk[:, :-1], chunk[:, 1:]


class Sharding:
    """The sequence sharded over the processes of torchrun (WORLD_SIZE > 1, gloo), or one process.

    Every rank takes its contiguous slice [lo, hi) of each window; the loss it returns is its share, summed
    over the ranks for the value; the gradients are summed over the ranks before the optimizer step."""

    def __init__(self, seq_len: int):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = 0
        if self.world > 1:
            dist.init_process_group("gloo", timeout=timedelta(minutes=10))
            self.rank = dist.get_rank()
        self.lo, self.hi = token_range(seq_len, self.world, self.rank)

    def wrap(self, model):
        return ContextParallelLM(model) if self.world > 1 else model

    def slice(self, t: torch.Tensor) -> torch.Tensor:
        return t[:, self.lo:self.hi]

    def total(self, value: torch.Tensor) -> float:
        """The sum over the ranks of a scalar (the loss shares); the value itself in one process."""
        if self.world > 1:
            value = value.detach().clone()
            dist.all_reduce(value)
        return value.item()

    def maximum(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item()

    def sum_grads(self, model) -> None:
        if self.world > 1:
            for p in model.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)

    def print(self, *a, **kw) -> None:
        if self.rank == 0:
            print(*a, **kw)


@torch.no_grad()
def evaluate(net, data: torch.Tensor, args, shard: Sharding) -> float:
    """Bits per byte on fixed, evenly spaced validation windows."""
    net.eval()
    n = args.val_batches * args.batch_size
    starts = torch.linspace(0, data.numel() - args.seq_len - 1, n).long()
    total, count = 0.0, 0
    for i in range(0, n, args.batch_size):
        idx = starts[i:i + args.batch_size, None] + torch.arange(args.seq_len + 1)
        chunk = data[idx].long()
        _, loss = net(shard.slice(chunk[:, :-1]), shard.slice(chunk[:, 1:]))
        total += shard.total(loss) * chunk[:, 1:].numel()
        count += chunk[:, 1:].numel()
    net.train()
    return total / count / LN2


# ---- model ----

# The prompt of the sample written at the end of training.
PROMPT = b"import os\n\ndef "


def rope_max_len(args) -> int:
    """Positions of the rotary tables: the training windows and the end-of-training sample (prompt + bytes)."""
    return max(args.seq_len, len(PROMPT) + getattr(args, "sample_len", 0)) + 1


def build_model(args) -> PolymorpherLM:
    common = dict(num_tokens=256, dim=args.dim, depth=args.depth, degree=args.degree, expand=args.expand,
                  n_sel_heads=args.n_sel_heads, conv_size=args.conv_size, conv_skip=getattr(args, "conv_skip", False),
                  **({"rope": "1d", "rope_max_len": rope_max_len(args)} if getattr(args, "rope", False) else {}))
    if args.model == "pom":
        return PolymorpherLM(**common)
    if args.model == "hybrid":
        return PolymorpherLM(**common, attn_every=args.attn_every, n_heads=args.n_heads, window=args.window)
    return PolymorpherLM(**common, layer_pattern="A", n_heads=args.n_heads, window=args.window)


def make_optimizer(model, args):
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "po_coeff" not in n]
    other = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "po_coeff" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                              {"params": other, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))


def lr_at(step: int, progress: float, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    cos = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * cos)


# ---- logging / checkpoints ----

class Progress:
    def __init__(self, total: float, unit: str, initial: float):
        self.bar = tqdm(total=round(total), unit=unit, initial=round(initial), dynamic_ncols=True) if tqdm else None
        self.total, self.unit, self.done, self.last_print = total, unit, initial, 0.0

    def update(self, done: float, info: str):
        if self.bar is not None:
            self.bar.update(max(0, round(done) - self.bar.n))
            self.bar.set_postfix_str(info, refresh=False)
        elif time.time() - self.last_print > 5:
            self.last_print = time.time()
            print(f"[{100 * done / self.total:5.1f}%] {done:.0f}/{self.total:.0f} {self.unit} {info}", flush=True)

    def write(self, msg: str):
        (self.bar.write if self.bar is not None else print)(msg)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def save_log(out: pathlib.Path, meta: dict, records: list):
    (out / "log.json").write_text(json.dumps({**meta, "records": records}, indent=1))
    with open(out / "log.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "time_s", "train_loss", "val_bpb"])
        for r in records:
            w.writerow([r["step"], f"{r['time_s']:.2f}", "" if r.get("train_loss") is None else
                        f"{r['train_loss']:.5f}", "" if r.get("val_bpb") is None else f"{r['val_bpb']:.5f}"])


def save_checkpoint(path: pathlib.Path, model, opt, step, elapsed, records, args):
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "elapsed": elapsed,
                "records": records, "args": vars(args)}, tmp)
    os.replace(tmp, path)


MODEL_ARGS = ("model", "dim", "depth", "degree", "expand", "n_sel_heads", "conv_size", "n_heads", "window",
              "attn_every", "rope", "conv_skip")
NEWER_MODEL_ARGS = {"conv_skip": False}  # the value of checkpoints from before the option


def main(argv=None):
    args = parse_args(argv)
    shard = Sharding(args.seq_len)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "ckpt.pt"

    data, nfiles, root = load_split(args.val_percent)
    shard.print(f"data: {root}: train {nfiles['train']} files / {data['train'].numel() / 1e6:.1f} MB, "
                f"val {nfiles['val']} files / {data['val'].numel() / 1e6:.2f} MB")

    step, elapsed, records = 0, 0.0, []
    ckpt = None
    if args.resume:
        if not ckpt_path.exists():
            sys.exit(f"--resume: no checkpoint at {ckpt_path}")
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        saved_args = {**NEWER_MODEL_ARGS, **ckpt["args"]}
        for k in MODEL_ARGS:
            saved = saved_args[k]
            if saved != getattr(args, k):
                shard.print(f"--resume: using the checkpoint's {k}={saved!r} (given {getattr(args, k)!r})")
                setattr(args, k, saved)
    model = build_model(args)
    opt = make_optimizer(model, args)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        step, elapsed, records = ckpt["step"], ckpt["elapsed"], ckpt["records"]
        shard.print(f"resumed from {ckpt_path} at step {step} ({elapsed:.0f} s)")
    params = model.num_params()
    shard.print(f"model {args.model}: layers {model.pattern}, {params / 1e6:.2f} M parameters "
                f"({model.num_params(exclude_embeddings=True) / 1e6:.2f} M without embeddings)")
    if shard.world > 1:
        shard.print(f"sequence sharded over {shard.world} processes (gloo)")
    meta = {"args": vars(args), "params": params, "pattern": model.pattern, "processes": shard.world}
    net = shard.wrap(model)

    budget = args.minutes * 60 if args.minutes is not None else None

    def progress() -> float:
        return elapsed / budget if budget is not None else step / args.steps

    def finished() -> bool:
        return progress() >= 1.0

    bar = Progress(budget if budget is not None else args.steps, "s" if budget is not None else "step",
                   elapsed if budget is not None else step) if shard.rank == 0 else None
    model.train()
    window_loss, window_n, val_bpb = 0.0, 0, None
    t_last = time.time()
    while not finished():
        lr = lr_at(step, progress(), args)
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = train_batch(data["train"], step, args)
        _, loss = net(shard.slice(x), shard.slice(y))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        shard.sum_grads(model)
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        step += 1
        loss_value = shard.total(loss)
        window_loss += loss_value
        window_n += 1
        now = time.time()
        elapsed = shard.maximum(elapsed + now - t_last)  # every rank stops at the same step
        t_last = now
        if step % args.log_every == 0 or step % args.eval_every == 0 or finished():
            rec = {"step": step, "time_s": elapsed, "train_loss": window_loss / window_n, "lr": lr,
                   "tokens": step * args.batch_size * args.seq_len, "val_bpb": None}
            if step % args.eval_every == 0 or finished():
                rec["val_bpb"] = val_bpb = evaluate(net, data["val"], args, shard)
                if shard.rank == 0:
                    save_checkpoint(ckpt_path, model, opt, step, elapsed, records + [rec], args)
                    bar.write(f"step {step:6d}  {elapsed:7.1f} s  train {rec['train_loss'] / LN2:.3f} bpb  "
                              f"val {val_bpb:.3f} bpb")
                t_last = time.time()  # validation time is not training time
            records.append(rec)
            if shard.rank == 0:
                save_log(out, meta, records)
            window_loss, window_n = 0.0, 0
        if bar is not None:
            info = f"step {step} loss {loss_value:.3f}" + (f" val {val_bpb:.3f} bpb" if val_bpb is not None else "")
            bar.update(elapsed if budget is not None else step, info)
    if bar is not None:
        bar.close()

    last = records[-1] if records else {}
    final_bpb = last["val_bpb"] if last.get("step") == step and last.get("val_bpb") is not None \
        else evaluate(net, data["val"], args, shard)
    if shard.world > 1:
        dist.barrier()
        dist.destroy_process_group()
        if shard.rank > 0:  # rank 0 samples and writes the log
            return meta
    prompt = torch.tensor(list(PROMPT), dtype=torch.long)[None]
    t0 = time.time()
    sample = model.eval().generate(prompt, args.sample_len, temperature=0.8, top_k=40,
                                   generator=torch.Generator().manual_seed(args.seed))
    gen_s = time.time() - t0
    text = bytes(sample[0].tolist()).decode("utf-8", errors="replace")
    (out / "sample.txt").write_text(text)
    meta["final"] = {"step": step, "time_s": elapsed, "val_bpb": final_bpb,
                     "generate_tokens_per_s": args.sample_len / max(gen_s, 1e-9)}
    save_log(out, meta, records)
    print(f"final: step {step}, {elapsed:.0f} s, val {final_bpb:.4f} bpb, "
          f"generation {args.sample_len / max(gen_s, 1e-9):.0f} tokens/s")
    print("---- sample ----")
    print(text)
    return meta


if __name__ == "__main__":
    main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # A process of torchrun leaves without the interpreter's finalization: everything is written and the
        # process group destroyed by now, and tearing down gloo's threads at exit can abort the process
        # (std::terminate, seen with torch 2.14) after a successful run.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
