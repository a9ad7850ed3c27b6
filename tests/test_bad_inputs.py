"""Bad-input matrix: every public op, function and layer method called with malformed arguments raises an
error whose message names the argument, and nothing crashes.

All cases run in one child process (restarted after the case that killed it, if any), which reports each
result as a JSON line, so that a segfault or abort is a failed case rather than a dead test session.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def build_cases():
    """[(name, argument names any one of which the message must contain, thunk)]."""
    import pom_ext
    from pom_ext import PoM, PoMState, functional as PF, ops

    f32, i64, i32 = torch.float32, torch.int64, torch.int32
    h, c = torch.randn(2, 5, 4), torch.randn(4, 3)
    w = torch.rand(2, 5)
    hp, cu = torch.randn(10, 4), torch.tensor([0, 3, 10], dtype=i32)
    s, n = torch.zeros(2, 4), torch.zeros(2, dtype=i64)
    meta = lambda t: t.to("meta")
    bad_cu = {
        "cu_not_from_0": torch.tensor([1, 3, 10], dtype=i32),
        "cu_decreasing": torch.tensor([0, 6, 4, 10], dtype=i32),
        "cu_wrong_last": torch.tensor([0, 3, 11], dtype=i32),
        "cu_short_last": torch.tensor([0, 3, 9], dtype=i64),
        "cu_float": torch.tensor([0.0, 3.0, 10.0]),
        "cu_2d": torch.tensor([[0, 3, 10]], dtype=i32),
        "cu_one_offset": torch.tensor([0], dtype=i32),
        "cu_meta": meta(cu),
        "cu_negative": torch.tensor([0, -2, 10], dtype=i32),
    }
    cases = []

    def add(name, args, fn):
        cases.append((name, (args,) if isinstance(args, str) else tuple(args), fn))

    # ---- the ops, through the dispatcher and through pom_ext.ops ----
    for ns_name, ns in (("torch.ops.pom_ext", torch.ops.pom_ext), ("pom_ext.ops", ops)):
        P = ns_name + "."
        add(P + "poly_eval h int", "h", lambda ns=ns: ns.poly_eval(h.long(), c))
        add(P + "poly_eval h 0-D", "h", lambda ns=ns: ns.poly_eval(torch.tensor(1.0), c))
        add(P + "poly_eval coeff width", "coeff", lambda ns=ns: ns.poly_eval(h, torch.randn(5, 3)))
        add(P + "poly_eval coeff 1-D", "coeff", lambda ns=ns: ns.poly_eval(h, torch.randn(4)))
        add(P + "poly_eval coeff 3-D", "coeff", lambda ns=ns: ns.poly_eval(h, torch.randn(4, 3, 1)))
        add(P + "poly_eval degree 0", "coeff", lambda ns=ns: ns.poly_eval(h, torch.randn(4, 0)))
        add(P + "poly_eval coeff int", "coeff", lambda ns=ns: ns.poly_eval(h, c.long()))
        add(P + "poly_eval coeff meta", "coeff", lambda ns=ns: ns.poly_eval(h, meta(c)))
        add(P + "poly_eval h meta", ("h", "coeff"), lambda ns=ns: ns.poly_eval(meta(h), c))
        add(P + "poly_mean h 2-D", "h", lambda ns=ns: ns.poly_mean(h[0], c))
        add(P + "poly_mean h 4-D", "h", lambda ns=ns: ns.poly_mean(h[None], c))
        add(P + "poly_mean h int", "h", lambda ns=ns: ns.poly_mean(h.int(), c))
        add(P + "poly_mean h bool", "h", lambda ns=ns: ns.poly_mean(h > 0, c))
        add(P + "poly_mean coeff width", "coeff", lambda ns=ns: ns.poly_mean(h, torch.randn(3, 3)))
        add(P + "poly_mean weight batch", "weight", lambda ns=ns: ns.poly_mean(h, c, torch.rand(3, 5)))
        add(P + "poly_mean weight length", "weight", lambda ns=ns: ns.poly_mean(h, c, torch.rand(2, 6)))
        add(P + "poly_mean weight 1-D", "weight", lambda ns=ns: ns.poly_mean(h, c, torch.rand(5)))
        add(P + "poly_mean weight 3-D", "weight", lambda ns=ns: ns.poly_mean(h, c, torch.rand(2, 5, 1)))
        add(P + "poly_mean weight int", "weight", lambda ns=ns: ns.poly_mean(h, c, torch.ones(2, 5, dtype=i64)))
        add(P + "poly_mean weight meta", "weight", lambda ns=ns: ns.poly_mean(h, c, meta(w)))
        add(P + "poly_mean packed weight", "weight", lambda ns=ns: ns.poly_mean(hp, c, torch.rand(9), cu))
        add(P + "poly_mean h 3-D with cu", "h", lambda ns=ns: ns.poly_mean(h, c, None, cu))
        for k, v in bad_cu.items():
            add(f"{P}poly_mean {k}", "cu_seqlens", lambda ns=ns, v=v: ns.poly_mean(hp, c, None, v))
            add(f"{P}poly_causal {k}", "cu_seqlens", lambda ns=ns, v=v: ns.poly_causal(hp, c, 1, v))
        add(P + "poly_causal h 2-D", "h", lambda ns=ns: ns.poly_causal(hp, c))
        add(P + "poly_causal h int", "h", lambda ns=ns: ns.poly_causal(h.long(), c))
        add(P + "poly_causal coeff width", "coeff", lambda ns=ns: ns.poly_causal(h, torch.randn(2, 2)))
        add(P + "poly_causal coeff meta", "coeff", lambda ns=ns: ns.poly_causal(h, meta(c)))
        add(P + "poly_causal block 0", "block_size", lambda ns=ns: ns.poly_causal(h, c, 0))
        add(P + "poly_causal block -3", "block_size", lambda ns=ns: ns.poly_causal(h, c, -3))
        add(P + "poly_causal block 2.5", "block_size", lambda ns=ns: ns.poly_causal(h, c, 2.5))
        add(P + "poly_state_update h 2-D", "h", lambda ns=ns: ns.poly_state_update(h[0], c, s, n))
        add(P + "poly_state_update h int", "h", lambda ns=ns: ns.poly_state_update(h.long(), c, s, n))
        add(P + "poly_state_update coeff", "coeff", lambda ns=ns: ns.poly_state_update(h, c[:3], s, n))
        add(P + "poly_state_update sum batch", "state_sum",
            lambda ns=ns: ns.poly_state_update(h, c, torch.zeros(3, 4), n))
        add(P + "poly_state_update sum width", "state_sum",
            lambda ns=ns: ns.poly_state_update(h, c, torch.zeros(2, 5), n))
        add(P + "poly_state_update sum 1-D", "state_sum", lambda ns=ns: ns.poly_state_update(h, c, torch.zeros(8), n))
        add(P + "poly_state_update sum half", "state_sum", lambda ns=ns: ns.poly_state_update(h, c, s.half(), n))
        add(P + "poly_state_update sum int", "state_sum", lambda ns=ns: ns.poly_state_update(h, c, s.long(), n))
        add(P + "poly_state_update sum meta", "state_sum", lambda ns=ns: ns.poly_state_update(h, c, meta(s), n))
        add(P + "poly_state_update count int32", "count", lambda ns=ns: ns.poly_state_update(h, c, s, n.int()))
        add(P + "poly_state_update count float", "count", lambda ns=ns: ns.poly_state_update(h, c, s, n.float()))
        add(P + "poly_state_update count batch", "count",
            lambda ns=ns: ns.poly_state_update(h, c, s, torch.zeros(3, dtype=i64)))
        add(P + "poly_state_update count 2-D", "count",
            lambda ns=ns: ns.poly_state_update(h, c, s, torch.zeros(2, 1, dtype=i64)))
        add(P + "poly_state_update count meta", "count", lambda ns=ns: ns.poly_state_update(h, c, s, meta(n)))
        add(P + "poly_state_step_ sum transposed", "state_sum",
            lambda ns=ns: ns.poly_state_step_(h, c, torch.zeros(4, 2).t(), n.clone()))
        add(P + "poly_state_step_ sum batch", "state_sum",
            lambda ns=ns: ns.poly_state_step_(h, c, torch.zeros(1, 4), n.clone()))
        add(P + "poly_state_step_ count", "count", lambda ns=ns: ns.poly_state_step_(h, c, s.clone(), n.int()))

    o = torch.ops.pom_ext
    H = torch.zeros(2, 4)
    add("poly_eval_backward grad_p shape", "grad_p", lambda: o.poly_eval_backward(torch.randn(2, 5, 3), h, c))
    add("poly_eval_backward grad_p meta", ("grad_p", "h"), lambda: o.poly_eval_backward(meta(h), h, c))
    add("poly_eval_backward coeff", "coeff", lambda: o.poly_eval_backward(h, h, c[:2]))
    add("poly_mean_backward grad_H shape", "grad_H",
        lambda: o.poly_mean_backward(torch.zeros(2, 5), H, h, c, None, None, False))
    add("poly_mean_backward H shape", "H", lambda: o.poly_mean_backward(H, torch.zeros(3, 4), h, c, None, None, False))
    add("poly_mean_backward weight_grad without weight", "weight_grad",
        lambda: o.poly_mean_backward(H, H, h, c, None, None, True))
    add("poly_mean_backward weight shape", "weight",
        lambda: o.poly_mean_backward(H, H, h, c, torch.rand(2, 4), None, True))
    add("poly_mean_backward cu", "cu_seqlens",
        lambda: o.poly_mean_backward(torch.zeros(2, 4), torch.zeros(2, 4), hp, c, None, bad_cu["cu_wrong_last"], False))
    add("poly_causal_backward grad_H shape", "grad_H", lambda: o.poly_causal_backward(torch.randn(2, 4, 4), h, c, 1, None))
    add("poly_causal_backward grad_H meta", ("grad_H", "h"), lambda: o.poly_causal_backward(meta(h), h, c, 1, None))
    add("poly_causal_backward block 0", "block_size", lambda: o.poly_causal_backward(h, h, c, 0, None))
    add("poly_causal_backward cu", "cu_seqlens",
        lambda: o.poly_causal_backward(hp, hp, c, 1, bad_cu["cu_decreasing"]))
    add("poly_state_update_backward grad_H", "grad_H",
        lambda: o.poly_state_update_backward(torch.zeros(2, 5), s, h, c, n))
    add("poly_state_update_backward grad_state_sum", "grad_state_sum",
        lambda: o.poly_state_update_backward(H, torch.zeros(3, 4), h, c, n))
    add("poly_state_update_backward count", "count",
        lambda: o.poly_state_update_backward(H, s, h, c, torch.zeros(3, dtype=i64)))
    add("poly_state_update_backward h 2-D", "h", lambda: o.poly_state_update_backward(H, s, h[0], c, n))

    # ---- pom_ext.functional ----
    add("functional.aggregate h list", "h", lambda: PF.aggregate([[1.0]], c))
    add("functional.aggregate h int", "h", lambda: PF.aggregate(h.long(), c))
    add("functional.aggregate h 2-D", "h", lambda: PF.aggregate(h[0], c))
    add("functional.aggregate coeff width", "coeff", lambda: PF.aggregate(h, torch.randn(5, 3)))
    add("functional.aggregate degree 0", "coeff", lambda: PF.aggregate(h, torch.randn(4, 0)))
    add("functional.aggregate coeff list", "coeff", lambda: PF.aggregate(h, [[1.0]] * 4))
    add("functional.aggregate coeff meta", "coeff", lambda: PF.aggregate(h, meta(c)))
    add("functional.aggregate mask string", "mask", lambda: PF.aggregate(h, c, "causl"))
    add("functional.aggregate mask list", "mask", lambda: PF.aggregate(h, c, [1, 0]))
    add("functional.aggregate mask (B, N) shape", "mask", lambda: PF.aggregate(h, c, torch.rand(2, 4)))
    add("functional.aggregate mask (B, T, N) shape", "mask", lambda: PF.aggregate(h, c, torch.rand(3, 2, 5)))
    add("functional.aggregate mask 1-D", "mask", lambda: PF.aggregate(h, c, torch.rand(5)))
    add("functional.aggregate mask 4-D", "mask", lambda: PF.aggregate(h, c, torch.rand(2, 1, 1, 5)))
    add("functional.aggregate mask int", "mask", lambda: PF.aggregate(h, c, torch.ones(2, 5, dtype=i64)))
    add("functional.aggregate mask meta", "mask", lambda: PF.aggregate(h, c, meta(w)))
    add("functional.aggregate block without causal", "block_size", lambda: PF.aggregate(h, c, None, block_size=2))
    add("functional.aggregate block 0", "block_size", lambda: PF.aggregate(h, c, "causal", block_size=0))
    add("functional.aggregate block 2.5", "block_size", lambda: PF.aggregate(h, c, "causal", block_size=2.5))
    add("functional.aggregate block True", "block_size", lambda: PF.aggregate(h, c, "causal", block_size=True))
    for k, v in bad_cu.items():
        add(f"functional.aggregate {k}", "cu_seqlens", lambda v=v: PF.aggregate(hp, c, cu_seqlens=v))
        add(f"functional.aggregate causal {k}", "cu_seqlens", lambda v=v: PF.aggregate(hp, c, "causal", cu_seqlens=v))
    add("functional.aggregate cu list", "cu_seqlens", lambda: PF.aggregate(hp, c, cu_seqlens=[0, 10]))
    add("functional.aggregate cu with mask tensor", "mask", lambda: PF.aggregate(hp, c, torch.rand(10), cu_seqlens=cu))
    add("functional.aggregate h 3-D with cu", "h", lambda: PF.aggregate(h, c, cu_seqlens=cu))
    add("functional.select width", "s", lambda: PF.select(torch.rand(2, 5, 3), torch.rand(2, 5, 4)))
    add("functional.select heads", "s", lambda: PF.select(torch.rand(2, 5, 3), torch.rand(2, 5, 4), n_sel_heads=3))
    add("functional.select heads 2.5", ("n_sel_heads", "s"),
        lambda: PF.select(torch.rand(2, 5, 2), torch.rand(2, 5, 4), n_sel_heads=2.5))
    add("functional.pom causal T != N", "s", lambda: PF.pom(h, torch.rand(2, 3, 4), c, "causal"))
    add("functional.pom gate width", "s", lambda: PF.pom(h, torch.rand(2, 5, 3), c))
    add("functional.pom mask", "mask", lambda: PF.pom(h, torch.rand(2, 5, 4), c, torch.rand(2, 6)))
    add("functional.pom cu", "cu_seqlens", lambda: PF.pom(hp, torch.rand(10, 4), c, cu_seqlens=bad_cu["cu_2d"]))
    add("functional.state_update sum int", "state_sum", lambda: PF.state_update(h, c, s.int(), n))
    add("functional.state_update sum batch", "state_sum", lambda: PF.state_update(h, c, torch.zeros(3, 4), n))
    add("functional.state_update sum width", "state_sum", lambda: PF.state_update(h, c, torch.zeros(2, 3), n))
    add("functional.state_update sum meta", "state_sum", lambda: PF.state_update(h, c, meta(s), n))
    add("functional.state_update sum list", "state_sum", lambda: PF.state_update(h, c, [0.0], n))
    # A float count in the sum's dtype is a weighted state's weight total; another dtype is an error.
    add("functional.state_update count float64", "count", lambda: PF.state_update(h, c, s, n.double()))
    add("functional.state_update count int32", "count", lambda: PF.state_update(h, c, s, n.int()))
    add("functional.state_update count batch", "count", lambda: PF.state_update(h, c, s, torch.zeros(3, dtype=i64)))
    add("functional.state_update count meta", "count", lambda: PF.state_update(h, c, s, meta(n)))
    add("functional.state_update count list", "count", lambda: PF.state_update(h, c, s, [0, 0]))
    add("functional.state_update coeff meta", "coeff", lambda: PF.state_update(h, meta(c), s, n))
    add("functional.state_update h 2-D", "h", lambda: PF.state_update(h[0], c, s, n))
    add("functional.check_coeff width", "coeff", lambda: PF.check_coeff(c, 5))
    add("functional.check_cu_seqlens", "cu_seqlens", lambda: PF.check_cu_seqlens(bad_cu["cu_wrong_last"], 10, hp.device))
    add("functional.check_state count", "count", lambda: PF.check_state(h, c, s, n[:1]))

    # ---- the layer ----
    for k, v in (("dim", dict(dim=0)), ("dim", dict(dim=-4)), ("dim", dict(dim=16.0)), ("dim", dict(dim="16")),
                 ("degree", dict(degree=0)), ("degree", dict(degree=-2)), ("degree", dict(degree=2.5)),
                 ("degree", dict(degree=True)), ("degree", dict(degree=None)), ("degree", dict(degree="3")),
                 ("expand", dict(expand=0)), ("expand", dict(expand=1.5)), ("n_groups", dict(n_groups=0)),
                 ("n_groups", dict(n_groups=2.0)), ("dim", dict(n_groups=3)), ("n_sel_heads", dict(n_sel_heads=-1)),
                 ("n_sel_heads", dict(n_sel_heads=5)), ("n_sel_heads", dict(n_sel_heads=2.5))):
        kw = dict(dim=16, degree=3, expand=2)
        kw.update(v)
        add(f"PoM({kw})", k, lambda kw=kw: PoM(**kw))

    layer = PoM(16, 3, 2)
    x = torch.randn(2, 7, 16)
    xp = torch.randn(14, 16)
    cu7 = torch.tensor([0, 5, 14], dtype=i32)
    add("PoM.forward xq 2-D", "xq", lambda: layer(x[0]))
    add("PoM.forward xq 4-D", "xq", lambda: layer(x[None]))
    add("PoM.forward xq width", "xq", lambda: layer(torch.randn(2, 7, 15)))
    add("PoM.forward xq int", "xq", lambda: layer(x.long()))
    add("PoM.forward xq list", "xq", lambda: layer([[0.0] * 16]))
    add("PoM.forward xq meta", "xq", lambda: layer(meta(x)))
    add("PoM.forward xq float64", "xq", lambda: layer(x.double()))
    add("PoM.forward xc batch", "xc", lambda: layer(x, torch.randn(3, 7, 16)))
    add("PoM.forward xc width", "xc", lambda: layer(x, torch.randn(2, 7, 8)))
    add("PoM.forward xc rank", "xc", lambda: layer(x, torch.randn(7, 16)))
    add("PoM.forward xc int", "xc", lambda: layer(x, torch.ones(2, 7, 16, dtype=i64)))
    add("PoM.forward xc meta", "xc", lambda: layer(x, meta(x)))
    add("PoM.forward xc float64", "xc", lambda: layer(x, x.double()))
    add("PoM.forward causal T != N", ("xq", "xc"), lambda: layer(x, torch.randn(2, 9, 16), mask="causal"))
    add("PoM.forward mask string", "mask", lambda: layer(x, mask="future"))
    add("PoM.forward mask (B, N) shape", "mask", lambda: layer(x, mask=torch.ones(2, 8, dtype=torch.bool)))
    add("PoM.forward mask (B, T, N) shape", "mask", lambda: layer(x, mask=torch.ones(2, 7, 9)))
    add("PoM.forward mask (B, T, N) wrong T", "mask", lambda: layer(x, mask=torch.ones(2, 5, 7)))
    add("PoM.forward mask int", "mask", lambda: layer(x, mask=torch.ones(2, 7, dtype=i64)))
    add("PoM.forward mask meta", "mask", lambda: layer(x, mask=meta(torch.ones(2, 7))))
    add("PoM.forward mask 1-D", "mask", lambda: layer(x, mask=torch.ones(7)))
    add("PoM.forward block without causal", "block_size", lambda: layer(x, block_size=3))
    add("PoM.forward block 0", "block_size", lambda: layer(x, mask="causal", block_size=0))
    add("PoM.forward block 1.5", "block_size", lambda: layer(x, mask="causal", block_size=1.5))
    add("PoM.forward xq 3-D with cu", "xq", lambda: layer(x, cu_seqlens=torch.tensor([0, 14], dtype=i32)))
    add("PoM.forward packed xc tokens", "xc", lambda: layer(xp, torch.randn(13, 16), cu_seqlens=cu7))
    add("PoM.forward packed mask tensor", "mask", lambda: layer(xp, mask=torch.ones(14), cu_seqlens=cu7))
    bad_cu14 = {
        "cu_not_from_0": torch.tensor([1, 5, 14], dtype=i32),
        "cu_decreasing": torch.tensor([0, 6, 4, 14], dtype=i32),
        "cu_wrong_last": torch.tensor([0, 5, 15], dtype=i32),
        "cu_short_last": torch.tensor([0, 5, 13], dtype=i64),
        "cu_float": torch.tensor([0.0, 5.0, 14.0]),
        "cu_2d": torch.tensor([[0, 5, 14]], dtype=i32),
        "cu_one_offset": torch.tensor([0], dtype=i32),
        "cu_meta": meta(cu7),
        "cu_negative": torch.tensor([0, -2, 14], dtype=i32),
    }
    for k, v in bad_cu14.items():
        add(f"PoM.forward {k}", "cu_seqlens", lambda v=v: layer(xp, cu_seqlens=v))
        add(f"PoM.forward causal {k}", "cu_seqlens", lambda v=v: layer(xp, mask="causal", cu_seqlens=v))

    st_ok = layer.allocate_state(2)
    add("PoM.state_forward xq 2-D", "xq", lambda: layer.state_forward(x[0]))
    add("PoM.state_forward xc width", "xc", lambda: layer.state_forward(x, torch.randn(2, 3, 8)))
    add("PoM.state_forward xc batch", "xc", lambda: layer.state_forward(x, torch.randn(3, 3, 16)))
    add("PoM.state_forward state batch", "state", lambda: layer.state_forward(x, state=layer.allocate_state(3)))
    add("PoM.state_forward state width", "state", lambda: layer.state_forward(x, state=PoMState.allocate(2, 31)))
    add("PoM.state_forward state dict keys", "state", lambda: layer.state_forward(x, state={"mean": 0}))
    add("PoM.state_forward state list", "state", lambda: layer.state_forward(x, state=[0, 1]))
    add("PoM.state_forward state dict h shape", "state",
        lambda: layer.state_forward(x, state={"h": torch.zeros(2, 1, 5), "n": 3}))
    add("PoM.state_forward state dict n shape", "state",
        lambda: layer.state_forward(x, state={"h": torch.zeros(2, 1, 32), "n": torch.tensor([1, 2, 3])}))
    add("PoM.state_forward state sum int", "state_sum",
        lambda: layer.state_forward(x, state=PoMState(torch.zeros(2, 32, dtype=i64), torch.zeros(2, dtype=i64))))
    add("PoM.state_forward state count float64", "count",
        lambda: layer.state_forward(x, state=PoMState(torch.zeros(2, 32), torch.zeros(2, dtype=torch.float64))))
    add("PoM.state_forward state count batch", "count",
        lambda: layer.state_forward(x, state=PoMState(torch.zeros(2, 32), torch.zeros(3, dtype=i64))))
    add("PoM.state_forward state meta", ("state", "state_sum"),
        lambda: layer.state_forward(x, state=PoMState(meta(torch.zeros(2, 32)), meta(torch.zeros(2, dtype=i64)))))
    add("PoM.state_forward state count negative", "count",
        lambda: layer.state_forward(x, state=PoMState(torch.zeros(2, 32), torch.tensor([3, -1]))))
    add("PoM.step state count negative", "count",
        lambda: layer.step(x[:, :1], PoMState(torch.zeros(2, 32), torch.tensor([-5, 0]))))
    add("PoM.allocate_state dtype half", "dtype", lambda: layer.allocate_state(2, dtype=torch.half))
    add("PoM.allocate_state batch -1", "batch_size", lambda: layer.allocate_state(-1))
    add("PoM.step state dict", "state", lambda: layer.step(x, {"h": 0.0, "n": 0}))
    add("PoM.step state None", "state", lambda: layer.step(x, None))
    add("PoM.step x 2-D", "x", lambda: layer.step(x[0], st_ok))
    add("PoM.step x width", "x", lambda: layer.step(torch.randn(2, 1, 8), st_ok))
    add("PoM.step x int", "x", lambda: layer.step(x.long(), st_ok))
    add("PoM.step state batch", ("state", "state_sum"), lambda: layer.step(x, PoMState.allocate(3, 32)))
    add("PoM.step state width", ("state", "state_sum"), lambda: layer.step(x, PoMState.allocate(2, 33)))
    add("PoM.step state sum half", ("state", "state_sum"),
        lambda: layer.step(x, PoMState(torch.zeros(2, 32, dtype=torch.half), torch.zeros(2, dtype=i64))))
    add("PoM.step state count int32", ("state", "count"),
        lambda: layer.step(x, PoMState(torch.zeros(2, 32), torch.zeros(2, dtype=i32))))
    add("PoM.step state meta", ("state", "state_sum"), lambda: layer.step(
        x, PoMState(meta(torch.zeros(2, 32)), meta(torch.zeros(2, dtype=i64)))))
    add("PoMState.from_reference not a dict", "state", lambda: PoMState.from_reference(3, 2, 32))
    add("PoMState.from_reference missing n", "state", lambda: PoMState.from_reference({"h": torch.zeros(2, 1, 32)}, 2, 32))
    add("PoMState.from_reference h shape", "state",
        lambda: PoMState.from_reference({"h": torch.zeros(3, 1, 32), "n": 1}, 2, 32))
    add("PoMState.from_reference h width", "state",
        lambda: PoMState.from_reference({"h": torch.zeros(2, 1, 31), "n": 1}, 2, 32))
    add("PoMState.from_reference n batch", "state",
        lambda: PoMState.from_reference({"h": torch.zeros(2, 1, 32), "n": torch.tensor([1, 2, 3])}, 2, 32))
    add("PoMState.from_reference n negative", "state",
        lambda: PoMState.from_reference({"h": torch.zeros(2, 1, 32), "n": -1}, 2, 32))
    add("PoMState.from_reference h string", "state",
        lambda: PoMState.from_reference({"h": "zeros", "n": 1}, 2, 32))
    return cases


def child(start):
    """Runs cases[start:], one JSON line each, flushed before the next case starts."""
    cases = build_cases()
    for i in range(start, len(cases)):
        name, args, fn = cases[i]
        print(json.dumps({"i": i, "name": name, "started": True}), flush=True)
        try:
            fn()
            res = {"outcome": "returned"}
        except (ValueError, RuntimeError, TypeError, IndexError, NotImplementedError) as e:
            msg = str(e).split("\n")[0][:400]
            res = {"outcome": "raised", "type": type(e).__name__, "msg": msg,
                   "names_arg": any(f"'{a}'" in str(e) for a in args)}
        except BaseException as e:  # any other exception type is reported as such
            res = {"outcome": "other", "type": type(e).__name__, "msg": str(e)[:400]}
        print(json.dumps({"i": i, "name": name, "args": list(args), **res}), flush=True)


def run_all():
    """Results per case index; a case during which the child died is recorded as a crash."""
    n_cases = len(build_cases())
    results, start = {}, 0
    # The child imports the same pom_ext as this process (e.g. the sanitized scratch copy of .ci/asan_check.sh),
    # then the repository's.
    import pom_ext
    path = [os.path.dirname(os.path.dirname(os.path.abspath(pom_ext.__file__))), os.path.dirname(HERE)]
    if os.environ.get("PYTHONPATH"):
        path.append(os.environ["PYTHONPATH"])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
    while start < n_cases:
        p = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", str(start)], capture_output=True,
                           text=True, timeout=600, env=env)
        last = start
        for line in p.stdout.splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if not r.get("started"):
                results[r["i"]] = r
            last = r["i"]
        if p.returncode == 0 and len(results) >= n_cases - start:
            break
        if last not in results:
            results[last] = {"i": last, "outcome": "crash", "returncode": p.returncode, "stderr": p.stderr[-2000:]}
        start = last + 1
    return results


_NAMES = None


def case_names():
    global _NAMES
    if _NAMES is None:
        _NAMES = [name for name, _, _ in build_cases()]
    return _NAMES


@pytest.fixture(scope="module")
def results():
    return run_all()


def _ids():
    import pom_ext
    if not pom_ext.native_available():
        return []
    return list(range(len(case_names())))


@pytest.mark.parametrize("i", _ids(), ids=lambda i: case_names()[i])
def test_bad_input(results, i):
    r = results.get(i)
    assert r is not None, f"case {case_names()[i]}: no result"
    assert r["outcome"] != "crash", f"case {case_names()[i]}: the process died (rc {r.get('returncode')}): " \
                                    f"{r.get('stderr')}"
    assert r["outcome"] == "raised", f"case {r['name']}: expected an error naming {r.get('args')}, got {r}"
    assert r["names_arg"], f"case {r['name']}: the error does not name {r['args']}: {r['type']}: {r['msg']}"


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--child":
    child(int(sys.argv[2]))
