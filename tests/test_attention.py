"""The CPU attention path (matmuls around the fast softmax) against MLX's fused attention."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from conftest import relative_error, to_numpy

from mlx_gemma4.models.activations import geglu, softcap, softmax
from mlx_gemma4.models.attention import attention


def qkv(batch=2, heads=4, kv_heads=2, queries=40, keys=56, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    make = lambda *shape: mx.array(rng.normal(size=shape).astype(np.float32))  # noqa: E731
    return (
        make(batch, heads, queries, dim),
        make(batch, kv_heads, keys, dim),
        make(batch, kv_heads, keys, dim),
    )


def masks(batch, queries, keys):
    rng = np.random.default_rng(1)
    allowed = rng.random((batch, 1, queries, keys)) > 0.3
    allowed[..., -1] = True  # every query sees at least one key
    return {
        "none": None,
        "causal": "causal",
        "bool [L, S]": mx.array(allowed[0, 0]),
        "bool [B, 1, L, S]": mx.array(allowed),
        "additive": mx.array(np.where(allowed, 0.0, -1e9).astype(np.float32)),
    }


@pytest.mark.parametrize("shape", [(40, 56), (1, 300)], ids=["prefill", "decode step"])
@pytest.mark.parametrize("mask_name", list(masks(2, 40, 56)))
@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_cpu_attention_matches_the_fused_kernel(mask_name, kv_heads, shape, monkeypatch):
    q, k, v = qkv(kv_heads=kv_heads, queries=shape[0], keys=shape[1])
    mask = masks(2, *shape)[mask_name]
    expected = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=mask)
    monkeypatch.setattr(mx.fast, "scaled_dot_product_attention", None)  # the CPU path only
    ours = attention(q, k, v, scale=0.25, mask=mask)
    assert relative_error(to_numpy(ours), to_numpy(expected)) < 1e-5


def test_fast_softmax_geglu_and_softcap_match_float64():
    rng = np.random.default_rng(0)
    x = rng.normal(scale=8.0, size=(16, 300)).astype(np.float32)
    exact = np.exp(x - x.max(-1, keepdims=True))
    exact /= exact.sum(-1, keepdims=True)
    assert np.abs(to_numpy(softmax(mx.array(x))) - exact).max() < 3e-6
    gate, up = x[:, :150], x[:, 150:]
    g = gate.astype(np.float64)
    gelu = 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g**3)))
    assert relative_error(to_numpy(geglu(mx.array(gate), mx.array(up))), gelu * up) < 1e-6
    capped = 30.0 * np.tanh(x.astype(np.float64) * 4 / 30.0)  # logits reach well past the cap
    assert relative_error(to_numpy(softcap(mx.array(x * 4), 30.0)), capped) < 1e-6
