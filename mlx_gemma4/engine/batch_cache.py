"""KV caches of many sequences decoded together, one row per sequence.

Rows are right-aligned: every row's newest position sits in the same column, and a row that
holds fewer positions than its neighbours is padded on the left. Each step appends one position
to every row; `make_mask` hides the padding, and on sliding-window layers the positions past a
row's own window, so each row attends exactly to what its solo cache would show it.

A cache stores "parts": arrays [rows, kv heads, columns, width] that grow together (keys and
values; or for a quantized cache the keys' codes and scales, then the values').
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from ..cache import QuantizedFullAttentionCache, SlidingWindowCache
from ..kv_quant import KVQuantization, QuantizedKV, quantize_vectors, rotate
from ..rotation import rotation_signs


class BatchKVCache:
    """Float keys and values of a full-attention layer (`window=None`) or a sliding-window
    one, for one-token decode steps."""

    # `cache.attention_mask` asks caches that set this for their own per-row mask
    masks_rows = True
    step = 256

    def __init__(self, window: int | None = None):
        self.window = window
        self.parts: list[mx.array] | None = None
        self.end = 0  # the column after every row's newest position
        self.lengths: list[int] = []  # valid columns per row, right-aligned at `end`
        self.positions: list[int] = []  # each row's next absolute position

    @classmethod
    def like(cls, solo: Any) -> BatchKVCache:
        """The batch cache for layers whose solo cache is `solo`."""
        if isinstance(solo, QuantizedFullAttentionCache):
            return BatchQuantizedKVCache(solo.quantization, solo.seed)
        if isinstance(solo, SlidingWindowCache):
            return cls(solo.window)
        return cls()

    @property
    def offset(self) -> mx.array:
        """Per-row RoPE offsets of the positions the next step adds."""
        return mx.array(self.positions)

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def keys(self) -> mx.array | None:
        return None if self.parts is None else self.parts[0]

    @keys.setter
    def keys(self, keys: mx.array) -> None:
        """Replace the first part by an array equal to it (a pipeline ties it to the last
        broadcast of its forward pass: `models.sharding.ForwardCaches`)."""
        self.parts[0] = keys

    def _kept(self, length: int) -> int:
        """How many of a row's past positions a future query can still see."""
        return length if self.window is None else min(length, self.window - 1)

    # ------------------------------------------------------------------ rows joining, leaving
    def add_row(self, solo: Any) -> None:
        """Append the sequence that `solo` (a prefilled solo cache of the same layer) holds."""
        parts = self._solo_parts(solo)
        length = 0 if not parts else parts[0].shape[2]
        if length > self._kept(length):
            drop = length - self._kept(length)
            parts, length = [p[..., drop:, :] for p in parts], length - drop
        if length and self.parts is None:
            self._allocate(parts)
        if self.parts is not None:
            if length > self.end:
                self._shift_right(length - self.end)
            row = [mx.zeros((1, *p.shape[1:]), p.dtype) for p in self.parts]
            for new, old in zip(row, parts, strict=False):
                new[..., self.end - length : self.end, :] = old
            self.parts = [mx.concatenate([p, r]) for p, r in zip(self.parts, row, strict=True)]
        self.lengths.append(length)
        self.positions.append(solo.offset)

    @staticmethod
    def _solo_parts(solo: Any) -> list[mx.array]:
        state = list(solo.state)
        if state and isinstance(solo, SlidingWindowCache):
            state = [p[..., -solo.stored :, :] for p in state]  # older columns are spare
        return state

    def keep_rows(self, rows: list[int]) -> None:
        """Drop every row not in `rows` (indices, in their new order) and free its memory."""
        self.lengths = [self.lengths[i] for i in rows]
        self.positions = [self.positions[i] for i in rows]
        if not rows:
            self.parts, self.end = None, 0
            return
        if self.parts is None:
            return
        index = mx.array(rows)
        # columns before the longest remaining row are padding for everyone: cut them off
        first = self.end - max(self.lengths)
        self.parts = [p[index, :, first:, :] for p in self.parts]
        self.end -= first

    # ------------------------------------------------------------------ storage
    def _blank(self, like: list[mx.array], rows: int, width: int) -> list[mx.array]:
        return [mx.zeros((rows, p.shape[1], width, p.shape[3]), p.dtype) for p in like]

    def _allocate(self, like: list[mx.array]) -> None:
        self.parts, self.end = self._blank(like, self.rows, self.step), 0

    def _shift_right(self, by: int) -> None:
        """Move every row `by` columns right (more left padding), with room after `end`."""
        parts = self._blank(self.parts, self.rows, self.end + by + self.step)
        for new, old in zip(parts, self.parts, strict=True):
            new[..., by : by + self.end, :] = old[..., : self.end, :]
        self.parts, self.end = parts, self.end + by

    def _make_room(self) -> None:
        """Start a new buffer holding only the columns some row can still see."""
        keep = max(self.lengths, default=0)
        parts = self._blank(self.parts, self.rows, keep + self.step)
        if keep:
            for new, old in zip(parts, self.parts, strict=True):
                new[..., :keep, :] = old[..., self.end - keep : self.end, :]
        self.parts, self.end = parts, keep

    # ------------------------------------------------------------------ a decode step
    def _encode(self, keys: mx.array, values: mx.array) -> list[mx.array]:
        return [keys, values]

    def _view(self, parts: list[mx.array]) -> Any:
        return tuple(parts)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> Any:
        """Append one position per row; return the columns the new queries may see."""
        if keys.shape[2] != 1:
            raise ValueError("a batch cache takes one position per row and step")
        new = self._encode(keys, values)
        if self.parts is None:
            self._allocate(new)
        elif self.end >= self.parts[0].shape[2]:
            self._make_room()
        for part, column in zip(self.parts, new, strict=True):
            part[..., self.end : self.end + 1, :] = column
        self.end += 1
        self.lengths = [self._kept(n + 1) for n in self.lengths]
        self.positions = [p + 1 for p in self.positions]
        start = self.end - self._visible_width(self.end)
        return self._view([p[..., start : self.end, :] for p in self.parts])

    def _visible_width(self, end: int) -> int:
        return end if self.window is None else min(end, self.window)

    def make_mask(self, n_queries: int) -> mx.array:
        """[rows, 1, 1, columns]: True where a row's query may attend, over the columns the
        next `update_and_fetch` returns."""
        if n_queries != 1:
            raise ValueError("a batch cache takes one position per row and step")
        width = self._visible_width(self.end + 1)
        seen = mx.array([min(n + 1, width) for n in self.lengths])
        return (mx.arange(width)[None] >= (width - seen)[:, None])[:, None, None, :]

    @property
    def nbytes(self) -> int:
        return 0 if self.parts is None else sum(p.nbytes for p in self.parts)


class BatchQuantizedKVCache(BatchKVCache):
    """Rotated, quantized keys and values of a full-attention layer, quantized per vector as
    the solo `QuantizedFullAttentionCache` does (same rotation), so rows match solo runs."""

    def __init__(self, quantization: KVQuantization, seed: int):
        super().__init__(None)
        self.quantization = quantization
        self.seed = seed
        self._signs: mx.array | None = None

    def _rotation(self, head_dim: int) -> mx.array:
        if self._signs is None or self._signs.shape[0] != head_dim:
            self._signs = rotation_signs(head_dim, self.seed)
        return self._signs

    def _encode(self, keys: mx.array, values: mx.array) -> list[mx.array]:
        q = self.quantization
        signs = self._rotation(keys.shape[-1])
        return [
            *quantize_vectors(rotate(keys, signs), q.key_bits),
            *quantize_vectors(rotate(values, signs), q.value_bits),
        ]

    def _view(self, parts: list[mx.array]) -> QuantizedKV:
        q = self.quantization
        head_dim = parts[0].shape[-1] * 32 // q.key_bits
        return QuantizedKV(
            tuple(parts[:2]), tuple(parts[2:]), self._rotation(head_dim), q.key_bits, q.value_bits
        )
