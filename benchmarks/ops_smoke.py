"""Every pom_ext op, forward and backward, once, on small odd shapes of every layout and dtype, each result checked
against the float64 reference: the program compute-sanitizer runs (memcheck, racecheck) in
benchmarks/gpu_check.sh, short enough for a sanitizer and covering every kernel and its scalar (strided) path.

    python benchmarks/ops_smoke.py [--device cuda|cpu]

Exits 1 with the failing case named if any result is off (SPEC §4 tolerances: float64 1e-10, float32 1e-5,
16-bit 1e-2) or non-finite.
"""
import argparse
import sys

import torch

from pom_ext import ops, reference as R

TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def rel(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def cases(device, dtype):
    """(name, fn(impl, h, c) -> outputs, h (B, N, E) float64 master, needs h grad)."""
    g = torch.Generator().manual_seed(0)
    B, N, E, K = 3, 37, 24, 3
    h = torch.randn(B, N, E, generator=g, dtype=torch.float64) * 2
    w = torch.rand(B, N, generator=g, dtype=torch.float64)
    cu = torch.tensor([0, 5, 5, 40, B * N], dtype=torch.int32)
    wz = w * (torch.rand(B, N, generator=g) > 0.2)  # weights, some 0
    pad = torch.arange(N).expand(B, N) >= torch.tensor([[0], [4], [N]])  # left padding; row 2 all padding
    s0 = torch.randn(B, E, generator=g, dtype=torch.float64)
    n0 = torch.tensor([0, 3, 11])
    pre = torch.randn(B, N, 6, generator=g, dtype=torch.float64)
    pre_e = torch.randn(B, N, E, generator=g, dtype=torch.float64)
    bias = torch.randn(6, generator=g, dtype=torch.float64)
    dev = lambda t: t.to(device)
    lowp = lambda t: t.to(device, dtype)
    out = [
        ("eval", lambda m, x, c: [m.poly_eval(x, c)]),
        ("mean", lambda m, x, c: [m.poly_mean(x, c)]),
        ("weighted", lambda m, x, c: [m.poly_mean(x, c, lowp(w) if m is ops else dev(w))]),
        ("packed mean", lambda m, x, c: [m.poly_mean(x.reshape(-1, E), c, None, dev(cu))]),
        ("causal", lambda m, x, c: [m.poly_causal(x, c, 1)]),
        ("block 4", lambda m, x, c: [m.poly_causal(x, c, 4)]),
        ("block 64", lambda m, x, c: [m.poly_causal(x, c, 64)]),
        ("packed causal", lambda m, x, c: [m.poly_causal(x.reshape(-1, E), c, 1, dev(cu))]),
        ("packed block 3", lambda m, x, c: [m.poly_causal(x.reshape(-1, E), c, 3, dev(cu))]),
        ("weighted causal", lambda m, x, c: [m.poly_causal_weighted(x, c, dev(wz), 1)]),
        ("padded block 5", lambda m, x, c: [m.poly_causal_weighted(x, c, dev(pad), 5)]),
        ("packed weighted block 2", lambda m, x, c: [m.poly_causal_weighted(x.reshape(-1, E), c,
                                                                               dev(wz).reshape(-1), 2, dev(cu))]),
        ("strided causal", lambda m, x, c: [m.poly_causal(x.transpose(0, 1).contiguous().transpose(0, 1), c, 1)]),
        ("gated per channel", lambda m, x, c: [m.poly_causal_gated(
            torch.cat([x, pre_e.to(x.device, dtype).to(x.dtype)], -1), c, None, 1)]),
        ("gated 6 heads, bias", lambda m, x, c: [m.poly_causal_gated(
            torch.cat([x, pre.to(x.device, dtype).to(x.dtype)], -1), c, bias.to(x.device, dtype).to(x.dtype), 2)]),
        ("state update", lambda m, x, c: list(m.poly_state_update(x, c, dev(s0).float() if x.dtype != torch.float64
                                                                  else dev(s0), dev(n0))[:2])),
    ]
    return h, K, out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    failures = 0
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        h, K, todo = cases(device, dtype)
        c = torch.randn(h.shape[-1], K, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 0.3
        for name, fn in todo:
            hk = h.to(device, dtype).requires_grad_()
            ck = c.to(device, torch.float32 if dtype != torch.float64 else dtype).requires_grad_()
            hr = h.to(device, dtype).double().requires_grad_()
            cr = ck.detach().double().requires_grad_()
            got, ref = fn(ops, hk, ck), fn(R, hr, cr)
            seeds = [torch.randn(r.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
                     for r in ref]
            gk = torch.autograd.grad(got, [hk, ck], [s.to(device, a.dtype) for s, a in zip(seeds, got)])
            gr = torch.autograd.grad(ref, [hr, cr], [s.to(device).to(a.dtype).double() for s, a in zip(seeds, got)])
            tol = TOL[dtype]
            errs = [rel(a, b) for a, b in zip(got, ref)] + [rel(gk[0], gr[0]), rel(gk[1], gr[1])]
            ok = all(e < tol for e in errs)
            failures += not ok
            if not ok:
                print(f"FAIL {dtype} {name}: relative errors {['%.2e' % e for e in errs]} (tolerance {tol:.0e})")
    with torch.no_grad():
        # The in-place decode step.
        x = torch.randn(2, 1, 16, dtype=torch.float32, device=device)
        c = torch.randn(16, 2, device=device) * 0.3
        s, n = torch.zeros(2, 16, device=device), torch.zeros(2, dtype=torch.int64, device=device)
        H = ops.poly_state_step_(x, c, s, n)
        Hr = R.poly_state_update(x.double(), c.double(), torch.zeros(2, 16, dtype=torch.float64, device=device),
                                 torch.zeros(2, dtype=torch.int64, device=device))[0]
        if rel(H, Hr) >= 1e-5 or n.tolist() != [1, 1]:
            failures += 1
            print("FAIL poly_state_step_")
    if device.type == "cuda":
        torch.cuda.synchronize()
    print(f"ops_smoke on {device}: {'all passed' if not failures else f'{failures} failed'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
