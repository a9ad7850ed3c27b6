"""PolymorpherConfig: Transformers' conventional names where they exist, PoM's own otherwise."""
import math
from typing import List, Optional, Union

from transformers import PreTrainedConfig

from ..models.blocks import check_bool, check_int, check_optional_int, check_rate, resolve_layer_pattern


class PolymorpherConfig(PreTrainedConfig):
    """Configuration of a Polymorpher model (pom_ext.models.PolymorpherLM in Transformers).

    vocab_size, hidden_size (D), num_hidden_layers, intermediate_size (MLP width, default 4 D),
    num_attention_heads (attention layers of hybrids, default max(1, D // 64)), sliding_window (local attention),
    layer_pattern ('P' PoM, 'A' attention, tiled over the layers: "PPPA"), pom_degree, pom_expand (E = expand D),
    pom_gate_heads (gate heads, n_sel_heads), pom_groups, conv_size (short causal convolution before each PoM layer,
    0 for none), conv_skip (the convolution's output, weighted per channel, added to the PoM layer's), pom_rope
    (None, or "1d": rotary positions in the PoM mixers, pom_ext.PoMRoPE, whose tables hold max_position_embeddings
    positions), use_bias, dropout, tie_word_embeddings, pad / bos / eos token ids.
    layer_types is derived from the pattern ("linear_attention" for PoM layers, "full_attention" or
    "sliding_attention" for attention layers).
    Every field is checked when the config is built (from keywords or a saved config.json), and again when a
    model is built from it and by save_pretrained: an invalid value raises ValueError naming the field.
    """

    model_type = "polymorpher"
    keys_to_ignore_at_inference = ["cache"]

    vocab_size: int = 256
    hidden_size: int = 256
    num_hidden_layers: int = 6
    intermediate_size: Optional[int] = None
    num_attention_heads: Optional[int] = None
    layer_pattern: str = "P"
    sliding_window: Optional[int] = None
    pom_degree: int = 2
    pom_expand: int = 2
    pom_gate_heads: int = 1
    pom_groups: int = 1
    conv_size: int = 4
    conv_skip: bool = False
    pom_rope: Optional[str] = None
    max_position_embeddings: int = 4096
    use_bias: bool = False
    dropout: float = 0.0
    initializer_range: float = 0.02
    layer_types: Optional[List[str]] = None
    use_cache: bool = True
    pad_token_id: Optional[int] = None
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[Union[int, List[int]]] = None
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs):
        pattern = self._check_fields()
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        if self.num_attention_heads is None:
            self.num_attention_heads = max(1, self.hidden_size // 64)
        self.layer_types = self._layer_types(pattern)
        super().__post_init__(**kwargs)

    def _layer_types(self, pattern: str) -> List[str]:
        attention = "sliding_attention" if self.sliding_window is not None else "full_attention"
        return ["linear_attention" if k == "P" else attention for k in pattern]

    def _check_fields(self) -> str:
        """Raise ValueError naming the field when a field has a value the model cannot be built with (the rules of
        pom_ext.models: PolymorpherLM, build_blocks, PolymorpherBlock, PoM / PoMRoPE, Attention), else return the
        layer pattern, one letter per layer. intermediate_size and num_attention_heads may be None (their defaults)."""
        owner = "pom_ext.hf.PolymorpherConfig"
        check_int(owner, "vocab_size", self.vocab_size, 1)
        D = check_int(owner, "hidden_size", self.hidden_size, 1)
        depth = check_int(owner, "num_hidden_layers", self.num_hidden_layers, 1)
        lp = self.layer_pattern
        if isinstance(lp, str) and lp and not set(lp.upper()) - {"P", "A"} and depth % len(lp):
            raise ValueError(f"{owner}: argument 'layer_pattern' ({lp!r}, length {len(lp)}) must have length "
                             f"num_hidden_layers = {depth} or a length that divides it")
        pattern = resolve_layer_pattern(depth, lp, None, owner)
        check_optional_int(owner, "intermediate_size", self.intermediate_size, 0)
        check_optional_int(owner, "num_attention_heads", self.num_attention_heads, 1)
        check_optional_int(owner, "sliding_window", self.sliding_window, 1)
        check_int(owner, "pom_degree", self.pom_degree, 1)
        expand = check_int(owner, "pom_expand", self.pom_expand, 1)
        G = check_int(owner, "pom_gate_heads", self.pom_gate_heads, 0)
        groups = check_int(owner, "pom_groups", self.pom_groups, 1)
        check_int(owner, "conv_size", self.conv_size, 0)
        check_bool(owner, "conv_skip", self.conv_skip)
        if self.pom_rope not in (None, "1d"):
            raise ValueError(f"{owner}: argument 'pom_rope' must be None or '1d' (rotary positions of a sequence), "
                             f"got {self.pom_rope!r}")
        check_int(owner, "max_position_embeddings", self.max_position_embeddings, 1)
        check_bool(owner, "use_bias", self.use_bias)
        check_rate(owner, "dropout", self.dropout)
        r = self.initializer_range
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or r < 0:
            raise ValueError(f"{owner}: argument 'initializer_range' must be a finite number >= 0 (the standard "
                             f"deviation of the initial weights), got {r!r}")
        check_bool(owner, "use_cache", self.use_cache)
        check_bool(owner, "tie_word_embeddings", self.tie_word_embeddings)
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            ids = value if name == "eos_token_id" and isinstance(value, list) and value else [value]
            if value is not None and any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
                raise ValueError(f"{owner}: argument '{name}' must be None or an integer"
                                 f"{' (or a non-empty list of integers)' if name == 'eos_token_id' else ''}, "
                                 f"got {value!r}")
        if "P" in pattern:  # PoM layers: PoM / PoMRoPE(dim=hidden_size, degree, expand, n_groups, n_sel_heads)
            if D % groups:
                raise ValueError(f"{owner}: argument 'pom_groups' ({groups}) must divide hidden_size ({D})")
            E = expand * D
            if G > 1 and E % G:
                raise ValueError(f"{owner}: argument 'pom_gate_heads' ({G}) must divide pom_expand * hidden_size "
                                 f"= {E}")
            if self.pom_rope == "1d":
                if E % 2:
                    raise ValueError(f"{owner}: arguments 'pom_expand' * 'hidden_size' = {E} must be even for "
                                     f"rotary PoM layers (pom_rope='1d')")
                if G > 1 and (G % 2 or E // G < 2):
                    raise ValueError(f"{owner}: argument 'pom_gate_heads' ({G}) must be even and leave a head width "
                                     f"pom_expand * hidden_size / pom_gate_heads >= 2 for rotary PoM layers "
                                     f"(pom_rope='1d'), got a head width of {E // G}")
        if "A" in pattern:  # Attention(dim=hidden_size, n_heads, window, rope=True)
            H = max(1, D // 64) if self.num_attention_heads is None else self.num_attention_heads
            if D % H or (D // H) % 2:
                default = ", the default max(1, hidden_size // 64)" if self.num_attention_heads is None else ""
                raise ValueError(f"{owner}: argument 'num_attention_heads' ({H}{default}) must divide hidden_size "
                                 f"({D}) into an even head size (rotary embedding)")
        elif self.sliding_window is not None:
            raise ValueError(f"{owner}: argument 'sliding_window' applies to attention layers, but the layer "
                             f"pattern {pattern!r} has none: give None")
        return pattern

    def validate(self):
        """The fields' checks and Transformers' own; layer_types derived again from the pattern. Run by
        save_pretrained and when a model is built, so that values set after the config was built (from_pretrained's
        keyword overrides, assignments) are checked too."""
        self.layer_types = self._layer_types(self._check_fields())
        super().validate()

    @property
    def pattern(self) -> str:
        """The kind of each layer, 'P' or 'A', from layer_pattern and num_hidden_layers."""
        return resolve_layer_pattern(self.num_hidden_layers, self.layer_pattern, None, "pom_ext.hf.PolymorpherConfig")
