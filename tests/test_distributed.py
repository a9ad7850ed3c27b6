"""Context parallelism (pom_ext.distributed) on gloo: groups of 2 and 3 processes started here, every rank's
output and every gradient against the unsharded layer in one process, for every mask form; bad inputs raise
on every rank.

One process group per size runs every case (bad inputs first, then the comparisons; this file is also the
worker's script: `python test_distributed.py --worker RANK WORLD PORT OUT`); every rank writes a JSON report
that the tests of that size read. A group that does not finish within TIMEOUT seconds is killed and the test
fails.
"""
import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import pytest
import torch

try:
    import torch.distributed as dist
    HAS_GLOO = dist.is_available() and dist.is_gloo_available()
except ImportError:
    HAS_GLOO = False

pytestmark = pytest.mark.skipif(not HAS_GLOO, reason="torch.distributed with the gloo backend is not available")

TIMEOUT = 120
ROOT = pathlib.Path(__file__).resolve().parents[1]
TOL = {"float64": 1e-12, "float32": 1e-5}

# ---- the cases (shared by the test and the worker) ----

B, N, D, T_CROSS = 3, 13, 12, 7
CONFIGS = [(1, 1, False), (2, 4, True)]  # (n_groups, n_sel_heads, bias)
# The layers of the comparisons: CONFIGS, and a rotary layer (PoMRoPE, 1-D, default positions: each rank rotates at
# its global offset, packed sequences restart at 0).
CASE_CONFIGS = CONFIGS + [(2, 4, True, "rope")]
# Token counts per rank: uneven, a rank inside one block, a rank with no tokens.
SPLITS = {2: [[5, 8]], 3: [[4, 1, 8], [6, 0, 7]]}
# The models' splits: also one where rank 0 (the encoder's class token) holds no tokens.
MODEL_SPLITS = {2: [[5, 8], [0, 13]], 3: [[4, 1, 8], [6, 0, 7], [0, 9, 4]]}
# Packed: sequences [0,1) [1,12) [12,12) [12,30) [30,39), some crossing one or two rank boundaries.
CU = [0, 1, 12, 12, 30, 39]
VARLEN_SPLITS = {2: [[16, 23]], 3: [[10, 1, 28], [17, 0, 22]]}
MODES = ["none", "weights", "padding", "causal", "block3", "block6", "cross_none", "cross_weights",
         "cross_causal", "cross_block3", "varlen", "varlen_causal", "varlen_block4", "cross_varlen_block5"]
STATE_MODES = {"none", "causal", "block6", "varlen_causal"}


def _offsets(split):
    return [sum(split[:r]) for r in range(len(split) + 1)]


def _make_layer(config, dtype, dim=D):
    from pom_ext import PoM, PoMRoPE
    torch.manual_seed(0)
    if len(config) > 3:
        layer = PoMRoPE(dim, 3, 2, config[0], config[1], config[2], max_seq_len=64).to(dtype)
    else:
        layer = PoM(dim, 3, 2, n_groups=config[0], n_sel_heads=config[1], bias=config[2]).to(dtype)
    with torch.no_grad():
        layer.po_coeff.copy_(torch.randn_like(layer.po_coeff) * 0.5)
        if config[2]:
            layer.ag_proj.bias.normal_()
    return layer


def _inputs(mode, dtype):
    """The whole batch: xq, xc (or None), mask, block_size, cu_seqlens, upstream gradient."""
    g = torch.Generator().manual_seed(7)
    varlen = "varlen" in mode
    cross = mode.startswith("cross_")
    shape = (CU[-1], D) if varlen else (B, N, D)
    xc = torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)
    xq = torch.randn(*(shape if varlen or "causal" in mode or "block" in mode else (B, T_CROSS, D)),
                     generator=g, dtype=torch.float64).to(dtype) if cross else xc
    base = mode[len("cross_"):] if cross else mode
    mask, block = None, None
    if base == "weights":
        mask = torch.rand(B, N, generator=g, dtype=torch.float64).to(dtype)
    elif base == "padding":
        mask = torch.rand(B, N, generator=g) > 0.4
        mask[0] = False  # an all-padding row gives 0
    elif base in ("causal", "varlen_causal"):
        mask = "causal"
    elif "block" in base:
        mask, block = "causal", int(base.split("block")[1])
    cu = torch.tensor(CU, dtype=torch.int32) if varlen else None
    gout = torch.randn(*xq.shape[:-1], D, generator=g, dtype=torch.float64).to(dtype)
    return xq, (xc if cross else None), mask, block, cu, gout


def _slice(t, mode, a, b):
    """Rank slice [a, b) of the token axis of t (dim 0 packed, dim 1 batched)."""
    varlen = "varlen" in mode
    return t[a:b] if varlen else t[:, a:b]


def _grads(layer, xs):
    """The inputs' and the layer's gradients; every parameter has one on every rank (zeros where the rank's tokens
    do not reach it: DDP and FSDP2 reduce the same tensors on every rank)."""
    missing = [n for n, p in layer.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing}"
    return [x.grad for x in xs] + [p.grad for p in layer.parameters()]


# ---- worker ----

def _run_cases(world, rank, report):
    import pom_ext.distributed as cp
    from conftest import rel_err

    for dtype_name, dtype in (("float64", torch.float64), ("float32", torch.float32)):
        for config in CASE_CONFIGS:
            for mode in MODES:
                splits = VARLEN_SPLITS[world] if "varlen" in mode else SPLITS[world]
                for split in splits:
                    layer = _make_layer(config, dtype)
                    xq, xc, mask, block, cu, gout = _inputs(mode, dtype)
                    cross = xc is not None
                    # unsharded, in this process
                    leaves = [xq.clone().requires_grad_()] + ([xc.clone().requires_grad_()] if cross else [])
                    ref = layer(leaves[0], leaves[1] if cross else None, mask=mask, block_size=block,
                                cu_seqlens=cu)
                    (ref * gout).sum().backward()
                    ref_grads = _grads(layer, leaves)
                    layer.zero_grad(set_to_none=True)
                    # sharded: context slice o[r]:o[r+1], queries the same slice or an even split (pooled cross)
                    o = _offsets(split)
                    a, b = o[rank], o[rank + 1]
                    qa, qb = (a, b)
                    if mode in ("cross_none", "cross_weights"):  # T_CROSS queries, split evenly
                        qa, qb = cp.token_range(xq.shape[1], world, rank)
                    runs = []
                    for _ in range(2):
                        lq = _slice(xq, mode, qa, qb).clone().requires_grad_()
                        lc = _slice(xc, mode, a, b).clone().requires_grad_() if cross else None
                        lm = mask[:, a:b] if isinstance(mask, torch.Tensor) else mask
                        out = cp.context_parallel_pom(layer, lq, lc, lm, block_size=block, cu_seqlens=cu)
                        (out * _slice(gout, mode, qa, qb)).sum().backward()
                        grads = _grads(layer, [lq] + ([lc] if cross else []))
                        for gp in grads[len(leaves):]:
                            dist.all_reduce(gp)
                        runs.append([out.detach()] + [g.detach().clone() for g in grads])
                        layer.zero_grad(set_to_none=True)
                    out, grads = runs[0][0], runs[0][1:]
                    errs = {"out": rel_err(out, _slice(ref, mode, qa, qb).detach()),
                            "xq": rel_err(grads[0], _slice(ref_grads[0], mode, qa, qb))}
                    if cross:
                        errs["xc"] = rel_err(grads[1], _slice(ref_grads[1], mode, a, b))
                    errs["params"] = max(rel_err(g, r) for g, r in zip(grads[len(leaves):], ref_grads[len(leaves):]))
                    case = {"dtype": dtype_name, "config": list(config), "mode": mode, "split": split,
                            "errs": errs, "bitwise_repeat": all(torch.equal(u, v) for u, v in zip(*runs))}
                    if mode in STATE_MODES:
                        case.update(_state_check(cp, layer, xq, mask, block, cu, mode, a, b, rel_err))
                    report.append(case)


def _run_16bit(world, rank, report):
    """bfloat16 and float16 layers (sums exchanged in float32): output and input gradients against a float64
    copy of the layer, over the whole tensors put together from the ranks' slices: no further off than the
    unsharded 16-bit layer (at most twice its error, plus 1e-4)."""
    import copy

    import pom_ext.distributed as cp
    from conftest import rel_err

    def up(t):
        return t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t

    for dtype_name, dtype in (("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        for mode in MODES:
            split = (VARLEN_SPLITS if "varlen" in mode else SPLITS)[world][0]
            layer = _make_layer(CONFIGS[1], dtype)
            exact = copy.deepcopy(layer).double()
            xq, xc, mask, block, cu, gout = _inputs(mode, dtype)
            o = _offsets(split)
            a, b = o[rank], o[rank + 1]
            qa, qb = cp.token_range(xq.shape[1], world, rank) if mode in ("cross_none", "cross_weights") else (a, b)
            results = {}
            for name, run in (("exact", lambda q: exact(q, up(xc), mask=up(mask), block_size=block, cu_seqlens=cu)),
                              ("unsharded", lambda q: layer(q, xc, mask=mask, block_size=block, cu_seqlens=cu))):
                q = (up(xq) if name == "exact" else xq).clone().requires_grad_()
                out = run(q)
                (out * up(gout) if name == "exact" else out * gout).sum().backward()
                results[name] = (out.detach(), q.grad)
            q = _slice(xq, mode, qa, qb).clone().requires_grad_()
            out = cp.context_parallel_pom(layer, q, None if xc is None else _slice(xc, mode, a, b),
                                          mask[:, a:b] if isinstance(mask, torch.Tensor) else mask,
                                          block_size=block, cu_seqlens=cu)
            (out * _slice(gout, mode, qa, qb)).sum().backward()
            # the whole tensors, put together from every rank's slice: one-token slices are a few rounding draws
            pieces = [None] * world
            dist.all_gather_object(pieces, (out.detach(), q.grad))
            whole = [torch.cat([p[i] for p in pieces], 0 if "varlen" in mode else 1) for i in range(2)]
            errs = {}
            for i, what in enumerate(("out", "xq")):
                mine, plain = (rel_err(r[i], results["exact"][i]) for r in (whole, results["unsharded"]))
                errs[what] = mine
                errs[what + "_unsharded"] = plain
            report.append({"dtype": dtype_name, "config": list(CONFIGS[1]), "mode": mode, "split": split,
                           "errs": errs, "bitwise_repeat": True})


MODEL_CASES = [("lm", {"n_sel_heads": 1}), ("lm", {"n_sel_heads": 4, "n_groups": 2}), ("encoder", {"pool": "mean"}),
               ("encoder_weights", {"pool": "mean"}), ("encoder_padding", {"pool": "cls"}),
               ("lm", {"n_sel_heads": 4, "rope": "1d", "rope_max_len": 32}), ("encoder", {"pool": "cls", "rope": "1d"}),
               # hybrids: attention gathers every rank's keys and values (and key padding); a window of 3 reaches
               # over a rank of one token or none
               ("lm", {"layer_pattern": "PA", "n_heads": 2, "conv_skip": True}),
               ("lm", {"layer_pattern": "AP", "n_heads": 2, "window": 3}),
               ("encoder", {"pool": "cls", "layer_pattern": "PA", "n_heads": 2}),
               ("encoder_padding", {"pool": "mean", "layer_pattern": "AP", "n_heads": 2, "window": 3}),
               ("encoder_weights", {"pool": "mean", "layer_pattern": "PA", "n_heads": 2}),
               # every block under checkpoint_wrapper (the PoM block non-reentrant, the attention block reentrant):
               # the backward recomputes the sharded blocks, their collectives included
               ("lm", {"layer_pattern": "PA", "n_heads": 2, "window": 3, "ac": True}),
               ("encoder_padding", {"pool": "cls", "layer_pattern": "AP", "n_heads": 2, "ac": True})]


def _model(kind, kw, dtype):
    """The model of a case; kw "ac": every block under checkpoint_wrapper (PoM blocks non-reentrant, attention
    blocks reentrant), model.ac_calls[0] counting the runs of the checkpointed functions (the forward's, then the
    backward's recomputation: 2 per block and training step)."""
    from pom_ext.models import PolymorpherEncoder, PolymorpherLM
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper
    kw = dict(kw)
    ac = kw.pop("ac", False)
    torch.manual_seed(1)
    if kind == "lm":
        model = PolymorpherLM(50, 16, 2, degree=3, conv_size=4, **kw)
        with torch.no_grad():  # the skip's zeros would hide it
            for block in model.blocks:
                if getattr(block, "skip", None) is not None:
                    block.skip.normal_()
    else:
        model = PolymorpherEncoder(5, 16, 2, num_tokens=50, max_len=N + 2, degree=3, **kw)
    if ac:
        model.ac_calls = [0]

        def counted(checkpoint_fn):
            def run(fn, *args, **kwargs):
                def counting(*a, **k):
                    model.ac_calls[0] += 1
                    return fn(*a, **k)
                return checkpoint_fn(counting, *args, **kwargs)
            return run

        for i, block in enumerate(model.blocks):
            impl = CheckpointImpl.REENTRANT if block.kind == "A" else CheckpointImpl.NO_REENTRANT
            model.blocks[i] = checkpoint_wrapper(block, checkpoint_impl=impl)
            model.blocks[i].checkpoint_fn = counted(model.blocks[i].checkpoint_fn)
    return model.to(dtype)


def _run_models(world, rank, report):
    """PolymorpherLM and PolymorpherEncoder sharded against the unsharded model: outputs, loss, gradients."""
    import pom_ext.distributed as cp
    from conftest import rel_err

    for dtype_name, dtype in (("float64", torch.float64), ("float32", torch.float32)):
        for kind, kw in MODEL_CASES:
            for split in MODEL_SPLITS[world]:
                model = _model(kind, kw, dtype)
                g = torch.Generator().manual_seed(3)
                tokens = torch.randint(0, 50, (B, N), generator=g)
                o = _offsets(split)
                a, b = o[rank], o[rank + 1]
                errs = {}
                if kind == "lm":
                    targets = torch.randint(0, 50, (B, N), generator=g)
                    targets[0, ::3] = -100  # ignored positions
                    wrapped = cp.ContextParallelLM(model)

                    def run(sharded):
                        if not sharded:
                            return model(tokens, targets)
                        return wrapped(tokens[:, a:b], targets[:, a:b])
                else:
                    mask = None
                    if kind == "encoder_weights":
                        mask = torch.rand(B, N, generator=g, dtype=torch.float64).to(dtype)
                    elif kind == "encoder_padding":
                        mask = torch.rand(B, N, generator=g) > 0.4
                    gout = torch.randn(B, 5, generator=g, dtype=torch.float64).to(dtype)
                    wrapped = cp.ContextParallelEncoder(model)

                    def run(sharded):
                        # every rank holds the whole logits: its loss counts 1 / world of the unsharded one
                        if not sharded:
                            out = model(tokens, mask)
                            return out, (out * gout).sum()
                        out = wrapped(tokens[:, a:b], None if mask is None else mask[:, a:b])
                        return out, (out * gout).sum() / world
                params = list(model.parameters())
                ref, loss = run(False)
                loss.backward()
                ref_grads = [p.grad.clone() for p in params]
                model.zero_grad(set_to_none=True)
                calls = getattr(model, "ac_calls", [0])
                calls[0] = 0
                out, share = run(True)
                share.backward()
                ac_calls = calls[0]
                # every parameter has a gradient on every rank, zero where the rank's tokens do not reach it
                # (DDP and FSDP2 reduce the same tensors on every rank)
                missing = [n for n, p in model.named_parameters() if p.grad is None]
                grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
                for gp in grads:
                    dist.all_reduce(gp)
                total = share.detach().clone()
                dist.all_reduce(total)
                errs["out"] = rel_err(out, ref[:, a:b] if kind == "lm" else ref)
                errs["loss"] = rel_err(total, loss)
                errs["params"] = max(rel_err(gp, r) for gp, r in zip(grads, ref_grads))
                if kind == "lm":  # a sharded prefill, then two decoding steps on this rank alone
                    with torch.no_grad():
                        nxt = torch.randint(0, 50, (B, 2), generator=g)
                        ref_cache = model.allocate_cache(B)
                        model.step(tokens, ref_cache)
                        ref_steps = [model.step(nxt[:, i:i + 1], ref_cache) for i in range(2)]
                        logits, cache = wrapped.prefill(tokens[:, a:b])
                        steps = [model.step(nxt[:, i:i + 1], cache) for i in range(2)]
                    errs["prefill"] = rel_err(logits, ref[:, a:b])
                    errs["decode"] = max(rel_err(u, v) for u, v in zip(steps, ref_steps))
                report.append({"dtype": dtype_name, "config": kw, "mode": kind, "split": split, "errs": errs,
                               "bitwise_repeat": True, "missing_grads": missing, "ac_calls": ac_calls,
                               "blocks": len(model.blocks)})


def _run_wrapped(world, rank, report):
    """ContextParallelLM under DDP (a separate process group for the sequence) and under FSDP2 (fully_shard of
    the wrapper; and of every block of a hybrid, then the wrapper, rank 0 holding no tokens: its gradients are
    zeros that FSDP2 reduces like the others): both average the gradients over the ranks, so the ranks
    back-propagate loss * world."""
    import pom_ext.distributed as cp
    from conftest import rel_err
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    g = torch.Generator().manual_seed(5)
    tokens, targets = torch.randint(0, 50, (B, N), generator=g), torch.randint(0, 50, (B, N), generator=g)
    for kind in ("lm_ddp", "lm_fsdp2", "lm_fsdp2_blocks", "lm_fsdp2_ac_blocks"):
        blocks = kind.endswith("_blocks")
        a, b = cp.token_range(N, world, rank) if not blocks else (0, 0) if rank == 0 else (0, N)
        model = _model("lm", {"layer_pattern": "PA", "n_heads": 2, "ac": "_ac_" in kind} if blocks else {},
                       torch.float64)
        model(tokens, targets)[1].backward()
        ref = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        if kind == "lm_ddp":
            net = DistributedDataParallel(cp.ContextParallelLM(model, group=dist.new_group(list(range(world)))))
        else:
            net = cp.ContextParallelLM(model)
            if blocks:  # each block (a checkpoint_wrapper's wrapper: FSDP2's hooks on it, recomputed inside)
                for block in model.blocks:
                    fully_shard(block)
            fully_shard(net)
        errs = {}
        calls = getattr(model, "ac_calls", [0])
        calls[0] = 0
        for step in range(2):  # DDP's first and later iterations differ (bucket rebuild)
            _, share = net(tokens[:, a:b], targets[:, a:b])
            (share * world).backward()
            grads = {n: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                     for n, p in model.named_parameters()}
            errs[f"params{step}"] = max(rel_err(grads[n], ref[n]) for n in ref)
            net.zero_grad(set_to_none=True)
        report.append({"dtype": "float64", "config": {"ac": True} if "_ac_" in kind else {}, "mode": kind,
                       "split": [], "errs": errs, "bitwise_repeat": True, "ac_calls": calls[0] // 2,
                       "blocks": len(model.blocks)})


def _state_check(cp, layer, x, mask, block, cu, mode, a, b, rel_err):
    """The state after a sharded prefill against the unsharded sequence's, and the same bits on every rank."""
    with torch.no_grad():
        lm = mask[:, a:b] if isinstance(mask, torch.Tensor) else mask
        if cu is None:  # the module form's prefill
            _, st = cp.ContextParallelPoM(layer).prefill(_slice(x, mode, a, b), mask=lm, block_size=block)
        else:
            _, st = cp.context_parallel_pom(layer, _slice(x, mode, a, b), None, lm, cu_seqlens=cu, return_state=True)
        if cu is None:
            _, ref = layer.state_forward(x)
            ref_sum, ref_count = ref.sum, ref.count
        else:
            c = cu.tolist()
            sums = [layer.state_forward(x[s:e][None])[1].sum[0] for s, e in zip(c, c[1:])]
            ref_sum, ref_count = torch.stack(sums), torch.tensor([e - s for s, e in zip(c, c[1:])])
        mine = torch.cat([st.sum.double().flatten(), st.count.double()])
        parts = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, mine)
    return {"state_err": rel_err(st.sum, ref_sum), "state_count_ok": torch.equal(st.count, ref_count),
            "state_dtype": str(st.sum.dtype), "state_same_on_ranks": all(torch.equal(p, parts[0]) for p in parts)}


def _bad_cases(world, rank):
    """(name, expected argument in the message, a call that must raise ValueError on every rank)."""
    import pom_ext.distributed as cp
    config = CONFIGS[0]
    layer = _make_layer(config, torch.float64)
    x = torch.randn(B, 4, D, dtype=torch.float64)
    last = rank == world - 1
    cu_ok = torch.tensor([0, 3, 4 * world], dtype=torch.int32)
    packed = torch.randn(4, D, dtype=torch.float64)
    lm, enc = _model("lm", {}, torch.float64), _model("encoder", {"pool": "mean"}, torch.float64)
    tokens = torch.randint(0, 50, (B, 8))  # encoder: 8 tokens a rank, more than max_len = N + 2 over the ranks

    def call(*args, **kw):
        return lambda: cp.context_parallel_pom(*args, **kw)

    def no_grad(fn):
        return torch.no_grad()(fn)

    return [
        ("batch", "xq", call(layer, x[:2] if last else x)),
        ("width", "layer", call(_make_layer(config, torch.float64, 16), torch.randn(B, 4, 16, dtype=torch.float64))
         if last else call(layer, x)),
        ("dtype", "xq", call(_make_layer(config, torch.float32), x.float()) if last else call(layer, x)),
        ("mask kind", "mask", call(layer, x, mask="causal" if last else None)),
        ("block size", "block_size", call(layer, x, mask="causal", block_size=3 if last else 2)),
        ("xc on one rank", "xc", call(layer, x, x.clone() if last else None)),
        ("grad on one rank", "xq", no_grad(call(layer, x)) if last else call(layer, x)),
        ("local mask shape", "mask", call(layer, x, mask=torch.ones(B, 5 if last else 4, dtype=torch.float64))),
        ("cu_seqlens differ", "cu_seqlens",
         call(layer, packed, cu_seqlens=torch.tensor([0, 2 if last else 3, 4 * world], dtype=torch.int32))),
        ("cu_seqlens vs slices", "cu_seqlens",
         call(layer, packed[:3] if last else packed, cu_seqlens=cu_ok)),
        ("causal T != N", "xq", call(layer, x[:, :3], x, mask="causal")),
        ("(B, T, N) mask", "mask", call(layer, x, mask=torch.ones(B, 4, 4 * world, dtype=torch.bool))),
        ("state with weights", "return_state",
         call(layer, x, mask=torch.ones(B, 4, dtype=torch.float64), return_state=last)),
        ("LM batch", "tokens", lambda: cp.ContextParallelLM(lm)(tokens[:2] if last else tokens)),
        ("LM targets on one rank", "targets", lambda: cp.ContextParallelLM(lm)(tokens, tokens if last else None)),
        ("encoder past max_len", "x", lambda: cp.ContextParallelEncoder(enc)(tokens)),
        ("LM dtype", "model", lambda: cp.ContextParallelLM(lm.float() if last else lm)(tokens)),
    ]


def _run_bad(world, rank, report):
    import pom_ext.distributed as cp
    for name, arg, fn in _bad_cases(world, rank):
        try:
            fn()
            report.append({"case": name, "raised": None})
        except ValueError as e:
            report.append({"case": name, "raised": "ValueError", "message": str(e), "arg": arg})
        except Exception as e:  # noqa: BLE001 - reported, and the test fails on it
            report.append({"case": name, "raised": type(e).__name__, "message": str(e), "arg": arg})
    # the group still works after the errors
    layer = _make_layer(CONFIGS[0], torch.float64)
    out = cp.context_parallel_pom(layer, torch.randn(B, 4, D, dtype=torch.float64), mask="causal")
    report.append({"case": "after errors", "raised": None, "finite": bool(torch.isfinite(out).all())})


ROPE_LEN, ROPE_N = 8, 12  # the rotary cases: tables of 8 positions, 12 tokens over the ranks


def _rope_bad_cases(world, rank):
    """(name, expected argument in the message, whether every rank's message is the same, a call that must raise
    ValueError on every rank, a valid call to run after it): rotary positions past the tables, found on some
    ranks only (the default global positions of the later ranks, positions given on one rank)."""
    import pom_ext.distributed as cp
    from pom_ext import PoM, PoMRoPE
    from pom_ext.models import PolymorpherLM
    torch.manual_seed(0)
    layer = PoMRoPE(16, 2, 2, max_seq_len=ROPE_LEN).double()
    plain = PoM(16, 2, 2).double()
    longer = PoMRoPE(16, 2, 2, max_seq_len=2 * ROPE_LEN).double()
    x = torch.randn(2, ROPE_N, 16, dtype=torch.float64)
    lo, hi = cp.token_range(ROPE_N, world, rank)
    vlo, vhi = cp.token_range(ROPE_LEN, world, rank)  # the valid calls: 8 tokens
    qlo, qhi = cp.token_range(4, world, rank)
    last = rank == world - 1
    packed = x[0]  # 12 packed tokens
    lm = PolymorpherLM(50, 16, 2, degree=2, rope="1d", rope_max_len=ROPE_LEN).double()
    tokens = torch.randint(0, 50, (2, ROPE_N))

    def valid():
        return cp.context_parallel_pom(layer, x[:, vlo:vhi], mask="causal")

    def valid_lm():
        return cp.ContextParallelLM(lm)(tokens[:, vlo:vhi])

    return [
        ("causal, default positions", "positions", True,
         lambda: cp.context_parallel_pom(layer, x[:, lo:hi], mask="causal"), valid),
        ("pooled, default positions", "positions", True,
         lambda: cp.context_parallel_pom(layer, x[:, lo:hi]), valid),
        ("packed, a sequence of 9", "positions", True,
         lambda: cp.context_parallel_pom(layer, packed[lo:hi], mask="causal",
                                         cu_seqlens=torch.tensor([0, 3, ROPE_N], dtype=torch.int32)),
         # 12 packed tokens in sequences of 6: the default positions restart at each sequence, within the tables
         lambda: cp.context_parallel_pom(layer, packed[lo:hi], mask="causal",
                                         cu_seqlens=torch.tensor([0, 6, ROPE_N], dtype=torch.int32))),
        ("cross, default context positions", "ctx_positions", True,
         lambda: cp.context_parallel_pom(layer, x[:, qlo:qhi], x[:, lo:hi]), valid),
        ("positions given on rank 0, defaults elsewhere", "positions", True,
         lambda: cp.context_parallel_pom(layer, x[:, lo:hi], mask="causal",
                                         positions=torch.arange(hi - lo) if rank == 0 else None), valid),
        ("positions past the tables on the last rank", "positions", False,
         lambda: cp.context_parallel_pom(layer, x[:, vlo:vhi], mask="causal",
                                         positions=torch.arange(vlo, vhi) + (ROPE_LEN if last else 0)), valid),
        ("positions to a plain PoM on the last rank", "positions", False,
         lambda: cp.context_parallel_pom(plain, x[:, lo:hi], mask="causal",
                                         positions=torch.arange(lo, hi) if last else None),
         lambda: cp.context_parallel_pom(plain, x[:, lo:hi], mask="causal")),
        ("a plain PoM on rank 0, rotary layers elsewhere", "layer", True,
         lambda: cp.context_parallel_pom(plain if rank == 0 else layer, x[:, lo:hi], mask="causal"), valid),
        ("rotary tables of other lengths on the last rank", "layer", True,
         lambda: cp.context_parallel_pom(longer if last else layer, x[:, vlo:vhi], mask="causal"), valid),
        ("LM past rope_max_len", "tokens", True, lambda: cp.ContextParallelLM(lm)(tokens[:, lo:hi]), valid_lm),
        ("LM prefill past rope_max_len", "tokens", True,
         lambda: cp.ContextParallelLM(lm).prefill(tokens[:, lo:hi]), valid_lm),
    ]


def _run_rope_bad(world, rank, report):
    for name, arg, same, fn, ok in _rope_bad_cases(world, rank):
        try:
            fn()
            case = {"case": name, "raised": None}
        except Exception as e:  # noqa: BLE001 - reported: a timeout of the group (a hang) fails the test
            case = {"case": name, "raised": type(e).__name__, "message": str(e)}
        case.update(arg=arg, same=same)
        try:  # the group still works: a valid call right after
            out = ok()
            case["after"] = bool(torch.isfinite(out).all())
        except Exception as e:  # noqa: BLE001
            case["after"] = f"{type(e).__name__}: {e}"
        report.append(case)


def _worker(rank, world, port, out_dir, rope_only=False):
    from datetime import timedelta
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=ROPE_GROUP_TIMEOUT if rope_only else TIMEOUT // 2))
    report = {"bad": [], "cases": []}
    try:
        if rope_only:
            _run_rope_bad(world, rank, report["bad"])
            dist.barrier()
            return
        _run_bad(world, rank, report["bad"])  # first: the cases then also show that the group still works
        _run_cases(world, rank, report["cases"])
        _run_16bit(world, rank, report["cases"])
        _run_models(world, rank, report["cases"])
        if world == 2:  # (x 2 is exact: the LM's loss is float32, a factor 3 would round there)
            _run_wrapped(world, rank, report["cases"])
        dist.barrier()  # no rank tears down the group while another still talks to it
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(report, f)
        dist.destroy_process_group()


# ---- the tests ----

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(world, tmp_path, flag="--worker"):
    """Runs `world` worker processes; returns their reports (a hang past TIMEOUT is a failure)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]
                                                      + [p for p in [os.environ.get("PYTHONPATH")] if p]),
               OMP_NUM_THREADS="1")
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, __file__, flag, str(r), str(world), str(port),
                               str(tmp_path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    deadline = time.monotonic() + TIMEOUT
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()
        pytest.fail(f"the {world}-process group did not finish within {TIMEOUT} s")
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} exited with {p.returncode}:\n{log[-4000:]}"
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]


_GROUPS = {}


def _group(world, tmp_path_factory):
    """The reports of the one {world}-process group that runs every case (started by the first test asking)."""
    if world not in _GROUPS:
        _GROUPS[world] = _launch(world, tmp_path_factory.mktemp(f"cp{world}"))
    return _GROUPS[world]


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_layer_matches_unsharded(world, tmp_path_factory):
    reports = [r["cases"] for r in _group(world, tmp_path_factory)]
    expected = sum(len(VARLEN_SPLITS[world] if "varlen" in m else SPLITS[world]) for m in MODES) * 2 * \
        len(CASE_CONFIGS)
    expected += len(MODEL_CASES) * len(MODEL_SPLITS[world]) * 2 + (4 if world == 2 else 0) + 2 * len(MODES)
    for rank, report in enumerate(reports):
        assert len(report) == expected
        for case in report:
            what = f"rank {rank} {case['dtype']} {case['config']} {case['mode']} split {case['split']}"
            for k, err in case["errs"].items():
                if k.endswith("_unsharded"):
                    continue
                if case["dtype"] in ("bfloat16", "float16"):  # no further off than the unsharded 16-bit layer
                    tol = 2 * case["errs"][k + "_unsharded"] + 1e-4
                else:  # the LM's loss is float32 whatever the model's dtype (cross-entropy of logits.float())
                    tol = TOL["float32"] if k == "loss" else TOL[case["dtype"]]
                assert err < tol, f"{what}: {k} relative error {err:.3e} >= {tol:.1e}"
            assert case["bitwise_repeat"], f"{what}: a second run gave other bits"
            assert not case.get("missing_grads"), f"{what}: no gradient for {case['missing_grads']}"
            if isinstance(case["config"], dict) and case["config"].get("ac"):  # each checkpointed block ran in the forward and again in the backward
                assert case["ac_calls"] == 2 * case["blocks"], f"{what}: {case['ac_calls']} checkpointed runs"
            if "state_err" in case:
                tol = TOL[case["dtype"]]
                assert case["state_err"] < tol, f"{what}: state sum relative error {case['state_err']:.3e}"
                assert case["state_count_ok"], f"{what}: state count differs"
                assert case["state_dtype"] == ("torch.float64" if case["dtype"] == "float64" else "torch.float32")
                assert case["state_same_on_ranks"], f"{what}: the ranks' states differ"


def test_wrong_models_are_refused():
    """The encoder wrapper refuses image encoders, and each wrapper takes its own model class: when built, before
    any collective."""
    import pom_ext.distributed as cp
    from pom_ext.models import PolymorpherEncoder, PolymorpherLM
    with pytest.raises(ValueError, match="argument 'model' must take token sequences"):
        cp.ContextParallelEncoder(PolymorpherEncoder(5, 16, 1, image_size=8, patch_size=4))
    with pytest.raises(ValueError, match="argument 'model' must be a pom_ext.models.PolymorpherLM"):
        cp.ContextParallelLM(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="argument 'model' must be a pom_ext.models.PolymorpherEncoder"):
        cp.ContextParallelEncoder(PolymorpherLM(50, 16, 2, layer_pattern="PA", n_heads=2))


def test_composable_checkpoint_is_refused():
    """The composable activation checkpoint would recompute a block with its own, unsharded forward: the wrappers
    raise at the call, before any collective (so this needs no process group); checkpoint_wrapper is accepted
    (MODEL_CASES with "ac")."""
    import pom_ext.distributed as cp
    from pom_ext.models import PolymorpherEncoder, PolymorpherLM
    from torch.distributed._composable import checkpoint
    lm = PolymorpherLM(50, 16, 2, layer_pattern="PA", n_heads=2)
    checkpoint(lm.blocks[1])
    with pytest.raises(ValueError, match=r"argument 'model' has block 1 under torch.distributed._composable.check"
                                         r"point: .* wrap the block with checkpoint_wrapper"):
        cp.ContextParallelLM(lm)(torch.zeros(1, 3, dtype=torch.long))
    enc = PolymorpherEncoder(5, 16, 2, num_tokens=50, max_len=8)
    checkpoint(enc.blocks[0])
    with pytest.raises(ValueError, match=r"argument 'model' has block 0 under torch.distributed._composable"):
        cp.ContextParallelEncoder(enc)(torch.zeros(1, 3, dtype=torch.long))
    # also inside a checkpoint_wrapper
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    lm = PolymorpherLM(50, 16, 2, layer_pattern="PA", n_heads=2)
    checkpoint(lm.blocks[0])
    lm.blocks[0] = checkpoint_wrapper(lm.blocks[0])
    with pytest.raises(ValueError, match=r"argument 'model' has block 0 under torch.distributed._composable"):
        cp.ContextParallelLM(lm)(torch.zeros(1, 3, dtype=torch.long))


@pytest.mark.parametrize("world", [2, 3])
def test_bad_inputs_raise_on_every_rank(world, tmp_path_factory):
    reports = [r["bad"] for r in _group(world, tmp_path_factory)]
    for rank, report in enumerate(reports):
        for case in report[:-1]:
            assert case["raised"] == "ValueError", f"rank {rank}, {case['case']}: got {case}"
            msg = case["message"]
            # the rank whose own arguments are wrong names the argument; the others say which rank rejected
            assert f"argument '{case['arg']}'" in msg or "rejected their arguments" in msg, \
                f"rank {rank}, {case['case']}: {msg}"
        assert report[-1] == {"case": "after errors", "raised": None, "finite": True}
    # a disagreement seen in the gathered metadata is the same error on every rank
    for i, case in enumerate(reports[0][:-1]):
        if case["case"] not in ("local mask shape", "causal T != N", "(B, T, N) mask", "state with weights"):
            assert all(r[i]["message"] == case["message"] for r in reports), case["case"]
            assert f"argument '{case['arg']}'" in case["message"]


ROPE_GROUP_TIMEOUT = 20  # a rank left waiting in a collective (the hang) fails its case within this


@pytest.mark.parametrize("world", [2, 3])
def test_rope_positions_past_tables_raise_on_every_rank(world, tmp_path):
    """Rotary positions past the tables that only some ranks reach (the default global positions of the later
    ranks, positions given on one rank) or positions given to a plain PoM on one rank: every rank raises a
    ValueError naming the argument, before any exchange of data (no rank is left waiting in a collective), the
    same message where the gathered metadata shows it, and a valid call right after works. Its own group."""
    reports = [r["bad"] for r in _launch(world, tmp_path, "--rope-worker")]
    assert all(len(r) == len(reports[0]) == 11 for r in reports)
    for i, case in enumerate(reports[0]):
        for rank, report in enumerate(reports):
            got = report[i]
            what = f"rank {rank}, {got['case']}"
            assert got["raised"] == "ValueError", f"{what}: {got}"
            assert f"argument '{got['arg']}'" in got["message"], f"{what}: {got['message']}"
            assert got["after"] is True, f"{what}: the valid call after it gave {got['after']}"
        if case["same"]:
            assert all(r[i]["message"] == case["message"] for r in reports), [r[i]["message"] for r in reports]
        else:  # the last rank's argument is bad: it raises its own error, the others name it and quote it
            assert "rejected their arguments" in reports[0][i]["message"], reports[0][i]["message"]
            assert reports[-1][i]["message"] in reports[0][i]["message"], reports[0][i]["message"]


@pytest.mark.parametrize("model", ["pom", "hybrid"])
def test_train_lm_under_torchrun_matches_one_process(tmp_path, model):
    """examples/train_lm.py under torchrun with 2 processes (the sequence sharded) gives the loss curve of one
    process, step by step, and the same validation bits per byte: PoM blocks, and a hybrid (PA: the attention
    layer gathers the keys and values of both ranks)."""
    args = ["--steps", "10", "--dim", "32", "--depth", "2", "--seq-len", "64", "--batch-size", "4",
            "--eval-every", "5", "--log-every", "1", "--val-batches", "2", "--sample-len", "4", "--threads", "1",
            "--warmup", "3", "--model", model, "--attn-every", "2", "--n-heads", "2"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    script = str(ROOT / "examples" / "train_lm.py")
    runs = {1: [sys.executable, script], 2: [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                             "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), script]}
    logs = {}
    for world, cmd in runs.items():
        out = tmp_path / f"p{world}"
        try:
            done = subprocess.run(cmd + args + ["--out", str(out)], env=env, capture_output=True, text=True,
                                  timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"train_lm.py with {world} process(es) did not finish within {TIMEOUT} s")
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        logs[world] = json.loads((out / "log.json").read_text())
    one, two = logs[1]["records"], logs[2]["records"]
    assert logs[2]["processes"] == 2 and len(one) == len(two) == 10
    assert logs[1]["pattern"] == logs[2]["pattern"] == ("PP" if model == "pom" else "PA")
    for a, b in zip(one, two):
        assert abs(a["train_loss"] - b["train_loss"]) <= 1e-5 * abs(a["train_loss"]), (a, b)
        assert (a["val_bpb"] is None) == (b["val_bpb"] is None)
        if a["val_bpb"] is not None:
            assert abs(a["val_bpb"] - b["val_bpb"]) <= 1e-5 * a["val_bpb"], (a, b)


if __name__ == "__main__" and len(sys.argv) == 6 and sys.argv[1] in ("--worker", "--rope-worker"):
    _worker(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], rope_only=sys.argv[1] != "--worker")
