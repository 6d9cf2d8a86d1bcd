"""The CPU route of quantized products with many rows: dequantizing bit for bit as
`mx.dequantize` does, a float weight made a slice at a time, and the layers that take it."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import pytest

from mlx_gemma4.models import dequantize as dq
from mlx_gemma4.models.layers import (
    MATRIX_ROWS,
    SLOW_MATRIX_ROWS,
    Embedding,
    Linear,
    QuantizedEmbedding,
    QuantizedLinear,
)


def packed(rows: int, columns: int, *, dtype=mx.float32, seed: int = 0, **scheme):
    weight = mx.random.normal((rows, columns), key=mx.random.key(seed)) * 0.05
    return mx.quantize(weight.astype(dtype), **scheme)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_fast_dequantize_is_bit_identical(bits, group_size, dtype):
    for rows, columns in [(1, 128), (7, 384), (96, 512)]:
        scheme = dict(group_size=group_size, bits=bits)
        weight, scales, biases = packed(rows, columns, dtype=dtype, seed=rows, **scheme)
        assert dq.has_fast_path(bits, "affine", biases)
        ours = dq.dequantize(weight, scales, biases, **scheme)
        expected = mx.dequantize(weight, scales, biases, **scheme)
        assert ours.dtype == expected.dtype == dtype and ours.shape == (rows, columns)
        assert mx.array_equal(ours, expected).item()


@pytest.mark.parametrize(
    "scheme",
    [dict(bits=3, group_size=64), dict(bits=6, group_size=32), dict(bits=4, mode="mxfp4")],
)
def test_other_schemes_keep_mx_dequantize(scheme):
    parts = packed(16, 256, **scheme)
    biases = parts[2] if len(parts) > 2 else None
    mode = scheme.get("mode", "affine")
    assert not dq.has_fast_path(scheme["bits"], mode, biases)
    group_size = scheme.get("group_size", 32)
    args = dict(group_size=group_size, bits=scheme["bits"], mode=mode)
    expected = mx.dequantize(parts[0], parts[1], biases, **args)
    assert mx.array_equal(dq.dequantize(parts[0], parts[1], biases, **args), expected).item()


def test_sliced_product_equals_the_whole_weights(monkeypatch):
    weight, scales, biases = packed(1000, 256, group_size=64, bits=4)
    x = mx.random.normal((16, 256), key=mx.random.key(1))
    float_weight = mx.dequantize(weight, scales, biases, group_size=64, bits=4)
    expected = x @ float_weight.T
    monkeypatch.setattr(dq, "MIN_SLICE_ELEMENTS", 300 * 256)  # slices of 300, 300, 300, 100 rows
    ours = dq.dequantized_matmul(x, weight, scales, biases, group_size=64, bits=4)
    assert ours.shape == (16, 1000)
    assert mx.allclose(ours, expected, rtol=1e-6, atol=1e-6).item()
    packed_product = mx.quantized_matmul(x, weight, scales, biases, group_size=64, bits=4)
    assert mx.allclose(ours, packed_product, rtol=1e-4, atol=1e-5).item()


def test_the_float_weight_never_exists_whole():
    """A head 256x the slice size: the product needs a small part of its float weight."""
    rows, columns = 16_384, 512  # 32 MiB in float32
    weight, scales, biases = packed(rows, columns, group_size=64, bits=4)
    x = mx.random.normal((16, columns), key=mx.random.key(2))
    mx.eval(weight, scales, biases, x)
    assert dq.slice_elements(16) == rows * columns // 256
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    out = dq.dequantized_matmul(x, weight, scales, biases, group_size=64, bits=4)
    mx.eval(out)
    extra = mx.get_peak_memory() - before
    assert extra < rows * columns * 4 // 4, f"{extra / 2**20:.1f} MiB"


def linear_and_head(bits: int = 4, mode: str = "affine", group_size: int = 64):
    linear = Linear(256, 384, bias=True)
    embedding = Embedding(384, 256)
    linear.bias = mx.random.normal((384,), key=mx.random.key(3))
    quantized = [m.to_quantized(group_size, bits, mode) for m in (linear, embedding)]
    assert isinstance(quantized[0], QuantizedLinear)
    assert isinstance(quantized[1], QuantizedEmbedding)
    return quantized


def packed_kernel(module, x):
    return mx.quantized_matmul(
        x,
        module.weight,
        module.scales,
        module.get("biases"),
        group_size=module.group_size,
        bits=module.bits,
        mode=module.mode,
    )


@pytest.mark.parametrize("bits", [4, 8])
def test_linear_and_tied_head_take_the_float_route_from_matrix_rows(bits):
    linear, head = linear_and_head(bits)
    for rows in (1, MATRIX_ROWS - 1, MATRIX_ROWS, 16):
        x = mx.random.normal((2, rows // 2 or 1, 256) if rows > 1 else (1, 256))
        for module, ours in ((linear, linear(x)), (head, head.as_linear(x))):
            packed_out = packed_kernel(module, x)
            if "bias" in module:
                packed_out = packed_out + module.bias
            if x.size < MATRIX_ROWS * 256:
                assert mx.array_equal(ours, packed_out).item()
                continue
            float_out = dq.dequantized_matmul(
                x,
                module.weight,
                module.scales,
                module.biases,
                group_size=module.group_size,
                bits=bits,
            )
            if "bias" in module:
                float_out = float_out + module.bias
            assert mx.array_equal(ours, float_out).item()
            assert mx.allclose(ours, packed_out, rtol=1e-4, atol=1e-5).item()


def test_modes_without_the_fast_path_wait_for_more_rows():
    linear, head = linear_and_head(bits=4, mode="mxfp4", group_size=32)
    x = mx.random.normal((MATRIX_ROWS, 256))
    assert mx.array_equal(head.as_linear(x), packed_kernel(head, x)).item()
    x = mx.random.normal((SLOW_MATRIX_ROWS, 256))
    assert mx.allclose(head.as_linear(x), packed_kernel(head, x), rtol=1e-4, atol=1e-5).item()


def test_a_quantized_text_model_gets_the_tied_head(tiny):
    from mlx_gemma4 import load_model
    from mlx_gemma4.quantize import quantize_model

    model = load_model(tiny("dense")[0], dtype=mx.float32)
    quantize_model(model, bits=4, group_size=32)
    table = model.language_model.embed_tokens
    assert isinstance(table, QuantizedEmbedding) and isinstance(table, nn.QuantizedEmbedding)
    hidden = mx.random.normal((1, MATRIX_ROWS, model.config.text_config.hidden_size))
    assert mx.allclose(
        table.as_linear(hidden), packed_kernel(table, hidden), rtol=1e-4, atol=1e-5
    ).item()
