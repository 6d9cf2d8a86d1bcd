"""KV caches of many sequences decoded together, one row per sequence.

Rows are right-aligned: every row's newest position sits in the same column, and a row that
holds fewer positions than its neighbours is padded on the left. Each step appends one position
to every row; `make_mask` hides the padding, and on sliding-window layers the positions past a
row's own window, so each row attends exactly to what its solo cache would show it.
"""

from __future__ import annotations

import mlx.core as mx


class BatchKVCache:
    """Keys and values [rows, kv heads, columns, head dim] of a full-attention layer
    (`window=None`) or a sliding-window one, for one-token decode steps."""

    # `cache.attention_mask` asks caches that set this for their own per-row mask
    masks_rows = True
    step = 256

    def __init__(self, window: int | None = None):
        self.window = window
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.end = 0  # the column after every row's newest position
        self.lengths: list[int] = []  # valid columns per row, right-aligned at `end`
        self.positions: list[int] = []  # each row's next absolute position

    @property
    def offset(self) -> mx.array:
        """Per-row RoPE offsets of the positions the next step adds."""
        return mx.array(self.positions)

    @property
    def rows(self) -> int:
        return len(self.lengths)

    def _kept(self, length: int) -> int:
        """How many of a row's past positions a future query can still see."""
        return length if self.window is None else min(length, self.window - 1)

    def add_row(self, keys: mx.array | None, values: mx.array | None, position: int) -> None:
        """Append a sequence whose past positions are `keys` / `values` [1, kv heads, L, D]
        (None when it has none yet); `position` is its next absolute position."""
        length = 0 if keys is None else keys.shape[2]
        if length > self._kept(length):
            drop = length - self._kept(length)
            keys, values, length = keys[..., drop:, :], values[..., drop:, :], length - drop
        if length and self.keys is None:
            self._allocate(keys.shape, keys.dtype, values.shape[-1])
        if self.keys is not None:
            if length > self.end:
                self._shift_right(length - self.end)
            width = self.keys.shape[2]
            new_keys = mx.zeros((1, *self.keys.shape[1:]), self.keys.dtype)
            new_values = mx.zeros((1, *self.values.shape[1:]), self.values.dtype)
            if length:
                new_keys[..., self.end - length : self.end, :] = keys
                new_values[..., self.end - length : self.end, :] = values
            assert new_keys.shape[2] == width
            self.keys = mx.concatenate([self.keys, new_keys])
            self.values = mx.concatenate([self.values, new_values])
        self.lengths.append(length)
        self.positions.append(position)

    def keep_rows(self, rows: list[int]) -> None:
        """Drop every row not in `rows` (indices, in their new order) and free its memory."""
        self.lengths = [self.lengths[i] for i in rows]
        self.positions = [self.positions[i] for i in rows]
        if not rows:
            self.keys = self.values = None
            self.end = 0
            return
        if self.keys is None:
            return
        index = mx.array(rows)
        # columns before the longest remaining row are padding for everyone: cut them off
        first = self.end - max(self.lengths)
        self.keys = self.keys[index, :, first:, :]
        self.values = self.values[index, :, first:, :]
        self.end -= first

    def _allocate(self, shape: tuple[int, ...], dtype: mx.Dtype, value_dim: int) -> None:
        _, kv_heads, _, key_dim = shape
        self.keys = mx.zeros((self.rows, kv_heads, self.step, key_dim), dtype)
        self.values = mx.zeros((self.rows, kv_heads, self.step, value_dim), dtype)
        self.end = 0

    def _shift_right(self, by: int) -> None:
        """Move every row `by` columns right (more left padding), with room after `end`."""
        rows, kv_heads, _, key_dim = self.keys.shape
        width = self.end + by + self.step
        keys = mx.zeros((rows, kv_heads, width, key_dim), self.keys.dtype)
        values = mx.zeros((rows, kv_heads, width, self.values.shape[-1]), self.values.dtype)
        keys[..., by : by + self.end, :] = self.keys[..., : self.end, :]
        values[..., by : by + self.end, :] = self.values[..., : self.end, :]
        self.keys, self.values, self.end = keys, values, self.end + by

    def _make_room(self) -> None:
        """Start a new buffer holding only the columns some row can still see."""
        rows, kv_heads, _, key_dim = self.keys.shape
        keep = max(self.lengths, default=0)
        keys = mx.zeros((rows, kv_heads, keep + self.step, key_dim), self.keys.dtype)
        values = mx.zeros((rows, kv_heads, keep + self.step, self.values.shape[-1]), keys.dtype)
        if keep:
            keys[..., :keep, :] = self.keys[..., self.end - keep : self.end, :]
            values[..., :keep, :] = self.values[..., self.end - keep : self.end, :]
        self.keys, self.values, self.end = keys, values, keep

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Append one position per row; return the columns the new queries may see."""
        if keys.shape[2] != 1:
            raise ValueError("a batch cache takes one position per row and step")
        if self.keys is None:
            self._allocate(keys.shape, keys.dtype, values.shape[-1])
        elif self.end >= self.keys.shape[2]:
            self._make_room()
        self.keys[..., self.end : self.end + 1, :] = keys
        self.values[..., self.end : self.end + 1, :] = values
        self.end += 1
        self.lengths = [self._kept(n + 1) for n in self.lengths]
        self.positions = [p + 1 for p in self.positions]
        start = self.end - self._visible_width()
        return self.keys[..., start : self.end, :], self.values[..., start : self.end, :]

    def _visible_width(self) -> int:
        return self.end if self.window is None else min(self.end, self.window)

    def make_mask(self, n_queries: int) -> mx.array:
        """[rows, 1, 1, columns]: True where a row's query may attend, for the columns
        `update_and_fetch` returns next."""
        if n_queries != 1:
            raise ValueError("a batch cache takes one position per row and step")
        end = self.end + 1
        width = end if self.window is None else min(end, self.window)
        seen = mx.array([min(n + 1, width) for n in self.lengths])
        return (mx.arange(width)[None] >= (width - seen)[:, None])[:, None, None, :]

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes
