"""Gemma 4 12B (gemma4_unified) preprocessing against transformers: merged 48 px image patches,
video frames, raw waveform frames, and the processor's prompts for chat messages with media."""

from __future__ import annotations

import numpy as np
import pytest
from checkpoints import MM_TOKENS
from conftest import random_image, tones
from unified_checkpoints import tiny_unified
from unified_reference import unified_images

from mlx_gemma4 import load
from mlx_gemma4.processing.video import Video

IMAGE, VIDEO, AUDIO = MM_TOKENS["image_token_id"], MM_TOKENS["video_token_id"], 476


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    return load(tiny_unified(tmp_path_factory)[0])[1]


@pytest.mark.parametrize(
    "size, budget",
    [((96, 64), 70), ((300, 200), 140), ((517, 333), 280), ((40, 900), 70), ((1000, 30), 140)],
)
def test_images_match_transformers(processor, size, budget):
    image = random_image(*size, seed=size[0])
    inputs = processor("<|image|> what is this?", images=[image], max_soft_tokens=budget)
    pixels, positions, counts = unified_images([image], budget)
    assert np.array(inputs["pixel_values"]).shape == (1, budget, 3 * 48 * 48)
    assert np.abs(np.array(inputs["pixel_values"]) - pixels).max() <= 2 / 255
    assert np.array_equal(np.array(inputs["image_position_ids"]), positions)
    ids = np.array(inputs["input_ids"][0])
    assert (ids == IMAGE).sum() == counts[0]
    start = ids.tolist().index(MM_TOKENS["boi_token_id"])
    assert ids[start + counts[0] + 1] == MM_TOKENS["eoi_token_id"]


def test_video_frames_match_transformers(processor):
    """Each frame is resized and merged as an image of the frame budget (the unified video
    processor's rule and layout; it needs torchvision, which has no CPU-torch build here)."""
    frames = [random_image(101, 67, seed=i) for i in range(3)]
    inputs = processor("<|video|> what happens?", videos=[Video(frames, [0.0, 1.0, 2.0])])
    pixels, positions, counts = unified_images(frames, 70)
    assert np.abs(np.array(inputs["pixel_values_videos"]) - pixels).max() <= 2 / 255
    assert np.array_equal(np.array(inputs["video_position_ids"]), positions)
    ids = np.array(inputs["input_ids"][0])
    assert (ids == VIDEO).sum() == sum(counts)
    assert processor.decode(ids.tolist()).count("00:0") == 3


def test_waveform_frames_match_transformers(processor):
    from transformers.models.gemma4_unified.feature_extraction_gemma4_unified import (
        Gemma4UnifiedAudioFeatureExtractor,
    )

    rng = np.random.default_rng(0)
    waves = [0.1 * rng.standard_normal(n).astype(np.float32) for n in (16_000, 5_000, 12_345)]
    inputs = processor("<|audio|> <|audio|> <|audio|>", audio=waves)
    expected = Gemma4UnifiedAudioFeatureExtractor()(waves, return_tensors="np")
    assert np.array_equal(np.array(inputs["input_features"]), expected["input_features"])
    assert np.array_equal(np.array(inputs["input_features_mask"]), expected["input_features_mask"])
    ids = np.array(inputs["input_ids"][0])
    assert (ids == AUDIO).sum() == expected["input_features_mask"].sum()  # 25 + 8 + 20
    # one clip alone is padded only to itself, as the extractor would pad it
    media = processor.prepare("<|audio|> <|audio|> <|audio|>", audio=waves)[1]
    features, mask = media.audio.take([1])
    alone = Gemma4UnifiedAudioFeatureExtractor()([waves[1]], return_tensors="np")
    assert np.array_equal(np.array(features), alone["input_features"])
    assert np.array_equal(np.array(mask), alone["input_features_mask"])


def test_chat_messages_with_media(processor):
    clip = tones(1.5)
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": random_image(96, 64)},
                {"type": "audio", "audio": clip},
                {"type": "text", "text": "what is this?"},
            ],
        }
    ]
    inputs = processor(messages, max_soft_tokens=70)
    ids = np.array(inputs["input_ids"][0])
    assert (ids == IMAGE).sum() == 60  # 96 x 64 at budget 70 -> 480 x 288 px, 10 x 6 patches
    assert (ids == AUDIO).sum() == 38  # ceil(1.5 s * 16 kHz / 640 samples)
    assert np.array(inputs["input_features"]).shape == (1, 38, 640)
