"""pom-bench output: tables (stdout), JSON, CSV, PNG plots, speed-ups and the project's targets."""
import csv
import json
import os
from typing import Dict, Iterable, List, Optional, Tuple

from .layer import is_attention

SCHEMA = "pom-bench/1"
CSV_FIELDS = ["bench", "method", "mode", "pass", "n", "context", "batch", "layers", "layers_measured", "status",
              "median_s", "p10_s", "p90_s", "min_s", "max_s", "repeats", "peak_bytes", "cache_bytes",
              "tokens_per_s", "note"]


def _ok(p: Dict[str, object]) -> bool:
    return p.get("status") == "ok"


def _index(points: Iterable[Dict[str, object]], *keys: str) -> Dict[Tuple, Dict[str, object]]:
    return {tuple(p.get(k) for k in keys): p for p in points}


# ---- speed-ups ----

def layer_speedups(result: Dict[str, object], sdpa_only: bool = False) -> List[Dict[str, object]]:
    """pom_ext against the fastest attention method at each (mode, pass, N) where both ran; sdpa_only: among
    the SDPA methods only (flash_attn left out)."""
    points = result["points"]
    idx = _index(points, "method", "mode", "pass", "n")
    out = []
    for p in points:
        if p["method"] != "pom_ext" or not _ok(p):
            continue
        rivals = [q for q in points if is_attention(q["method"]) and _ok(q) and q["mode"] == p["mode"]
                  and q["pass"] == p["pass"] and q["n"] == p["n"]
                  and (not sdpa_only or q["method"].startswith("sdpa"))]
        if not rivals:
            continue
        best = min(rivals, key=lambda q: q["median_s"])
        row = {"mode": p["mode"], "pass": p["pass"], "n": p["n"], "fastest_attention": best["method"],
               "speedup": best["median_s"] / p["median_s"]}
        for q in rivals:
            row[f"speedup_vs_{q['method']}"] = q["median_s"] / p["median_s"]
        ref = idx.get(("pom_ext_reference", p["mode"], p["pass"], p["n"]))
        if ref is not None and _ok(ref):
            row["speedup_vs_pom_ext_reference"] = ref["median_s"] / p["median_s"]
        out.append(row)
    return out


def decode_ratios(result: Dict[str, object]) -> List[Dict[str, object]]:
    """PoM tokens/s over the fastest attention's, and KV-cache bytes over state bytes, per (batch, context)."""
    out = []
    for p in result["points"]:
        if p["method"] != "pom_ext":
            continue
        rivals = [q for q in result["points"] if q["method"] != "pom_ext" and q["batch"] == p["batch"]
                  and q["context"] == p["context"]]
        row = {"batch": p["batch"], "context": p["context"]}
        ok = [q for q in rivals if _ok(q)]
        if _ok(p) and ok:
            best = max(ok, key=lambda q: q["tokens_per_s"])
            row.update(fastest_attention=best["method"], tokens_per_s_ratio=p["tokens_per_s"] / best["tokens_per_s"])
        if rivals:
            row["cache_bytes_ratio"] = rivals[0]["cache_bytes"] / p["cache_bytes"]
        out.append(row)
    return out


# ---- targets (issue 4 of the project), evaluated when a run has the configuration they are set for ----

def _check(name: str, ok: Optional[bool], detail: str) -> Dict[str, object]:
    return {"target": name, "met": ok, "detail": detail}


def layer_targets(result: Dict[str, object], env: Dict[str, object]) -> List[Dict[str, object]]:
    cfg = result["config"]
    gpu = env["device"] == "cuda"
    if gpu and not (cfg["dim"] == 1024 and cfg["heads"] == 16 and cfg["dtype"] == "bfloat16"):
        return []
    if not gpu and not (cfg["dim"] == 256 and cfg["dtype"] == "float32"):
        return []
    sp = {(r["mode"], r["n"]): r for r in layer_speedups(result, sdpa_only=True) if r["pass"] == "fwd+bwd"}
    checks = []

    def faster_from(mode: str, n0: int):
        rows = [r for (m, n), r in sorted(sp.items()) if m == mode and n >= n0]
        if not rows:
            return _check(f"{mode} fwd+bwd: PoM faster than SDPA from N={n0} on", None, "not measured")
        worst = min(rows, key=lambda r: r["speedup"])
        return _check(f"{mode} fwd+bwd: PoM faster than SDPA from N={n0} on", worst["speedup"] > 1,
                      f"lowest speed-up {worst['speedup']:.2f}x at N={worst['n']}")

    def at_least(mode: str, n: int, x: float):
        r = sp.get((mode, n))
        name = f"{mode} fwd+bwd: >= {x:g}x at N={n}"
        if r is None:
            return _check(name, None, "not measured")
        return _check(name, r["speedup"] >= x, f"{r['speedup']:.1f}x vs {r['fastest_attention']}")

    if gpu:
        checks += [faster_from("non-causal", 1024), at_least("non-causal", 32768, 15),
                   at_least("non-causal", 131072, 50), at_least("causal", 32768, 8)]
    else:
        for mode in ("non-causal", "causal"):
            checks += [faster_from(mode, 1024), at_least(mode, 16384, 10)]
    return checks


def decode_targets(result: Dict[str, object], env: Dict[str, object]) -> List[Dict[str, object]]:
    cfg = result["config"]
    if env["device"] != "cuda" or cfg["layers"] != 12 or cfg["dim"] != 1024:
        return []
    checks = []
    for b in cfg["batches"]:
        pts = [p for p in result["points"] if p["method"] == "pom_ext" and p["batch"] == b and _ok(p)
               and 1024 <= p["context"] <= 2**20]
        name = f"PoM per-token latency flat within 10% from 1k to 1M context, batch {b}"
        if {p["context"] for p in pts} >= {1024, 2**20}:
            lo, hi = min(p["median_s"] for p in pts), max(p["median_s"] for p in pts)
            checks.append(_check(name, hi <= 1.1 * lo, f"{lo * 1e3:.3f} to {hi * 1e3:.3f} ms"))
        else:
            checks.append(_check(name, None, "not measured"))
    r = {(x["batch"], x["context"]): x for x in decode_ratios(result)}.get((64, 32768), {})
    name = "tokens/s at 32k context, batch 64: PoM >= 50x KV-cache attention"
    if "tokens_per_s_ratio" in r:
        checks.append(_check(name, r["tokens_per_s_ratio"] >= 50, f"{r['tokens_per_s_ratio']:.1f}x"))
    else:
        checks.append(_check(name, None, "not measured (or attention out of memory)"))
    return checks


# ---- tables ----

def _ms(p: Optional[Dict[str, object]]) -> str:
    if p is None:
        return "-"
    if not _ok(p):
        s = p["status"]
        return "oom" if s == "oom" else "skip" if s.startswith("skipped") else "error"
    return f"{p['median_s'] * 1e3:.2f}"


def _mib(nbytes: Optional[float]) -> str:
    return "-" if nbytes is None else f"{nbytes / 2**20:.1f}"


def _render(title: str, head: List[str], rows: List[List[str]], markdown: bool) -> List[str]:
    """A titled table as aligned text, or as a markdown table under a bold title."""
    if markdown:
        return [f"\n**{title}**\n", "| " + " | ".join(head) + " |", "|" + "---:|" * len(head)] + \
            ["| " + " | ".join(r) + " |" for r in rows]
    width = [max(len(x) for x in col) for col in zip(head, *rows)]
    line = lambda cells: " ".join(c.rjust(w) for c, w in zip(cells, width))  # noqa: E731
    text = line(head)
    return [f"\n{title}", text, "-" * len(text)] + [line(r) for r in rows]


def _bytes(nbytes: Optional[float]) -> str:
    if nbytes is None:
        return "-"
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= div:
            return f"{nbytes / div:.1f} {unit}"
    return f"{nbytes:.0f} B"


def layer_table(result: Dict[str, object], markdown: bool = False) -> str:
    cfg = result["config"]
    methods = [m for m, v in result["methods"].items() if v["status"] == "ok"]
    idx = _index(result["points"], "method", "mode", "pass", "n")
    sp = _index(layer_speedups(result), "mode", "pass", "n")
    lines = []
    for mode in cfg["modes"]:
        for pas in cfg["passes"]:
            rows = []
            for n in cfg["seq_lens"]:
                row = [idx.get((m, mode, pas, n)) for m in methods]
                batch = next((p["batch"] for p in row if p is not None), "")
                s = sp.get((mode, pas, n))
                pom = idx.get(("pom_ext", mode, pas, n))
                best = idx.get((s["fastest_attention"], mode, pas, n)) if s else None
                rows.append([str(n), str(batch)] + [_ms(p) for p in row] + [
                    f"{s['speedup']:.1f}x" if s else "-", s["fastest_attention"] if s else "-",
                    _mib(pom.get("peak_bytes") if pom and _ok(pom) else None),
                    _mib(best.get("peak_bytes") if best else None)])
            head = ["N", "B"] + methods + ["speed-up", "vs", "MiB pom", "MiB attn"]
            lines += _render(f"{mode}, {pas}: median ms (peak MiB for pom_ext and the fastest attention)", head,
                             rows, markdown)
    for m, v in result["methods"].items():
        if v["status"] != "ok":
            lines.append(f"\n{m}: {v['status']}" if markdown else f"{m}: {v['status']}")
    return "\n".join(lines)


def decode_table(result: Dict[str, object], markdown: bool = False) -> str:
    cfg = result["config"]
    methods = [m for m, v in result["methods"].items() if v["status"] == "ok"]
    idx = _index(result["points"], "method", "batch", "context")
    ratios = _index(decode_ratios(result), "batch", "context")
    rows, extrapolated = [], False
    for b in cfg["batches"]:
        for c in cfg["contexts"]:
            cells = []
            for m in methods:
                p = idx.get((m, b, c))
                star = p is not None and "extrapolated" in p.get("note", "")
                extrapolated |= star
                cells.append(_ms(p) + ("*" if star else ""))
            r = ratios.get((b, c), {})
            pom = idx.get(("pom_ext", b, c))
            kv = next((idx[(m, b, c)] for m in methods if m != "pom_ext" and (m, b, c) in idx), None)
            rows.append([str(b), str(c)] + cells + [
                f"{r['tokens_per_s_ratio']:.1f}x" if "tokens_per_s_ratio" in r else "-",
                _bytes(pom["cache_bytes"] if pom else None), _bytes(kv["cache_bytes"] if kv else None)])
    head = ["B", "context"] + methods + ["tok/s ratio", "PoM state", "KV cache"]
    lines = _render(f"decode, {cfg['layers']} layers: ms per step (one token per sequence), tokens/s ratio PoM / "
                    f"fastest attention, memory holding the context", head, rows, markdown)
    if extrapolated:
        lines.append("\n* the KV cache of the whole stack does not fit: measured on fewer layers, time scaled up")
    return "\n".join(lines)


def targets_table(checks: List[Dict[str, object]], markdown: bool = False) -> str:
    if not checks:
        return ""
    mark = {True: "met", False: "NOT met", None: "n/a"}
    if markdown:
        return "\n\ntargets:\n\n" + "\n".join(f"- {mark[c['met']]}: {c['target']} ({c['detail']})" for c in checks)
    return "\ntargets:\n" + "\n".join(f"  [{mark[c['met']]:>7s}] {c['target']}: {c['detail']}" for c in checks)


def summary_header(env: Dict[str, object]) -> str:
    """The machine and software of a run, for the head of summary.md."""
    load = env.get("loadavg_start")
    return (f"pom-bench on {env['device_name']} ({env['device']}, {env['threads']} threads), torch {env['torch']}, "
            f"CUDA {env['cuda']}, pom_ext {env['pom_ext']} at commit {env['git_commit']}, {env['date']}"
            + (f"; load average at the start {load[0]:.2f}" if load else "") + "\n")


# ---- files ----

def write_json(path: str, env: Dict[str, object], result: Dict[str, object], extra: Dict[str, object]) -> None:
    doc = {"schema": SCHEMA, "env": env, **result, **extra}
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)


def write_csv(path: str, points: List[Dict[str, object]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for p in points:
            w.writerow(p)


# ---- plots ----

def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _plot_inputs(result: Dict[str, object], *keys: str):
    """(pyplot or None, config, methods that ran, points by keys)."""
    methods = [m for m, v in result["methods"].items() if v["status"] == "ok"]
    return _pyplot(), result["config"], methods, _index(result["points"], *keys)


def _log_axes(ax, xs: List[int], xlabel: str, ylabel: str, title: str) -> None:
    """Log-log axes with the measured sizes as x ticks (512, 1k, 64k, 1M)."""
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ticks = sorted(set(xs))
    ax.set_xticks(ticks, [_size(x) for x in ticks])
    from matplotlib.ticker import NullLocator

    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


def _size(n: int) -> str:
    for unit, div in (("M", 2**20), ("k", 2**10)):
        if n >= div and n % div == 0:
            return f"{n // div}{unit}"
    return str(n)


def _save(plt, fig, title: str, env: Dict[str, object], cfg: Dict[str, object], path: str) -> str:
    where = (f"{env['device_name']} ({env['device']}, {cfg['dtype']}, {env['threads']} threads)"
             if env["device"] == "cpu" else f"{env['device_name']} ({cfg['dtype']})")
    fig.suptitle(f"{title} — {where}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_layer(result: Dict[str, object], env: Dict[str, object], out_dir: str) -> List[str]:
    """layer_time.png (log-log), layer_memory.png, layer_speedup.png; [] without matplotlib."""
    plt, cfg, methods, idx = _plot_inputs(result, "method", "mode", "pass", "n")
    if plt is None:
        return []
    files = []
    for what, key, scale, ylabel in (("time", "median_s", 1e3, "median time (ms)"),
                                     ("memory", "peak_bytes", 2.0**-20, "peak memory above inputs (MiB)")):
        fig, axes = plt.subplots(len(cfg["passes"]), len(cfg["modes"]), squeeze=False,
                                 figsize=(5.5 * len(cfg["modes"]), 4.2 * len(cfg["passes"])))
        for i, pas in enumerate(cfg["passes"]):
            for j, mode in enumerate(cfg["modes"]):
                ax = axes[i][j]
                for m in methods:
                    pts = [idx[(m, mode, pas, n)] for n in cfg["seq_lens"] if (m, mode, pas, n) in idx]
                    pts = [p for p in pts if _ok(p) and p.get(key)]
                    if pts:
                        ax.plot([p["n"] for p in pts], [p[key] * scale for p in pts], marker="o",
                                linestyle="-" if m.startswith("pom") else "--", label=m)
                    oom = [p["n"] for p in (idx.get((m, mode, pas, n)) for n in cfg["seq_lens"])
                           if p is not None and p["status"] == "oom"]
                    if oom:
                        ax.axvline(min(oom), color="grey", linewidth=0.5, linestyle=":")
                _log_axes(ax, cfg["seq_lens"], "sequence length N", ylabel, f"{mode}, {pas}")
        files.append(_save(plt, fig, f"one layer, D={cfg['dim']}, {cfg['heads']} heads, batch {cfg['batch']}", env,
                           cfg, os.path.join(out_dir, f"layer_{what}.png")))

    speedups = layer_speedups(result)
    fig, axes = plt.subplots(1, len(cfg["modes"]), squeeze=False, figsize=(5.5 * len(cfg["modes"]), 4.2))
    for j, mode in enumerate(cfg["modes"]):
        ax = axes[0][j]
        for pas in cfg["passes"]:
            rows = [r for r in speedups if r["mode"] == mode and r["pass"] == pas]
            for m in [m for m in methods if is_attention(m)]:
                pts = [(r["n"], r[f"speedup_vs_{m}"]) for r in rows if f"speedup_vs_{m}" in r]
                if pts:
                    ax.plot(*zip(*pts), marker="o", linestyle="-" if pas == "fwd+bwd" else ":",
                            label=f"vs {m}, {pas}")
        ax.axhline(1.0, color="black", linewidth=0.8)
        _log_axes(ax, cfg["seq_lens"], "sequence length N", "speed-up of pom_ext (attention time / PoM time)",
                  mode)
    path = os.path.join(out_dir, "layer_speedup.png")
    return files + [_save(plt, fig, "PoM speed-up over attention", env, cfg, path)]


def plot_decode(result: Dict[str, object], env: Dict[str, object], out_dir: str) -> List[str]:
    """decode.png: per-step latency and context memory against context length; [] without matplotlib."""
    plt, cfg, methods, idx = _plot_inputs(result, "method", "batch", "context")
    if plt is None:
        return []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for b in cfg["batches"]:
        for m in methods:
            pts = [idx[(m, b, c)] for c in cfg["contexts"] if (m, b, c) in idx]
            ok = [p for p in pts if _ok(p)]
            style = "-" if m == "pom_ext" else "--"
            if ok:
                axes[0].plot([p["context"] for p in ok], [p["median_s"] * 1e3 for p in ok], marker="o",
                             linestyle=style, label=f"{m}, batch {b}")
            axes[1].plot([p["context"] for p in pts], [p["cache_bytes"] / 2**20 for p in pts], marker="o",
                         linestyle=style, label=f"{m}, batch {b}")
    _log_axes(axes[0], cfg["contexts"], "context length", "ms per step (one token per sequence)",
              f"decode step, {cfg['layers']} layers")
    _log_axes(axes[1], cfg["contexts"], "context length", "context memory (MiB)", "PoM state vs KV cache")
    return [_save(plt, fig, f"D={cfg['dim']}, {cfg['heads']} heads", env, cfg, os.path.join(out_dir, "decode.png"))]
