"""PolymorpherLM: a causal language model of PoM blocks (optionally hybrid with attention blocks).

Decoding is recurrent: the prompt is processed in one parallel causal pass that also leaves every PoM
layer's state (the sum of its polynomial features and a token count), then tokens are produced one at a time
from those states. PoM memory is constant in the context length; attention layers of a hybrid keep a KV
cache (the last `window` positions when the attention is local).
"""
from typing import List, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .blocks import (KVCache, PoMCache, build_blocks, check_bool, check_int, check_rate, init_weights,
                     resolve_layer_pattern)

Cache = List[Union[PoMCache, KVCache]]


class PolymorpherLM(nn.Module):
    """Causal LM: token embedding -> blocks (pattern of PoM 'P' / attention 'A') -> final norm -> head.

    PolymorpherLM(num_tokens, dim, depth, degree=2, expand=2, n_sel_heads=1, ...).
    forward(tokens: (B, T) long, targets: (B, T) long | None) -> logits (B, T, V), or (logits, loss) with
    targets (cross-entropy, positions with target ignore_index=-100 skipped).
    Positions: PoM blocks are order-aware through the causal mask and their short causal convolution
    (conv_size), and with rope="1d" through rotary positions in the mixer (PoMRoPE; sequences up to rope_max_len
    tokens, decoding included); attention blocks use rotary embeddings. No learned absolute positions.
    conv_skip=True: every PoM block adds its convolution's output, weighted per channel, to the mixer's output
    (PolymorpherBlock).
    """

    def __init__(self, num_tokens: int, dim: int, depth: int, degree: int = 2, expand: int = 2,
                 n_sel_heads: int = 1, n_groups: int = 1, mlp_ratio: float = 4.0, conv_size: int = 4,
                 layer_pattern: Optional[str] = None, attn_every: Optional[int] = None,
                 n_heads: Optional[int] = None, window: Optional[int] = None, tie_embeddings: bool = True,
                 bias: bool = False, dropout: float = 0.0, rope: Optional[str] = None, rope_max_len: int = 4096,
                 conv_skip: bool = False):
        super().__init__()
        owner = "pom_ext.models.PolymorpherLM"
        if rope not in (None, "1d"):
            raise ValueError(f"{owner}: argument 'rope' must be None or '1d' (a language model has 1-D positions), "
                             f"got {rope!r}")
        check_int(owner, "num_tokens", num_tokens, 1)
        check_int(owner, "dim", dim, 1)
        check_rate(owner, "dropout", dropout)
        check_bool(owner, "conv_skip", conv_skip)
        self.pattern = resolve_layer_pattern(depth, layer_pattern, attn_every, owner)
        self.num_tokens, self.dim, self.depth = num_tokens, dim, depth
        self.embed = nn.Embedding(num_tokens, dim)
        self.drop = nn.Dropout(dropout)
        self.blocks = build_blocks(dim, self.pattern, degree=degree, expand=expand, n_sel_heads=n_sel_heads,
                                   n_groups=n_groups, mlp_ratio=mlp_ratio, conv_size=conv_size, n_heads=n_heads,
                                   window=window, bias=bias, dropout=dropout, owner=owner, conv_skip=conv_skip,
                                   **({} if rope is None else dict(rope=rope, rope_max_len=rope_max_len)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_tokens, bias=False)
        init_weights(self, depth)
        if tie_embeddings:
            self.head.weight = self.embed.weight

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if exclude_embeddings else n

    def _check_tokens(self, name: str, tokens) -> None:
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype not in (torch.int64,
                                                                                             torch.int32):
            got = f"shape {tuple(tokens.shape)}, {tokens.dtype}" if isinstance(tokens, torch.Tensor) \
                else type(tokens).__name__
            raise ValueError(f"pom_ext.models.PolymorpherLM: argument '{name}' must be a (B, T) integer tensor, "
                             f"got {got}")
        if tokens.shape[1] == 0:
            raise ValueError(f"pom_ext.models.PolymorpherLM: argument '{name}' must hold at least one token")

    def _check_padding(self, tokens: torch.Tensor, attention_mask) -> None:
        if attention_mask is None:
            return
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != tokens.shape or \
                attention_mask.is_complex():
            got = f"shape {tuple(attention_mask.shape)}, {attention_mask.dtype}" \
                if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
            raise ValueError(f"pom_ext.models.PolymorpherLM: argument 'attention_mask' must be a (B, T) = "
                             f"{tuple(tokens.shape)} padding mask (1 / True: token, 0 / False: padding), got {got}")

    def forward(self, tokens: torch.Tensor, targets: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None):
        """attention_mask: (B, T) padding mask, 0 on padded positions (left or right padding): every row gives the
        logits it gives alone at its tokens."""
        self._check_tokens("tokens", tokens)
        self._check_padding(tokens, attention_mask)
        x = self.drop(self.embed(tokens))
        for block in self.blocks:
            x = block(x, mask="causal", weight=attention_mask)
        logits = self.head(self.norm(x))
        if targets is None:
            return logits
        if not isinstance(targets, torch.Tensor) or targets.shape != tokens.shape:
            raise ValueError(f"pom_ext.models.PolymorpherLM: argument 'targets' must have the shape of 'tokens' "
                             f"{tuple(tokens.shape)}, got "
                             f"{tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets)}")
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten().long(), ignore_index=-100)
        return logits, loss

    # ---- decoding ----

    def allocate_cache(self, batch_size: int, device=None, dtype: Optional[torch.dtype] = None) -> Cache:
        """One cache per block: PoMCache (constant size) or KVCache."""
        check_int("pom_ext.models.PolymorpherLM.allocate_cache", "batch_size", batch_size, 1)
        device = self.embed.weight.device if device is None else device
        dtype = self.embed.weight.dtype if dtype is None else dtype
        return [block.allocate_cache(batch_size, device, dtype) for block in self.blocks]

    def step(self, tokens: torch.Tensor, cache: Cache, attention_mask: Optional[torch.Tensor] = None
             ) -> torch.Tensor:
        """Causal continuation: tokens (B, T) after everything in `cache` (updated in place) -> logits (B, T, V).

        On a fresh cache this is the prefill: one parallel causal pass whose logits equal forward(tokens) and
        which leaves each PoM layer with the state of the whole prompt. T = 1 is one decoding step.
        attention_mask: (B, T) padding mask of the new tokens (a left-padded prompt), or None.
        """
        self._check_tokens("tokens", tokens)
        self._check_padding(tokens, attention_mask)
        if not isinstance(cache, (list, tuple)) or len(cache) != len(self.blocks):
            raise ValueError(f"pom_ext.models.PolymorpherLM: argument 'cache' must be the list of {len(self.blocks)} "
                             f"per-layer caches from allocate_cache, got {type(cache).__name__}")
        x = self.embed(tokens)
        for block, c in zip(self.blocks, cache):
            x = block.step(x, c, attention_mask)
        return self.head(self.norm(x))

    @staticmethod
    def _sample(logits: torch.Tensor, temperature: float, top_k: Optional[int],
                generator: Optional[torch.Generator]) -> torch.Tensor:
        if temperature == 0:
            return logits.argmax(-1, keepdim=True)
        logits = logits.float() / temperature
        if top_k is not None and top_k < logits.shape[-1]:
            kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: Optional[int] = None, *, use_cache: bool = True,
                 generator: Optional[torch.Generator] = None,
                 attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Continue prompt: (B, T) long by max_new_tokens tokens -> (B, T + max_new_tokens).

        temperature 0 is greedy decoding; top_k keeps the k most likely tokens. use_cache=True prefills the
        per-layer caches in one parallel pass and then decodes one token at a time (PoM memory constant in
        the context length); use_cache=False recomputes the full causal forward at every step.
        attention_mask: (B, T) padding mask of a left-padded batch of prompts: each row continues as it would alone.
        """
        owner = "pom_ext.models.PolymorpherLM.generate"
        self._check_tokens("prompt", prompt)
        self._check_padding(prompt, attention_mask)
        check_int(owner, "max_new_tokens", max_new_tokens, 0)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature < 0:
            raise ValueError(f"{owner}: argument 'temperature' must be a number >= 0 (0: greedy), got "
                             f"{temperature!r}")
        if top_k is not None:
            check_int(owner, "top_k", top_k, 1)
        if not use_cache:
            seq, mask = prompt, attention_mask
            for _ in range(max_new_tokens):
                nxt = self._sample(self(seq, attention_mask=mask)[:, -1], temperature, top_k, generator)
                seq = torch.cat([seq, nxt], dim=1)
                if mask is not None:
                    mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            return seq
        cache = self.allocate_cache(prompt.shape[0], prompt.device)
        logits = self.step(prompt, cache, attention_mask)[:, -1]  # prefill: one parallel causal pass
        out = [prompt]
        for i in range(max_new_tokens):
            out.append(self._sample(logits, temperature, top_k, generator))
            if i + 1 < max_new_tokens:
                logits = self.step(out[-1], cache)[:, -1]
        return torch.cat(out, dim=1)
