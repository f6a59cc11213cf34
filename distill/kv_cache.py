"""A preallocated key/value cache with cheap rollback, for speculative decoding.

Speculative decoding appends tokens the target may reject, so the cache must shrink again (chain: drop the rejected
tail; tree: keep the accepted root-to-leaf path, which is scattered among the verified nodes). Each layer keeps one
buffer that grows by doubling and a `length`; `update` writes new keys/values in place and returns views of the
filled part (no per-step concatenation), `truncate(n)` is a length change, and `keep_path` copies the accepted nodes
down into place.

`KVCache` is a transformers `Cache`, so a Hugging Face target fills it through its forward's cache argument
(`cache_argument`: `cache`, or `past_key_values` before transformers renamed it); the drafters use the same layers
directly.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class KVLayer(CacheLayerMixin):
    """One attention layer's keys and values, [batch, kv_heads, capacity, head_dim], filled up to `length`."""

    is_croppable = True

    def __init__(self, capacity: int = 256, **kwargs):
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, head_dim = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states.new_empty(batch, heads, self.capacity, head_dim)
        self.values = value_states.new_empty(batch, heads, self.capacity, value_states.shape[-1])
        self.is_initialized = True

    def _grow(self, needed: int) -> None:
        capacity = max(needed, 2 * self.capacity)
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = old.new_empty(*old.shape[:2], capacity, old.shape[-1])
            new[:, :, : self.length] = old[:, :, : self.length]
            setattr(self, name, new)
        self.capacity = capacity

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            self._grow(end)
        self.keys[:, :, self.length : end] = key_states
        self.values[:, :, self.length : end] = value_states
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.length = 0

    def crop(self, max_length: int) -> None:
        """transformers' convention: a negative value removes that many tokens, otherwise keep `max_length`."""
        self.truncate(self.length + max_length if max_length < 0 else max_length)

    def truncate(self, length: int) -> None:
        self.length = min(self.length, length)

    def keep_path(self, start: int, node_offsets: torch.Tensor) -> None:
        """Keep entries start + node_offsets (ascending) as start, start+1, … and drop everything after them."""
        if self.is_initialized:
            source = start + node_offsets
            count = len(node_offsets)
            self.keys[:, :, start : start + count] = self.keys[:, :, source]
            self.values[:, :, start : start + count] = self.values[:, :, source]
            self.length = start + count


class KVCache(Cache):
    """A transformers cache of `KVLayer`s (one per attention layer, created on first use)."""

    def __init__(self, capacity: int = 256):
        # `Cache` calls its layer class with no arguments when a layer is first used; bind the capacity
        super().__init__(layers=None, layer_class_to_replicate=functools.partial(KVLayer, capacity=capacity))

    def layer(self, index: int) -> KVLayer:
        """Layer `index`, created (with the layers before it) on first use."""
        while len(self.layers) <= index:
            self.layers.append(self.layer_class_to_replicate())
        return self.layers[index]

    @property
    def length(self) -> int:
        return self.layers[0].length if self.layers else 0

    def truncate(self, length: int) -> None:
        for layer in self.layers:
            layer.truncate(length)

    def keep_path(self, start: int, node_offsets: torch.Tensor) -> None:
        for layer in self.layers:
            layer.keep_path(start, node_offsets)


# The keyword a Hugging Face model's forward takes its KV cache by. transformers renamed it from `past_key_values` to
# `cache` (the old name is a deprecated alias that 5.40 removes, and outputs carry the cache as `.cache`); passing the
# new name to a forward that predates it would vanish into its **kwargs and decode without the cache, so the name is
# read from each model class's forward signature (decorators keep it through functools.wraps).
CACHE_KEYWORDS = ("cache", "past_key_values")


@functools.cache
def cache_keyword(model_class: type) -> str:
    """`cache` or `past_key_values`, whichever `model_class.forward` names; a forward naming neither (remote code
    taking **kwargs) gets the installed transformers' own name, as its Llama has it."""
    parameters = inspect.signature(model_class.forward).parameters
    named = next((name for name in CACHE_KEYWORDS if name in parameters), None)
    if named is None:
        from transformers import LlamaModel

        named = cache_keyword(LlamaModel) if model_class is not LlamaModel else "past_key_values"
    return named


def cache_argument(model: torch.nn.Module, cache: Cache | None) -> dict[str, Cache | None]:
    """`{keyword: cache}` for `model(...)` / `model.get_decoder()(...)`, under the name its forward takes."""
    return {cache_keyword(type(model)): cache}


def returned_cache(output: object) -> Cache | None:
    """The cache a model output carries: `.cache`, or `.past_key_values` before the rename (no deprecation notice)."""
    names = {field.name for field in dataclasses.fields(output)} if dataclasses.is_dataclass(output) else set()
    return getattr(output, "cache" if "cache" in names else "past_key_values", None)
