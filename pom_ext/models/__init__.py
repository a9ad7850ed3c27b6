"""Polymorpher models: PoM blocks, hybrid PoM/attention stacks, a causal LM with recurrent decoding and an encoder.

    from pom_ext.models import PolymorpherLM, PolymorpherEncoder, PolymorpherBlock
"""
from .blocks import (MLP, Attention, AttentionBlock, KVCache, PoMCache, PolymorpherBlock, pom_causal_step,
                     resolve_layer_pattern)
from .encoder import PatchEmbed, PolymorpherEncoder
from .lm import PolymorpherLM

__all__ = ["MLP", "Attention", "AttentionBlock", "KVCache", "PoMCache", "PolymorpherBlock", "PolymorpherLM",
           "PolymorpherEncoder", "PatchEmbed", "pom_causal_step", "resolve_layer_pattern"]
