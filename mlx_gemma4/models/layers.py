"""The model's linear layer, whose quantized form picks the faster kernel for the backend."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

# Inputs with at least this many rows (prefill chunks) count as matrix-matrix products.
MATRIX_ROWS = 16


def on_cpu() -> bool:
    return mx.default_device() == mx.cpu


class QuantizedLinear(nn.QuantizedLinear):
    """`nn.QuantizedLinear`, except for many-row inputs on the CPU backend.

    MLX's CPU `quantized_matmul` does not use BLAS: for a 512-token prefill chunk it is ~15x
    slower than dequantizing the weight and running a float32 GEMM (measured with OpenBLAS;
    still faster with the bundled BLAS). One-row decode steps keep the packed kernel, which
    reads 4-8x fewer bytes. On a GPU the packed kernel is always used.
    """

    def __call__(self, x: mx.array) -> mx.array:
        if x.size < MATRIX_ROWS * x.shape[-1] or not on_cpu():
            return super().__call__(x)
        weight = mx.dequantize(
            self.weight,
            self.scales,
            self.get("biases"),
            group_size=self.group_size,
            bits=self.bits,
            mode=self.mode,
        )
        out = x @ weight.astype(x.dtype).T
        return out + self.bias if "bias" in self else out


class Linear(nn.Linear):
    def to_quantized(
        self,
        group_size: int | None = None,
        bits: int | None = None,
        mode: str = "affine",
        quantize_input: bool = False,
    ) -> nn.Module:
        if quantize_input:
            return super().to_quantized(group_size, bits, mode, quantize_input)
        return QuantizedLinear.from_linear(self, group_size, bits, mode)
