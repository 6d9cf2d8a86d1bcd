"""A TurboQuant-style KV cache for full-attention layers: rotated vectors, one scale each.

Keys and values are rotated over the head dimension by a fixed randomized Hadamard transform
R = H·diag(signs)/sqrt(D). The rotation spreads outlier channels over all channels, so the
coordinates of a rotated vector all follow nearly the same Gaussian and, as in TurboQuant, one
scale per vector is enough: the step of a uniform quantizer, either the one optimal for a
Gaussian of the vector's RMS or the one that just spans its largest coordinate, whichever
reconstructs the vector better. Codes are packed as MLX packs them (a little-endian bitstream
in uint32 words), next to one float32 scale per position and head: 1/16 of a bit per element
at head dimension 512, where MLX's group-wise affine quantization spends half a bit on a scale
and bias per 64 (in bfloat16).

Attention never dequantizes the whole cache. R is orthogonal, so q·k = (Rq)·(Rk): the scores
are the rotated queries times the codes, scaled per position afterwards; the values' scales
multiply the probabilities first, and R^T brings the output back. On a GPU the products with
the codes are `quantized_matmul` with unit scales. MLX's CPU `quantized_matmul` runs a
matrix-vector product per query row (7x slower than BLAS for the 8 rows of an E2B decode step),
so on the CPU the codes are unpacked a block of positions at a time, straight from the packed
bytes where codes fill whole bytes (2, 4 and 8 bits), and multiplied with BLAS. A prefill chunk
longer than `QUERY_BLOCK` unpacks the cache once per query block: the price of never holding
all of it in float.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import _BaseCache

from .errors import KVQuantizationError
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
UNPACKED_BLOCK = 2**19  # cache elements unpacked at once on the CPU (2 MiB in float32)

# The step of the uniform quantizer with 2^bits levels that minimizes the mean squared error on
# a unit Gaussian (Max, 1960; tests/test_kv_quant.py checks each is the minimum).
GAUSSIAN_STEP = {2: 0.9957, 3: 0.5860, 4: 0.3352, 5: 0.1881, 6: 0.1041, 8: 0.03076}

Quantized = tuple[mx.array, mx.array]  # (packed uint32 codes, float32 scales [..., 1])


@dataclass(frozen=True)
class KVQuantization:
    """Bit widths of the cached keys and values of full-attention layers."""

    key_bits: int
    value_bits: int

    def __post_init__(self) -> None:
        for name, bits in (("key", self.key_bits), ("value", self.value_bits)):
            if bits not in AFFINE_BITS:
                raise KVQuantizationError(
                    f"KV {name} bits must be one of {', '.join(map(str, AFFINE_BITS))}, not {bits}"
                )

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


def _center(bits: int) -> float:
    """Code c stands for (c - center) * scale: the levels are symmetric around zero."""
    return (2**bits - 1) / 2


def require_packable(head_dim: int) -> None:
    """Packed codes fill whole uint32 words at every width only for multiples of 32."""
    if head_dim % 32:
        raise KVQuantizationError(
            f"cannot quantize the KV cache of head dimension {head_dim}: it is not a multiple "
            "of 32; run without KV quantization"
        )


def quantize_vectors(x: mx.array, bits: int) -> Quantized:
    """Codes and per-vector scales of `x` over its last axis (a multiple of 32 long).

    Each vector takes whichever step reconstructs it better: the Gaussian-optimal one for its
    RMS, which clips the rare tails, or the one whose outermost levels reach its largest
    coordinate, which clips nothing (the better one at high bit widths)."""
    require_packable(x.shape[-1])
    x = x.astype(mx.float32)
    rms = mx.sqrt(mx.mean(x * x, axis=-1, keepdims=True))
    peak = mx.max(mx.abs(x), axis=-1, keepdims=True)
    codes, scale, error = _quantize_with(x, GAUSSIAN_STEP[bits] * rms, bits)
    peak_codes, peak_scale, peak_error = _quantize_with(x, peak / _center(bits), bits)
    gaussian_wins = error < peak_error
    codes = mx.where(gaussian_wins, codes, peak_codes)
    return pack_codes(codes.astype(mx.uint32), bits), mx.where(gaussian_wins, scale, peak_scale)


def _quantize_with(x: mx.array, scale: mx.array, bits: int) -> tuple[mx.array, ...]:
    """Codes of `x` at step `scale`, the step, and the squared error of each vector."""
    scale = mx.maximum(scale, 1e-30)  # an all-zero vector
    codes = mx.clip(mx.floor(x / scale) + 2 ** (bits - 1), 0, 2**bits - 1)
    error = mx.sum(mx.square((codes - _center(bits)) * scale - x), axis=-1, keepdims=True)
    return codes, scale, error


def pack_codes(codes: mx.array, bits: int) -> mx.array:
    """Codes [..., D] as MLX packs them: value i at bit i*bits of a little-endian bitstream."""
    # 8 codes fill `bits` whole bytes; code i's bits land in byte j shifted by i*bits - 8j
    # (clamped to [-8, 8], which keeps every shift defined and still leaves 0 for no overlap)
    offsets = [[min(max(i * bits - 8 * j, -8), 8) for j in range(bits)] for i in range(8)]
    left = mx.array([[max(o, 0) for o in row] for row in offsets], dtype=mx.uint32)
    right = mx.array([[max(-o, 0) for o in row] for row in offsets], dtype=mx.uint32)
    octets = codes.astype(mx.uint32).reshape(*codes.shape[:-1], -1, 8, 1)
    packed = (((octets << left) >> right) & 0xFF).sum(axis=-2)  # disjoint bits: sum is OR
    return packed.astype(mx.uint8).reshape(*codes.shape[:-1], -1).view(mx.uint32)


def _unit_affine(codes: mx.array, bits: int, dtype: mx.Dtype) -> dict[str, Any]:
    """MLX affine arguments that read packed `codes` as centered codes c - center."""
    head_dim = codes.shape[-1] * 32 // bits
    group = next(g for g in reversed(AFFINE_GROUPS) if head_dim % g == 0)
    shape = (*codes.shape[:-1], head_dim // group)
    return dict(
        scales=mx.broadcast_to(mx.array(1, dtype), shape),
        biases=mx.broadcast_to(mx.array(-_center(bits), dtype), shape),
        group_size=group,
        bits=bits,
    )


@dataclass
class QuantizedKV:
    """What a quantized cache hands to attention (and to the layers that share its K/V)."""

    keys: Quantized  # rotated keys [B, kv heads, T, D]: packed codes, scales [B, kv heads, T, 1]
    values: Quantized  # rotated values, the same way
    signs: mx.array  # the rotation's sign diagonal [D]
    key_bits: int
    value_bits: int

    def dequantize(self) -> tuple[mx.array, mx.array]:
        """Float keys and values as stored (un-rotated): the reference for the quantized path."""

        def restore(quantized: Quantized, bits: int) -> mx.array:
            codes, scales = quantized
            centered = mx.dequantize(codes, **_unit_affine(codes, bits, mx.float32))
            return unrotate(centered * scales, self.signs)

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
    key_codes, key_scales = kv.keys
    scores = _times_codes_transposed(rows, key_codes, kv.key_bits) * key_scales.swapaxes(-1, -2)
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
    value_codes, value_scales = kv.values
    weights = softmax(scores) * value_scales.swapaxes(-1, -2)
    out = _times_codes(weights, value_codes, kv.value_bits).astype(queries.dtype)
    return unrotate(out.reshape(batch, n_heads, length, head_dim), kv.signs)


def _times_codes_transposed(rows: mx.array, codes: mx.array, bits: int) -> mx.array:
    """Rows [B, H_kv, R, D] times the centered codes [B, H_kv, T, D], transposed -> [..., R, T]."""
    if not on_cpu():
        return mx.quantized_matmul(
            rows, codes, transpose=True, **_unit_affine(codes, bits, rows.dtype)
        )
    blocks = []
    for planes in _unpacked_blocks(codes, bits):
        stride = len(planes)
        products = [rows[..., k::stride] @ plane.swapaxes(-1, -2) for k, plane in enumerate(planes)]
        blocks.append(sum(products[1:], products[0]))
    raw = mx.concatenate(blocks, axis=-1) if len(blocks) > 1 else blocks[0]
    return raw - _plane_offset(bits) * rows.sum(axis=-1, keepdims=True)


def _times_codes(weights: mx.array, codes: mx.array, bits: int) -> mx.array:
    """Weights [B, H_kv, R, T] times the centered codes [B, H_kv, T, D] -> [B, H_kv, R, D]."""
    if not on_cpu():
        return mx.quantized_matmul(
            weights, codes, transpose=False, **_unit_affine(codes, bits, weights.dtype)
        )
    outputs, start = None, 0
    for planes in _unpacked_blocks(codes, bits):
        block = weights[..., start : start + planes[0].shape[-2]]
        start += planes[0].shape[-2]
        products = [block @ plane for plane in planes]
        outputs = (
            products if outputs is None else [a + b for a, b in zip(outputs, products, strict=True)]
        )
    # plane k holds dimensions k, k + stride, ...: interleave them back
    raw = (
        outputs[0]
        if len(outputs) == 1
        else mx.stack(outputs, axis=-1).reshape(*weights.shape[:-1], -1)
    )
    return raw - _plane_offset(bits) * weights.sum(axis=-1, keepdims=True)


def _unpacked_blocks(codes: mx.array, bits: int) -> Iterator[list[mx.array]]:
    """The stored codes, a block of positions at a time, as float32 planes: plane k of `stride`
    holds head dimensions k, k + stride, ... (a single plane when codes straddle bytes)."""
    batch, heads, n_keys, words = codes.shape
    head_dim = words * 32 // bits
    block = max(1, UNPACKED_BLOCK // (batch * heads * head_dim))
    for start in range(0, n_keys, block):
        yield _code_planes(codes[..., start : start + block, :], bits)


def _code_planes(codes: mx.array, bits: int) -> list[mx.array]:
    """Float32 planes whose entries minus `_plane_offset(bits)` are the centered codes."""
    if 8 % bits:
        return [mx.dequantize(codes, **_unit_affine(codes, bits, mx.float32))]
    return _BYTE_PLANES[bits](codes.view(mx.uint8))


def _byte_plane_unpacker(bits: int) -> Callable[[mx.array], list[mx.array]]:
    """One fused kernel from packed bytes to planes of c - 2^(bits-1): nearly centered, so the
    products' sums stay small and lose nothing to the correction that finishes centering."""
    stride, mask, half = 8 // bits, 2**bits - 1, 2 ** (bits - 1)

    def unpack(packed_bytes: mx.array) -> list[mx.array]:
        # codes sit lowest bits first (MLX's packing, little-endian)
        planes = [(packed_bytes >> (bits * k)) & mask for k in range(stride)]
        return [plane.astype(mx.float32) - half for plane in planes]

    # shapeless: the last block's length changes every decode step, and these integer constants
    # do not suffer the broadcast slowdown that keeps `activations` compiled per shape
    return mx.compile(unpack, shapeless=True)


_BYTE_PLANES = {bits: _byte_plane_unpacker(bits) for bits in (2, 4, 8)}


def _plane_offset(bits: int) -> float:
    """What `_code_planes` entries exceed the centered codes by."""
    if 8 % bits:
        return 0.0  # mx.dequantize centered them
    return _center(bits) - 2 ** (bits - 1)  # byte planes hold c - 2^(bits-1)


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
