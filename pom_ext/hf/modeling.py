"""Polymorpher models in Transformers: the blocks of pom_ext.models (PoM blocks, attention blocks) behind
Transformers' model classes, generate(), save_pretrained / from_pretrained and the Trainer."""
import functools
import math
from typing import Optional

import torch
import torch.nn as nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GenericForSequenceClassification
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg

from ..layers import PoM
from ..models.blocks import AttentionBlock, PolymorpherBlock, build_blocks
from ..models.lm import PolymorpherLM
from .cache import AttentionCacheLayer, PoMCacheLayer, install
from .configuration import PolymorpherConfig


def _padding(attention_mask, T: int) -> Optional[torch.Tensor]:
    """The (B, T) padding mask of the T new tokens from the attention_mask generate() or a user passes: a (B, past +
    T) 2-D mask (1 / True: token), a dict of masks per layer type (pre-built by generate for compileable caches),
    or None (no padding). None as well when nothing is padded."""
    if isinstance(attention_mask, dict):
        attention_mask = next((m for m in attention_mask.values() if isinstance(m, torch.Tensor) and m.dim() == 2),
                              None)
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2 or attention_mask.shape[1] < T:
        raise ValueError(f"pom_ext.hf: argument 'attention_mask' must be a (B, N) padding mask covering the {T} new "
                         f"tokens (1: token, 0: padding), got "
                         f"{tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else attention_mask}")
    w = attention_mask[:, -T:]
    if torch.compiler.is_compiling() or not bool((w != 0).all()):
        return w
    return None


def _rope_kwargs(config: PolymorpherConfig) -> dict:
    """build_blocks' / PolymorpherLM's rotary arguments of a config."""
    if config.pom_rope is None:
        return {}
    return dict(rope=config.pom_rope, rope_max_len=config.max_position_embeddings)


class PolymorpherPreTrainedModel(PreTrainedModel):
    config_class = PolymorpherConfig
    config: PolymorpherConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["PolymorpherBlock", "AttentionBlock"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        """pom_ext's initialization (pom_ext.models.init_weights), through transformers.initialization so that
        weights loaded from a checkpoint are left alone: PoM layers and the blocks' convolutions keep torch's
        default initialization (the reference's), other linear and embedding weights N(0, initializer_range), the
        residual output projections scaled by 1 / sqrt(2 depth)."""
        std = self.config.initializer_range
        if isinstance(module, PoM):
            c = torch.randn(module.po_coeff.shape, dtype=torch.float32).clamp(-1e-3, 1e-3)
            init.copy_(module.po_coeff, c.to(module.po_coeff.dtype))
            if module.se_bias is not None:
                init.zeros_(module.se_bias)
        elif getattr(module, "_pom_default_init", False):  # Linear / Conv1d inside a PoM layer, block convolutions
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                fan_in = module.weight[0].numel()
                bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, nn.Linear):
            scale = 1 / math.sqrt(2 * self.config.num_hidden_layers) if getattr(module, "_pom_residual", False) else 1
            init.normal_(module.weight, mean=0.0, std=std * scale)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, PolymorpherBlock) and module.skip is not None:  # its own parameter; submodules
            init.zeros_(module.skip)                                             # are visited on their own
        else:
            super()._init_weights(module)


def _mark_init(blocks: nn.ModuleList) -> None:
    """Tag the modules _init_weights treats as pom_ext does."""
    for block in blocks:
        for name, m in block.named_modules():
            if isinstance(m, PoM):
                for sub in m.modules():
                    if isinstance(sub, (nn.Linear, nn.Conv1d)):
                        sub._pom_default_init = True
            elif isinstance(m, nn.Conv1d) and name == "conv":
                m._pom_default_init = True
            elif isinstance(m, nn.Linear) and name.endswith(("mlp.fc2", "mixer.proj")):
                m._pom_residual = True


class PolymorpherModel(PolymorpherPreTrainedModel):
    """Token embedding -> blocks (PoM 'P' / attention 'A', config.layer_pattern) -> final LayerNorm."""

    def __init__(self, config: PolymorpherConfig):
        config.validate()  # values set after the config was built (from_pretrained's overrides) checked too
        super().__init__(config)
        D = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, D)
        self.drop = nn.Dropout(config.dropout)
        self.layers = build_blocks(D, config.pattern, degree=config.pom_degree, expand=config.pom_expand,
                                   n_sel_heads=config.pom_gate_heads, n_groups=config.pom_groups,
                                   mlp_ratio=config.intermediate_size / D, conv_size=config.conv_size,
                                   n_heads=config.num_attention_heads, window=config.sliding_window,
                                   bias=config.use_bias, dropout=config.dropout, owner="pom_ext.hf.PolymorpherModel",
                                   conv_skip=config.conv_skip, **_rope_kwargs(config))
        self.norm = nn.LayerNorm(D)
        self.gradient_checkpointing = False
        _mark_init(self.layers)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def _layer_cache(self, cache: Cache, i: int, block: nn.Module, batch: int, x: torch.Tensor):
        if isinstance(block, PolymorpherBlock):
            return install(cache, i, PoMCacheLayer, lambda: block.allocate_cache(batch, x.device, x.dtype))
        return install(cache, i, AttentionCacheLayer, lambda: block.allocate_cache(batch, x.device, x.dtype))

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")  # Transformers' old name of the cache
    @can_return_tuple
    def forward(self, input_ids: Optional[torch.LongTensor] = None, attention_mask=None,
                position_ids: Optional[torch.LongTensor] = None, cache: Optional[Cache] = None,
                inputs_embeds: Optional[torch.Tensor] = None, use_cache: Optional[bool] = None,
                output_hidden_states: Optional[bool] = None, **kwargs) -> BaseModelOutputWithPast:
        """Causal: every token sees the tokens before it (and, with a cache, everything the cache holds).
        attention_mask: (B, past + T) padding mask (left or right padding): padded tokens are invisible to the PoM
        states and means and to attention. position_ids are not needed (PoM has no positions; attention layers
        use rotary positions relative to the tokens seen)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pom_ext.hf.PolymorpherModel: give exactly one of 'input_ids' and 'inputs_embeds'")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        checkpointing = self.gradient_checkpointing and self.training
        if checkpointing:
            use_cache = False
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        x = self.drop(x)
        B, T = x.shape[0], x.shape[1]
        w = _padding(attention_mask, T)
        if w is not None and self.config.pom_rope is not None:
            raise ValueError("pom_ext.hf.PolymorpherModel: argument 'attention_mask' pads tokens, which models with "
                             "rotary PoM layers (pom_rope='1d') do not support yet: decode rows of different "
                             "lengths one by one, or use a model without pom_rope")
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        hidden = [x] if output_hidden_states else None
        for i, block in enumerate(self.layers):
            if use_cache:
                layer = self._layer_cache(cache, i, block, B, x)
                x = block.step(x, layer.inner, w)
                layer.seen_tokens += T
            elif checkpointing:
                x = self._gradient_checkpointing_func(functools.partial(block, mask="causal", weight=w), x)
            else:
                x = block(x, mask="causal", weight=w)
            if hidden is not None:
                hidden.append(x)
        x = self.norm(x)
        if hidden is not None:
            hidden[-1] = x  # as Transformers' models: the last hidden state is the normed one
        return BaseModelOutputWithPast(last_hidden_state=x, cache=cache if use_cache else None,
                                       hidden_states=None if hidden is None else tuple(hidden))


class PolymorpherForCausalLM(PolymorpherPreTrainedModel, GenerationMixin):
    """A Polymorpher language model: generate() decodes with PoM states of constant size (and KV caches for the
    attention layers of hybrids)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: PolymorpherConfig):
        super().__init__(config)
        self.model = PolymorpherModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(self, input_ids: Optional[torch.LongTensor] = None, attention_mask=None,
                position_ids: Optional[torch.LongTensor] = None, cache: Optional[Cache] = None,
                inputs_embeds: Optional[torch.Tensor] = None, labels: Optional[torch.LongTensor] = None,
                use_cache: Optional[bool] = None, logits_to_keep=0, output_hidden_states: Optional[bool] = None,
                **kwargs) -> CausalLMOutputWithPast:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, cache=cache,
                         inputs_embeds=inputs_embeds, use_cache=use_cache, output_hidden_states=output_hidden_states,
                         return_dict=True)
        h = out.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(h[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache, hidden_states=out.hidden_states)


class PolymorpherForSequenceClassification(GenericForSequenceClassification, PolymorpherPreTrainedModel):
    """The causal model's last non-padding token, scored (config.num_labels; needs config.pad_token_id for
    batches)."""


# ---- weights to and from pom_ext.models.PolymorpherLM ----

def _config_of(lm: PolymorpherLM, **overrides) -> PolymorpherConfig:
    pom = next((b for b in lm.blocks if isinstance(b, PolymorpherBlock)), None)
    attn = next((b for b in lm.blocks if isinstance(b, AttentionBlock)), None)
    if pom is not None and pom.rope not in (None, "1d"):
        raise ValueError(f"pom_ext.hf: argument 'lm' has rotary PoM layers with rope={pom.rope!r}; a language model "
                         f"takes rope=None or '1d'")
    first = lm.blocks[0]
    mlp = first.mlp
    mixer = pom.mixer if pom is not None else None
    kw = dict(vocab_size=lm.num_tokens, hidden_size=lm.dim, num_hidden_layers=lm.depth, layer_pattern=lm.pattern,
              intermediate_size=mlp.fc1.out_features if mlp is not None else 0,
              tie_word_embeddings=lm.head.weight is lm.embed.weight,
              dropout=lm.drop.p)
    # bias=True puts biases on the MLPs, the PoM output projections and the attention projections alike
    if mlp is not None:
        kw["use_bias"] = mlp.fc1.bias is not None
    elif mixer is not None:
        kw["use_bias"] = mixer.ag_proj.bias is not None
    elif attn is not None:
        kw["use_bias"] = attn.mixer.proj.bias is not None
    if mixer is not None:
        kw.update(pom_degree=mixer.degree, pom_expand=mixer.expand, pom_gate_heads=mixer.n_sel_heads,
                  pom_groups=mixer.n_groups, conv_size=pom.conv_size, conv_skip=pom.skip is not None)
        if pom.use_rope:
            kw.update(pom_rope=pom.rope, max_position_embeddings=mixer.max_seq_len)
    if attn is not None:
        kw.update(num_attention_heads=attn.mixer.n_heads, sliding_window=attn.mixer.window)
    kw.update(overrides)
    return PolymorpherConfig(**kw)


def _hf_key(key: str) -> str:
    for a, b in (("embed.", "model.embed_tokens."), ("blocks.", "model.layers."), ("norm.", "model.norm."),
                 ("head.", "lm_head.")):
        if key.startswith(a):
            return b + key[len(a):]
    raise KeyError(key)


def from_polymorpher_lm(lm: PolymorpherLM, **config_overrides) -> PolymorpherForCausalLM:
    """The Transformers model of a pom_ext.models.PolymorpherLM, with its weights (equal logits)."""
    if not isinstance(lm, PolymorpherLM):
        raise ValueError(f"pom_ext.hf: argument 'lm' must be a pom_ext.models.PolymorpherLM, got {type(lm).__name__}")
    # in lm's dtype before the weights are loaded: a float64 model's weights are not rounded through float32
    model = PolymorpherForCausalLM(_config_of(lm, **config_overrides)).to(next(lm.parameters()).dtype)
    state = {_hf_key(k): v for k, v in lm.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"pom_ext.hf: the weights of 'lm' do not match: missing {missing}, unexpected {unexpected}")
    return model


def to_polymorpher_lm(model: PolymorpherForCausalLM) -> PolymorpherLM:
    """The pom_ext.models.PolymorpherLM of a Transformers Polymorpher model, with its weights (equal logits)."""
    if not isinstance(model, PolymorpherForCausalLM):
        raise ValueError(f"pom_ext.hf: argument 'model' must be a PolymorpherForCausalLM, got {type(model).__name__}")
    c = model.config
    lm = PolymorpherLM(c.vocab_size, c.hidden_size, c.num_hidden_layers, degree=c.pom_degree, expand=c.pom_expand,
                       n_sel_heads=c.pom_gate_heads, n_groups=c.pom_groups,
                       mlp_ratio=c.intermediate_size / c.hidden_size, conv_size=c.conv_size,
                       layer_pattern=c.pattern, n_heads=c.num_attention_heads, window=c.sliding_window,
                       tie_embeddings=c.tie_word_embeddings, bias=c.use_bias, dropout=c.dropout,
                       conv_skip=c.conv_skip, **_rope_kwargs(c))
    lm = lm.to(model.dtype)  # before the weights are loaded: a float64 model's are not rounded through float32
    inverse = {_hf_key(k): k for k in lm.state_dict()}
    state = {inverse[k]: v for k, v in model.state_dict().items() if k in inverse}
    lm.load_state_dict(state, strict=True)
    return lm
