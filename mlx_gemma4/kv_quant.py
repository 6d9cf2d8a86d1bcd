"""A TurboQuant-style KV cache for full-attention layers: rotated, then affine-quantized K/V.

Keys and values are rotated over the head dimension by a fixed randomized Hadamard transform
R = H·diag(signs)/sqrt(D), which spreads outlier channels over all channels, and are then
stored with MLX affine quantization (separate bit widths for keys and values). On a GPU,
attention never dequantizes the cache: R is orthogonal, so q·k = (Rq)·(Rk) and the scores come from
`quantized_matmul` of the rotated queries against the packed keys; the probabilities times the
packed values give the output in the rotated space, and R^T brings it back. Both rotations act
on queries and outputs only, which are short next to the cache.

MLX's CPU `quantized_matmul` runs a matrix-vector product per query row, 7x slower than BLAS
for the 8 rows of an E2B decode step. On the CPU the cache is instead dequantized a block of
positions at a time, straight from the packed bytes where codes fill whole bytes (2, 4 and 8
bits), and attended with BLAS; the packed form stays the same on every backend. A prefill
chunk longer than `QUERY_BLOCK` dequantizes the cache once per query block: the price of never
holding all of it in float.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import _BaseCache

from .errors import Gemma4Error
from .models.activations import softmax
from .models.layers import on_cpu
from .packing import AFFINE_BITS, AFFINE_GROUPS

__all__ = [
    "KVQuantization",
    "KVQuantizationError",
    "QuantizedFullAttentionCache",
    "QuantizedKV",
    "quantized_attention",
]

QUERY_BLOCK = 512  # queries attended at once in a long prefill chunk
DEQUANTIZED_BLOCK = 2**19  # cache elements dequantized at once on the CPU (2 MiB in float32)

Packed = tuple[mx.array, mx.array, mx.array]  # (packed uint32 codes, scales, biases)


class KVQuantizationError(Gemma4Error):
    """An unsupported KV-cache quantization setting."""


@dataclass(frozen=True)
class KVQuantization:
    """Bit widths of the cached keys and values of full-attention layers, and their group size.

    The group size shrinks to the head dimension when that is smaller (tiny test models).
    """

    key_bits: int
    value_bits: int
    group_size: int = 64

    def __post_init__(self) -> None:
        for name, bits in (("key", self.key_bits), ("value", self.value_bits)):
            if bits not in AFFINE_BITS:
                raise KVQuantizationError(
                    f"KV {name} bits must be one of {', '.join(map(str, AFFINE_BITS))}, not {bits}"
                )
        if self.group_size not in AFFINE_GROUPS:
            raise KVQuantizationError(f"KV group size must be 32, 64 or 128, not {self.group_size}")

    @classmethod
    def from_bits(
        cls, bits: int | None = None, key_bits: int | None = None, value_bits: int | None = None
    ) -> KVQuantization | None:
        """`bits` sets both widths, `key_bits` / `value_bits` override one; None when all are."""
        if bits is None and key_bits is None and value_bits is None:
            return None
        key_bits = bits if key_bits is None else key_bits
        value_bits = bits if value_bits is None else value_bits
        if key_bits is None or value_bits is None:
            raise KVQuantizationError(
                "KV quantization needs both key and value bits (or kv_bits, which sets both)"
            )
        return cls(key_bits, value_bits)

    def group_for(self, head_dim: int) -> int:
        group = min(self.group_size, head_dim)
        if group not in AFFINE_GROUPS or head_dim % group:
            raise KVQuantizationError(f"cannot quantize KV with head dimension {head_dim}")
        return group

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | None) -> KVQuantization | None:
        return None if text in (None, "null") else cls(**json.loads(text))

    def __str__(self) -> str:
        return f"{self.key_bits}-bit keys / {self.value_bits}-bit values"


def rotation_signs(head_dim: int, seed: int) -> mx.array:
    """The fixed random ±1 diagonal of a randomized Hadamard rotation."""
    flips = mx.random.bernoulli(0.5, (head_dim,), key=mx.random.key(seed))
    return mx.where(flips, 1.0, -1.0)


def rotate(x: mx.array, signs: mx.array) -> mx.array:
    """R x over the last axis: flip signs, then the orthonormal Hadamard transform."""
    return mx.hadamard_transform(x * signs.astype(x.dtype), scale=x.shape[-1] ** -0.5)


def unrotate(x: mx.array, signs: mx.array) -> mx.array:
    """R^T x: the Hadamard transform is its own inverse, then flip the signs back."""
    return mx.hadamard_transform(x, scale=x.shape[-1] ** -0.5) * signs.astype(x.dtype)


@dataclass
class QuantizedKV:
    """What a quantized cache hands to attention (and to the layers that share its K/V)."""

    keys: Packed  # rotated keys [B, kv heads, T, D], packed
    values: Packed  # rotated values, packed
    signs: mx.array  # the rotation's sign diagonal [D]
    key_bits: int
    value_bits: int
    group_size: int

    def dequantize(self) -> tuple[mx.array, mx.array]:
        """Float keys and values as stored (un-rotated): the reference for the quantized path."""

        def restore(packed: Packed, bits: int) -> mx.array:
            rotated = mx.dequantize(*packed, group_size=self.group_size, bits=bits)
            return unrotate(rotated, self.signs)

        return restore(self.keys, self.key_bits), restore(self.values, self.value_bits)


def _causal(n_queries: int, n_keys: int) -> mx.array:
    queries = mx.arange(n_keys - n_queries, n_keys)
    return queries[:, None] >= mx.arange(n_keys)[None]


def quantized_attention(
    queries: mx.array, kv: QuantizedKV, *, scale: float, mask: Any = None
) -> mx.array:
    """Attention of `queries` [B, H, L, D] over a quantized cache; H may be a multiple of its
    KV heads (grouped-query attention). `mask`: None, "causal", or a bool / additive array
    broadcastable to [B, H, L, T].

    Long prefill chunks go `QUERY_BLOCK` queries at a time, so the scores held at once stay
    [B, H, QUERY_BLOCK, T] however long the chunk is.
    """
    length, n_keys = queries.shape[2], kv.keys[0].shape[2]
    if length <= QUERY_BLOCK:
        return _attend(queries, kv, scale, mask)
    if isinstance(mask, str):
        mask = _causal(length, n_keys)
    blocks = []
    for start in range(0, length, QUERY_BLOCK):
        rows = slice(start, start + QUERY_BLOCK)
        block_mask = mask if mask is None or mask.shape[-2] == 1 else mask[..., rows, :]
        blocks.append(_attend(queries[:, :, rows], kv, scale, block_mask))
    return mx.concatenate(blocks, axis=2)


def _attend(queries: mx.array, kv: QuantizedKV, scale: float, mask: Any) -> mx.array:
    batch, n_heads, length, head_dim = queries.shape
    kv_heads = kv.keys[0].shape[1]
    per_kv = n_heads // kv_heads
    if scale != 1.0:
        queries = queries * scale
    # the query heads of one KV head become rows of one matrix against that head's keys
    rows = rotate(queries, kv.signs).reshape(batch, kv_heads, per_kv * length, head_dim)
    scores = _scores(rows, kv)
    if mask is not None:
        n_keys = scores.shape[-1]
        scores = scores.reshape(batch, kv_heads, per_kv, length, n_keys)
        if isinstance(mask, str):
            mask = _causal(length, n_keys)
        elif mask.ndim == 4:  # [B, H or 1, L, T] -> [B, kv heads or 1, per_kv or 1, L, T]
            head_groups = 1 if mask.shape[1] == 1 else per_kv
            mask = mask.reshape(mask.shape[0], -1, head_groups, *mask.shape[2:])
        if mask.dtype == mx.bool_:
            scores = mx.where(mask, scores, mx.finfo(scores.dtype).min)
        else:
            scores = scores + mask.astype(scores.dtype)
        scores = scores.reshape(batch, kv_heads, per_kv * length, n_keys)
    out = _weighted_values(softmax(scores), kv).astype(queries.dtype)
    return unrotate(out.reshape(batch, n_heads, length, head_dim), kv.signs)


def _scores(rows: mx.array, kv: QuantizedKV) -> mx.array:
    """Rotated query rows [B, H_kv, R, D] times the stored keys -> [B, H_kv, R, T]."""
    if not on_cpu():
        return mx.quantized_matmul(
            rows, *kv.keys, transpose=True, group_size=kv.group_size, bits=kv.key_bits
        )
    blocks = []
    for planes in _dequantized_blocks(kv.keys, kv.key_bits, kv.group_size):
        stride = len(planes)
        products = [rows[..., k::stride] @ plane.swapaxes(-1, -2) for k, plane in enumerate(planes)]
        blocks.append(sum(products[1:], products[0]))
    return mx.concatenate(blocks, axis=-1) if len(blocks) > 1 else blocks[0]


def _weighted_values(probs: mx.array, kv: QuantizedKV) -> mx.array:
    """Probabilities [B, H_kv, R, T] times the stored values -> rotated outputs [B, H_kv, R, D]."""
    if not on_cpu():
        return mx.quantized_matmul(
            probs, *kv.values, transpose=False, group_size=kv.group_size, bits=kv.value_bits
        )
    outputs, start = None, 0
    for planes in _dequantized_blocks(kv.values, kv.value_bits, kv.group_size):
        weights = probs[..., start : start + planes[0].shape[-2]]
        start += planes[0].shape[-2]
        products = [weights @ plane for plane in planes]
        outputs = (
            products if outputs is None else [a + b for a, b in zip(outputs, products, strict=True)]
        )
    if len(outputs) == 1:
        return outputs[0]
    # plane k holds dimensions k, k + stride, ...: interleave them back
    return mx.stack(outputs, axis=-1).reshape(*probs.shape[:-1], -1)


def _dequantized_blocks(packed: Packed, bits: int, group_size: int) -> Iterator[list[mx.array]]:
    """The stored positions, a block at a time, as float32 planes: plane k of `stride` holds
    head dimensions k, k + stride, ... (a single plane when codes straddle bytes)."""
    codes, scales, biases = packed
    batch, heads, n_keys, words = codes.shape
    head_dim = words * 32 // bits
    block = max(1, DEQUANTIZED_BLOCK // (batch * heads * head_dim))
    for start in range(0, n_keys, block):
        part = slice(start, start + block)
        yield _dequantize_planes(
            codes[..., part, :], scales[..., part, :], biases[..., part, :], bits, group_size
        )


def _dequantize_planes(
    codes: mx.array, scales: mx.array, biases: mx.array, bits: int, group_size: int
) -> list[mx.array]:
    if 8 % bits:
        plane = mx.dequantize(codes, scales, biases, group_size=group_size, bits=bits)
        return [plane.astype(mx.float32)]
    stride = 8 // bits  # codes per byte, lowest bits first (MLX's packing, little-endian)
    packed_bytes = codes.view(mx.uint8)
    grouped = (*packed_bytes.shape[:-1], -1, group_size // stride)
    scales = scales.astype(mx.float32)[..., None]
    biases = biases.astype(mx.float32)[..., None]
    planes = []
    for k in range(stride):
        plane = packed_bytes if stride == 1 else (packed_bytes >> (k * bits)) & (2**bits - 1)
        plane = plane.astype(mx.float32).reshape(grouped) * scales + biases
        planes.append(plane.reshape(packed_bytes.shape))
    return planes


class QuantizedFullAttentionCache(_BaseCache):
    """A growing full-attention cache of rotated, quantized keys and values.

    Storage grows in `step`-position blocks; `trim` only moves the end back. Its state is the
    six packed arrays (keys then values: codes, scales, biases) up to the last position.
    """

    step = 256

    def __init__(self, quantization: KVQuantization, seed: int = 0):
        self.quantization = quantization
        self.seed = seed  # picks the rotation; fixed per layer, kept in meta_state
        self.keys: Packed | None = None
        self.values: Packed | None = None
        self.offset = 0
        self._signs: mx.array | None = None

    def _rotation(self, head_dim: int) -> mx.array:
        if self._signs is None or self._signs.shape[0] != head_dim:
            self._signs = rotation_signs(head_dim, self.seed)
        return self._signs

    def _quantize(self, x: mx.array, bits: int) -> Packed:
        rotated = rotate(x, self._rotation(x.shape[-1]))
        group = self.quantization.group_for(x.shape[-1])
        return tuple(mx.quantize(rotated, group_size=group, bits=bits))

    def _make_room(self, keys: Packed, values: Packed, n: int) -> None:
        if self.keys is not None and self.offset + n <= self.keys[0].shape[2]:
            return
        grow = (n + self.step - 1) // self.step * self.step

        def extend(stored: Packed | None, new: Packed) -> Packed:
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
        def visible(stored: Packed) -> Packed:
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
            self.quantization.group_for(head_dim),
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
        self.keys, self.values = tuple(value[:3]), tuple(value[3:])
        self.offset = self.keys[0].shape[2]

    @property
    def meta_state(self):
        q = self.quantization
        return tuple(map(str, (q.key_bits, q.value_bits, q.group_size, self.seed)))

    @meta_state.setter
    def meta_state(self, value) -> None:
        key_bits, value_bits, group_size, self.seed = map(int, value)
        self.quantization = KVQuantization(key_bits, value_bits, group_size)
        self._signs = None

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return sum(part.nbytes for part in (*self.keys, *self.values))
