"""KV caches of many sequences decoded together, one row per sequence.

Rows are right-aligned: every row's newest position sits in the same column, and a row that
holds fewer positions than its neighbours is padded on the left. A step appends the same
number of positions to every row (one for a plain decode step, several when speculative
decoding verifies drafts); `make_mask` hides the padding, the other rows' positions, and on
sliding-window layers the positions past a row's own window, so each row attends exactly to
what its solo cache would show it.

Speculative decoding rolls each row back by its own count of rejected positions
(`roll_back`). Shifting the row right to restore the alignment would copy the whole cache
every step; instead a row may end `lag` columns before the newest column: its next positions
are written after its own end (a scatter of the new columns only), and the mask reads each
row's positions from its own end. Lags only grow while some row rejects more than another, so
once the largest exceeds `max_lag` the rows are realigned in one gather (between forwards,
where no mask is pending), which bounds the columns wasted to `max_lag` a row.

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
    one. A sliding cache keeps `spare` positions per row beyond what its next query sees (an
    assistant drafter reads two more than the window)."""

    # `cache.attention_mask` asks caches that set this for their own per-row mask
    masks_rows = True
    step = 256
    max_lag = 64  # the most columns a row may end before the newest one (see the module doc)

    def __init__(self, window: int | None = None, spare: int = 2):
        self.window = window
        self.spare = spare
        self.parts: list[mx.array] | None = None
        self.end = 0  # the column after the newest position of any row
        self.lags: list[int] = []  # per row: columns between its newest position and `end`
        self.lengths: list[int] = []  # valid columns per row, ending `lag` columns before `end`
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
        """How many of a row's past positions a buffer keeps when it is compacted."""
        return length if self.window is None else min(length, self.window - 1 + self.spare)

    def _seen(self, length: int) -> int:
        """How many of a row's past positions its next query sees."""
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
        self.lags.append(0)
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
        self.lags = [self.lags[i] for i in rows]
        self.lengths = [self.lengths[i] for i in rows]
        self.positions = [self.positions[i] for i in rows]
        if not rows:
            self.parts, self.end = None, 0
            return
        if self.parts is None:
            return
        index = mx.array(rows)
        # columns after the newest remaining row are free, those before the earliest are
        # padding for everyone: cut both off
        last = self.end - min(self.lags)
        first = last - max(lag + n for lag, n in zip(self.lags, self.lengths, strict=True))
        first += min(self.lags)
        self.parts = [p[index, :, first:, :] for p in self.parts]
        self.lags = [lag - min(self.lags) for lag in self.lags]
        self.end = last - first

    def roll_back(self, rejected: list[int]) -> None:
        """Drop each row's newest `rejected[row]` positions (drafts the target rejected)."""
        if not any(rejected):
            return
        self.lags = [lag + r for lag, r in zip(self.lags, rejected, strict=True)]
        self.lengths = [n - r for n, r in zip(self.lengths, rejected, strict=True)]
        self.positions = [p - r for p, r in zip(self.positions, rejected, strict=True)]
        common = min(self.lags)
        self.lags = [lag - common for lag in self.lags]
        self.end -= common
        if max(self.lags) > self.max_lag:
            self._realign()

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

    def _make_room(self, n: int) -> None:
        """Start a new buffer holding only the columns some row can still see, and room for
        `n` more. Lags stay as they are: a mask already made for the step still fits."""
        self.lengths = [self._kept(length) for length in self.lengths]
        spans = (lag + length for lag, length in zip(self.lags, self.lengths, strict=True))
        keep = max(spans, default=0)
        parts = self._blank(self.parts, self.rows, keep + n + self.step)
        if keep:
            for new, old in zip(parts, self.parts, strict=True):
                new[..., :keep, :] = old[..., self.end - keep : self.end, :]
        self.parts, self.end = parts, keep

    def _realign(self) -> None:
        """Move each row right by its lag, so every row ends at `end` again."""
        width = self.parts[0].shape[2]
        columns = mx.arange(width)[None] - mx.array(self.lags)[:, None]
        index = mx.maximum(columns, 0)[:, None, :, None]
        self.parts = [
            mx.take_along_axis(
                p, mx.broadcast_to(index, (*index.shape[:2], width, p.shape[3])), axis=2
            )
            for p in self.parts
        ]
        self.lags = [0] * self.rows

    # ------------------------------------------------------------------ a decode step
    def _encode(self, keys: mx.array, values: mx.array) -> list[mx.array]:
        return [keys, values]

    def _view(self, parts: list[mx.array]) -> Any:
        return tuple(parts)

    def _width(self, n_queries: int) -> int:
        """Columns the next step's `n_queries` new positions per row attend over."""
        seen = (lag + self._seen(n) for lag, n in zip(self.lags, self.lengths, strict=True))
        return max(seen, default=0) + n_queries

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> Any:
        """Append `keys.shape[2]` positions per row; return the columns the new queries may
        see (what `make_mask` masks)."""
        n = keys.shape[2]
        new = self._encode(keys, values)
        width = self._width(n)
        if self.parts is None:
            self._allocate(new)
        if self.end + n > self.parts[0].shape[2]:
            self._make_room(n)
        if not any(self.lags):
            for part, columns in zip(self.parts, new, strict=True):
                part[..., self.end : self.end + n, :] = columns
        else:  # each row's new columns go after its own end
            starts = mx.array([self.end - lag for lag in self.lags])
            index = (starts[:, None] + mx.arange(n)[None])[:, None, :, None]
            self.parts = [
                mx.put_along_axis(part, mx.broadcast_to(index, columns.shape), columns, axis=2)
                for part, columns in zip(self.parts, new, strict=True)
            ]
        self.end += n
        self.lengths = [length + n for length in self.lengths]
        self.positions = [p + n for p in self.positions]
        return self._view([p[..., self.end - width : self.end, :] for p in self.parts])

    def make_mask(self, n_queries: int) -> mx.array:
        """[rows, 1, n_queries, columns]: True where a row's query may attend, over the columns
        the next `update_and_fetch` returns (causal among the new positions, within the
        window on a sliding layer)."""
        # row i's query j sits `lag_i + n_queries - 1 - j` columns before the last one
        width = self._width(n_queries)
        lags = mx.array(self.lags)[:, None, None]
        lengths = mx.array(self.lengths)[:, None, None]
        column = mx.arange(width)[None, None]
        query = width - 1 - lags - (n_queries - 1 - mx.arange(n_queries))[None, :, None]
        first = width - lags - n_queries - lengths  # the row's oldest position
        if self.window is not None:
            first = mx.maximum(first, query - self.window + 1)
        return ((column >= first) & (column <= query))[:, None]

    def stored(self, last: int | None = None) -> tuple[Any, mx.array]:
        """Every row's positions (its `last` newest when given) and the mask [rows, 1, 1,
        columns] that picks them: what a reader outside the target (an assistant drafter)
        attends over from each row's next position."""
        seen = [n if last is None else min(n, last) for n in self.lengths]
        width = max(lag + n for lag, n in zip(self.lags, seen, strict=True))
        start = self.end - width
        after = width - mx.array(self.lags)[:, None]  # the column after each row's newest
        column = mx.arange(width)[None]
        mask = (column >= after - mx.array(seen)[:, None]) & (column < after)
        mask = mask[:, None, None, :]
        return self._view([p[..., start : self.end, :] for p in self.parts]), mask

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
