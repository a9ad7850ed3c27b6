"""What the compiler made of the CUDA kernels, read from a built library without a GPU (cuobjdump -res-usage and
-sass), held to the rules of csrc/cuda/README.md:

- no kernel uses a stack frame (register spills or local arrays: STACK and LOCAL are 0);
- every streaming kernel (one that walks the rows of h) fits 2 blocks of 256 threads per SM: at most 128 registers
  a thread (65,536 registers per SM on sm_80 and sm_90);
- every streaming kernel moves its rows with 16-byte accesses: a 128-bit global load (LDG.E.128), and a 128-bit
  global store (STG.E.128) in those that write rows. (Each kernel also keeps a scalar path for strided views.)

Prints the table of every kernel (name, template arguments, registers, stack, blocks of 256 per SM, widest load
and store) and exits 1 on a violation. `--table FILE` also writes it as JSON; `--report-only` never fails.

The kernels that do not meet the register and stack rules yet are listed, with what they use now, in the
budget file (csrc/cuda/resource_budget.json; csrc/cuda/README.md says why each is there and how it is to come
down): such a kernel fails when it uses more than its entry, any other kernel when it breaks a rule, and an
entry that a kernel now beats is reported so the budget can be tightened (`--write-budget` writes a new one).
The 16-byte rules have no budget.

usage: python .ci/sass_check.py LIBRARY.so [--arch sm_90] [--budget FILE] [--write-budget FILE]
                                [--table out.json] [--report-only]
"""
import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
from collections import defaultdict

REGS_PER_SM = 65536
MAX_REGS_HOT = REGS_PER_SM // (2 * 256)  # 128

# Streaming kernels: they read rows of h (or of the upstream gradient); those that write rows too.
READS_ROWS = {"eval_fwd_kernel", "eval_bwd_kernel", "row_partials_kernel", "row_backward_kernel",
              "rope_partials_kernel", "rope_backward_kernel", "rope_tot_kernel", "rope_scan_kernel",
              "rope_bwd_tot_kernel", "rope_bwd_scan_kernel", "rope_gate_bwd_kernel",
              "causal_tot_kernel", "causal_scan_kernel", "causal_bwd_tot_kernel", "causal_bwd_scan_kernel",
              "causal_tot_weighted_kernel", "causal_scan_weighted_kernel", "causal_bwd_tot_weighted_kernel",
              "causal_bwd_scan_weighted_kernel",
              "causal_gate_bwd_kernel", "causal_fill_kernel", "causal_block_bwd_kernel", "state_small_kernel"}
WRITES_ROWS = {"eval_fwd_kernel", "eval_bwd_kernel", "row_backward_kernel", "rope_backward_kernel",
               "rope_scan_kernel", "rope_bwd_scan_kernel", "rope_gate_bwd_kernel",
               "causal_scan_kernel",
               "causal_bwd_scan_kernel", "causal_scan_weighted_kernel", "causal_bwd_scan_weighted_kernel",
               "causal_gate_bwd_kernel", "causal_fill_kernel", "causal_block_bwd_kernel"}


def find_tool(name):
    """cuobjdump from PATH, CUDA_HOME, /usr/local/cuda*, or the copy Triton ships with a CUDA build of torch."""
    candidates = [os.environ.get(name.upper(), ""), shutil.which(name) or ""]
    for root in (os.environ.get("CUDA_HOME", ""), "/usr/local/cuda", *glob.glob("/usr/local/cuda-*")):
        if root:
            candidates.append(os.path.join(root, "bin", name))
    try:
        import triton  # noqa: F401
        candidates.append(os.path.join(os.path.dirname(sys.modules["triton"].__file__), "backends", "nvidia",
                                       "bin", name))
    except ImportError:
        pass
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def demangle(names):
    r = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True)
    return r.stdout.splitlines()


def short(demangled):
    """(kernel name, template arguments) of a demangled kernel symbol."""
    m = re.search(r"(\w+_kernel)(?:<(.*?)>)?\(", demangled)
    if not m:
        return demangled.split("(")[0], ""
    args = (m.group(2) or "").replace("c10::", "").replace("(int)", "")
    return m.group(1), args


def res_usage(tool, lib, arch):
    out = subprocess.run([tool, "-res-usage", "-arch", arch, lib], capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    rows = []
    for i, line in enumerate(lines):
        m = re.match(r"\s*Function (\S+):", line)
        if m and i + 1 < len(lines):
            u = lines[i + 1]
            get = lambda k: int(re.search(rf"{k}:(\d+)", u).group(1))
            rows.append({"symbol": m.group(1), "regs": get("REG"), "stack": get("STACK"), "local": get("LOCAL"),
                         "shared": get("SHARED")})
    return rows


def access_widths(tool, lib, arch):
    """{symbol: (widest LDG bits, widest STG bits)} from the SASS."""
    out = subprocess.run([tool, "-sass", "-arch", arch, lib], capture_output=True, text=True, check=True).stdout
    widths = defaultdict(lambda: [0, 0])
    current = None
    for line in out.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            current = m.group(1)
            continue
        if current is None:
            continue
        for i, op in enumerate(("LDG", "STG")):
            m = re.search(rf"\b{op}\.E(\.[A-Z0-9.]+)?\s", line)
            if m:
                suffix = m.group(1) or ""
                bits = max([int(b) for b in re.findall(r"\.(\d+)", suffix)] or [32])
                bits = 16 if ".U16" in suffix or ".S16" in suffix else 8 if ".U8" in suffix or ".S8" in suffix \
                    else bits
                widths[current][i] = max(widths[current][i], bits)
    return widths


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("library")
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--table", help="write the table as JSON here")
    ap.add_argument("--budget", help="JSON {kernel<template args>: {regs, stack}} of kernels above the rules")
    ap.add_argument("--write-budget", help="write the budget the library needs now to this file")
    ap.add_argument("--report-only", action="store_true", help="print the table, never fail")
    args = ap.parse_args()
    tool = find_tool("cuobjdump")
    if tool is None:
        print("sass_check: skipped: no cuobjdump (CUDA toolkit, or Triton's copy)")
        return 0
    rows = res_usage(tool, args.library, args.arch)
    if not rows:
        print(f"sass_check: FAIL: no {args.arch} kernels in {args.library}")
        return 0 if args.report_only else 1
    widths = access_widths(tool, args.library, args.arch)
    for r, d in zip(rows, demangle([r["symbol"] for r in rows])):
        r["kernel"], r["targs"] = short(d)
        r["blocks256"] = REGS_PER_SM // (max(r["regs"], 1) * 256)
        r["ldg_bits"], r["stg_bits"] = widths.get(r["symbol"], (0, 0))
    rows.sort(key=lambda r: (r["kernel"], r["targs"]))

    budget = {}
    if args.budget:
        with open(args.budget) as f:
            budget = json.load(f)["kernels"]
    needed = {}
    problems, tighten = [], []
    print(f"{'kernel':<26} {'template arguments':<22} {'regs':>4} {'stack':>5} {'blk256/SM':>9} {'LDG':>4} {'STG':>4}")
    for r in rows:
        print(f"{r['kernel']:<26} {r['targs'][:22]:<22} {r['regs']:>4} {r['stack']:>5} {r['blocks256']:>9} "
              f"{r['ldg_bits']:>4} {r['stg_bits']:>4}")
        where = f"{r['kernel']}<{r['targs']}>"
        hot = r["kernel"] in READS_ROWS
        over_regs = hot and r["regs"] > MAX_REGS_HOT
        over_stack = bool(r["stack"] or r["local"])
        if over_regs or over_stack:
            needed[where] = {"regs": r["regs"] if over_regs else 0, "stack": r["stack"] + r["local"]}
        allowed = budget.get(where)
        if allowed is not None:
            if (over_regs and r["regs"] > allowed["regs"]) or r["stack"] + r["local"] > allowed["stack"]:
                problems.append(f"{where}: {r['regs']} registers, stack {r['stack'] + r['local']} B, above its budget "
                                f"({allowed['regs']} registers, stack {allowed['stack']} B)")
            elif not over_regs and not over_stack or r["regs"] < allowed["regs"] or \
                    r["stack"] + r["local"] < allowed["stack"]:
                tighten.append(f"{where}: {r['regs']} registers, stack {r['stack'] + r['local']} B "
                               f"(budget {allowed['regs']}, {allowed['stack']} B)")
        else:
            if over_stack:
                problems.append(f"{where}: stack frame {r['stack']} B, local {r['local']} B (spills)")
            if over_regs:
                problems.append(f"{where}: {r['regs']} registers > {MAX_REGS_HOT} (fewer than 2 blocks of 256/SM)")
        if hot:
            if r["ldg_bits"] < 128:
                problems.append(f"{where}: widest row load {r['ldg_bits']} bits, not 128")
        if r["kernel"] in WRITES_ROWS and r["stg_bits"] < 128:
            problems.append(f"{where}: widest row store {r['stg_bits']} bits, not 128")
    if args.table:
        with open(args.table, "w") as f:
            json.dump({"arch": args.arch, "library": os.path.basename(args.library), "kernels": rows}, f, indent=1)
    if args.write_budget:
        with open(args.write_budget, "w") as f:
            json.dump({"arch": args.arch, "rules": {"max_regs_hot": MAX_REGS_HOT, "stack": 0},
                       "kernels": dict(sorted(needed.items()))}, f, indent=1)
            f.write("\n")
    over = sum(1 for w in needed if w in budget)
    print(f"sass_check: {len(rows)} kernels ({args.arch}), {len(problems)} violations, {over} within their budget "
          f"above the rules")
    for p in problems:
        print("  " + p)
    for t in tighten:
        print("  below its budget (tighten csrc/cuda/resource_budget.json): " + t)
    return 0 if args.report_only or not problems else 1


if __name__ == "__main__":
    sys.exit(main())
