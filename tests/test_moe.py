"""The expert path against a naive per-expert loop."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import pytest
from checkpoints import text_config

from mlx_gemma4.config import TextConfig
from mlx_gemma4.models.moe import SORT_THRESHOLD, Experts, Router


@pytest.fixture
def experts():
    config = TextConfig.from_dict(text_config("moe_k_eq_v").to_dict())
    mx.random.seed(0)
    return config, Experts(config), Router(config)


def naive(experts: Experts, x, indices, weights):
    gate_up, down = experts.gate_up_proj.weight, experts.down_proj.weight
    rows = []
    for t in range(x.shape[0]):
        total = mx.zeros((x.shape[1],))
        for j in range(indices.shape[1]):
            e = indices[t, j].item()
            gate, up = mx.split(gate_up[e] @ x[t], 2)
            total = total + weights[t, j] * (down[e] @ (nn.gelu_approx(gate) * up))
        rows.append(total)
    return mx.stack(rows)


@pytest.mark.parametrize("tokens", [1, 3, SORT_THRESHOLD])  # unsorted and sorted-by-expert paths
def test_matches_per_expert_loop(experts, tokens):
    config, layer, router = experts
    x = mx.random.normal((tokens, config.hidden_size))
    indices, weights = router(x)
    assert indices.shape == (tokens, config.top_k_experts)
    assert mx.allclose(weights.sum(-1), mx.ones(tokens), atol=1e-6)  # per_expert_scale is 1
    out = layer(x, indices, weights)
    assert mx.allclose(out, naive(layer, x, indices, weights), atol=1e-5)


@pytest.mark.parametrize("tokens", [2, SORT_THRESHOLD])
def test_bfloat16_on_cpu_equals_float32_on_the_same_rounded_numbers(experts, tokens):
    config, layer, router = experts
    x = mx.random.normal((tokens, config.hidden_size)).astype(mx.bfloat16)
    indices, weights = router(x.astype(mx.float32))
    layer.set_dtype(mx.bfloat16)
    ours = layer(x, indices, weights)
    assert ours.dtype == mx.bfloat16
    layer.set_dtype(mx.float32)  # exact: these weights are already bf16-representable
    expected = layer(x.astype(mx.float32), indices, weights)
    assert mx.allclose(ours.astype(mx.float32), expected, rtol=2e-2, atol=2e-2)
