"""The vision tower and image soft tokens against transformers, on tiny random checkpoints."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from checkpoints import MM_TOKENS, patches
from conftest import relative_error, to_numpy

from mlx_gemma4 import load_model
from mlx_gemma4.errors import ImageError, VideoError

IMAGE = MM_TOKENS["image_token_id"]
BOI, EOI = MM_TOKENS["boi_token_id"], MM_TOKENS["eoi_token_id"]


def prompt_with_images(token_counts: list[int], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ids = [2, *rng.integers(5, 90, 6)]
    for count in token_counts:
        ids += [BOI, *[IMAGE] * count, EOI, *rng.integers(5, 90, 4)]
    return np.array([ids])


def reference_forward(reference, ids, pixels, positions):
    import torch

    with torch.no_grad():
        return reference(
            input_ids=torch.tensor(ids),
            pixel_values=torch.tensor(pixels),
            image_position_ids=torch.tensor(positions),
            mm_token_type_ids=torch.tensor((ids == IMAGE).astype(np.int64)),
        ).logits.numpy()


VARIANTS = ["multimodal", "multimodal_bidirectional"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_vision_tower_matches_reference(tiny, variant):
    import torch

    folder, reference = tiny(variant)
    pixels, positions = patches([(6, 6), (3, 6)], max_tokens=5)
    with torch.no_grad():
        expected = reference.model.vision_tower(
            pixel_values=torch.tensor(pixels), pixel_position_ids=torch.tensor(positions)
        ).last_hidden_state.numpy()
    model = load_model(folder)
    ours = to_numpy(model.vision_tower(mx.array(pixels), mx.array(positions)))
    assert ours.shape == expected.shape == (4 + 2, 32)  # padding soft tokens are dropped
    assert relative_error(ours, expected) < 1e-4


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_with_two_images_match_reference(tiny, variant):
    folder, reference = tiny(variant)
    pixels, positions = patches([(6, 6), (9, 3)], max_tokens=4, seed=1)
    ids = prompt_with_images([4, 3])
    model = load_model(folder)
    logits = model(
        mx.array(ids), pixel_values=mx.array(pixels), image_position_ids=mx.array(positions)
    )
    expected = reference_forward(reference, ids, pixels, positions)
    assert relative_error(to_numpy(logits), expected) < 1e-4


@pytest.mark.parametrize("variant", VARIANTS)
def test_image_prefill_then_decode_matches_reference(tiny, variant):
    folder, reference = tiny(variant)
    pixels, positions = patches([(6, 6)], max_tokens=4, seed=2)
    ids = prompt_with_images([4])
    rng = np.random.default_rng(3)
    full = np.concatenate([ids, rng.integers(5, 90, (1, 12))], axis=1)
    expected = reference_forward(reference, full, pixels, positions)

    model = load_model(folder)
    cache = model.make_cache()
    split = 3  # text first, then the image and its text, then one token at a time
    steps = [
        model(mx.array(ids[:, :split]), cache=cache),
        model(mx.array(ids[:, split:]), cache, mx.array(pixels), mx.array(positions)),
    ] + [
        model(mx.array(full[:, t : t + 1]), cache=cache) for t in range(ids.shape[1], full.shape[1])
    ]
    logits = np.concatenate([to_numpy(s) for s in steps], axis=1)
    assert relative_error(logits, expected) < 1e-4


def test_placeholder_count_must_match_the_images(tiny):
    folder, _ = tiny("multimodal")
    pixels, positions = patches([(6, 6)], max_tokens=4)
    model = load_model(folder)
    with pytest.raises(ValueError, match="4 soft tokens for 3 placeholders"):
        model(
            mx.array(prompt_with_images([3])),
            pixel_values=mx.array(pixels),
            image_position_ids=mx.array(positions),
        )


def test_text_only_model_refuses_images(tiny):
    model = load_model(tiny("dense")[0])
    pixels, positions = patches([(3, 3)], max_tokens=1)
    with pytest.raises(ImageError, match="no vision tower; it cannot take images"):
        model(
            mx.array([[2, IMAGE]]),
            pixel_values=mx.array(pixels),
            image_position_ids=mx.array(positions),
        )


def test_video_without_vision_tower_names_video(tiny):
    model = load_model(tiny("dense")[0])
    assert model.towers == frozenset() and model.path == tiny("dense")[0]
    pixels, positions = patches([(3, 3)], max_tokens=1)
    with pytest.raises(VideoError, match="no vision tower; it cannot take video"):
        model(
            mx.array([[2, MM_TOKENS["video_token_id"]]]),
            pixel_values_videos=mx.array(pixels),
            video_position_ids=mx.array(positions),
        )


def test_pooler_averages_blocks_by_position_and_scales(tiny):
    """A 6 x 3 patch grid pools into 2 x 1 blocks: each soft token is the mean of its 3 x 3
    patches times sqrt(hidden), in float32."""
    model = load_model(tiny("multimodal")[0])
    pooler = model.vision_tower.pooler
    _, positions = patches([(6, 3)], max_tokens=2)
    h = mx.array(np.random.default_rng(0).standard_normal((1, 18, 32)), dtype=mx.bfloat16)
    pooled, valid = pooler(h, mx.array(positions), 2)
    assert pooled.dtype == mx.float32 and valid.tolist() == [[True, True]]
    grid = np.array(h.astype(mx.float32))[0].reshape(3, 6, 32)  # rows, columns
    expected = [grid[:, :3].mean((0, 1)), grid[:, 3:].mean((0, 1))]
    np.testing.assert_allclose(np.array(pooled[0]), np.array(expected) * 32**0.5, rtol=1e-5)


def test_quantized_patch_projection_takes_pixels(tiny):
    """Pixels are cast to the compute dtype, not to the packed (uint32) weight's dtype."""
    import mlx.nn as nn

    model = load_model(tiny("multimodal")[0], dtype="bfloat16")
    pixels, positions = patches([(6, 6)], max_tokens=4)
    before = model.vision_tower(mx.array(pixels), mx.array(positions))
    nn.quantize(model.vision_tower, 64, 8, class_predicate=lambda p, _: p.endswith("input_proj"))
    assert model.vision_tower.patch_embedder.input_proj.weight.dtype == mx.uint32
    after = model.vision_tower(mx.array(pixels), mx.array(positions))
    assert after.dtype == mx.bfloat16
    assert relative_error(to_numpy(after), to_numpy(before)) < 0.05
