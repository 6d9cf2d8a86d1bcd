"""A pool of prompt caches shared across requests, least recently used first out, bounded in
bytes: a request whose prompt extends an earlier one (the next chat turn, a shared system
prompt) starts from a copy of that cache and prefills only the new tokens."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import mlx.core as mx

from ..kv_quant import KVQuantization
from ..prompt_cache import PromptCache, common_prefix


def _copy_layer(model_cache: Any, source: Any) -> Any:
    """`model_cache` (a fresh cache of the same kind) holding what `source` holds. Caches write
    into their arrays in place, so each gets its own array objects (over shared buffers)."""
    state = source.state
    if state:
        model_cache.state = [mx.array(part) for part in state]
    model_cache.meta_state = source.meta_state
    return model_cache


class PrefixCachePool:
    """Prompt caches of finished prefills, at most `max_bytes` of KV in all."""

    def __init__(self, model, max_bytes: int):
        self.model = model
        self.max_bytes = max_bytes
        self._entries: OrderedDict[int, PromptCache] = OrderedDict()
        self._next = 0

    @property
    def nbytes(self) -> int:
        return sum(self.entry_bytes(entry) for entry in self._entries.values())

    def entry_bytes(self, prompt_cache: PromptCache) -> int:
        """The bytes a pooled cache counts for against `max_bytes`."""
        return _cache_bytes(prompt_cache)

    def __len__(self) -> int:
        return len(self._entries)

    def take(self, prompt: list[int], kv_quantization: KVQuantization | None) -> PromptCache:
        """A copy of the pooled cache sharing the longest prefix with `prompt` (a fresh cache
        when none shares any); it becomes the most recently used."""
        best, best_length = None, 0
        for key, entry in self._entries.items():
            if entry.kv_quantization != kv_quantization:
                continue
            length = common_prefix(entry.tokens, prompt)
            if length > best_length:
                best, best_length = key, length
        fresh = PromptCache(self.model, kv_quantization)
        if best is None:
            return fresh
        self._entries.move_to_end(best)
        source = self._entries[best]
        fresh.cache = [_copy_layer(c, s) for c, s in zip(fresh.cache, source.cache, strict=True)]
        fresh.tokens = list(source.tokens)
        return fresh

    def put(self, prompt_cache: PromptCache) -> None:
        """Keep a copy of a prefilled cache; drop the least recently used past the budget.
        A cache whose tokens another entry already starts with replaces that entry."""
        if not prompt_cache.tokens or self.entry_bytes(prompt_cache) > self.max_bytes:
            return
        for key, entry in list(self._entries.items()):
            covered = common_prefix(entry.tokens, prompt_cache.tokens) == len(entry.tokens)
            if covered and entry.kv_quantization == prompt_cache.kv_quantization:
                del self._entries[key]
        copy = PromptCache(self.model, prompt_cache.kv_quantization)
        copy.cache = [
            _copy_layer(c, s) for c, s in zip(copy.cache, prompt_cache.cache, strict=True)
        ]
        copy.tokens = list(prompt_cache.tokens)
        self._entries[self._next] = copy
        self._next += 1
        while self.nbytes > self.max_bytes:
            self._entries.popitem(last=False)


def _cache_bytes(prompt_cache: PromptCache) -> int:
    return sum(layer.nbytes for layer in prompt_cache.cache)
