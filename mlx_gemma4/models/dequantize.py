"""Dequantizing affine weights on the CPU, and many-row products through the float weight.

MLX's CPU `quantized_matmul` computes one matrix-vector product per input row, so its cost grows
with every row, while a float32 BLAS GEMM costs about the same for 1 to 32 rows. Past a few rows
it is cheaper to dequantize the weight and run the GEMM, if the dequantization is cheap:
`mx.dequantize`'s CPU kernel is about half as fast as the same arithmetic written as MLX
operations (unpack by shifts and a mask, then `q * scale + bias` per group), which compiles to
one fused pass and gives bit-identical values.

The float weight is made a slice of output rows at a time, so a 262k-row tied LM head never
exists whole in float32, and each slice is still in cache when its GEMM reads it: for a batch's
decode step, slices of about 128 KiB run the head 2-3x faster than one whole-matrix pass.
"""

from __future__ import annotations

import mlx.core as mx

# Bit widths whose codes never straddle a 32-bit word (the others keep `mx.dequantize`).
FAST_BITS = (2, 4, 8)

# Float elements of the weight dequantized at a time, per input row: a few rows (a decode step)
# get cache-sized slices (128 KiB in float32), a prefill chunk wider ones, so that its GEMM
# keeps enough output columns to run at full speed (measured on E2B's MLP weight and head).
SLICE_ELEMENTS_PER_ROW = 1 << 11
MIN_SLICE_ELEMENTS, MAX_SLICE_ELEMENTS = 1 << 15, 1 << 21


def has_fast_path(bits: int, mode: str, biases: mx.array | None) -> bool:
    return mode == "affine" and bits in FAST_BITS and biases is not None


def _affine(weight: mx.array, scales: mx.array, biases: mx.array, group_size: int, bits: int):
    rows, groups = scales.shape
    shifts = mx.arange(0, 32, bits, dtype=mx.uint32)
    codes = (weight[..., None] >> shifts) & ((1 << bits) - 1)
    codes = codes.reshape(rows, groups, group_size).astype(scales.dtype)
    return (codes * scales[..., None] + biases[..., None]).reshape(rows, groups * group_size)


# One fused kernel per shape (MLX's shapeless CPU kernels run elementwise chains much slower).
_compiled_affine = mx.compile(_affine)


def dequantize(
    weight: mx.array,
    scales: mx.array,
    biases: mx.array | None,
    *,
    group_size: int,
    bits: int,
    mode: str = "affine",
) -> mx.array:
    """`mx.dequantize` of a 2-D weight, bit for bit, faster for affine 2-, 4- and 8-bit."""
    if not has_fast_path(bits, mode, biases) or weight.ndim != 2:
        return mx.dequantize(weight, scales, biases, group_size=group_size, bits=bits, mode=mode)
    return _compiled_affine(weight, scales, biases, group_size, bits)


def slice_elements(input_rows: int) -> int:
    """How many float elements of the weight to dequantize at a time for `input_rows` rows."""
    return min(max(input_rows * SLICE_ELEMENTS_PER_ROW, MIN_SLICE_ELEMENTS), MAX_SLICE_ELEMENTS)


def dequantized_matmul(
    x: mx.array,
    weight: mx.array,
    scales: mx.array,
    biases: mx.array | None,
    *,
    group_size: int,
    bits: int,
    mode: str = "affine",
) -> mx.array:
    """`x @ W.T` for the quantized weight W [out, in], through its float form a slice of
    output rows at a time."""
    rows = weight.shape[0]
    inputs = weight.shape[1] * 32 // bits
    step = max(1, slice_elements(x.size // inputs) // inputs)
    outputs = []
    for first in range(0, rows, step):
        part = slice(first, first + step)
        float_weight = dequantize(
            weight[part],
            scales[part],
            None if biases is None else biases[part],
            group_size=group_size,
            bits=bits,
            mode=mode,
        )
        outputs.append(x @ float_weight.astype(x.dtype).T)
    return outputs[0] if len(outputs) == 1 else mx.concatenate(outputs, axis=-1)
