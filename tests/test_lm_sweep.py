"""examples/lm_sweep.py: the comparison it reports (equal tokens, equal training time) from known logs, a smoke
sweep that skips finished runs, and its argument errors."""
import json

import pytest

from conftest import load_example


@pytest.fixture(scope="module")
def sweep():
    return load_example("lm_sweep")


def write_log(out, model, lr, step_s, vals, pattern, seed=0):
    """A finished train_lm.py log: validation (step, bpb) pairs, step_s seconds per training step."""
    path = out / model / (f"lr{lr:g}" if seed == 0 else f"lr{lr:g}-seed{seed}")
    path.mkdir(parents=True)
    records = [{"step": s, "time_s": s * step_s, "train_loss": None, "val_bpb": v} for s, v in vals]
    last = vals[-1][0]
    log = {"args": {"model": model, "lr": lr, "threads": 1, "seed": seed}, "params": 1000, "pattern": pattern,
           "final": {"step": last, "time_s": last * step_s, "val_bpb": vals[-1][1]}, "records": records}
    (path / "log.json").write_text(json.dumps(log))


def test_report_equal_tokens_and_equal_time(sweep, tmp_path):
    # attention: 2 s/step, best at lr 1e-3 (final 2.0); pom: 1 s/step, best at lr 2e-3 (final 2.1).
    write_log(tmp_path, "attention", 1e-3, 2.0, [(100, 3.0), (200, 2.0)], "AA")
    write_log(tmp_path, "attention", 2e-3, 2.0, [(100, 2.8), (200, 2.2)], "AA")
    write_log(tmp_path, "pom", 1e-3, 1.0, [(100, 2.9), (200, 2.3)], "PP")
    write_log(tmp_path, "pom", 2e-3, 1.0, [(100, 2.6), (200, 2.1)], "PP")
    # An unfinished run (no "final") is left out.
    (tmp_path / "pom" / "lr0.004").mkdir()
    (tmp_path / "pom" / "lr0.004" / "log.json").write_text(json.dumps({"args": {}, "records": []}))
    assert sweep.main(["--report", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "lm_sweep.json").read_text())
    assert summary["best"] == {"attention": {"lr": 1e-3, "final_bpb": 2.0, "seeds": 1},
                               "pom": {"lr": 2e-3, "final_bpb": 2.1, "seeds": 1}}
    assert len(summary["runs"]) == 4
    # Equal time: the shortest full run is pom's 200 s; attention reached step 100 by then (2.8 at lr 2e-3).
    assert summary["equal_time_budget_s"] == pytest.approx(200.0)
    assert summary["equal_time"]["attention"] == {"val_bpb": 2.8, "lr": 2e-3, "step": 100}
    assert summary["equal_time"]["pom"] == {"val_bpb": 2.1, "lr": 2e-3, "step": 200}
    md = (tmp_path / "lm_sweep.md").read_text()
    assert "| pom | PP | 0.00 | 1000 | 2.300 | 2.100 | 2.100 | +5.0% |" in md
    assert "| attention | AA | 0.00 | 2000 | 2.000 | 2.200 | 2.000 | +0.0% |" in md


def test_report_averages_seeds(sweep, tmp_path, capsys):
    # pom at 1e-3: seed 0, 2.2. At 2e-3: seeds 0, 1, 2 end at 2.1, 2.4, 2.4 (mean 2.3). The rates are compared on
    # the seed they share (0: 2.1 < 2.2), and 2e-3 is reported with its three seeds' mean; its curve is averaged
    # at the steps every seed evaluated (100 and 200; seed 1's lone step 50 is not).
    write_log(tmp_path, "attention", 1e-3, 2.0, [(100, 3.0), (200, 2.0)], "AA")
    write_log(tmp_path, "attention", 4e-3, 2.0, [(100, 3.0), (200, 2.5)], "AA", seed=1)
    write_log(tmp_path, "pom", 1e-3, 1.0, [(100, 2.9), (200, 2.2)], "PP")
    write_log(tmp_path, "pom", 2e-3, 1.0, [(100, 2.6), (200, 2.1)], "PP")
    write_log(tmp_path, "pom", 2e-3, 1.0, [(50, 2.0), (100, 2.6), (200, 2.4)], "PP", seed=1)
    write_log(tmp_path, "pom", 2e-3, 1.0, [(100, 2.0), (200, 2.4)], "PP", seed=2)
    write_log(tmp_path, "pom", 2e-3, 1.0, [(100, 1.0)], "PP", seed=3)  # a shorter budget: left out
    assert sweep.main(["--report", "--out", str(tmp_path)]) == 0
    assert "pom lr 0.002 seed 3: 100 steps, not the 200 of its rate's other runs: left out" in capsys.readouterr().err
    summary = json.loads((tmp_path / "lm_sweep.json").read_text())
    assert len(summary["runs"]) == 7
    assert summary["best"]["pom"] == {"lr": 2e-3, "final_bpb": pytest.approx(2.3), "seeds": 3}
    rate = [g for g in summary["rates"]["pom"] if g["lr"] == 2e-3][0]
    assert rate["seeds"] == [0, 1, 2] and rate["final_bpb_seeds"] == [2.1, 2.4, 2.4]
    # Equal time (200 s): on seed 0, 2e-3 reaches 2.1 and 1e-3 2.2; 2e-3's mean curve: 2.4 at 100, 2.3 at 200.
    assert summary["equal_time"]["pom"] == {"val_bpb": pytest.approx(2.3), "lr": 2e-3, "step": 200}
    md = (tmp_path / "lm_sweep.md").read_text()
    assert "| pom | PP | 0.00 | 1000 | 2.200 | 2.300 (3 seeds: 2.100–2.400) |  | 2.300 | +15.0% |" in md
    assert "| pom | 0.002 | 0, 1, 2 | 2.100, 2.400, 2.400 | 2.300 | 0.173 |" in md
    assert "| 2.500 (seed 1) |" in md  # a rate whose one run is not seed 0's says which
    # A second seed at 1e-3 (1.9): the rates share seeds 0 and 1 (1e-3: 2.05, 2e-3: 2.25), so 1e-3 is the best.
    write_log(tmp_path, "pom", 1e-3, 1.0, [(100, 2.5), (200, 1.9)], "PP", seed=1)
    assert sweep.main(["--report", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "lm_sweep.json").read_text())
    assert summary["best"]["pom"] == {"lr": 1e-3, "final_bpb": pytest.approx(2.05), "seeds": 2}
    assert "| 2.050 (2 seeds: 1.900–2.200) | 2.300 (3 seeds: 2.100–2.400) |  | 2.050 | +2.5% |" in (
        tmp_path / "lm_sweep.md").read_text()


def test_report_draws_the_sweep(sweep, tmp_path):
    pytest.importorskip("matplotlib")
    write_log(tmp_path, "attention", 1e-3, 2.0, [(100, 3.0), (200, 2.0)], "AA")
    write_log(tmp_path, "hybrid", 2e-3, 1.5, [(100, 2.9), (200, 2.2)], "PA")
    write_log(tmp_path, "pom", 1e-3, 1.0, [(100, 2.9), (200, 2.3)], "PP")
    write_log(tmp_path, "pom", 2e-3, 1.0, [(100, 2.6), (200, 2.1)], "PP")
    assert sweep.main(["--report", "--out", str(tmp_path)]) == 0
    png = (tmp_path / "lm_sweep.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_report_equal_time_on_measured_step_times(sweep, tmp_path):
    # The runs' own clocks say attention 2 s/step and pom 1 s/step (a shared machine); measured alone, attention
    # takes 1.0 s a step and pom 1.5 s: attention's full run (200 s) is the budget, pom gets 133 steps of it.
    write_log(tmp_path, "attention", 1e-3, 2.0, [(100, 3.0), (200, 2.0)], "AA")
    write_log(tmp_path, "pom", 1e-3, 1.0, [(100, 2.9), (200, 2.3)], "PP")
    write_log(tmp_path, "pom", 2e-3, 1.0, [(100, 2.6), (200, 2.1)], "PP")
    (tmp_path / "step_ms.json").write_text(json.dumps({"step_ms": {"attention": 1000.0, "pom": 1500.0},
                                                       "steps_timed": 40, "threads": 1}))
    assert sweep.main(["--report", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "lm_sweep.json").read_text())
    assert summary["equal_time_budget_s"] == pytest.approx(200.0)
    assert summary["equal_time_clock"] == {"measured_step_ms": {"attention": 1000.0, "pom": 1500.0}}
    assert summary["equal_time"]["attention"] == {"val_bpb": 2.0, "lr": 1e-3, "step": 200}
    assert summary["equal_time"]["pom"] == {"val_bpb": 2.6, "lr": 2e-3, "step": 100}
    md = (tmp_path / "lm_sweep.md").read_text()
    assert "each model's step time measured alone (40 steps, threads 1" in md
    assert "| pom | PP | 0.00 | 1500 | 2.300 | 2.100 | 2.100 | +5.0% |" in md  # ms/step on the measured clock
    # A model without a measured step time: the runs' own clocks for all, and the report says why.
    write_log(tmp_path, "hybrid", 1e-3, 1.0, [(100, 2.7), (200, 2.2)], "PA")
    assert sweep.main(["--report", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "lm_sweep.json").read_text())
    assert summary["equal_time_clock"] == "runs' own times"
    assert summary["equal_time"]["pom"] == {"val_bpb": 2.1, "lr": 2e-3, "step": 200}
    assert "step_ms.json lacks hybrid" in (tmp_path / "lm_sweep.md").read_text()


def test_smoke_time_steps(sweep, tmp_path):
    tmp_path = tmp_path / "new"  # an --out that does not exist yet
    argv = ["--models", "pom,attention", "--lrs", "3e-3", "--threads", "1", "--out", str(tmp_path), "--time-steps",
            "5", "--train-args", "--dim 16 --depth 1 --seq-len 32 --batch-size 2 --val-batches 1"]
    assert sweep.main(argv) == 0
    timing = json.loads((tmp_path / "step_ms.json").read_text())
    assert set(timing["step_ms"]) == {"pom", "attention"} and all(v > 0 for v in timing["step_ms"].values())
    assert timing["steps_timed"] == 5 and timing["threads"] == 1
    assert not (tmp_path / "pom").exists()  # timing leaves no run behind


def test_time_steps_relative_to(sweep, tmp_path, monkeypatch, capsys):
    # The file's clock: pom 300 ms, attention 400 ms. A later run, on a machine 2x slower, times pom at 600 ms
    # and pom-e4 at 900 ms: pom-e4 enters at pom's 300 x 1.5 = 450 ms; pom's own entry and the file's settings stay.
    base = {"step_ms": {"pom": 300.0, "attention": 400.0}, "steps_timed": 100, "threads": 1, "train_args": "",
            "date": "then", "git_commit": "abc", "later": {"attention": "put on pom's clock"}}
    (tmp_path / "step_ms.json").write_text(json.dumps(base))
    later_times = {"pom": 600.0, "pom-e4": 900.0, "attention": 500.0}
    timed = []

    def fake(args, name, extra, lr, seed):
        timed.append((name, extra))
        return later_times[name]

    monkeypatch.setattr(sweep, "measure_step_ms", fake)
    argv = ["--time-steps", "5", "--threads", "1", "--out", str(tmp_path)]
    assert sweep.main(argv + ["--models", "pom-e4", "--relative-to", "pom"]) == 0
    assert timed == [("pom", sweep.PRESETS["pom"]), ("pom-e4", sweep.PRESETS["pom-e4"])]  # the reference first
    timing = json.loads((tmp_path / "step_ms.json").read_text())
    assert timing["step_ms"] == {"pom": 300.0, "attention": 400.0, "pom-e4": pytest.approx(450.0)}
    assert {k: timing[k] for k in ("steps_timed", "date", "git_commit")} == {"steps_timed": 100, "date": "then",
                                                                            "git_commit": "abc"}
    note = timing["later"]["pom-e4"]
    assert "pom 600.0, pom-e4 900.0 ms/step" in note and "pom's time here x 1.500" in note
    # Timed directly (no --relative-to), a model is on the file's clock: its `later` note goes.
    assert sweep.main(argv + ["--models", "attention"]) == 0
    timing = json.loads((tmp_path / "step_ms.json").read_text())
    assert timing["step_ms"]["attention"] == 500.0 and set(timing["later"]) == {"pom-e4"}
    assert timing["steps_timed"] == 5
    # A reference the file lacks, one that is no model, a mismatched setting, --relative-to without timing.
    capsys.readouterr()
    assert sweep.main(argv + ["--models", "pom-e4", "--relative-to", "hybrid"]) == 2
    assert "--relative-to: 'hybrid' has no step time in" in capsys.readouterr().err
    timing["step_ms"]["mine"] = 1.0
    (tmp_path / "step_ms.json").write_text(json.dumps(timing))
    assert sweep.main(argv + ["--models", "pom-e4", "--relative-to", "mine"]) == 2
    assert "'mine' is neither a preset nor one of --models" in capsys.readouterr().err
    assert sweep.main(["--time-steps", "5", "--threads", "2", "--out", str(tmp_path), "--models", "pom-e4",
                       "--relative-to", "pom"]) == 2
    assert "was timed with --threads 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sweep.main(["--models", "pom-e4", "--relative-to", "pom", "--out", str(tmp_path)])
    assert "--relative-to: only with --time-steps" in capsys.readouterr().err


def test_smoke_sweep_skips_finished_runs(sweep, tmp_path, capsys):
    argv = ["--models", "pom", "--lrs", "3e-3", "--steps", "4", "--threads", "1", "--out", str(tmp_path),
            "--train-args", "--dim 16 --depth 1 --seq-len 32 --batch-size 2 --eval-every 2 --val-batches 1 "
                            "--sample-len 4"]
    assert sweep.main(argv) == 0
    log = json.loads((tmp_path / "pom" / "lr0.003" / "log.json").read_text())
    assert log["final"]["step"] == 4 and log["args"]["lr"] == 3e-3 and log["args"]["dim"] == 16
    assert sum(r.get("val_bpb") is not None for r in log["records"]) >= 2
    capsys.readouterr()
    assert sweep.main(argv) == 0
    assert "pom lr 0.003: done, skipped" in capsys.readouterr().out
    assert "| pom | P |" in (tmp_path / "lm_sweep.md").read_text()
    # A second seed runs beside the first, in its own directory, with its own initialization and batches.
    capsys.readouterr()
    assert sweep.main(argv[:4] + ["--seeds", "0,1"] + argv[4:]) == 0
    out = capsys.readouterr().out
    assert "pom lr 0.003: done, skipped" in out and "pom lr 0.003 seed 1: " in out
    log1 = json.loads((tmp_path / "pom" / "lr0.003-seed1" / "log.json").read_text())
    assert log1["args"]["seed"] == 1 and log1["final"]["step"] == 4
    assert log1["final"]["val_bpb"] != log["final"]["val_bpb"]
    assert "(2 seeds: " in (tmp_path / "lm_sweep.md").read_text()


@pytest.mark.parametrize("argv,match", [
    (["--models", "nonesuch"], "--models: unknown model 'nonesuch'"),
    (["--models", ""], "--models: expected at least one model"),
    (["--lrs", "1e-3,x"], "--lrs: expected comma-separated numbers"),
    (["--lrs", "0"], "--lrs: expected positive learning rates"),
    (["--seeds", "0,x"], "--seeds: expected comma-separated integers"),
    (["--seeds", "1,1"], "--seeds: expected distinct non-negative integers"),
    (["--seeds", "-1"], "--seeds: expected distinct non-negative integers"),
])
def test_bad_arguments(sweep, tmp_path, argv, match):
    with pytest.raises(SystemExit, match=match):
        sweep.main(argv + ["--out", str(tmp_path)])


@pytest.mark.parametrize("argv,match", [
    (["--time-steps", "-1"], "--time-steps must be >= 0"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--train-args", "--dim 16 --seed 3"], "--train-args: give the seeds with --seeds"),
])
def test_bad_counts(sweep, tmp_path, capsys, argv, match):
    with pytest.raises(SystemExit):
        sweep.main(argv + ["--out", str(tmp_path)])
    assert match in capsys.readouterr().err


def test_report_without_runs(sweep, tmp_path, capsys):
    assert sweep.main(["--report", "--out", str(tmp_path)]) == 1
    assert "no finished runs" in capsys.readouterr().err


def test_train_lm_conv_skip_and_resume(tmp_path, capsys):
    """train_lm.py --conv-skip trains PoM blocks with the skip; a checkpoint from before the option (no conv_skip in
    its arguments) resumes as a model without it, whatever is given."""
    import torch
    train = load_example("train_lm")
    small = ["--dim", "16", "--depth", "1", "--seq-len", "32", "--batch-size", "2", "--eval-every", "2",
             "--val-batches", "1", "--sample-len", "4", "--threads", "1"]
    skip = tmp_path / "skip"
    train.main(small + ["--steps", "2", "--conv-skip", "--out", str(skip)])
    state = torch.load(skip / "ckpt.pt", weights_only=False)["model"]
    assert "blocks.0.skip" in state and state["blocks.0.skip"].abs().sum() > 0  # trained away from its zeros
    old = tmp_path / "old"
    train.main(small + ["--steps", "2", "--out", str(old)])
    ckpt = torch.load(old / "ckpt.pt", weights_only=False)
    del ckpt["args"]["conv_skip"]
    torch.save(ckpt, old / "ckpt.pt")
    capsys.readouterr()
    train.main(small + ["--steps", "4", "--conv-skip", "--resume", "--out", str(old)])
    assert "using the checkpoint's conv_skip=False (given True)" in capsys.readouterr().out
    log = json.loads((old / "log.json").read_text())
    assert log["final"]["step"] == 4 and "blocks.0.skip" not in torch.load(old / "ckpt.pt", weights_only=False)["model"]


def test_presets_parse_and_are_listed(sweep, tmp_path):
    """Every preset makes a valid train_lm.py command line as the sweep builds it (no argument misspelt, none given
    twice, its own --model kept) and is described in the module's docstring, which --help prints."""
    import types
    train = load_example("train_lm")
    listed = {line.split()[0] for line in sweep.__doc__.splitlines() if line.startswith("    ") and line.split()}
    settings = types.SimpleNamespace(threads=1, train_args="")
    for name, extra in sweep.PRESETS.items():
        assert name in listed, name
        words = sweep.train_cmd(settings, extra, 4e-3, 0, 1, tmp_path / name)[2:]
        options = [w for w in words if w.startswith("--")]
        assert len(options) == len(set(options)), name
        args = train.parse_args(words)
        assert args.model == extra.split("--model")[1].split()[0], name
