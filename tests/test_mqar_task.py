"""The MQAR task of examples/mqar.py: what its sequences hold, the state size it reports, and a smoke run."""
import json

import pytest
import torch

from conftest import load_example


@pytest.fixture(scope="module")
def mqar():
    return load_example("mqar")


@pytest.mark.parametrize("L,kv,vocab", [(64, 4, 8192), (128, 32, 256), (512, 64, 8192)])
def test_sequences(mqar, L, kv, vocab):
    x, y = mqar.mqar_batch(8, L, kv, vocab, torch.Generator().manual_seed(0))
    half = vocab // 2
    for b in range(8):
        keys, values = x[b, 0:2 * kv:2], x[b, 1:2 * kv:2]
        assert len(set(keys.tolist())) == kv and keys.min() >= 1 and keys.max() < half
        assert values.min() >= half and values.max() < vocab
        pos = (y[b] != -100).nonzero().flatten()
        assert len(pos) == kv and pos.min() >= 2 * kv and ((pos - 2 * kv) % 2 == 0).all()
        pair = dict(zip(keys.tolist(), values.tolist()))
        for p in pos.tolist():
            # the query is a key of the pairs, its target that key's value, and the value follows the query
            assert pair[x[b, p].item()] == y[b, p].item() == x[b, p + 1].item()
        rest = torch.ones(L, dtype=torch.bool)
        rest[:2 * kv] = False
        rest[pos] = False
        rest[pos + 1] = False
        assert (x[b][rest] == 0).all()


def test_power_law_offsets(mqar):
    """Zoology's gaps: most queries come soon after the pairs, the far half of the slots gets few."""
    _, y = mqar.mqar_batch(256, 512, 16, 8192, torch.Generator().manual_seed(1))
    pos = (y != -100).nonzero()[:, 1].float()
    near = ((pos - 32) / 2 < 112).float().mean().item()
    assert near > 0.6


def test_state_bytes(mqar):
    args = mqar.parse_args(["--vocab", "64", "--seq-lens", "32", "--num-kv", "4"])
    pom = mqar.build("pom-2x2", 32, args)
    # per layer: the running sum (expand * dim fp32), the count (int64), the convolution tail (3 * dim fp32)
    assert mqar.state_bytes(pom, 32) == mqar.state_bytes(pom, 64) == 2 * (4 * 64 + 8 + 4 * 3 * 32)
    att = mqar.build("attention", 32, args)
    assert mqar.state_bytes(att, 32) == 2 * 2 * 32 * 32 * 4  # layers x (k, v) x L x dim x fp32


def test_smoke_run_and_resume(mqar, tmp_path, capsys):
    argv = ["--quick", "--models", "pom-2x2", "--seq-lens", "32", "--threads", "1", "--out", str(tmp_path)]
    mqar.main(argv)
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert len(lines) == 1
    r = json.loads(lines[0])
    assert r["model"] == "pom-2x2" and r["degree"] == 2 and 0 <= r["accuracy"] <= 1 and r["curve"]
    mqar.main(argv)  # the run is there: nothing is trained again
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 1
    # the final model by the order of the queries: every held-out query in one span, the spans together the final
    # evaluation, each beside what ruling out the answered values gives (ranks 1..4 of 4 pairs: 1/4, 1/3, 1/2, 1)
    spans = r["final_by_rank"]
    assert [b[:2] for b in spans] == [[1, 1], [2, 2], [3, 3], [4, 4]] and sum(b[3] for b in spans) == 64 * 4
    assert [b[4] for b in spans] == pytest.approx([1 / 4, 1 / 3, 1 / 2, 1])
    assert sum(b[2] * b[3] for b in spans) / (64 * 4) == pytest.approx(r["final_accuracy"], abs=1e-12)
    summary = json.loads((tmp_path / "mqar.json").read_text())
    assert summary["rows"][0]["accuracies"] == [r["accuracy"]]
    assert summary["rows"][0]["by_rank"] == spans and summary["rows"][0]["by_rank_seeds"] == [0]
    md = (tmp_path / "mqar.md").read_text()
    assert "| pom-2x2 | 32 |" in md and "| pom-2x2 | 32 | 32 | 4 | 0 |" in md


@pytest.mark.parametrize("num_kv,bins", [(4, 4), (8, 4), (6, 4), (3, 4)])
def test_accuracy_by_rank(mqar, monkeypatch, num_kv, bins):
    """A predictor right on the second query of every sequence only: all its hits in the span of rank 2."""
    L, vocab = 8 * num_kv, 64
    test = [mqar.mqar_batch(16, L, num_kv, vocab, torch.Generator().manual_seed(s)) for s in range(3)]

    def second_only(lm, x, sel):
        answer = torch.roll(x, -1, 1)[sel]  # the value follows its query
        rank = (sel.cumsum(1) - 1)[sel]
        return torch.nn.functional.one_hot(torch.where(rank == 1, answer, 0), vocab).float()

    monkeypatch.setattr(mqar, "query_logits", second_only)
    spans = mqar.accuracy_by_rank(torch.nn.Module(), test, num_kv, bins)
    n = min(bins, num_kv)
    assert len(spans) == n and spans[0][0] == 1 and spans[-1][1] == num_kv
    assert all(a[1] + 1 == b[0] for a, b in zip(spans, spans[1:]))  # the ranks in order, each in one span
    hits = [acc * q for _, _, acc, q, _ in spans]
    assert [q for *_, q, _ in spans] == [48 * (hi - lo + 1) for lo, hi, *_ in spans]
    at = next(i for i, b in enumerate(spans) if b[0] <= 2 <= b[1])
    assert hits[at] == pytest.approx(48) and sum(hits) == pytest.approx(48)
    assert mqar.elimination(4, 1, 4) == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 4) / 4)

def test_model_names(mqar):
    """The convolution is part of a PoM model's name (-cC) unless it is the default; --conv-size adds it."""
    args = mqar.parse_args(["--models", "pom-2x8,pom-1x2-h4,pom-2x2-c2,attention", "--conv-size", "3"])
    assert args.models == ["pom-2x8-c3", "pom-1x2-h4-c3", "pom-2x2-c2", "attention"]
    assert mqar.parse_args(["--models", "pom-2x8-c4,pom-2x8-h1"]).models == ["pom-2x8", "pom-2x8"]
    assert mqar.spec("pom-3x8-h2-c0") == {"kind": "pom", "degree": 3, "expand": 8, "gate_heads": 2, "conv_size": 0}
    args = mqar.parse_args(["--vocab", "64", "--seq-lens", "32", "--num-kv", "4"])
    assert mqar.build("pom-2x2-c2", 32, args).blocks[0].conv.kernel_size == (2,)
    assert mqar.build("pom-2x2", 32, args).blocks[0].conv.kernel_size == (4,)
    assert mqar.build("pom-2x2-c0", 32, args).blocks[0].conv is None
    with pytest.raises(SystemExit):
        mqar.parse_args(["--models", "pom-2x2-x3"])


def test_hybrid_models(mqar, tmp_path, capsys):
    """-lLAYERS builds a hybrid with those layers in order (P: PoM, A: attention); all P is the plain PoM model;
    its state counts the PoM state and the attention layers' KV cache; a wrong number of layers or no P is refused."""
    args = mqar.parse_args(["--models", "pom-2x8-lPA,pom-1x2-h4-c2-lAP,pom-2x8-lPP", "--conv-size", "3",
                            "--vocab", "64", "--seq-lens", "32", "--num-kv", "4"])
    assert args.models == ["pom-2x8-c3-lPA", "pom-1x2-h4-c2-lAP", "pom-2x8-c3"]
    assert mqar.spec("pom-2x8-lAP") == {"kind": "pom", "degree": 2, "expand": 8, "gate_heads": 1, "conv_size": 4,
                                        "layers": "AP"}
    assert "layers" not in mqar.spec("pom-2x8-lPP")
    lm = mqar.build("pom-2x8-c3-lPA", 32, args)
    assert [type(b).__name__ for b in lm.blocks] == ["PolymorpherBlock", "AttentionBlock"]
    assert lm.blocks[0].conv.kernel_size == (3,) and lm.blocks[0].mixer.degree == 2
    pom_only, attention = mqar.build("pom-2x8-c3", 32, args), mqar.build("attention", 32, args)
    half_kv = mqar.state_bytes(attention, 32) // 2
    assert mqar.state_bytes(lm, 32) == mqar.state_bytes(pom_only, 32) // 2 + half_kv
    for bad in (["--models", "pom-2x8-lPAP"], ["--models", "pom-2x8-lAA"], ["--models", "pom-2x8-lPX"],
                ["--models", "pom-2x8-lP", "--depth", "2"]):
        with pytest.raises(SystemExit):
            mqar.parse_args(bad)
    assert "LAYERS must have one letter per layer" in capsys.readouterr().err
    mqar.main(["--quick", "--models", "pom-2x2-lAP", "--seq-lens", "32", "--steps", "4", "--eval-every", "2",
               "--out", str(tmp_path), "--threads", "1"])
    run = mqar.load(tmp_path)[0]
    assert run["model"] == "pom-2x2-lAP" and run["layers"] == "AP" and run["steps"] == 4
    assert (tmp_path / "mqar.md").read_text().count("pom-2x2-lAP") >= 1


def test_longer_run_of_a_seed_is_reported(mqar):
    """A seed run again with more --steps replaces its shorter run in the report; other seeds and rates stay."""
    base = {"model": "attention", "dim": 64, "seq_len": 64, "num_kv": 4, "vocab": 8192, "lr": 2.2e-3,
            "batch_size": 64, "depth": 2, "state_bytes": 1, "params": 1}
    runs = [dict(base, seed=0, max_steps=3000, accuracy=0.99), dict(base, seed=2, max_steps=3000, accuracy=0.38),
            dict(base, seed=2, max_steps=6000, accuracy=0.99), dict(base, seed=2, lr=1e-2, max_steps=3000,
                                                                    accuracy=0.3)]
    kept = mqar.longest(runs)
    assert len(kept) == 3 and runs[1] not in kept and runs[2] in kept
    row = next(r for r in mqar.summarize(kept))
    assert row["seeds"] == [0, 2] and row["accuracies"] == [0.99, 0.99]


def test_coefficient_init(mqar, tmp_path, capsys):
    """--coeff-std draws PoM's polynomial coefficients from N(0, std^2) (attention has none), is kept in the run
    and in its key, the report says it, and an OUT of runs with another initialization is refused."""
    args = mqar.parse_args(["--quick", "--coeff-std", "0.5"])
    torch.manual_seed(0)
    lm = mqar.build("pom-2x8", 32, args)
    coeffs = torch.cat([p.flatten() for n, p in lm.named_parameters() if n.endswith("po_coeff")])
    assert coeffs.numel() == 2 * 2 * 8 * 32 and 0.4 < coeffs.std().item() < 0.6
    torch.manual_seed(0)
    own = mqar.build("pom-2x8", 32, mqar.parse_args(["--quick"]))
    assert max(p.abs().max().item() for n, p in own.named_parameters() if n.endswith("po_coeff")) <= 1.0001e-3
    argv = ["--quick", "--models", "pom-2x2", "--seq-lens", "32", "--threads", "1", "--out", str(tmp_path)]
    mqar.main(argv + ["--coeff-std", "0.5"])
    r = json.loads((tmp_path / "results.jsonl").read_text())
    assert r["coeff_std"] == 0.5 and mqar.key(r)[-1] == 0.5
    assert "N(0, s^2), s = 0.5" in (tmp_path / "mqar.md").read_text()
    with pytest.raises(SystemExit, match="initialized otherwise"):
        mqar.main(argv)
    with pytest.raises(SystemExit):
        mqar.parse_args(["--coeff-std", "-1"])
