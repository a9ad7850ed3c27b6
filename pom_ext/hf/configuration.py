"""PolymorpherConfig: Transformers' conventional names where they exist, PoM's own otherwise."""
from typing import List, Optional, Union

from transformers import PreTrainedConfig

from ..models.blocks import check_bool, resolve_layer_pattern


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
        owner = "pom_ext.hf.PolymorpherConfig"
        pattern = resolve_layer_pattern(self.num_hidden_layers, self.layer_pattern, None, owner)
        if self.pom_rope not in (None, "1d"):
            raise ValueError(f"{owner}: argument 'pom_rope' must be None or '1d' (rotary positions of a sequence), "
                             f"got {self.pom_rope!r}")
        check_bool(owner, "conv_skip", self.conv_skip)
        if isinstance(self.max_position_embeddings, bool) or not isinstance(self.max_position_embeddings, int) \
                or self.max_position_embeddings < 1:
            raise ValueError(f"{owner}: argument 'max_position_embeddings' must be a positive int, got "
                             f"{self.max_position_embeddings!r}")
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        if self.num_attention_heads is None:
            self.num_attention_heads = max(1, self.hidden_size // 64)
        attention = "sliding_attention" if self.sliding_window is not None else "full_attention"
        self.layer_types = ["linear_attention" if k == "P" else attention for k in pattern]
        super().__post_init__(**kwargs)

    @property
    def pattern(self) -> str:
        """The kind of each layer, 'P' or 'A'."""
        return "".join("P" if t == "linear_attention" else "A" for t in self.layer_types)
