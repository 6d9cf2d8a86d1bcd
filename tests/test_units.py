"""Unit tests of the model's building blocks: config forms, RoPE, norms and linears, and the
fused CPU activations against exact MLX ops."""

from __future__ import annotations

import copy

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from checkpoints import multimodal_config, text_config, to_hub_form

from mlx_gemma4.config import ModelConfig, VisionConfig
from mlx_gemma4.errors import AudioError, ImageError, VideoError
from mlx_gemma4.models import activations
from mlx_gemma4.models.gemma4 import Model
from mlx_gemma4.models.layers import ClippableLinear, RMSNorm, RMSNormNoScale
from mlx_gemma4.models.rope import RoPE, rope_wavelengths

RNG = np.random.default_rng(0)


def _np(x: mx.array) -> np.ndarray:
    return np.array(x.astype(mx.float32), dtype=np.float64)


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("variant", ["k_eq_v", "ple_kv_shared"])
def test_config_forms_agree(variant):
    """transformers' `per_layer_config` form and the Hub's top-level keys read the same."""
    raw = text_config(variant).to_dict()
    assert "per_layer_config" in raw
    ours = ModelConfig.from_dict(copy.deepcopy(raw)).text_config
    hub = ModelConfig.from_dict(to_hub_form(copy.deepcopy(raw))).text_config
    layers = range(hub.num_hidden_layers)
    assert [ours.layer_head_dim(i) for i in layers] == [hub.layer_head_dim(i) for i in layers]
    assert [ours.layer_kv_heads(i) for i in layers] == [hub.layer_kv_heads(i) for i in layers]
    assert [ours.kv_source(i) for i in layers] == [hub.kv_source(i) for i in layers]
    assert hub.layer_head_dim(2) == 32 and hub.layer_head_dim(0) == 16  # full vs sliding
    if variant == "k_eq_v":
        assert hub.layer_kv_heads(2) == 1 and hub.layer_kv_heads(0) == 2
    else:
        assert [hub.kv_source(i) for i in layers] == [0, 1, 2, 1, 1, 2]


def test_multimodal_config_takes_top_level_vocabulary():
    raw = to_hub_form(multimodal_config().to_dict())
    raw["text_config"].pop("vocab_size")
    config = ModelConfig.from_dict(raw)
    assert config.text_config.vocab_size == raw["vocab_size"]
    assert config.vision_config.patch_size == 16 and config.audio_config is not None


# ----------------------------------------------------------------------------- rope


def _rotate_half_reference(x: np.ndarray, inv_freq: np.ndarray, offset: int) -> np.ndarray:
    """x [heads, T, D]: x cos + rotate_half(x) sin, angles (offset + t) * inv_freq per pair."""
    angles = (offset + np.arange(x.shape[1]))[:, None] * inv_freq[None]
    cos, sin = np.cos(np.tile(angles, 2)), np.sin(np.tile(angles, 2))
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


@pytest.mark.parametrize(
    "params",
    [
        {"rope_type": "default", "rope_theta": 10_000.0},
        {"rope_type": "proportional", "rope_theta": 1_000_000.0, "partial_rotary_factor": 0.25},
    ],
)
def test_rope_matches_the_rotate_half_formula(params):
    head_dim = 32
    rotated = int(params.get("partial_rotary_factor", 1.0) * head_dim // 2)
    # exponents over the FULL head dim; the pairs past `rotated` do not turn
    inv_freq = np.zeros(head_dim // 2)
    inv_freq[:rotated] = params["rope_theta"] ** (-np.arange(0, 2 * rotated, 2) / head_dim)
    np.testing.assert_allclose(1 / _np(rope_wavelengths(head_dim, params)), inv_freq, rtol=1e-6)

    x = RNG.standard_normal((1, 2, 7, head_dim)).astype(np.float32)
    ours = _np(RoPE(head_dim, params)(mx.array(x), offset=5))
    np.testing.assert_allclose(ours[0], _rotate_half_reference(x[0], inv_freq, 5), atol=2e-5)
    if rotated < head_dim // 2:  # the unrotated pairs pass through
        still = np.r_[rotated : head_dim // 2, head_dim // 2 + rotated : head_dim]
        np.testing.assert_array_equal(ours[..., still], x[..., still])


# ----------------------------------------------------------------------------- layers


def test_rms_norms_match_the_formula():
    x = RNG.standard_normal((3, 5, 64)).astype(np.float32)
    weight = (1 + 0.3 * RNG.standard_normal(64)).astype(np.float32)
    normed = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-6)
    norm = RMSNorm(64, eps=1e-6)
    norm.weight = mx.array(weight)
    np.testing.assert_allclose(_np(norm(mx.array(x))), normed * weight, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_np(RMSNormNoScale(1e-6)(mx.array(x))), normed, rtol=1e-5, atol=1e-6)
    assert norm(mx.array(x).astype(mx.float16)).dtype == mx.float16


def test_clippable_linear_clamps_input_and_output():
    x = (3 * RNG.standard_normal((4, 32))).astype(np.float32)
    plain = ClippableLinear(32, 16, clipped=False)
    weight = _np(plain.linear.weight)
    np.testing.assert_allclose(_np(plain(mx.array(x))), x @ weight.T, rtol=1e-5, atol=1e-5)

    clipped = ClippableLinear(32, 16, clipped=True)
    clipped.linear.weight = plain.linear.weight
    clipped.input_min, clipped.input_max = mx.array(-1.0), mx.array(1.5)
    clipped.output_min, clipped.output_max = mx.array(-0.2), mx.array(0.3)
    expected = np.clip(np.clip(x, -1.0, 1.5) @ weight.T, -0.2, 0.3)
    np.testing.assert_allclose(_np(clipped(mx.array(x))), expected, rtol=1e-5, atol=1e-6)
    assert 0 < (np.abs(expected) == 0.3).mean() < 1  # the bounds bind, not everywhere


# ----------------------------------------------------------------------------- activations


def test_fused_softmax_matches_exact_with_masked_scores():
    scores = (20 * RNG.standard_normal((4, 300))).astype(np.float32)
    scores[:, ::7] = -1e30  # masked positions
    exact = _np(mx.softmax(mx.array(scores), axis=-1, precise=True))
    ours = _np(activations._fast_softmax(mx.array(scores)))
    assert np.abs(ours - exact).max() < 2e-6
    assert (ours[:, ::7] == 0).all()
    np.testing.assert_allclose(ours.sum(-1), 1, atol=1e-5)
    assert activations.softmax(mx.array(scores).astype(mx.bfloat16)).dtype == mx.float32


def test_fused_gelu_silu_and_softcap_match_exact_ops():
    x = mx.array(np.linspace(-12, 12, 50_001, dtype=np.float32))
    up = mx.array(RNG.standard_normal(50_001).astype(np.float32))
    exact = _np(nn.gelu_approx(x) * up)
    assert np.abs(_np(activations._geglu_fast(x, up)) - exact).max() < 2e-6
    assert np.abs(_np(activations._geglu_exact(x, up)) - exact).max() < 2e-6
    silu_error = np.abs(_np(activations.fast_silu(x)) - _np(nn.silu(x)))
    assert (silu_error / np.maximum(1, np.abs(_np(x)))).max() < 5e-7
    logits = 100 * x
    exact_cap = _np(mx.tanh(logits / 30.0) * 30.0)
    assert np.abs(_np(activations.softcap(logits, 30.0)) - exact_cap).max() < 3e-5
    half = x.astype(mx.bfloat16)
    assert activations.geglu(half, half).dtype == mx.bfloat16


# ----------------------------------------------------------------------------- model seams


def test_require_tower_names_the_media_kind():
    text_only = Model(ModelConfig.from_dict(to_hub_form(text_config("dense").to_dict())))
    assert text_only.towers == frozenset() and text_only.path is None
    for kind, error, message in [
        ("image", ImageError, "no vision tower; it cannot take images"),
        ("video", VideoError, "no vision tower; it cannot take video"),
        ("audio", AudioError, "no audio tower; it cannot take audio"),
    ]:
        with pytest.raises(error, match=message):
            text_only.require_tower(kind)
    full = Model(ModelConfig.from_dict(to_hub_form(multimodal_config().to_dict())))
    assert full.towers == {"vision_tower", "audio_tower"}
    for kind in ("image", "video", "audio"):
        full.require_tower(kind)


def test_processor_takes_patch_grid_from_vision_config(chat_checkpoint):
    from PIL import Image

    from mlx_gemma4 import load
    from mlx_gemma4.processing import Processor

    folder, _ = chat_checkpoint("multimodal")
    _, processor = load(folder)
    assert (processor.patch_size, processor.pooling) == (16, 3)
    image = Image.fromarray(RNG.integers(0, 255, (64, 96, 3), dtype=np.uint8))
    grid = VisionConfig(patch_size=8, pooling_kernel_size=2)
    processor = Processor.from_folder(folder, [1], grid)
    _, media = processor.prepare("<|image|>", images=[image], max_soft_tokens=70)
    batch = media.images
    assert batch.pixel_values.shape == (1, 70 * 4, 3 * 8 * 8)
    real = (batch.position_ids[0] >= 0).all(-1).sum()
    assert batch.soft_tokens == [real // 4] and real % 4 == 0
