"""PoM into models people already have: `convert` replaces the self-attention of chosen layers of a Transformers
GPT-2, Llama-family (Llama, Qwen2, Mistral, ...) or BERT model with PoM layers of the same width; every other
weight stays. Decoders then generate with the PoM layers' constant-memory state kept in the model's Cache."""
from typing import Iterable, List, Optional

import torch
import torch.nn as nn
from transformers.cache_utils import Cache, EncoderDecoderCache

from ..layers import PoM
from ..models.blocks import PoMCache, pom_causal_step
from .cache import ConvertedPoMCacheLayer, install


def _chunk_padding(attention_mask, T: int, past: int) -> Optional[torch.Tensor]:
    """The (B, T) padding mask (True: token) of the T new tokens from the mask an attention layer receives, or None.

    2-D masks (flash-style) cover past + T positions. 4-D masks (B, 1, T, K) from Transformers' mask builders
    (bool True = attend, or float 0 = attend): query i attends to its own key unless it is padding; its key sits
    at column min(past, K - T) + i (K = past + T for dynamic caches, the static cache's length otherwise, the
    window for sliding layers)."""
    if attention_mask is None:
        return None
    if attention_mask.dim() == 2:
        w = attention_mask[:, -T:] != 0
    elif attention_mask.dim() == 4:
        K = attention_mask.shape[-1]
        i = torch.arange(T, device=attention_mask.device)
        diag = attention_mask[:, 0, i, min(past, K - T) + i]
        w = diag if diag.dtype == torch.bool else diag == 0
    else:
        raise ValueError(f"pom_ext.hf.PoMAttention: the attention mask must be 2-D or 4-D, got "
                         f"{tuple(attention_mask.shape)}")
    return None if bool(w.all()) else w


class PoMAttention(nn.Module):
    """A PoM layer where a Transformers self-attention module was: called as that module is called (hidden_states,
    attention_mask, cache, ... keyword arguments it does not need are ignored) and returning (output, None).

    causal=True (decoders): the causal PoM mixer; with a cache its state (running sum and count) lives in the
    cache's layer `layer_idx`, so generate() decodes with constant memory in this layer. causal=False (BERT-style
    encoders): the PoM mean over the sequence's tokens (padding excluded)."""

    def __init__(self, hidden_size: int, layer_idx: int, causal: bool, degree: int = 2, expand: int = 2,
                 n_sel_heads: int = 1, bias: bool = False):
        super().__init__()
        self.layer_idx, self.causal = layer_idx, causal
        self.pom = PoM(hidden_size, degree, expand, n_sel_heads=n_sel_heads, bias=bias)

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, cache: Optional[Cache] = None, **kwargs):
        T = hidden_states.shape[1]
        if not self.causal:
            w = _chunk_padding(attention_mask, T, 0)
            return self.pom(hidden_states, weight=w), None
        if isinstance(cache, EncoderDecoderCache):
            cache = cache.self_attention_cache
        if cache is None:
            return self.pom(hidden_states, mask="causal", weight=_chunk_padding(attention_mask, T, 0)), None
        B = hidden_states.shape[0]
        layer = install(cache, self.layer_idx, ConvertedPoMCacheLayer,
                        lambda: PoMCache(self.pom.allocate_state(B, hidden_states.device)))
        w = _chunk_padding(attention_mask, T, layer.seen_tokens)
        out = pom_causal_step(self.pom, hidden_states, layer.inner.state, w)
        layer.seen_tokens += T
        return out, None


def _attention_slots(model: nn.Module):
    """(the model's layers, the attribute of each layer's self-attention module, causal), by architecture."""
    cfg = model.config
    kind = getattr(cfg, "model_type", "")
    if kind == "gpt2":
        base = getattr(model, "transformer", model)
        return base.h, "attn", True
    if kind in ("bert", "roberta"):
        base = getattr(model, kind, model)
        return [layer.attention for layer in base.encoder.layer], "self", bool(getattr(cfg, "is_decoder", False))
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if layers is not None and all(hasattr(layer, "self_attn") for layer in layers):
        return layers, "self_attn", True
    raise ValueError(f"pom_ext.hf.convert: argument 'model' must be a GPT-2, Llama-family (model.layers[i].self_attn) "
                     f"or BERT model, got {type(model).__name__} (model_type {kind!r})")


def convert(model: nn.Module, layers: Optional[Iterable[int]] = None, *, degree: int = 2, expand: int = 2,
            n_sel_heads: int = 1, bias: bool = False) -> List[int]:
    """Replace the self-attention of `layers` (indices; all when None) of a Transformers GPT-2, Llama-family or
    BERT model with PoM layers (PoMAttention) of the model's hidden size, in place, on the model's device and in
    its dtype. Returns the replaced indices. The new layers start from pom_ext's initialization: fine-tune them."""
    slots, attr, causal = _attention_slots(model)
    n = len(slots)
    idx = list(range(n)) if layers is None else list(layers)
    for i in idx:
        if isinstance(i, bool) or not isinstance(i, int) or not -n <= i < n:
            raise ValueError(f"pom_ext.hf.convert: argument 'layers' must hold layer indices in [0, {n}), got {i!r}")
    hidden = model.config.hidden_size
    ref = next(model.parameters())
    done = []
    for i in sorted({i % n for i in idx}):
        old = getattr(slots[i], attr)
        layer_idx = getattr(old, "layer_idx", i)
        new = PoMAttention(hidden, layer_idx if layer_idx is not None else i, causal, degree, expand, n_sel_heads,
                           bias)
        setattr(slots[i], attr, new.to(ref.device, ref.dtype))
        done.append(i)
    return done
