"""What MLX's quantization can pack, and the one bit packer: read by loading, the quantizers
and the KV cache."""

from __future__ import annotations

import mlx.core as mx

AFFINE_BITS = (2, 3, 4, 5, 6, 8)
AFFINE_GROUPS = (32, 64, 128)
# The float modes each fix their (bits, group size).
FLOAT_MODES = {"mxfp4": (4, 32), "nvfp4": (4, 16), "mxfp8": (8, 32)}
MODES = ("affine", *FLOAT_MODES)


def pack_codes(codes: mx.array, bits: int) -> mx.array:
    """Codes [..., n] < 2^bits (n a multiple of 32) as MLX packs them: code i at bit i*bits of a
    little-endian bitstream per row, in uint32 words [..., n*bits/32]."""
    # 8 codes fill `bits` whole bytes; code i's bits land in byte j shifted by i*bits - 8j
    # (clamped to [-8, 8], which keeps every shift defined and still leaves 0 for no overlap)
    offsets = [[min(max(i * bits - 8 * j, -8), 8) for j in range(bits)] for i in range(8)]
    left = mx.array([[max(o, 0) for o in row] for row in offsets], dtype=mx.uint32)
    right = mx.array([[max(-o, 0) for o in row] for row in offsets], dtype=mx.uint32)
    octets = codes.astype(mx.uint32).reshape(*codes.shape[:-1], -1, 8, 1)
    packed = (((octets << left) >> right) & 0xFF).sum(axis=-2)  # disjoint bits: sum is OR
    return packed.astype(mx.uint8).reshape(*codes.shape[:-1], -1).view(mx.uint32)
