"""Cache layers that hold pom_ext's per-block decoding caches inside a Transformers Cache.

generate() builds a DynamicCache from config.layer_types; each block puts its own layer into its slot on first
use (`install`): a PoM layer's PoMCache (running sum, count, the convolution's last inputs: constant memory) or an
attention layer's KVCache (keys, values and which of them are padding; the last `sliding_window` when local). Both
report the number of positions seen, padding included, as the sequence length (Transformers reads layer 0's for
positions), and reorder, repeat and select batch rows for beam search.
"""
from typing import Callable, Optional, Tuple, Union

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer, LinearAttentionCacheLayerMixin

from ..models.blocks import KVCache, PoMCache


class _BlockCache:
    """What both layer kinds share: the pom_ext cache `inner` and the positions seen."""

    is_compileable = False
    is_sliding = False

    def _init_block(self) -> None:
        self.inner: Optional[Union[PoMCache, KVCache]] = None
        self.seen_tokens = 0
        self.keys = self.values = None  # read by DynamicCache's iteration

    def get_seq_length(self, *args) -> int:
        return self.seen_tokens

    def get_max_length(self) -> int:
        return -1

    def get_mask_sizes(self, query_length: int, *args) -> Tuple[int, int]:
        return self.seen_tokens + query_length, 0

    @property
    def batch_size(self) -> int:
        return self.inner.tensors()[0].shape[0] if self.inner is not None and self.inner.tensors() else 0

    def _select(self, index: torch.Tensor) -> None:
        if self.inner is not None:
            device = self.inner.tensors()[0].device if self.inner.tensors() else index.device
            self.inner.select_(index.to(device))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.inner is not None and self.inner.tensors():
            B = self.inner.tensors()[0].shape[0]
            self._select(torch.arange(B).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select(torch.as_tensor(indices))

    def reset(self) -> None:
        self._init_block()

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise ValueError("pom_ext.hf: a Polymorpher cache cannot drop tokens (a PoM state is a running sum): "
                             "assisted and speculative decoding are not supported")

    def offload(self) -> None:
        pass

    def prefetch(self) -> None:
        pass

    def lazy_initialization(self, *args, **kwargs) -> None:
        pass


class PoMCacheLayer(_BlockCache, LinearAttentionCacheLayerMixin):
    """A PoM block's decoding cache (pom_ext.models.PoMCache) as a layer of a Transformers Cache."""

    is_croppable = False

    def __init__(self, **kwargs):
        LinearAttentionCacheLayerMixin.__init__(self, number_of_states=1)
        self._init_block()

    def update_conv_state(self, *args, **kwargs):
        raise NotImplementedError("pom_ext.hf.PoMCacheLayer keeps its convolution inputs in its PoMCache")

    def update_recurrent_state(self, *args, **kwargs):
        raise NotImplementedError("pom_ext.hf.PoMCacheLayer keeps its state in its PoMCache")

    def activate_past_recording(self, **kwargs):
        raise ValueError("pom_ext.hf: a PoM state cannot record past states")


class ConvertedPoMCacheLayer(PoMCacheLayer, CacheLayerMixin):
    """The PoM layer of a converted Transformers model (pom_ext.hf.convert). Such a model builds its attention
    masks from the cache, which asks an attention layer (CacheLayerMixin) for their sizes: the positions seen plus
    the new tokens. Where every attention layer became PoM, none would be left to answer, so this layer answers
    too (a layer holding both kinds of state, in Transformers' terms)."""

    def __init__(self, **kwargs):
        PoMCacheLayer.__init__(self)
        CacheLayerMixin.__init__(self)  # keys, values (None, as _init_block set them), is_initialized

    def update(self, *args, **kwargs):
        raise NotImplementedError("pom_ext.hf.ConvertedPoMCacheLayer is updated by its PoM layer (PoMCache)")


class AttentionCacheLayer(_BlockCache, CacheLayerMixin):
    """An attention block's decoding cache (pom_ext.models.KVCache) as a layer of a Transformers Cache."""

    is_croppable = False

    def __init__(self, **kwargs):
        CacheLayerMixin.__init__(self)
        self._init_block()

    def update(self, *args, **kwargs):
        raise NotImplementedError("pom_ext.hf.AttentionCacheLayer is updated by its block (KVCache)")


def install(cache: Cache, layer_idx: int, kind: type, make: Callable[[], Union[PoMCache, KVCache]]) -> _BlockCache:
    """The layer of `kind` at layer_idx of `cache`, put there in place of the empty layer the Cache was built with
    (created with make() on first use)."""
    layers = cache.layers
    while len(layers) <= layer_idx:  # a DynamicCache() without a config grows as layers are used
        layers.append(DynamicLayer())
    layer = layers[layer_idx]
    if not isinstance(layer, kind):
        if isinstance(layer, _BlockCache) or (layer.get_seq_length() or 0) > 0:
            raise ValueError(f"pom_ext.hf: layer {layer_idx} of the cache holds a {type(layer).__name__} with "
                             f"content; a Polymorpher layer of this kind needs its own ({kind.__name__})")
        layer = kind()
        layers[layer_idx] = layer
    if layer.inner is None:
        layer.inner = make()
    return layer
