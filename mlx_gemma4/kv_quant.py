"""The codec of a TurboQuant-style KV cache for full-attention layers: rotated vectors, one
scale each.

Keys and values are rotated over the head dimension by a fixed randomized Hadamard transform
R = H·diag(signs)/sqrt(D). The rotation spreads outlier channels over all channels, so the
coordinates of a rotated vector all follow nearly the same Gaussian and, as in TurboQuant, one
scale per vector is enough: the step of a uniform quantizer, either the one optimal for a
Gaussian of the vector's RMS or the one that just spans its largest coordinate, whichever
reconstructs the vector better. Codes are packed as MLX packs them (a little-endian bitstream
in uint32 words), next to one float32 scale per position and head: 1/16 of a bit per element
at head dimension 512, where MLX's group-wise affine quantization spends half a bit on a scale
and bias per 64 (in bfloat16).

The cache that stores them is `cache.QuantizedFullAttentionCache`; attention over them without
dequantizing is `models.attention.quantized_attention`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

import mlx.core as mx

from .errors import KVQuantizationError
from .packing import AFFINE_BITS, AFFINE_GROUPS, pack_codes
from .rotation import rotation_signs

__all__ = [
    "KVQuantization",
    "KVQuantizationError",
    "QuantizedKV",
    "pack_codes",
    "quantize_vectors",
    "rotation_signs",
]

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


def rotate(x: mx.array, signs: mx.array) -> mx.array:
    """R x over the last axis: flip signs, then the orthonormal Hadamard transform."""
    return mx.hadamard_transform(x * signs.astype(x.dtype), scale=x.shape[-1] ** -0.5)


def unrotate(x: mx.array, signs: mx.array) -> mx.array:
    """R^T x: the Hadamard transform is its own inverse, then flip the signs back."""
    return mx.hadamard_transform(x, scale=x.shape[-1] ** -0.5) * signs.astype(x.dtype)


def code_center(bits: int) -> float:
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
    peak_codes, peak_scale, peak_error = _quantize_with(x, peak / code_center(bits), bits)
    gaussian_wins = error < peak_error
    codes = mx.where(gaussian_wins, codes, peak_codes)
    return pack_codes(codes.astype(mx.uint32), bits), mx.where(gaussian_wins, scale, peak_scale)


def _quantize_with(x: mx.array, scale: mx.array, bits: int) -> tuple[mx.array, ...]:
    """Codes of `x` at step `scale`, the step, and the squared error of each vector."""
    scale = mx.maximum(scale, 1e-30)  # an all-zero vector
    codes = mx.clip(mx.floor(x / scale) + 2 ** (bits - 1), 0, 2**bits - 1)
    error = mx.sum(mx.square((codes - code_center(bits)) * scale - x), axis=-1, keepdims=True)
    return codes, scale, error


def unit_affine(codes: mx.array, bits: int, dtype: mx.Dtype) -> dict[str, Any]:
    """MLX affine arguments that read packed `codes` as centered codes c - center."""
    head_dim = codes.shape[-1] * 32 // bits
    group = next(g for g in reversed(AFFINE_GROUPS) if head_dim % g == 0)
    shape = (*codes.shape[:-1], head_dim // group)
    return dict(
        scales=mx.broadcast_to(mx.array(1, dtype), shape),
        biases=mx.broadcast_to(mx.array(-code_center(bits), dtype), shape),
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
            centered = mx.dequantize(codes, **unit_affine(codes, bits, mx.float32))
            return unrotate(centered * scales, self.signs)

        return restore(self.keys, self.key_bits), restore(self.values, self.value_bits)
