"""Context-parallel PoM layer: bytes exchanged per layer (counted at the process group) and wall time.

One process (plain python) times the unsharded layer; under torchrun every rank holds N / P tokens of each
sequence and runs pom_ext.distributed.context_parallel_pom. The collectives the layer calls are counted as
they reach torch.distributed (payload bytes each rank hands to all_gather / all_reduce) and set against what
ring attention moves for the same shape: per rank and layer, forward 2 (P - 1) B (N / P) D s bytes (its K and
V blocks passed around the ring), backward twice that (K and V again, and their gradients), s = 2 for 16-bit
K and V. gloo on CPUs, NCCL when every rank has a GPU (--device cuda). --layer attention counts instead the
attention block of a hybrid model as pom_ext.distributed runs it (every rank's K and V gathered, causal).

    PYTHONPATH=. python benchmarks/bench_cp.py --seq 65536
    PYTHONPATH=. torchrun --nproc_per_node 2 benchmarks/bench_cp.py --seq 65536
    PYTHONPATH=. torchrun --nproc_per_node 2 benchmarks/bench_cp.py --layer attention --seq 8192
"""
import argparse
import datetime
import json
import os
import statistics
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from pom_ext import PoM  # noqa: E402
from pom_ext.distributed import _attention_block, context_parallel_pom, token_range  # noqa: E402
from pom_ext.models import AttentionBlock  # noqa: E402


class Counter:
    """Payload bytes handed to all_gather / all_reduce by this rank, and the bytes a ring algorithm sends for
    them: all_gather (P - 1) x its input, all_reduce 2 (P - 1) / P x its tensor."""

    def __init__(self):
        self.calls, self.sent = 0, 0
        self._gather, self._reduce = dist.all_gather, dist.all_reduce

    def install(self):
        def all_gather(out, t, *a, **kw):
            P = len(out)
            self.calls, self.sent = self.calls + 1, self.sent + (P - 1) * t.numel() * t.element_size()
            return self._gather(out, t, *a, **kw)

        def all_reduce(t, *a, **kw):
            P = dist.get_world_size(kw.get("group"))
            self.calls += 1
            self.sent += 2 * (P - 1) * t.numel() * t.element_size() // P
            return self._reduce(t, *a, **kw)

        dist.all_gather, dist.all_reduce = all_gather, all_reduce

    def take(self):
        out = (self.calls, self.sent)
        self.calls, self.sent = 0, 0
        return out


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layer", choices=["pom", "attention"], default="pom",
                   help="attention: a hybrid model's attention block (causal, --heads heads)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=65536, help="tokens of each sequence, all ranks together")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--expand", type=int, default=2)
    p.add_argument("--degree", type=int, default=2)
    p.add_argument("--mask", choices=["none", "causal", "block"], default="causal")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, help="write the rank-0 result to this file")
    return p.parse_args()


def main():
    args = parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, counter = 0, None
    device = torch.device(args.device)
    if world > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group(backend, timeout=timedelta(minutes=5))
        rank = dist.get_rank()
        counter = Counter()
        counter.install()
    torch.manual_seed(0)
    if args.layer == "attention":
        layer = AttentionBlock(args.dim, args.heads, mlp_ratio=0).to(device)
    else:
        layer = PoM(args.dim, args.degree, args.expand).to(device)
    lo, hi = token_range(args.seq, world, rank)
    x = torch.randn(args.batch, args.seq, args.dim, device=device)[:, lo:hi].contiguous().requires_grad_()
    mask = None if args.mask == "none" else "causal"
    block = args.block_size if args.mask == "block" else None

    def forward():
        if args.layer == "attention":
            if world == 1:
                return layer(x, mask="causal")
            counts = [b - a for a, b in (token_range(args.seq, world, r) for r in range(world))]
            return _attention_block(layer, x, counts, rank, dist.group.WORLD)
        if world == 1:
            return layer(x, mask=mask, block_size=block)
        return context_parallel_pom(layer, x, mask=mask, block_size=block)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fwd_t, bwd_t = [], []
    fwd_bytes = bwd_bytes = fwd_calls = bwd_calls = 0
    for _ in range(args.reps + 1):  # the first is a warm-up
        sync()
        t0 = time.perf_counter()
        out = forward()
        sync()
        t1 = time.perf_counter()
        if counter:
            fwd_calls, fwd_bytes = counter.take()
        out.backward(torch.ones_like(out))
        sync()
        t2 = time.perf_counter()
        if counter:
            bwd_calls, bwd_bytes = counter.take()
        fwd_t.append(t1 - t0)
        bwd_t.append(t2 - t1)
    B, N, D, P = args.batch, args.seq, args.dim, world
    ring_fwd = 2 * (P - 1) * B * (N // P) * D * 2
    name = args.layer
    result = {"processes": P, "backend": dist.get_backend() if world > 1 else None, "layer": name, "batch": B,
              "seq": N, "dim": D, **({"heads": args.heads, "mask": "causal"} if name == "attention" else
                                     {"state_width": layer.state_width, "mask": args.mask, "block_size": block}),
              "forward_ms": 1e3 * statistics.median(fwd_t[1:]), "backward_ms": 1e3 * statistics.median(bwd_t[1:]),
              f"{name}_forward_bytes_sent_per_rank": fwd_bytes, f"{name}_forward_collectives": fwd_calls,
              f"{name}_backward_bytes_sent_per_rank": bwd_bytes, f"{name}_backward_collectives": bwd_calls,
              "ring_attention_forward_bytes_per_rank_16bit_kv": ring_fwd,
              "ring_attention_backward_bytes_per_rank_16bit_kv": 2 * ring_fwd}
    from pom_ext.bench.common import cpu_name, git_commit
    result.update({"device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
                   "threads_per_process": torch.get_num_threads(), "torch": torch.__version__,
                   "cuda": torch.version.cuda, "git_commit": git_commit(),
                   "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
    if rank == 0:
        print(json.dumps(result, indent=1))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
