"""The vision tower and image soft tokens against transformers, on tiny random checkpoints."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from checkpoints import MM_TOKENS
from conftest import relative_error, to_numpy

from mlx_gemma4 import load_model

IMAGE = MM_TOKENS["image_token_id"]
BOI, EOI = MM_TOKENS["boi_token_id"], MM_TOKENS["eoi_token_id"]
PATCH_PIXELS = 3 * 16 * 16


def patches(grids: list[tuple[int, int]], max_tokens: int, seed: int = 0):
    """Random pixels and (x, y) patch positions for images of `grids` (patch columns, rows),
    padded to `max_tokens * 9` patches with (-1, -1), as transformers' processor lays them out."""
    rng = np.random.default_rng(seed)
    n = max_tokens * 9
    pixels = rng.random((len(grids), n, PATCH_PIXELS), dtype=np.float32)
    positions = np.full((len(grids), n, 2), -1, dtype=np.int64)
    for i, (columns, rows) in enumerate(grids):
        grid = np.stack(np.meshgrid(np.arange(columns), np.arange(rows)), -1).reshape(-1, 2)
        positions[i, : len(grid)] = grid
        pixels[i, len(grid) :] = 0.0
    return pixels, positions


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
    with pytest.raises(ValueError, match="no vision tower"):
        model(
            mx.array([[2, IMAGE]]),
            pixel_values=mx.array(pixels),
            image_position_ids=mx.array(positions),
        )
