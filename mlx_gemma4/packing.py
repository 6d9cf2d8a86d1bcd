"""What MLX's quantization can pack: read by loading, the quantizers and the KV cache."""

from __future__ import annotations

AFFINE_BITS = (2, 3, 4, 5, 6, 8)
AFFINE_GROUPS = (32, 64, 128)
# The float modes each fix their (bits, group size).
FLOAT_MODES = {"mxfp4": (4, 32), "nvfp4": (4, 16), "mxfp8": (8, 32)}
MODES = ("affine", *FLOAT_MODES)
