"""Polymorpher models: recurrent decoding equals the causal forward, constant PoM decode memory, encoder masks,
a few training steps, argument errors."""
import pytest
import torch

from pom_ext.models import (AttentionBlock, PolymorpherBlock, PolymorpherEncoder, PolymorpherLM,
                            resolve_layer_pattern)

V = 37
MODELS = {
    "pom": dict(),
    "pom_heads_noconv": dict(n_sel_heads=4, conv_size=0, expand=1, degree=3),
    "pom_skip": dict(conv_skip=True, degree=3),
    "hybrid_local": dict(layer_pattern="PA", n_heads=2, window=6),
    "hybrid_every": dict(attn_every=2, n_heads=4),
    "attention": dict(layer_pattern="A", n_heads=2),
}


def make_lm(name: str, depth: int = 2, dim: int = 32) -> PolymorpherLM:
    torch.manual_seed(0)
    model = PolymorpherLM(V, dim, depth, **MODELS[name]).eval()
    with torch.no_grad():  # larger PoM coefficients than the tiny initial ones, so that mixing matters
        for m in model.modules():
            if isinstance(m, PolymorpherBlock):
                m.mixer.po_coeff.normal_(0, 0.5)
                if m.skip is not None:  # zeros at init: a skip that adds something
                    m.skip.normal_(0, 1.0)
    return model


def cache_tensors(cache):
    return [t for c in cache for t in c.tensors()]


@pytest.mark.parametrize("name", list(MODELS))
def test_chunked_steps_equal_forward(name):
    model = make_lm(name)
    x = torch.randint(0, V, (3, 17))
    ref = model(x)
    cache = model.allocate_cache(3)
    outs = [model.step(x[:, a:b], cache) for a, b in ((0, 7), (7, 8), (8, 11), (11, 12), (12, 17))]
    torch.testing.assert_close(torch.cat(outs, 1), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list(MODELS))
def test_greedy_generation_with_cache_equals_recompute(name):
    model = make_lm(name)
    prompt = torch.randint(0, V, (2, 9))
    fast = model.generate(prompt, 20, temperature=0)
    manual = prompt
    for _ in range(20):  # recompute the full causal forward at every step
        manual = torch.cat([manual, model(manual)[:, -1].argmax(-1, keepdim=True)], 1)
    assert fast.shape == (2, 29)
    assert torch.equal(fast, manual)
    if name == "pom":
        assert torch.equal(model.generate(prompt, 20, temperature=0, use_cache=False), manual)


def _left_padded(prompts, pad_id=0):
    """A left-padded batch of 1-D prompts and its 0 / 1 attention mask."""
    T = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for b, p in enumerate(prompts):
        tokens[b, T - len(p):] = p
        mask[b, T - len(p):] = 1
    return tokens, mask


@pytest.mark.parametrize("name", list(MODELS))
def test_left_padded_batch_equals_rows_alone(name):
    """A left-padded batch with its attention mask: the logits at each row's tokens, the greedy continuation with
    the cache (prefill of the padded prompt, then steps) and without it are each row's own."""
    model = make_lm(name).double()
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, V, (n,), generator=g) for n in (11, 5, 1)]
    tokens, mask = _left_padded(prompts)
    tokens[mask == 0] = torch.randint(1, V, (int((mask == 0).sum()),), generator=g)  # padding content is ignored
    logits = model(tokens, attention_mask=mask)
    fast = model.generate(tokens, 8, temperature=0, attention_mask=mask)
    slow = model.generate(tokens, 8, temperature=0, attention_mask=mask, use_cache=False)
    assert torch.equal(fast, slow)
    T = tokens.shape[1]
    for b, p in enumerate(prompts):
        alone = model(p[None])
        torch.testing.assert_close(logits[b, T - len(p):], alone[0], rtol=1e-10, atol=1e-10)
        assert torch.equal(fast[b, T:], model.generate(p[None], 8, temperature=0)[0, len(p):])


def test_cache_rows_can_be_selected():
    """select_ on every block's cache (beam search reorders rows): continuing from the selected rows equals
    continuing those rows' own caches."""
    model = make_lm("hybrid_local").double()
    x = torch.randint(0, V, (3, 9))
    cache = model.allocate_cache(3)
    model.step(x, cache)
    idx = torch.tensor([2, 0, 0])
    picked = [c.select_(idx) for c in cache]
    nxt = torch.randint(0, V, (3, 1))
    ref = model.allocate_cache(3)
    model.step(x[idx], ref)
    torch.testing.assert_close(model.step(nxt, picked), model.step(nxt, ref), rtol=1e-12, atol=1e-12)


def test_sampling_is_seeded_and_top_k_restricts():
    model = make_lm("hybrid_local")
    prompt = torch.randint(0, V, (2, 5))
    a = model.generate(prompt, 12, temperature=0.8, top_k=5, generator=torch.Generator().manual_seed(1))
    b = model.generate(prompt, 12, temperature=0.8, top_k=5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    one = model.generate(prompt, 12, temperature=1.0, top_k=1)
    assert torch.equal(one, model.generate(prompt, 12, temperature=0))


def test_prefill_state_equals_causal_state():
    model = make_lm("pom")
    x = torch.randint(0, V, (2, 13))
    parallel, serial = model.allocate_cache(2), model.allocate_cache(2)
    model.step(x, parallel)
    for t in range(x.shape[1]):
        model.step(x[:, t:t + 1], serial)
    emb = model.embed(x)
    for block, p, s in zip(model.blocks, parallel, serial):
        assert torch.equal(p.state.count, torch.full((2,), 13))
        torch.testing.assert_close(p.state.sum, s.state.sum, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(p.conv, s.conv)
        # the state's mean is the causal mean at the last position
        u = block._conv(block.norm1(emb))
        h, _ = block.mixer.project(u)
        from pom_ext import functional as PF
        H = PF.aggregate(h, block.mixer.po_coeff, "causal")[:, -1]
        torch.testing.assert_close(p.state.mean(), H.float(), rtol=1e-5, atol=1e-6)
        emb = block(emb, mask="causal")


def test_pom_decode_memory_is_constant():
    model = make_lm("pom", depth=2, dim=16)
    cache = model.allocate_cache(2)
    tok = torch.randint(0, V, (2, 1))
    sizes = {}
    with torch.no_grad():
        for t in range(1, 1001):
            tok = model.step(tok, cache)[:, -1].argmax(-1, keepdim=True)
            if t in (10, 1000):
                sizes[t] = [(tuple(x.shape), x.numel() * x.element_size()) for x in cache_tensors(cache)]
    assert sizes[10] == sizes[1000]
    assert sum(b for _, b in sizes[1000]) == sum(b for _, b in sizes[10])
    assert all(int(c.state.count[0]) == 1000 for c in cache)


def test_local_attention_kv_cache_is_bounded():
    model = make_lm("hybrid_local")
    cache = model.allocate_cache(1)
    model.step(torch.randint(0, V, (1, 20)), cache)
    with torch.no_grad():
        for _ in range(30):
            model.step(torch.randint(0, V, (1, 1)), cache)
    kv = [c for c, kind in zip(cache, model.pattern) if kind == "A"]
    assert all(c.k.shape[2] == 6 and c.pos == 50 for c in kv)


def test_block_forward_modes():
    torch.manual_seed(0)
    x = torch.randn(2, 11, 24)
    for block in (PolymorpherBlock(24, 3, 2, conv_size=3), AttentionBlock(24, 4, window=4)):
        block.eval()
        for mask in (None, "causal", torch.rand(2, 11) > 0.3, torch.rand(2, 11, 11) > 0.5):
            assert block(x, mask=mask).shape == x.shape
        cache = block.allocate_cache(2)
        torch.testing.assert_close(torch.cat([block.step(x[:, :5], cache), block.step(x[:, 5:], cache)], 1),
                                   block(x, mask="causal"), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("pattern", ["P", "PA"])
@pytest.mark.parametrize("pool", ["mean", "cls"])
def test_encoder_tokens_padding_is_ignored(pattern, pool):
    torch.manual_seed(0)
    enc = PolymorpherEncoder(5, 32, 2, num_tokens=V, max_len=16, layer_pattern=pattern, n_heads=2, pool=pool).eval()
    x = torch.randint(0, V, (3, 12))
    mask = torch.ones(3, 12, dtype=torch.bool)
    mask[0, 7:] = False
    mask[2, 3:] = False
    out = enc(x, mask)
    assert out.shape == (3, 5)
    y = x.clone()
    y[~mask] = (y[~mask] + 1) % V
    torch.testing.assert_close(enc(y, mask), out)
    torch.testing.assert_close(enc(x[:1, :7]), out[:1], rtol=1e-4, atol=1e-5)
    assert enc.features(x, mask).shape == (3, 12 + (pool == "cls"), 32)
    weights = mask.float() * (0.5 if pool == "mean" else 1.0)  # the class token has weight 1
    torch.testing.assert_close(enc(x, weights), out, rtol=1e-4, atol=1e-5)


def test_encoder_images():
    torch.manual_seed(0)
    enc = PolymorpherEncoder(10, 48, 2, image_size=(16, 24), patch_size=4, in_chans=3, attn_every=2, n_heads=3)
    img = torch.randn(2, 3, 16, 24)
    out = enc(img)
    assert out.shape == (2, 10)
    assert enc.features(img).shape == (2, 4 * 6, 48)
    out.sum().backward()
    assert enc.embed.proj.weight.grad is not None


def test_lm_trains_on_toy_task():
    torch.manual_seed(0)
    model = PolymorpherLM(16, 48, 2, degree=2, expand=2)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        start = torch.randint(0, 16, (16, 1))
        seq = (start + torch.arange(33)) % 16  # counting modulo 16: next token is determined by the last
        _, loss = model(seq[:, :-1], seq[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5


def test_hybrid_lm_gradients_reach_every_parameter():
    model = make_lm("hybrid_local").train()
    x = torch.randint(0, V, (2, 10))
    _, loss = model(x, x)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_layer_patterns():
    assert resolve_layer_pattern(8, "PPPA") == "PPPAPPPA"
    assert resolve_layer_pattern(6, attn_every=3) == "PPAPPA"
    assert resolve_layer_pattern(3) == "PPP"
    assert make_lm("hybrid_every", depth=4).pattern == "PAPA"
    assert PolymorpherLM(V, 32, 4, layer_pattern="pa", n_heads=2).pattern == "PAPA"


@pytest.mark.parametrize("kwargs, arg", [
    (dict(layer_pattern="PXA"), "layer_pattern"),
    (dict(layer_pattern="PPA"), "layer_pattern"),
    (dict(layer_pattern="PA", attn_every=2), "attn_every"),
    (dict(attn_every=0), "attn_every"),
    (dict(window=4), "window"),
    (dict(layer_pattern="A", n_heads=3), "n_heads"),
    (dict(layer_pattern="A", window=0), "window"),
    (dict(degree=0), "degree"),
    (dict(expand=1.5), "expand"),
    (dict(conv_size=-1), "conv_size"),
    (dict(dropout=1.0), "dropout"),
    (dict(conv_skip=1), "conv_skip"),
])
def test_lm_bad_arguments(kwargs, arg):
    with pytest.raises(ValueError, match=f"'{arg}'"):
        PolymorpherLM(V, 32, 4, **kwargs)


def test_bad_call_arguments():
    model = make_lm("pom")
    prompt = torch.randint(0, V, (1, 4))
    with pytest.raises(ValueError, match="'tokens'"):
        model(torch.randn(1, 4))
    with pytest.raises(ValueError, match="'targets'"):
        model(prompt, prompt[:, :2])
    with pytest.raises(ValueError, match="'max_new_tokens'"):
        model.generate(prompt, -1)
    with pytest.raises(ValueError, match="'temperature'"):
        model.generate(prompt, 3, temperature=-1.0)
    with pytest.raises(ValueError, match="'top_k'"):
        model.generate(prompt, 3, top_k=0)
    with pytest.raises(ValueError, match="'prompt'"):
        model.generate(prompt[0], 3)
    with pytest.raises(ValueError, match="'cache'"):
        model.step(prompt, model.allocate_cache(1)[:1])
    with pytest.raises(ValueError, match="'num_tokens'"):
        PolymorpherEncoder(3, 32, 2, num_tokens=V, max_len=8, patch_size=4, image_size=16)
    with pytest.raises(ValueError, match="'max_len'"):
        PolymorpherEncoder(3, 32, 2, num_tokens=V)
    with pytest.raises(ValueError, match="'patch_size'"):
        PolymorpherEncoder(3, 32, 2, patch_size=5, image_size=16)
    with pytest.raises(ValueError, match="'pool'"):
        PolymorpherEncoder(3, 32, 2, num_tokens=V, max_len=8, pool="max")
    enc = PolymorpherEncoder(3, 32, 2, num_tokens=V, max_len=8)
    with pytest.raises(ValueError, match="'x'"):
        enc(torch.randint(0, V, (2, 9)))
    with pytest.raises(ValueError, match="'mask'"):
        enc(torch.randint(0, V, (2, 8)), torch.ones(2, 7, dtype=torch.bool))


def test_conv_skip():
    """conv_skip adds skip * conv(norm1(x)) to the mixer's output: a zero-initialized per-channel parameter (the block
    starts as without it; without the option the block has no such parameter, so state dicts keep their keys); the
    gradient reaches it; the block scripts with and without it."""
    torch.manual_seed(0)
    plain = PolymorpherBlock(16, degree=3, conv_size=4).double()
    block = PolymorpherBlock(16, degree=3, conv_size=4, conv_skip=True).double()
    assert "skip" not in dict(plain.named_parameters()) and block.skip.shape == (16,) and not block.skip.any()
    state = plain.state_dict()
    block.load_state_dict({**state, "skip": block.skip.detach()}, strict=True)
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    torch.testing.assert_close(block(x, mask="causal"), plain(x, mask="causal"), rtol=0, atol=0)
    with torch.no_grad():
        block.skip.normal_()
    u = block._conv(block.norm1(x))
    expected = plain._mlp(x + plain.mixer(u, mask="causal") + block.skip * u)
    torch.testing.assert_close(block(x, mask="causal"), expected, rtol=1e-12, atol=1e-12)
    block(x, mask="causal").sum().backward()
    assert block.skip.grad is not None and block.skip.grad.abs().sum() > 0
    for b in (plain, block):
        scripted = torch.jit.script(b)
        torch.testing.assert_close(scripted(x, "causal"), b(x, mask="causal"), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="'conv_skip'"):
        PolymorpherBlock(16, conv_skip="yes")
