"""Learning-rate sweeps of the byte-level language models of train_lm.py, and their comparison.

Every (model, learning rate, seed) of the command line is one run of examples/train_lm.py with the same data,
batch, schedule and step budget, in OUT/<model>/lr<lr>/ (seed 0) or OUT/<model>/lr<lr>-seed<seed>/ (log.json,
log.csv, ckpt.pt, sample.txt); the seed draws the initialization and the batches. A finished run is
skipped and an interrupted one resumes from its checkpoint, so a sweep stops and continues at will, and several
processes may share OUT if they run different models. --report reads every run in OUT and writes
OUT/lm_sweep.md, lm_sweep.json and lm_sweep.png (each model's best run against tokens and against the equal-time
clock, and the final bits per byte against the rate):

- at equal training tokens: each model's final validation bits per byte at every rate (the mean of the rate's
  seeds, with their range), its best rate (rates compared on the seeds they all ran, e.g. seed 0 when only the
  best rate got more; then given as the mean of all its seeds), and its gap to attention's best;
- at equal training time: each model's best validation bits per byte reached within the training time of the
  fastest model's full run (validation time excluded), over all its rates. Runs made in the background share
  the machine, so their own clocks do not compare: --time-steps N measures each model's step time alone (N steps
  of train_lm.py with the sweep's settings, one model after the other; run it on an idle machine) into
  OUT/step_ms.json, and the report then puts every run on that clock (step x its model's step time). Without
  that file it uses the runs' own times. The table's milliseconds per step are those of the clock used. A model
  added later is timed with --relative-to MODEL: MODEL is timed again beside it and the new model enters the
  file at its ratio to MODEL, since the machine's own speed drifts between runs.

Models (add your own as NAME=TRAIN_LM_ARGS, the arguments quoted as one):

    pom              PoM blocks (degree 2, expand 2, 8 gate heads, causal convolution of 4): PPPPPP
    pom-k3           the same with degree 3
    pom-g1           the same with one gate per channel (instead of 8 gate heads)
    pom-c16          the same with a causal convolution of 16
    pom-e4           the same with expand 4 (twice the state)
    pom-g1k3         degree 3 with one gate per channel
    pom-g1k3-skip    the same, the convolution's output also added to the mixer's (--conv-skip)
    pom-g1k4-skip    the same with degree 4
    pom-g1k3e4-skip  pom-g1k3-skip with expand 4 (twice the state)
    pom-rope         PoM with rotary positions (PoMRoPE) and the convolution
    pom-rope-c0      PoM with rotary positions and no convolution
    hybrid           PoM with attention every third layer: PPAPPA
    hybrid-pppa      attention every fourth layer, depth 8: PPPAPPPA
    hybrid-w64       PPAPPA with attention over a sliding window of 64 bytes
    hybrid-g1k3      PPAPPA with pom-g1k3's PoM blocks (degree 3, one gate per channel)
    hybrid-pa-g1k3   the same with attention every second layer: PAPAPA
    hybrid-pa-g1k3-skip  the same with --conv-skip in its PoM blocks
    attention        rotary multi-head attention: AAAAAA

    PYTHONPATH=. python examples/lm_sweep.py --models pom,attention --lrs 1e-3,2e-3,4e-3 --steps 3000 \\
        --out benchmarks/results/lm_sweep
    PYTHONPATH=. python examples/lm_sweep.py --models pom,attention --time-steps 40 --out benchmarks/results/lm_sweep
    PYTHONPATH=. python examples/lm_sweep.py --models pom-e4 --time-steps 40 --relative-to pom \\
        --out benchmarks/results/lm_sweep
    PYTHONPATH=. python examples/lm_sweep.py --report --out benchmarks/results/lm_sweep
"""
import argparse
import datetime
import json
import math
import os
import pathlib
import shlex
import statistics
import subprocess
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent

PRESETS = {
    "pom": "--model pom",
    "pom-k3": "--model pom --degree 3",
    "pom-g1": "--model pom --n-sel-heads 1",
    "pom-c16": "--model pom --conv-size 16",
    "pom-e4": "--model pom --expand 4",
    "pom-g1k3": "--model pom --degree 3 --n-sel-heads 1",
    "pom-g1k3-skip": "--model pom --degree 3 --n-sel-heads 1 --conv-skip",
    "pom-g1k4-skip": "--model pom --degree 4 --n-sel-heads 1 --conv-skip",
    "pom-g1k3e4-skip": "--model pom --degree 3 --expand 4 --n-sel-heads 1 --conv-skip",
    "pom-rope": "--model pom --rope",
    "pom-rope-c0": "--model pom --rope --conv-size 0",
    "hybrid": "--model hybrid --attn-every 3",
    "hybrid-pppa": "--model hybrid --attn-every 4 --depth 8",
    "hybrid-w64": "--model hybrid --attn-every 3 --window 64",
    "hybrid-g1k3": "--model hybrid --attn-every 3 --degree 3 --n-sel-heads 1",
    "hybrid-pa-g1k3": "--model hybrid --attn-every 2 --degree 3 --n-sel-heads 1",
    "hybrid-pa-g1k3-skip": "--model hybrid --attn-every 2 --degree 3 --n-sel-heads 1 --conv-skip",
    "attention": "--model attention",
}


def parse_models(spec: str) -> dict:
    models = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, sep, extra = item.partition("=")
        if sep:
            models[name] = extra
        elif name in PRESETS:
            models[name] = PRESETS[name]
        else:
            raise SystemExit(f"--models: unknown model {name!r}; expected one of {', '.join(PRESETS)} "
                             "or NAME=TRAIN_LM_ARGS")
    if not models:
        raise SystemExit("--models: expected at least one model")
    return models


def parse_lrs(spec: str) -> list:
    try:
        lrs = [float(s) for s in spec.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"--lrs: expected comma-separated numbers, got {spec!r}")
    if not lrs or any(not (lr > 0 and math.isfinite(lr)) for lr in lrs):
        raise SystemExit(f"--lrs: expected positive learning rates, got {spec!r}")
    return lrs


def parse_seeds(spec: str) -> list:
    try:
        seeds = [int(s) for s in spec.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"--seeds: expected comma-separated integers, got {spec!r}")
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise SystemExit(f"--seeds: expected distinct non-negative integers, got {spec!r}")
    return seeds


def run_dir(out: pathlib.Path, model: str, lr: float, seed: int = 0) -> pathlib.Path:
    """OUT/<model>/lr<lr>/ for seed 0, OUT/<model>/lr<lr>-seed<seed>/ for the others."""
    return out / model / (f"lr{lr:g}" if seed == 0 else f"lr{lr:g}-seed{seed}")


def finished(path: pathlib.Path, steps: int) -> bool:
    log = path / "log.json"
    if not log.exists():
        return False
    final = json.loads(log.read_text()).get("final")
    return final is not None and final.get("step", 0) >= steps


def train_cmd(args, extra: str, lr: float, seed: int, steps: int, path: pathlib.Path, *more: str) -> list:
    return [sys.executable, str(HERE / "train_lm.py"), *shlex.split(extra), "--lr", f"{lr:g}", "--steps", str(steps),
            "--threads", str(args.threads), "--seed", str(seed), "--out", str(path),
            *shlex.split(args.train_args), *more]


def measure_step_ms(args, name: str, extra: str, lr: float, seed: int):
    """One model's step time: args.time_steps steps of train_lm.py in a scratch directory, the median of the
    per-step times after the first two; None (with the run's output on stderr) if train_lm.py fails."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = train_cmd(args, extra, lr, seed, args.time_steps, pathlib.Path(tmp), "--log-every", "1",
                        "--eval-every", str(args.time_steps), "--val-batches", "1", "--sample-len", "1")
        print(f"{name}: timing {args.time_steps} steps: {shlex.join(cmd)}", flush=True)
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if done.returncode != 0:
            print(done.stdout[-2000:], file=sys.stderr)
            print(f"{name}: train_lm.py exited with {done.returncode}", file=sys.stderr)
            return None
        times = [r["time_s"] for r in json.loads((pathlib.Path(tmp) / "log.json").read_text())["records"]]
    per_step = [b - a for a, b in zip([0.0] + times, times)]  # times: training time after each step
    per_step = per_step[2:] or per_step
    ms = 1e3 * statistics.median(per_step)
    print(f"{name}: {ms:.1f} ms/step", flush=True)
    return ms


def time_steps(args) -> int:
    """Each model's training step time measured alone: args.time_steps steps of train_lm.py with the sweep's
    settings (the first rate of --lrs; the rate does not change the time), one model after the other. Merged
    into OUT/step_ms.json.

    With --relative-to REF (a model the file already has), REF is timed again in the same run, first, and each
    other model is put on the file's clock by its ratio to REF in this run (the file's REF time x its time / REF's
    time now): a model added later is compared on one clock with the others although the machine's speed has
    changed since. The file's `later` entries say how each such time was obtained; the file's own settings and
    date stay those of its run."""
    out = pathlib.Path(args.out)
    models, lrs, seed = parse_models(args.models), parse_lrs(args.lrs), parse_seeds(args.seeds)[0]
    out.mkdir(parents=True, exist_ok=True)  # before the timing, not after it
    path = out / "step_ms.json"
    timing = json.loads(path.read_text()) if path.exists() else {}
    step_ms, later = timing.setdefault("step_ms", {}), timing.setdefault("later", {})  # updated in place
    ref = args.relative_to
    if ref:
        if ref not in step_ms:
            print(f"--relative-to: {ref!r} has no step time in {path}; time it first with --time-steps alone",
                  file=sys.stderr)
            return 2
        if timing.get("threads") != args.threads or timing.get("train_args", "") != args.train_args:
            print(f"--relative-to: {path} was timed with --threads {timing.get('threads')} and --train-args "
                  f"{timing.get('train_args', '')!r}; give the same to compare with it", file=sys.stderr)
            return 2
        if ref not in models and ref not in PRESETS:
            print(f"--relative-to: {ref!r} is neither a preset nor one of --models (NAME=TRAIN_LM_ARGS)",
                  file=sys.stderr)
            return 2
        models = {ref: models.pop(ref) if ref in models else PRESETS[ref], **models}
    from pom_ext.bench.common import cpu_name, git_commit

    measured = {}
    for name, extra in models.items():
        ms = measure_step_ms(args, name, extra, lrs[0], seed)
        if ms is None:
            return 1
        measured[name] = ms
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    if ref:
        run = (f"measured in a later run ({args.time_steps} steps each, threads {args.threads}, {date}, commit "
               f"{git_commit()}): " + ", ".join(f"{m} {v:.1f}" for m, v in measured.items()) + " ms/step")
        for name, ms in measured.items():
            if name != ref:
                step_ms[name] = step_ms[ref] * ms / measured[ref]
                later[name] = f"{run}; put on this file's clock as {ref}'s time here x {ms / measured[ref]:.3f}"
    else:
        for name, ms in measured.items():
            step_ms[name] = ms
            later.pop(name, None)  # measured on this file's clock now
        timing.update({"steps_timed": args.time_steps, "threads": args.threads, "train_args": args.train_args,
                       "device": cpu_name(), "git_commit": git_commit(), "date": date})
    if not later:
        del timing["later"]
    path.write_text(json.dumps(timing, indent=1))
    return 0


def sweep(args) -> int:
    out = pathlib.Path(args.out)
    models, lrs, seeds = parse_models(args.models), parse_lrs(args.lrs), parse_seeds(args.seeds)
    for name, extra in models.items():
        for lr in lrs:
            for seed in seeds:
                path = run_dir(out, name, lr, seed)
                what = f"{name} lr {lr:g}" + (f" seed {seed}" if seed else "")
                if finished(path, args.steps):
                    print(f"{what}: done, skipped", flush=True)
                    continue
                cmd = train_cmd(args, extra, lr, seed, args.steps, path)
                if (path / "ckpt.pt").exists():
                    cmd.append("--resume")
                print(f"{what}: {shlex.join(cmd)}", flush=True)
                path.mkdir(parents=True, exist_ok=True)
                with open(path / "train.out", "a") as log:
                    rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
                if rc != 0:
                    print(f"{what}: train_lm.py exited with {rc}; see {path / 'train.out'}", file=sys.stderr)
                    return rc
    return report(args) if args.report_after else 0


def plot_lm():
    """examples/plot_lm.py, which reads train_lm.py logs and draws their curves."""
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    import plot_lm as module
    return module


def load_runs(out: pathlib.Path) -> list:
    runs = []
    for path in sorted(out.glob("*/lr*/log.json")):
        log = plot_lm().load(str(path))
        if "final" not in log:
            continue  # unfinished
        vals = [(r["step"], r["time_s"], r["val_bpb"]) for r in log["records"] if r.get("val_bpb") is not None]
        fin = log["final"]
        runs.append({"model": path.parent.parent.name, "lr": log["args"]["lr"], "seed": log["args"].get("seed", 0),
                     "layers": log.get("pattern", ""), "params": log["params"], "steps": fin["step"],
                     "train_s": fin["time_s"], "step_ms": 1e3 * fin["time_s"] / max(fin["step"], 1),
                     "final_bpb": fin["val_bpb"], "val": vals, "threads": log["args"]["threads"],
                     "dir": str(path.parent)})
    return runs


def mean_curve(runs: list) -> list:
    """The runs' validation curves averaged at the steps every run evaluated: (step, mean time, mean bpb)."""
    common = set.intersection(*({v[0] for v in r["val"]} for r in runs))
    per_step = {step: [v for r in runs for v in r["val"] if v[0] == step] for step in sorted(common)}
    return [(step, statistics.fmean(v[1] for v in vs), statistics.fmean(v[2] for v in vs))
            for step, vs in per_step.items()]


def group_runs(runs: list) -> dict:
    """{model: [one entry per rate]}: the rate's seeds averaged — the final bits per byte, and the validation curve
    at the steps every seed evaluated (its time the seeds' mean); a rate with one seed is that run. Only runs of
    the rate's longest budget are averaged (a shorter one is left out, with a note)."""
    groups = {}
    for r in runs:
        groups.setdefault((r["model"], r["lr"]), []).append(r)
    by_model = {}
    for (model, lr), rs in sorted(groups.items(), key=lambda kv: kv[0]):
        full = max(r["steps"] for r in rs)
        for r in rs:
            if r["steps"] != full:
                print(f"{model} lr {lr:g} seed {r['seed']}: {r['steps']} steps, not the {full} of its rate's other "
                      f"runs: left out of the report", file=sys.stderr)
        rs = sorted((r for r in rs if r["steps"] == full), key=lambda r: r["seed"])
        finals = [r["final_bpb"] for r in rs]
        by_model.setdefault(model, []).append({
            "model": model, "lr": lr, "seeds": [r["seed"] for r in rs], "final_bpb_seeds": finals,
            "final_bpb": statistics.fmean(finals), "layers": rs[0]["layers"], "params": rs[0]["params"],
            "steps": full, "train_s": statistics.fmean(r["train_s"] for r in rs),
            "step_ms": statistics.fmean(r["step_ms"] for r in rs), "val": mean_curve(rs), "runs": rs})
    return by_model


def shared_seeds(gs: list) -> set:
    """The seeds every rate of a model ran (rates are compared on them: a mean over more seeds than a
    neighbouring rate's one would not compare alike); all of a rate's seeds when the rates share none."""
    return set.intersection(*(set(g["seeds"]) for g in gs))


def best_rate(gs: list) -> dict:
    """The rate whose final bits per byte, averaged over the seeds all rates share, is the lowest."""
    shared = shared_seeds(gs)
    return min(gs, key=lambda g: statistics.fmean(v for s, v in zip(g["seeds"], g["final_bpb_seeds"])
                                                  if s in shared or not shared))


def cell(g: dict) -> str:
    """A rate's final bits per byte: the value of its one seed (named unless seed 0), or the seeds' mean, their
    count and range."""
    finals = g["final_bpb_seeds"]
    if len(finals) == 1:
        return f"{finals[0]:.3f}" + (f" (seed {g['seeds'][0]})" if g["seeds"][0] else "")
    return f"{g['final_bpb']:.3f} ({len(finals)} seeds: {min(finals):.3f}–{max(finals):.3f})"


def report(args) -> int:
    out = pathlib.Path(args.out)
    runs = load_runs(out)
    if not runs:
        print(f"no finished runs under {out}", file=sys.stderr)
        return 1
    by_model = group_runs(runs)
    best = {m: best_rate(gs) for m, gs in by_model.items()}
    ref = best.get("attention")
    # Equal training time: the shortest full run's time; every model's best validation within it, over its rates
    # (a rate's seeds averaged). The clock: each model's step time measured alone (OUT/step_ms.json, --time-steps)
    # when it has every model, else the runs' own times.
    timing = json.loads((out / "step_ms.json").read_text()) if (out / "step_ms.json").exists() else {}
    step_ms = timing.get("step_ms", {})
    missing = sorted(m for m in by_model if m not in step_ms)
    measured = not missing
    if measured:
        clock = lambda g, step, own_s: step * step_ms[g["model"]] / 1e3  # noqa: E731
        clock_note = (f"each model's step time measured alone ({timing.get('steps_timed')} steps, threads "
                      f"{timing.get('threads')}; step_ms.json) times the step")
    else:
        clock = lambda g, step, own_s: own_s  # noqa: E731
        clock_note = f"runs' own times, threads {sorted({r['threads'] for r in runs})}" + (
            f"; step_ms.json lacks {', '.join(missing)}" if step_ms else "")
    budget = min(min(clock(g, g["steps"], g["train_s"]) for g in gs) for gs in by_model.values())
    at_budget = {}

    def reached(g, curve):  # the lowest validation within the budget on the curve: (bpb, lr, step), or None
        within = [(v[2], g["lr"], v[0]) for v in curve if clock(g, v[0], v[1]) <= budget + 1e-9]
        return min(within) if within else None

    for m, gs in by_model.items():
        # the rate chosen on the seeds all rates share, then reported with all its seeds' mean curve
        shared = shared_seeds(gs)
        scored = [(reached(g, mean_curve([r for r in g["runs"] if r["seed"] in shared or not shared])), g)
                  for g in gs]
        scored = [(v, g) for v, g in scored if v is not None]
        chosen = min(scored, key=lambda t: t[0])[1] if scored else None
        at_budget[m] = None if chosen is None else reached(chosen, chosen["val"])
    lrs = sorted({r["lr"] for r in runs})
    lines = ["| model | layers | params (M) | ms/step | " + " | ".join(f"lr {lr:g}" for lr in lrs) +
             " | best | vs attention |",
             "|---|---|---:|---:|" + "---:|" * len(lrs) + "---:|---:|"]
    for m in sorted(by_model, key=lambda m: best[m]["final_bpb"]):
        cells = {g["lr"]: cell(g) for g in by_model[m]}
        b = best[m]
        gap = "" if ref is None else f"{100 * (b['final_bpb'] / ref['final_bpb'] - 1):+.1f}%"
        ms = step_ms[m] if measured else b["step_ms"]  # the equal-time clock's
        lines.append(f"| {m} | {b['layers']} | {b['params'] / 1e6:.2f} | {ms:.0f} | " +
                     " | ".join(cells.get(lr, "") for lr in lrs) + f" | {b['final_bpb']:.3f} | {gap} |")
    steps = sorted({r["steps"] for r in runs})
    seeded = sorted((g for gs in by_model.values() for g in gs if len(g["seeds"]) > 1),
                    key=lambda g: (best[g["model"]]["final_bpb"], g["lr"]))
    text = [f"Final validation bits per byte at equal training tokens ({', '.join(map(str, steps))} steps; 'best': "
            f"the lowest over the rates; 'vs attention': its gap to attention's best; a rate run with several "
            f"seeds shows their mean, count and range; rates are compared on the seeds they all ran, and the best "
            f"is given as the mean of all its seeds):", "", *lines, ""]
    if seeded:
        text += ["Rates run with several seeds (each seed draws its own initialization and batches):", "",
                 "| model | lr | seeds | final bits per byte of each | mean | sample std |",
                 "|---|---:|---|---|---:|---:|"]
        text += [f"| {g['model']} | {g['lr']:g} | {', '.join(map(str, g['seeds']))} | "
                 f"{', '.join(f'{v:.3f}' for v in g['final_bpb_seeds'])} | {g['final_bpb']:.3f} | "
                 f"{statistics.stdev(g['final_bpb_seeds']):.3f} |" for g in seeded]
        text.append("")
    text += [f"At equal training time ({budget:,.1f} s of training, the shortest full run; {clock_note}; a rate's "
             f"seeds averaged):", "", "| model | best val bpb within the time | at lr | step |", "|---|---:|---:|---:|"]
    for m in sorted(by_model, key=lambda m: (at_budget[m] or (math.inf,))[0]):
        v = at_budget[m]
        text.append(f"| {m} | {v[0]:.3f} | {v[1]:g} | {v[2]} |" if v else f"| {m} | (no validation yet) | | |")
    md = "\n".join(text) + "\n"
    (out / "lm_sweep.md").write_text(md)
    (out / "lm_sweep.json").write_text(json.dumps({
        "runs": runs,
        "rates": {m: [{k: g[k] for k in ("lr", "seeds", "final_bpb_seeds", "final_bpb")} for g in gs]
                  for m, gs in by_model.items()},
        "best": {m: {"lr": b["lr"], "final_bpb": b["final_bpb"], "seeds": len(b["seeds"])} for m, b in best.items()},
        "equal_time_budget_s": budget,
        "equal_time_clock": {"measured_step_ms": step_ms} if measured else "runs' own times",
        "equal_time": {m: None if v is None else {"val_bpb": v[0], "lr": v[1], "step": v[2]}
                       for m, v in at_budget.items()}}, indent=1))
    print(md)
    try:
        plot_sweep(by_model, best, clock, budget, "measured step time x step" if measured else "the runs' own time",
                   out / "lm_sweep.png")
    except ImportError:
        print("matplotlib is not installed: no lm_sweep.png", file=sys.stderr)
    return 0


def plot_sweep(by_model: dict, best: dict, clock, budget: float, clock_label: str, path: pathlib.Path) -> None:
    """Three panels: each model's best run (validation bits per byte) against the step (equal tokens) and against
    the report's equal-time clock (the budget dotted), and every run's final bits per byte against its rate;
    attention black, hybrids solid, PoM dashed; one legend, best first."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = sorted(by_model, key=lambda m: best[m]["final_bpb"])
    palette = plt.get_cmap("tab20").colors
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    others = iter(palette)
    for m in order:
        layers = best[m]["layers"]
        attention = "P" not in layers
        style = {"color": "k" if attention else next(others), "lw": 2.0 if attention else 1.3,
                 "ls": "-" if "A" in layers else "--"}
        b = best[m]
        val = b["val"]
        label = f"{m} ({b['layers']}): {b['final_bpb']:.3f} at lr {b['lr']:g}"
        axes[0].plot([v[0] for v in val], [v[2] for v in val], label=label, **style)
        axes[1].plot([clock(b, v[0], v[1]) / 60 for v in val], [v[2] for v in val], **style)
        gs = sorted(by_model[m], key=lambda g: g["lr"])
        axes[2].plot([g["lr"] for g in gs], [g["final_bpb"] for g in gs], marker="o", ms=4, **style)
        for g in gs:
            if len(g["seeds"]) > 1:  # the seeds' range
                axes[2].vlines(g["lr"], min(g["final_bpb_seeds"]), max(g["final_bpb_seeds"]), color=style["color"],
                               lw=1)
    axes[1].axvline(budget / 60, color="0.4", ls=":", lw=1)
    axes[0].set_xlabel("step (equal training tokens)")
    axes[1].set_xlabel(f"training time, min ({clock_label})")
    axes[2].set_xlabel("learning rate")
    axes[2].set_xscale("log", base=2)
    lrs = sorted({g["lr"] for gs in by_model.values() for g in gs})
    axes[2].set_xticks(lrs, [f"{lr:g}" for lr in lrs], rotation=45, ha="right")
    axes[2].minorticks_off()
    axes[0].set_title("validation, best rate of each model")
    axes[1].set_title("the same at equal time (dotted: the budget)")
    axes[2].set_title("final validation at each rate (bars: the seeds' range)")
    lo = min(b["final_bpb"] for b in best.values())
    for ax in axes:
        ax.set_ylabel("bits per byte")
        ax.set_ylim(lo - 0.05, lo + 0.9)
        ax.grid(alpha=0.3)
    fig.legend(loc="center left", bbox_to_anchor=(0.805, 0.5), fontsize=7, frameon=False)
    fig.suptitle("byte-level LM on the Python standard library: learning-rate sweeps")
    fig.tight_layout(rect=(0, 0, 0.8, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="pom,hybrid,attention",
                   help="comma-separated presets or NAME=TRAIN_LM_ARGS")
    p.add_argument("--lrs", default="1e-3,2e-3,4e-3", help="learning rates, comma-separated")
    p.add_argument("--steps", type=int, default=3000, help="training steps of every run")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seeds", default="0",
                   help="seeds of every (model, rate), comma-separated; the report averages a rate's seeds")
    p.add_argument("--train-args", default="", help="further train_lm.py arguments for every run, quoted as one")
    p.add_argument("--out", default="benchmarks/results/lm_sweep")
    p.add_argument("--report", action="store_true", help="only write the report of the runs in --out")
    p.add_argument("--time-steps", type=int, default=0,
                   help="only measure each model's step time alone over this many steps into OUT/step_ms.json "
                        "(the equal-time clock of the report)")
    p.add_argument("--relative-to", default="", metavar="MODEL",
                   help="with --time-steps: time MODEL (already in OUT/step_ms.json) again in the same run and put "
                        "the other models on the file's clock by their ratio to it")
    p.add_argument("--no-report", dest="report_after", action="store_false",
                   help="do not write the report after the sweep")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be >= 1")
    if args.threads < 1:
        p.error("--threads must be >= 1")
    if args.time_steps < 0:
        p.error("--time-steps must be >= 0")
    if any(a == "--seed" or a.startswith("--seed=") for a in shlex.split(args.train_args)):
        p.error("--train-args: give the seeds with --seeds (each seed has its own run directory), not --seed")
    if args.relative_to and not args.time_steps:
        p.error("--relative-to: only with --time-steps")
    if args.time_steps:
        return time_steps(args)
    return report(args) if args.report else sweep(args)


if __name__ == "__main__":
    sys.exit(main())
