"""pom_ext in Hugging Face Transformers (optional: `pip install transformers`, or the `hf` extra).

Importing this package registers model_type "polymorpher" with AutoConfig, AutoModel, AutoModelForCausalLM and
AutoModelForSequenceClassification:

    import pom_ext.hf
    cfg = AutoConfig.for_model("polymorpher", vocab_size=256, hidden_size=64, num_hidden_layers=2)
    model = AutoModelForCausalLM.from_config(cfg)
    model.generate(ids, attention_mask=mask, max_new_tokens=20)      # greedy, sampling, beam search

PoM layers keep their recurrent state (a running sum and a count: constant memory) in the model's Cache,
attention layers of hybrids their keys and values. `convert` puts PoM layers into GPT-2, Llama-family and BERT
models in place of their self-attention; `from_polymorpher_lm` / `to_polymorpher_lm` convert weights to and from
`pom_ext.models.PolymorpherLM`.
"""
_NEEDS = "pip install 'transformers>=5.25,<6' (or install pom_ext with its 'hf' extra)"
try:
    import transformers
except ImportError as e:
    raise ImportError(f"pom_ext.hf needs Hugging Face Transformers: {_NEEDS}") from e
try:  # the Cache and model APIs pom_ext.hf is written against (transformers 5.x)
    from transformers import PreTrainedConfig  # noqa: F401
    from transformers.cache_utils import LinearAttentionCacheLayerMixin  # noqa: F401
except ImportError as e:
    raise ImportError(f"pom_ext.hf needs transformers >= 5.25, found {transformers.__version__}: {_NEEDS}") from e

from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM,  # noqa: E402
                          AutoModelForSequenceClassification)

from .configuration import PolymorpherConfig  # noqa: E402
from .convert import PoMAttention, convert  # noqa: E402
from .modeling import (PolymorpherForCausalLM, PolymorpherForSequenceClassification,  # noqa: E402
                       PolymorpherModel, PolymorpherPreTrainedModel, from_polymorpher_lm, to_polymorpher_lm)

AutoConfig.register("polymorpher", PolymorpherConfig, exist_ok=True)
AutoModel.register(PolymorpherConfig, PolymorpherModel, exist_ok=True)
AutoModelForCausalLM.register(PolymorpherConfig, PolymorpherForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(PolymorpherConfig, PolymorpherForSequenceClassification, exist_ok=True)

__all__ = ["PolymorpherConfig", "PolymorpherPreTrainedModel", "PolymorpherModel", "PolymorpherForCausalLM",
           "PolymorpherForSequenceClassification", "PoMAttention", "convert", "from_polymorpher_lm",
           "to_polymorpher_lm"]
