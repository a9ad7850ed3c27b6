"""pom_ext.hf.PolymorpherConfig checks its fields (skipped without transformers).

A value the model cannot be built with raises ValueError naming the config field when the config is built (from
keywords or a saved config.json) and when it is saved; the edge values the model accepts are accepted, and the
model builds and runs on them. Nothing is downloaded: every model is a tiny random config.
"""
import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.0")
H = pytest.importorskip("pom_ext.hf")

from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

PA = dict(layer_pattern="PA", num_hidden_layers=2)  # a hybrid: the attention fields apply
BAD = [
    # (field the error names, config keywords)
    ("vocab_size", dict(vocab_size=0)),
    ("vocab_size", dict(vocab_size=-1)),
    ("vocab_size", dict(vocab_size=64.0)),
    ("vocab_size", dict(vocab_size=True)),
    ("vocab_size", dict(vocab_size="64")),
    ("vocab_size", dict(vocab_size=None)),
    ("hidden_size", dict(hidden_size=0)),
    ("hidden_size", dict(hidden_size=-16)),
    ("hidden_size", dict(hidden_size=16.0)),
    ("hidden_size", dict(hidden_size=True)),
    ("hidden_size", dict(hidden_size=None)),
    ("num_hidden_layers", dict(num_hidden_layers=0)),
    ("num_hidden_layers", dict(num_hidden_layers=-2)),
    ("num_hidden_layers", dict(num_hidden_layers=2.0)),
    ("num_hidden_layers", dict(num_hidden_layers=True)),
    ("intermediate_size", dict(intermediate_size=-1)),
    ("intermediate_size", dict(intermediate_size=64.0)),
    ("intermediate_size", dict(intermediate_size=False)),
    ("num_attention_heads", dict(PA, num_attention_heads=0)),
    ("num_attention_heads", dict(num_attention_heads=0)),  # a number of heads even without attention layers
    ("num_attention_heads", dict(PA, num_attention_heads=2.0)),
    ("num_attention_heads", dict(PA, num_attention_heads=True)),
    ("num_attention_heads", dict(PA, hidden_size=32, num_attention_heads=3)),  # does not divide hidden_size
    ("num_attention_heads", dict(PA, hidden_size=32, num_attention_heads=32)),  # odd head size (rotary)
    ("num_attention_heads", dict(PA, hidden_size=200)),  # the default, 200 // 64 = 3 heads, does not divide
    ("sliding_window", dict(PA, sliding_window=0)),
    ("sliding_window", dict(PA, sliding_window=-4)),
    ("sliding_window", dict(PA, sliding_window=4.0)),
    ("sliding_window", dict(PA, sliding_window=True)),
    ("sliding_window", dict(sliding_window=4)),  # no attention layer
    ("layer_pattern", dict(num_hidden_layers=4, layer_pattern="PXA")),
    ("layer_pattern", dict(layer_pattern="")),
    ("layer_pattern", dict(layer_pattern=3)),
    ("layer_pattern", dict(num_hidden_layers=4, layer_pattern="PPA")),  # length does not divide the depth
    ("pom_degree", dict(pom_degree=0)),
    ("pom_degree", dict(pom_degree=2.0)),
    ("pom_degree", dict(pom_degree=True)),
    ("pom_expand", dict(pom_expand=0)),
    ("pom_expand", dict(pom_expand=-1)),
    ("pom_expand", dict(pom_expand=1.5)),
    ("pom_gate_heads", dict(pom_gate_heads=-1)),
    ("pom_gate_heads", dict(pom_gate_heads=1.0)),
    ("pom_gate_heads", dict(hidden_size=32, pom_gate_heads=3)),  # does not divide pom_expand * hidden_size = 64
    ("pom_gate_heads", dict(hidden_size=24, pom_expand=1, pom_gate_heads=3, pom_rope="1d")),  # odd (rotary)
    ("pom_gate_heads", dict(hidden_size=32, pom_gate_heads=64, pom_rope="1d")),  # head width 1 (rotary)
    ("pom_groups", dict(pom_groups=0)),
    ("pom_groups", dict(pom_groups=2.0)),
    ("pom_groups", dict(hidden_size=32, pom_groups=3)),  # does not divide hidden_size
    ("pom_expand", dict(hidden_size=3, pom_expand=1, pom_rope="1d")),  # odd state width (rotary)
    ("conv_size", dict(conv_size=-1)),
    ("conv_size", dict(conv_size=4.0)),
    ("conv_size", dict(conv_size=True)),
    ("conv_skip", dict(conv_skip="yes")),
    ("conv_skip", dict(conv_skip=1)),
    ("pom_rope", dict(pom_rope="2d")),
    ("pom_rope", dict(pom_rope=True)),
    ("max_position_embeddings", dict(max_position_embeddings=0)),
    ("max_position_embeddings", dict(max_position_embeddings=64.0)),
    ("use_bias", dict(use_bias=1)),
    ("use_bias", dict(use_bias="no")),
    ("dropout", dict(dropout=1.0)),
    ("dropout", dict(dropout=-0.1)),
    ("dropout", dict(dropout=True)),
    ("dropout", dict(dropout="0.1")),
    ("initializer_range", dict(initializer_range=-0.02)),
    ("initializer_range", dict(initializer_range=math.nan)),
    ("initializer_range", dict(initializer_range=math.inf)),
    ("initializer_range", dict(initializer_range="0.02")),
    ("initializer_range", dict(initializer_range=True)),
    ("use_cache", dict(use_cache="yes")),
    ("tie_word_embeddings", dict(tie_word_embeddings=0)),
    ("pad_token_id", dict(pad_token_id=1.0)),
    ("pad_token_id", dict(pad_token_id=True)),
    ("bos_token_id", dict(bos_token_id="1")),
    ("eos_token_id", dict(eos_token_id=2.0)),
    ("eos_token_id", dict(eos_token_id=[1, "2"])),
    ("eos_token_id", dict(eos_token_id=[])),
]

GOOD = {  # edge values the model accepts
    "tiny": dict(vocab_size=1, hidden_size=1, num_hidden_layers=1, conv_size=0),
    "no_mlp_conv1": dict(intermediate_size=0, conv_size=1),
    "degree1_expand1_gate0": dict(pom_degree=1, pom_expand=1, pom_gate_heads=0),
    "gate_heads_groups": dict(hidden_size=8, pom_gate_heads=16, pom_groups=8),
    "window1_head_size2": dict(PA, hidden_size=8, num_attention_heads=4, sliding_window=1),
    "attention_only": dict(layer_pattern="A", num_hidden_layers=2, hidden_size=4, num_attention_heads=2),
    "lowercase_tiled": dict(layer_pattern="pa", num_hidden_layers=4, hidden_size=8),
    "pom_only_default_heads_not_dividing": dict(hidden_size=200, num_hidden_layers=1),  # 3 heads, unused
    "rope_edge": dict(hidden_size=8, pom_expand=1, pom_gate_heads=4, pom_rope="1d", max_position_embeddings=1,
                      conv_size=0),
    "rates_and_ids": dict(dropout=0, initializer_range=0, use_bias=True, use_cache=False, tie_word_embeddings=False,
                          pad_token_id=0, bos_token_id=1, eos_token_id=[1, 2], conv_skip=True),
}


@pytest.mark.parametrize("field,kwargs", BAD, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BAD)])
def test_bad_field_raises_naming_it(field, kwargs):
    kwargs = dict(dict(vocab_size=16, hidden_size=16, num_hidden_layers=1), **kwargs)
    with pytest.raises(ValueError, match=rf"arguments? '{field}'"):
        H.PolymorpherConfig(**kwargs)


@pytest.mark.parametrize("name", list(GOOD))
def test_edge_values_accepted_and_model_builds(name):
    kwargs = dict(dict(vocab_size=16, hidden_size=16, num_hidden_layers=1), **GOOD[name])
    cfg = AutoConfig.for_model("polymorpher", **kwargs)
    assert isinstance(cfg, H.PolymorpherConfig)
    for k, v in GOOD[name].items():
        assert getattr(cfg, k) == v
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    T = min(3, cfg.max_position_embeddings)
    with torch.no_grad():
        logits = model(torch.randint(0, cfg.vocab_size, (2, T))).logits
    assert logits.shape == (2, T, cfg.vocab_size) and torch.isfinite(logits).all()


def test_defaults_valid_and_round_trip(tmp_path):
    cfg = H.PolymorpherConfig()
    assert cfg.intermediate_size == 4 * cfg.hidden_size and cfg.num_attention_heads == max(1, cfg.hidden_size // 64)
    cfg.save_pretrained(tmp_path)
    for load in (AutoConfig.from_pretrained, H.PolymorpherConfig.from_pretrained):
        back = load(tmp_path)
        assert isinstance(back, H.PolymorpherConfig)
        a, b = cfg.to_dict(), back.to_dict()
        a.pop("_name_or_path", None), b.pop("_name_or_path", None)
        assert a == b


def test_non_default_config_round_trips(tmp_path):
    cfg = H.PolymorpherConfig(vocab_size=64, hidden_size=32, num_hidden_layers=4, layer_pattern="PPPA",
                              num_attention_heads=2, sliding_window=8, pom_degree=3, pom_gate_heads=4, pom_groups=2,
                              conv_skip=True, pad_token_id=0, eos_token_id=[1, 2])
    cfg.save_pretrained(tmp_path)
    back = AutoConfig.from_pretrained(tmp_path)
    assert back.layer_types == cfg.layer_types == ["linear_attention"] * 3 + ["sliding_attention"]
    for k in ("hidden_size", "num_attention_heads", "sliding_window", "pom_degree", "pom_gate_heads", "pom_groups",
              "conv_skip", "eos_token_id", "intermediate_size"):
        assert getattr(back, k) == getattr(cfg, k)


def test_bad_saved_config_refused_on_load(tmp_path):
    H.PolymorpherConfig(hidden_size=32, num_hidden_layers=2).save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    d = json.loads(path.read_text())
    d["hidden_size"] = -16
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError, match="'hidden_size'"):
        AutoConfig.from_pretrained(tmp_path)


def test_changed_config_checked_on_save_and_model_build(tmp_path):
    """Values set after the config was built — assignments, from_pretrained's keyword overrides — are checked
    when it is saved and when a model is built from it; layer_types follows the pattern."""
    cfg = H.PolymorpherConfig(hidden_size=32, num_hidden_layers=2)
    cfg.pom_groups = 3
    with pytest.raises(ValueError, match="'pom_groups'"):
        cfg.save_pretrained(tmp_path)
    assert not (tmp_path / "config.json").exists()
    cfg.pom_groups = 1
    cfg.num_hidden_layers = 4
    cfg.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert loaded.num_hidden_layers == 4 and loaded.layer_types == ["linear_attention"] * 4
    over = AutoConfig.from_pretrained(tmp_path, layer_pattern="PA", num_attention_heads=2)
    model = AutoModelForCausalLM.from_config(over)
    assert over.pattern == "PAPA" and over.layer_types[1] == "full_attention"
    assert [type(b).__name__ for b in model.model.layers] == ["PolymorpherBlock", "AttentionBlock"] * 2
    with pytest.raises(ValueError, match="'pom_groups'"):
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tmp_path, pom_groups=3))
