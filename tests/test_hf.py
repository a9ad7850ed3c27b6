"""pom_ext.hf: Polymorpher models in Hugging Face Transformers (skipped without transformers).

Auto classes, generate() in every decoding mode against recomputation without the cache, left padding, save /
load, conversion to and from PolymorpherLM, sequence classification, gradient checkpointing, pipeline with a
tokenizer built here, Trainer, and PoM layers swapped into GPT-2, Llama-family and BERT models. Nothing is
downloaded: every model is a small random config.
"""
import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.0")
H = pytest.importorskip("pom_ext.hf")

from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM,  # noqa: E402
                          AutoModelForSequenceClassification)

import pom_ext  # noqa: E402
from pom_ext.models import PolymorpherLM  # noqa: E402

V = 64
CONFIGS = {
    "pom": dict(layer_pattern="P", num_hidden_layers=2),
    "pom_skip": dict(layer_pattern="P", num_hidden_layers=2, conv_skip=True, pom_degree=3),
    "pom_heads_noconv": dict(layer_pattern="P", num_hidden_layers=2, pom_gate_heads=4, conv_size=0, pom_degree=3),
    "hybrid": dict(layer_pattern="PPA", num_hidden_layers=3, num_attention_heads=2),
    "hybrid_local": dict(layer_pattern="PA", num_hidden_layers=4, num_attention_heads=2, sliding_window=4),
    "rope_hybrid": dict(layer_pattern="PPA", num_hidden_layers=3, num_attention_heads=2, pom_rope="1d", conv_size=0,
                        max_position_embeddings=64),
}
PADDABLE = [n for n in CONFIGS if "pom_rope" not in CONFIGS[n]]


def make(name, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    cfg = AutoConfig.for_model("polymorpher", vocab_size=V, hidden_size=32, pad_token_id=0, **CONFIGS[name])
    model = AutoModelForCausalLM.from_config(cfg).to(dtype).eval()
    with torch.no_grad():  # coefficients of order one, so that the PoM layers matter; skips (zeros at init) too
        for n, p in model.named_parameters():
            if n.endswith("po_coeff"):
                p.normal_(0, 0.5)
            if n.endswith(".skip"):
                assert not p.any()
                p.normal_()
    return model


def left_padded(prompts):
    T = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), T, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):] = p
        mask[b, T - len(p):] = 1
    return ids, mask


def test_auto_classes_and_defaults():
    cfg = AutoConfig.for_model("polymorpher", vocab_size=256, hidden_size=64, num_hidden_layers=2)
    assert isinstance(cfg, H.PolymorpherConfig) and cfg.layer_types == ["linear_attention"] * 2
    model = AutoModelForCausalLM.from_config(cfg)
    assert isinstance(model, H.PolymorpherForCausalLM)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert isinstance(AutoModel.from_config(cfg), H.PolymorpherModel)
    cls = AutoModelForSequenceClassification.from_config(cfg)
    assert isinstance(cls, H.PolymorpherForSequenceClassification)
    logits = model(torch.randint(0, 256, (2, 5))).logits
    assert logits.shape == (2, 5, 256) and torch.isfinite(logits).all()
    hyb = AutoConfig.for_model("polymorpher", num_hidden_layers=4, layer_pattern="PPPA", sliding_window=8)
    assert hyb.layer_types == ["linear_attention"] * 3 + ["sliding_attention"]
    with pytest.raises(ValueError, match="layer_pattern"):
        AutoConfig.for_model("polymorpher", num_hidden_layers=4, layer_pattern="PXA")
    with pytest.raises(ValueError, match="conv_skip"):
        AutoConfig.for_model("polymorpher", conv_skip="yes")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_generate_with_cache_equals_recompute(name):
    """Greedy, sampling (temperature, top-k, top-p) and beam search: generate() with the cache gives the tokens it
    gives recomputing the whole sequence at every step (use_cache=False); greedy equals a manual argmax loop."""
    model = make(name)
    ids = torch.randint(1, V, (2, 9), generator=torch.Generator().manual_seed(1))
    greedy = model.generate(ids, max_new_tokens=12, do_sample=False)
    manual = ids
    with torch.no_grad():
        for _ in range(12):
            manual = torch.cat([manual, model(manual, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(greedy, manual)
    assert torch.equal(greedy, model.generate(ids, max_new_tokens=12, do_sample=False, use_cache=False))
    for kw in (dict(do_sample=True, temperature=0.7, top_k=10, top_p=0.9),
               dict(do_sample=False, num_beams=3, num_return_sequences=2)):
        torch.manual_seed(5)
        a = model.generate(ids, max_new_tokens=10, **kw)
        torch.manual_seed(5)
        b = model.generate(ids, max_new_tokens=10, use_cache=False, **kw)
        assert torch.equal(a, b), kw


@pytest.mark.parametrize("name", PADDABLE)
def test_left_padded_batch_decodes_each_row_alone(name):
    model = make(name)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(1, V, (n,), generator=g) for n in (10, 6, 2)]
    ids, mask = left_padded(prompts)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    logits = model(ids, attention_mask=mask, use_cache=False).logits
    T = ids.shape[1]
    for b, p in enumerate(prompts):
        alone = model.generate(p[None], max_new_tokens=8, do_sample=False)
        assert torch.equal(out[b, T:], alone[0, len(p):]), f"row {b}"
        torch.testing.assert_close(logits[b, T - len(p):], model(p[None]).logits[0], rtol=1e-9, atol=1e-9)
    beams = model.generate(ids, attention_mask=mask, max_new_tokens=6, num_beams=2, do_sample=False)
    assert torch.equal(beams, model.generate(ids, attention_mask=mask, max_new_tokens=6, num_beams=2,
                                             do_sample=False, use_cache=False))


def test_right_padding_for_training():
    """Right padding: logits and loss gradients at the tokens are those of each row alone."""
    model = make("hybrid")
    g = torch.Generator().manual_seed(4)
    rows = [torch.randint(1, V, (n,), generator=g) for n in (8, 3)]
    ids = torch.zeros(2, 8, dtype=torch.long)
    mask = torch.zeros(2, 8, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, :len(r)] = r
        mask[b, :len(r)] = 1
    logits = model(ids, attention_mask=mask, use_cache=False).logits
    for b, r in enumerate(rows):
        torch.testing.assert_close(logits[b, :len(r)], model(r[None], use_cache=False).logits[0], rtol=1e-9,
                                   atol=1e-9)


def test_save_load_roundtrip_and_dtype(tmp_path):
    model = make("hybrid_local", dtype=torch.float32)
    ids = torch.randint(0, V, (2, 6))
    model.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert back.lm_head.weight is back.model.embed_tokens.weight
    for (n, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), n
    assert torch.equal(model(ids).logits, back(ids).logits)
    bf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert bf.model.embed_tokens.weight.dtype == torch.bfloat16 and torch.isfinite(bf(ids).logits).all()
    cls = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=3)
    assert cls(ids).logits.shape == (2, 3)


def test_weights_convert_both_ways_with_polymorpher_lm():
    torch.manual_seed(0)
    lm = PolymorpherLM(V, 32, 4, layer_pattern="PPPA", n_heads=2, window=5, n_sel_heads=4, degree=3,
                       conv_skip=True).double().eval()
    with torch.no_grad():  # skips (zeros at init) that add something; every weight off the float32 grid, so
        for block in lm.blocks[:3]:  # that a conversion through float32 shows
            block.skip.normal_()
        for p in lm.parameters():
            p.add_(torch.randn_like(p), alpha=1e-3)
    model = H.from_polymorpher_lm(lm).eval()
    assert model.config.conv_skip
    ids = torch.randint(0, V, (2, 11))
    torch.testing.assert_close(model(ids).logits, lm(ids), rtol=1e-12, atol=1e-12)
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), lm.generate(ids, 6, temperature=0))
    back = H.to_polymorpher_lm(model).eval()
    torch.testing.assert_close(back(ids), lm(ids), rtol=0, atol=0)
    with pytest.raises(ValueError, match="'lm'"):
        H.from_polymorpher_lm(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("pattern", ["PP", "PA", "AP"])
def test_biases_without_mlp_convert(pattern):
    """bias=True puts biases on every projection; without MLPs the conversion reads it from the mixers."""
    torch.manual_seed(0)
    lm = PolymorpherLM(V, 16, 2, layer_pattern=pattern, n_heads=2, bias=True, mlp_ratio=0).double().eval()
    model = H.from_polymorpher_lm(lm).eval()
    assert model.config.use_bias
    ids = torch.randint(0, V, (2, 7))
    torch.testing.assert_close(model(ids).logits, lm(ids), rtol=1e-12, atol=1e-12)


def test_past_key_values_return_dict_and_hidden_states():
    """Transformers' conventions: the cache under its older name `past_key_values` (deprecated, still honoured,
    never silently dropped), return_dict=False (argument or config) giving a tuple, output_hidden_states from the
    config, the last hidden state the normed one."""
    model = make("hybrid")
    ids = torch.randint(1, V, (2, 9), generator=torch.Generator().manual_seed(5))
    full = model(ids).logits
    first = model(ids[:, :4], use_cache=True)
    with pytest.warns(FutureWarning, match="past_key_values"):
        rest = model(ids[:, 4:], past_key_values=first.cache, use_cache=True)
    torch.testing.assert_close(torch.cat([first.logits, rest.logits], 1), full, rtol=1e-12, atol=1e-12)
    out = model(ids, labels=ids)
    loss, logits = model(ids, labels=ids, return_dict=False)[:2]
    assert torch.equal(loss, out.loss) and torch.equal(logits, out.logits)
    model.config.return_dict = False
    try:
        assert isinstance(model(ids), tuple)
    finally:
        model.config.return_dict = True
    base = model.model
    assert isinstance(base(ids, return_dict=False), tuple)
    states = base(ids, output_hidden_states=True).hidden_states
    assert len(states) == model.config.num_hidden_layers + 1
    assert torch.equal(states[-1], base(ids).last_hidden_state)
    model.config.output_hidden_states = True
    try:
        assert model(ids).hidden_states is not None
    finally:
        model.config.output_hidden_states = False


def test_rotary_pom_layers(tmp_path):
    """pom_rope='1d': PoMRoPE mixers whose decoding state turns each token at its position; the weights and the
    rotary tables convert both ways with PolymorpherLM(rope='1d') and survive save / load; padding is refused
    with an error naming attention_mask."""
    torch.manual_seed(0)
    lm = PolymorpherLM(V, 32, 3, layer_pattern="PPA", n_heads=2, conv_size=0, rope="1d", rope_max_len=48,
                       degree=3).double().eval()
    model = H.from_polymorpher_lm(lm).eval()
    assert model.config.pom_rope == "1d" and model.config.max_position_embeddings == 48
    assert isinstance(model.model.layers[0].mixer, pom_ext.PoMRoPE)
    ids = torch.randint(1, V, (2, 11))
    torch.testing.assert_close(model(ids).logits, lm(ids), rtol=1e-12, atol=1e-12)
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), lm.generate(ids, 6, temperature=0))
    torch.testing.assert_close(H.to_polymorpher_lm(model).eval()(ids), lm(ids), rtol=0, atol=0)
    model.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    for (n, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), n  # the rotary tables included
    torch.testing.assert_close(back(ids).logits, model(ids).logits, rtol=1e-12, atol=1e-12)
    without = PolymorpherLM(V, 32, 3, layer_pattern="PPA", n_heads=2, conv_size=0, degree=3).double().eval()
    without.load_state_dict({k: v for k, v in lm.state_dict().items() if "cos" not in k and "sin" not in k})
    assert not torch.allclose(without(ids), lm(ids))  # the rotation matters
    _, mask = left_padded([ids[0], ids[1, :5]])
    with pytest.raises(ValueError, match="attention_mask"):
        model.generate(torch.where(mask.bool(), 7, 0), attention_mask=mask, max_new_tokens=2)
    with pytest.raises(ValueError, match="pom_rope"):
        AutoConfig.for_model("polymorpher", pom_rope="2d")


def test_gradient_checkpointing_gives_the_same_gradients():
    model = make("hybrid", dtype=torch.float32).train()
    ids = torch.randint(0, V, (2, 10))
    loss = model(ids, labels=ids, use_cache=False).loss
    ref = torch.autograd.grad(loss, list(model.parameters()))
    model.activation_checkpointing_enable()
    loss2 = model(ids, labels=ids).loss
    got = torch.autograd.grad(loss2, list(model.parameters()))
    assert torch.equal(loss, loss2)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def byte_tokenizer():
    """A byte-level tokenizer built here (no download): <pad>, <bos>, <eos>, then the 256 bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(["<pad>", "<bos>", "<eos>"] + alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<pad>", "<bos>", "<eos>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   padding_side="left")


def test_pipeline_and_trainer(tmp_path):
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments, pipeline
    tok = byte_tokenizer()
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("polymorpher", vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                               layer_pattern="PA", num_attention_heads=2, pad_token_id=tok.pad_token_id,
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = AutoModelForCausalLM.from_config(cfg)
    texts = ["the cat sat on the mat. " * 3, "a dog ran in the park. " * 3] * 16
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", save_strategy="no",
                             per_device_train_batch_size=8, max_steps=20, learning_rate=3e-3, logging_steps=5,
                             disable_tqdm=True, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=[tok(t) for t in texts],
                      data_collator=DataCollatorForLanguageModeling(tok, mlm=False), processing_class=tok)
    result = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0] and result.global_step == 20
    gen = pipeline("text-generation", model=model.eval(), tokenizer=tok, device="cpu")
    outs = gen(["the cat", "a dog ran"], max_new_tokens=8, do_sample=False, batch_size=2)
    assert len(outs) == 2 and all(o[0]["generated_text"].startswith(p) for o, p in zip(outs, ["the cat", "a dog ran"]))


# ---- PoM layers in models people already have ----

def stock(kind):
    from transformers import (BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                              MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)
    torch.manual_seed(0)
    small = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=128, eos_token_id=None, bos_token_id=None)
    if kind == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=32, n_layer=3, n_head=4, n_positions=128,
                                          eos_token_id=None, bos_token_id=None))
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**small))
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**small))
    if kind == "mistral":
        return MistralForCausalLM(MistralConfig(sliding_window=4, **small))
    return BertModel(BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64, max_position_embeddings=64))


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2", "mistral"])
@pytest.mark.parametrize("layers", [[0], [1, 2], [0, 1, 2]])
def test_convert_decoders(kind, layers):
    """Chosen layers' attention replaced by PoM: every other weight kept, the model trains, and generate() with
    the PoM state in the cache equals recomputation, for a left-padded batch too (each row as alone)."""
    model = stock(kind).double()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert H.convert(model, layers) == layers
    kept = {n: p for n, p in model.named_parameters() if ".pom." not in n}
    assert set(kept) == {n for n in before if not any(f".{i}." in n and ("attn" in n) for i in layers)}
    for n, p in kept.items():
        assert torch.equal(p, before[n]), n
    assert sum(isinstance(m, H.PoMAttention) for m in model.modules()) == len(layers)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, H.PoMAttention):
                m.pom.po_coeff.normal_(0, 0.5)
    model.eval()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, V, (2, 9), generator=g)
    a = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(a, model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False))
    b = model.generate(ids, max_new_tokens=6, num_beams=2, do_sample=False)
    assert torch.equal(b, model.generate(ids, max_new_tokens=6, num_beams=2, do_sample=False, use_cache=False))
    prompts = [torch.randint(1, V, (n,), generator=g) for n in (9, 4)]
    pids, mask = left_padded(prompts)
    out = model.generate(pids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    for r, p in enumerate(prompts):
        assert torch.equal(out[r, pids.shape[1]:], model.generate(p[None], max_new_tokens=6, do_sample=False)[0,
                                                                                                           len(p):])
    model.train()
    loss = model(ids, labels=ids).loss
    loss.backward()
    pom_grads = [p.grad for n, p in model.named_parameters() if ".pom." in n]
    assert pom_grads and all(gr is not None and torch.isfinite(gr).all() for gr in pom_grads)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])  # tied and untied embeddings
def test_converted_model_reloads_by_converting_again(kind, tmp_path):
    """The reload path docs/hf.md gives: the original model, converted with the same arguments, then the saved
    weights through safetensors' load_model, strict."""
    from safetensors.torch import load_model
    model = stock(kind).double()
    H.convert(model, [0, 2], n_sel_heads=4)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, H.PoMAttention):
                m.pom.po_coeff.normal_(0, 0.5)
    model.save_pretrained(tmp_path)
    torch.manual_seed(1)
    again = stock(kind).double()
    H.convert(again, [0, 2], n_sel_heads=4)
    missing, unexpected = load_model(again, str(tmp_path / "model.safetensors"), strict=True)
    assert not missing and not unexpected
    ids = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(again.eval()(ids).logits, model.eval()(ids).logits, rtol=0, atol=0)


def test_convert_bert_encoder():
    """BERT: the PoM mean over each sequence's tokens; right padding changes nothing at the tokens."""
    model = stock("bert").double().eval()
    H.convert(model, [0, 1], n_sel_heads=4)
    ids = torch.randint(1, V, (1, 7))
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1)
    mask = torch.tensor([[1] * 7 + [0] * 3])
    a = model(ids).last_hidden_state
    b = model(padded, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(b[:, :7], a, rtol=1e-9, atol=1e-9)


def test_convert_errors():
    with pytest.raises(ValueError, match="'model'"):
        H.convert(make("pom"))
    with pytest.raises(ValueError, match="'layers'"):
        H.convert(stock("gpt2"), [5])
