"""KV caches: a growing cache for full-attention layers (float or quantized), a trimmable window
cache for sliding ones.

KV-shared layers own no cache: they attend over what their source layer's cache returns.
"""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.models.base import create_causal_mask
from mlx_lm.models.cache import KVCache, _BaseCache

from .kv_quant import KVQuantization, Quantized, QuantizedKV, quantize_vectors, rotate
from .rotation import rotation_signs

__all__ = [
    "FullAttentionCache",
    "QuantizedFullAttentionCache",
    "SlidingWindowCache",
    "attention_mask",
]


class FullAttentionCache(KVCache):
    """mlx-lm's growing KV cache; its state is what it holds, without the spare capacity."""

    @property
    def state(self):
        return [] if self.keys is None else self.keys_and_values()

    @state.setter
    def state(self, value) -> None:
        self.keys, self.values = value
        self.offset = self.keys.shape[2]

    @property
    def meta_state(self):
        return ()

    @meta_state.setter
    def meta_state(self, value) -> None:
        pass


class SlidingWindowCache(_BaseCache):
    """Keys and values of the last `window` positions, kept in temporal order.

    Unlike a ring buffer it also keeps up to `spare` older positions, so the cache can be
    trimmed back by that many tokens (a chat turn that rewrites the tail of the previous
    one) and still hold a full window. The buffer grows in `step`-sized blocks and is
    compacted, dropping positions no query can reach, when it fills up.
    """

    step = 256

    def __init__(self, window: int, spare: int = 256):
        self.window = window
        self.spare = spare
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0  # absolute position after the last stored token
        self.start = 0  # absolute position of the first stored token
        self._end = 0  # buffer index after the last stored token

    @property
    def stored(self) -> int:
        return self.offset - self.start

    def _make_room(self, keys: mx.array, values: mx.array) -> None:
        n = keys.shape[2]
        if self.keys is not None and self._end + n <= self.keys.shape[2]:
            return
        retain = min(self.stored, self.window - 1 + self.spare)
        capacity = retain + n + self.step
        batch, kv_heads, _, k_dim = keys.shape
        new_keys = mx.zeros((batch, kv_heads, capacity, k_dim), keys.dtype)
        new_values = mx.zeros((batch, kv_heads, capacity, values.shape[3]), values.dtype)
        if retain:
            kept = slice(self._end - retain, self._end)
            new_keys[..., :retain, :] = self.keys[..., kept, :]
            new_values[..., :retain, :] = self.values[..., kept, :]
        self.keys, self.values = new_keys, new_values
        self.start = self.offset - retain
        self._end = retain

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Store new positions; return the keys and values the new queries can see."""
        n = keys.shape[2]
        self._make_room(keys, values)
        self.keys[..., self._end : self._end + n, :] = keys
        self.values[..., self._end : self._end + n, :] = values
        self._end += n
        self.offset += n
        visible = min(self.stored, self.window - 1 + n)
        window = slice(self._end - visible, self._end)
        return self.keys[..., window, :], self.values[..., window, :]

    def make_mask(self, n_queries: int) -> mx.array | None:
        """The mask for `n_queries` new positions over what `update_and_fetch` will return."""
        if n_queries == 1:
            return None
        past = min(self.stored, self.window - 1)
        if past + n_queries <= self.window:
            return "causal"  # no query reaches past the window: the fast kernel's own mask
        return create_causal_mask(n_queries, past, window_size=self.window)

    def size(self) -> int:
        return min(self.stored, self.window)

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        """Drop up to `n` newest positions, keeping a full window (or everything) behind them."""
        floor = self.start + self.window - 1 if self.start > 0 else 0
        n = max(0, min(n, self.offset - floor))
        self.offset -= n
        self._end -= n
        return n

    @property
    def state(self):
        if self.keys is None:
            return []
        return self.keys[..., : self._end, :], self.values[..., : self._end, :]

    @state.setter
    def state(self, value) -> None:
        if not value:
            self.keys = self.values = None
            self._end = 0
            return
        self.keys, self.values = value
        self._end = self.keys.shape[2]

    @property
    def meta_state(self):
        return tuple(map(str, (self.window, self.spare, self.offset, self.start)))

    @meta_state.setter
    def meta_state(self, value) -> None:
        self.window, self.spare, self.offset, self.start = map(int, value)

    def empty(self) -> bool:
        return self.keys is None

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


def vision_block_mask(cache: SlidingWindowCache, blocks: mx.array) -> mx.array:
    """Sliding-window mask where tokens of one image block also see each other both ways.

    `blocks` [B, n]: the block id of each new token (-1 for text). Blocks lie within the new
    tokens; the result [B, 1, n, visible keys] matches what `update_and_fetch` will return.
    """
    n = blocks.shape[1]
    past = min(cache.stored, cache.window - 1)
    causal = create_causal_mask(n, past, window_size=cache.window)
    same = (blocks[:, :, None] == blocks[:, None, :]) & (blocks[:, :, None] >= 0)
    same = mx.concatenate([mx.zeros((blocks.shape[0], n, past), dtype=mx.bool_), same], axis=-1)
    queries, keys = mx.arange(past, past + n)[:, None], mx.arange(past + n)[None]
    return (causal | (same & (keys > queries - cache.window)))[:, None]


def media_block_mask(cache, blocks: mx.array) -> mx.array:
    """gemma4_unified's mask: causal (within the window on a sliding cache), and tokens of one
    image block see each other both ways at any distance, on every layer.

    `blocks` [B, n] as for `vision_block_mask`; the result [B, 1, n, visible keys] matches what
    the cache's `update_and_fetch` will return."""
    n = blocks.shape[1]
    sliding = isinstance(cache, SlidingWindowCache)
    past = min(cache.stored, cache.window - 1) if sliding else cache.offset
    causal = create_causal_mask(n, past, window_size=cache.window if sliding else None)
    same = (blocks[:, :, None] == blocks[:, None, :]) & (blocks[:, :, None] >= 0)
    same = mx.concatenate([mx.zeros((blocks.shape[0], n, past), dtype=mx.bool_), same], axis=-1)
    return (causal | same)[:, None]


def attention_mask(cache, n_queries: int):
    """The mask for `n_queries` new positions attending through `cache`.

    Caches that set `masks_rows` (the engine's batch caches) mask each row themselves."""
    if isinstance(cache, SlidingWindowCache) or getattr(cache, "masks_rows", False):
        return cache.make_mask(n_queries)
    return None if n_queries == 1 else "causal"


class QuantizedFullAttentionCache(_BaseCache):
    """A growing full-attention cache of rotated, quantized keys and values.

    Storage grows in `step`-position blocks; `trim` only moves the end back. Its state is the
    four arrays (keys then values: packed codes, scales) up to the last position.
    """

    step = 256

    def __init__(self, quantization: KVQuantization, seed: int = 0):
        self.quantization = quantization
        self.seed = seed  # picks the rotation; fixed per layer, kept in meta_state
        self.keys: Quantized | None = None
        self.values: Quantized | None = None
        self.offset = 0
        self._signs: mx.array | None = None

    def _rotation(self, head_dim: int) -> mx.array:
        if self._signs is None or self._signs.shape[0] != head_dim:
            self._signs = rotation_signs(head_dim, self.seed)
        return self._signs

    def _quantize(self, x: mx.array, bits: int) -> Quantized:
        return quantize_vectors(rotate(x, self._rotation(x.shape[-1])), bits)

    def _make_room(self, keys: Quantized, values: Quantized, n: int) -> None:
        if self.keys is not None and self.offset + n <= self.keys[0].shape[2]:
            return
        grow = (n + self.step - 1) // self.step * self.step

        def extend(stored: Quantized | None, new: Quantized) -> Quantized:
            blocks = [mx.zeros((*part.shape[:2], grow, part.shape[3]), part.dtype) for part in new]
            if stored is None:
                return tuple(blocks)
            return tuple(
                mx.concatenate([old[..., : self.offset, :], block], axis=2)
                for old, block in zip(stored, blocks, strict=True)
            )

        self.keys, self.values = extend(self.keys, keys), extend(self.values, values)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> QuantizedKV:
        """Rotate, quantize and store new positions; return everything stored, packed."""
        n = keys.shape[2]
        new_keys = self._quantize(keys, self.quantization.key_bits)
        new_values = self._quantize(values, self.quantization.value_bits)
        self._make_room(new_keys, new_values, n)
        end = self.offset + n
        for stored, new in ((self.keys, new_keys), (self.values, new_values)):
            for buffer, part in zip(stored, new, strict=True):
                buffer[..., self.offset : end, :] = part
        self.offset = end
        return self.fetch()

    def fetch(self) -> QuantizedKV:
        def visible(stored: Quantized) -> Quantized:
            if stored[0].shape[2] == self.offset:
                return stored
            return tuple(part[..., : self.offset, :] for part in stored)

        head_dim = self.keys[0].shape[-1] * 32 // self.quantization.key_bits
        return QuantizedKV(
            visible(self.keys),
            visible(self.values),
            self._rotation(head_dim),
            self.quantization.key_bits,
            self.quantization.value_bits,
        )

    def size(self) -> int:
        return self.offset

    def empty(self) -> bool:
        return self.keys is None

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        n = min(self.offset, n)
        self.offset -= n
        return n

    @property
    def state(self):
        if self.keys is None:
            return []
        return [part[..., : self.offset, :] for part in (*self.keys, *self.values)]

    @state.setter
    def state(self, value) -> None:
        if not value:
            self.keys = self.values = None
            self.offset = 0
            return
        self.keys, self.values = tuple(value[:2]), tuple(value[2:])
        self.offset = self.keys[0].shape[2]

    @property
    def meta_state(self):
        q = self.quantization
        return tuple(map(str, (q.key_bits, q.value_bits, self.seed)))

    @meta_state.setter
    def meta_state(self, value) -> None:
        key_bits, value_bits, self.seed = map(int, value)
        self.quantization = KVQuantization(key_bits, value_bits)
        self._signs = None

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return sum(part.nbytes for part in (*self.keys, *self.values))
