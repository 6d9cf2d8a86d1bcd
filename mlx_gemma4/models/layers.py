"""Layers shared by the text decoder and the towers: norms, linears, rotations, codebooks.

Precision: the norms follow the reference's policy and compute in float32 whatever the model's
dtype, rounding once to it at the end (MLX's fused norm rounds the normalized value to the
input dtype before multiplying by the weight, a second rounding the reference does not make).
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn

from .dequantize import dequantized_matmul, has_fast_path

# Inputs with at least this many rows go through the float weight on the CPU (dequantize +
# GEMM): MLX's CPU `quantized_matmul` costs in proportion to its rows, a float32 GEMM about the
# same for 1 to 32 rows, and dequantizing affine 2/4/8-bit weights (`dequantize.py`) is level
# with the packed kernel at about 4 rows and clearly cheaper from 8 (`python benchmarks/
# batch.py --matmul` prints both by rows). Other modes dequantize through `mx.dequantize`,
# about twice as slow, which pays from SLOW_MATRIX_ROWS rows.
MATRIX_ROWS = 8
SLOW_MATRIX_ROWS = 32


def on_cpu() -> bool:
    return mx.default_device() == mx.cpu


def through_float_weight(x: mx.array, module: nn.Module) -> bool:
    """Whether a quantized module's product with `x` is cheaper dequantized (CPU, many rows)."""
    fast = has_fast_path(module.bits, module.mode, module.get("biases"))
    rows = MATRIX_ROWS if fast else SLOW_MATRIX_ROWS
    return x.size >= rows * x.shape[-1] and on_cpu()


def float_weight_product(x: mx.array, module: nn.Module) -> mx.array:
    """`x @ W.T` for a quantized module's weight W, through its float form a slice at a time."""
    return dequantized_matmul(
        x,
        module["weight"],
        module["scales"],
        module.get("biases"),
        group_size=module.group_size,
        bits=module.bits,
        mode=module.mode,
    )


class QuantizedLinear(nn.QuantizedLinear):
    """`nn.QuantizedLinear`, except for many-row inputs on the CPU backend.

    MLX's CPU `quantized_matmul` does not use BLAS: from a few rows on (a batch's decode step,
    a prefill chunk) dequantizing the weight and running a float32 GEMM is faster, by an order
    of magnitude for a prefill chunk. One-row decode steps keep the packed kernel, which reads
    4-8x fewer bytes. On a GPU the packed kernel is always used.
    """

    def __call__(self, x: mx.array) -> mx.array:
        if not through_float_weight(x, self):
            return super().__call__(x)
        out = float_weight_product(x, self)
        return out + self.bias if "bias" in self else out


class QuantizedEmbedding(nn.QuantizedEmbedding):
    """`nn.QuantizedEmbedding` whose `as_linear` (the tied LM head) takes the same CPU route as
    `QuantizedLinear` for many rows: a batch's 16-row step spends most of its time there."""

    def as_linear(self, x: mx.array) -> mx.array:
        if not through_float_weight(x, self):
            return super().as_linear(x)
        return float_weight_product(x, self)


class QuantizesToOurs:
    """`to_quantized` gives this package's quantized class (with its CPU route), unless input
    quantization is asked for (MLX's own classes handle that)."""

    quantized: Callable[..., nn.Module]  # (module, group_size, bits, mode) -> quantized module

    def to_quantized(
        self,
        group_size: int | None = None,
        bits: int | None = None,
        mode: str = "affine",
        quantize_input: bool = False,
    ) -> nn.Module:
        if quantize_input:
            return super().to_quantized(group_size, bits, mode, quantize_input)
        return self.quantized(self, group_size, bits, mode)


class Embedding(QuantizesToOurs, nn.Embedding):
    quantized = QuantizedEmbedding.from_embedding


class RMSNorm(nn.Module):
    """RMSNorm with the weight used as is (no `1 + w`), computed in float32."""

    def __init__(self, dims: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = mx.ones((dims,))

    def __call__(self, x: mx.array) -> mx.array:
        weight = self.weight.astype(mx.float32)
        return mx.fast.rms_norm(x.astype(mx.float32), weight, self.eps).astype(x.dtype)


class RMSNormNoScale(nn.Module):
    """RMSNorm without a weight, computed in float32."""

    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x.astype(mx.float32), None, self.eps).astype(x.dtype)


class Linear(QuantizesToOurs, nn.Linear):
    quantized = QuantizedLinear.from_linear


class ClippableLinear(nn.Module):
    """A bias-free linear whose input and output may be clamped to bounds the checkpoint stores."""

    def __init__(self, input_dims: int, output_dims: int, clipped: bool):
        super().__init__()
        self.linear = Linear(input_dims, output_dims, bias=False)
        self.clipped = clipped
        if clipped:
            self.input_min, self.input_max = mx.array(-mx.inf), mx.array(mx.inf)
            self.output_min, self.output_max = mx.array(-mx.inf), mx.array(mx.inf)

    def __call__(self, x: mx.array) -> mx.array:
        if not self.clipped:
            return self.linear(x)
        x = mx.clip(x, self.input_min, self.input_max)
        return mx.clip(self.linear(x), self.output_min, self.output_max)


# ----------------------------------------------------------------------------- rotations

# mx.hadamard_transform sizes are m * 2^k for these m; its own size check admits some others
# (5376 = 28 * 192) and then crashes, so sizes are checked here.
HADAMARD_BASES = (28, 20, 12, 1)


def is_hadamard_size(n: int) -> bool:
    for base in HADAMARD_BASES:
        if n % base == 0 and (n // base) & (n // base - 1) == 0:
            return True
    return False


def hadamard_blocks(dims: int) -> tuple[int, ...]:
    """Split `dims` into the fewest, largest sizes `mx.hadamard_transform` supports, greedily."""
    blocks = []
    rest = dims
    while rest:
        block = max(
            base << ((rest // base).bit_length() - 1) for base in HADAMARD_BASES if base <= rest
        )
        blocks.append(block)
        rest -= block
    return tuple(blocks)


class Rotation(nn.Module):
    """x -> H·D·x: random signs D, then an orthonormal Hadamard transform H per block.

    A rotated model stores each linear's weight as W·Rᵀ, so that W·x == (W·Rᵀ)·(R·x) and the
    rotated weight has near-Gaussian rows (no outlier channels) for quantization.
    """

    def __init__(self, dims: int, signs: mx.array | None = None):
        super().__init__()
        self.blocks = hadamard_blocks(dims)
        self.splits = tuple(sum(self.blocks[:i]) for i in range(1, len(self.blocks)))
        self.signs = mx.ones((dims,)) if signs is None else signs

    def __call__(self, x: mx.array) -> mx.array:
        x = x * self.signs.astype(x.dtype)
        if len(self.blocks) == 1:
            return mx.hadamard_transform(x, scale=self.blocks[0] ** -0.5)
        parts = mx.split(x, self.splits, axis=-1)
        return mx.concatenate(
            [
                mx.hadamard_transform(part, scale=block**-0.5)
                for part, block in zip(parts, self.blocks, strict=True)
            ],
            axis=-1,
        )


def rotated(module: nn.Module, site: str, x: mx.array) -> mx.array:
    """`x` through the module's rotation named `site`, if it has one (quantized models only)."""
    rotation = module.get(site)
    return x if rotation is None else rotation(x)


# ----------------------------------------------------------------------------- codebooks


class CodebookLinear(nn.Module):
    """A linear whose weight is b-bit indices into a scalar codebook, times a scale per group.

    Indices are packed as MLX packs affine weights, so `mx.dequantize` with unit scales and
    zero biases unpacks them; the float weight exists only for the duration of a call.
    """

    def __init__(
        self, input_dims: int, output_dims: int, bits: int, group_size: int, bias: bool = False
    ):
        super().__init__()
        self.bits, self.group_size, self.mode = bits, group_size, "codebook"
        self.weight = mx.zeros((output_dims, input_dims * bits // 32), dtype=mx.uint32)
        self.scales = mx.zeros((output_dims, input_dims // group_size))
        self.codebook = mx.zeros((2**bits,))
        if bias:
            self.bias = mx.zeros((output_dims,))
        self.freeze()

    def float_weight(self) -> mx.array:
        ones = mx.ones(self.scales.shape, dtype=mx.float32)
        indices = mx.dequantize(
            self.weight, ones, mx.zeros_like(ones), group_size=self.group_size, bits=self.bits
        ).astype(mx.uint32)
        rows, groups = self.scales.shape
        values = self.codebook[indices].reshape(rows, groups, self.group_size)
        return (values * self.scales[..., None]).reshape(rows, -1)

    def __call__(self, x: mx.array) -> mx.array:
        out = x @ self.float_weight().astype(x.dtype).T
        return out + self.bias if "bias" in self else out
