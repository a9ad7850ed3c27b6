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
try:
    import transformers  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised without transformers
    raise ImportError("pom_ext.hf needs Hugging Face Transformers: pip install 'transformers>=5.25' (or install "
                      "pom_ext with its 'hf' extra)") from e

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
