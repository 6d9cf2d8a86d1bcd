"""Generation with images: greedy parity, prefill chunks around image blocks, reuse across turns."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from checkpoints import MM_TOKENS
from conftest import random_image, reference_greedy

from mlx_gemma4 import PromptCache, load, stream_generate
from mlx_gemma4.generation import prefill_chunks, prompt_inputs


def reference_image_greedy(reference, inputs, n, stop_ids):
    ids = np.array(inputs["input_ids"])
    return reference_greedy(
        reference,
        ids[0].tolist(),
        n,
        stop_ids,
        pixel_values=inputs["pixel_values"],
        image_position_ids=inputs["image_position_ids"],
        mm_token_type_ids=(ids == MM_TOKENS["image_token_id"]).astype(np.int64),
    )


def image_chat(*sizes):
    parts = [
        {"type": "image", "image": random_image(w, h, seed=i)} for i, (w, h) in enumerate(sizes)
    ]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": "describe"}]}]


@pytest.mark.parametrize("variant", ["multimodal", "multimodal_bidirectional"])
@pytest.mark.parametrize("prefill_step_size", [2048, 7])  # small chunks must not cut an image
def test_greedy_with_images_equals_transformers(chat_checkpoint, variant, prefill_step_size):
    folder, reference = chat_checkpoint(variant)
    model, processor = load(folder)
    messages = image_chat((96, 96), (150, 50))
    ours = [
        r.token
        for r in stream_generate(
            model,
            processor,
            messages,
            max_tokens=10,
            max_soft_tokens=70,
            prefill_step_size=prefill_step_size,
        )
    ]
    inputs = processor(messages, max_soft_tokens=70)
    expected = reference_image_greedy(reference, inputs, 10, processor.stop_token_ids)
    assert ours == expected[: len(ours)]


def test_images_in_history_are_not_encoded_again(chat_checkpoint):
    model, processor = load(chat_checkpoint("multimodal_bidirectional")[0])
    cache = PromptCache(model)
    turn1 = image_chat((96, 96))
    answer = "".join(
        r.text
        for r in stream_generate(
            model, processor, turn1, max_tokens=4, max_soft_tokens=70, prompt_cache=cache
        )
    )
    turn2 = turn1 + [{"role": "assistant", "content": answer}, {"role": "user", "content": "more"}]
    ids, images = processor.prepare(turn2, max_soft_tokens=70)
    inputs = prompt_inputs(model, ids, images, cache)
    assert inputs.embeddings is None  # the image is in the cached prefix: no vision tower run
    assert len(inputs.todo) < len(ids) - 64


def test_cached_prefix_never_ends_inside_an_image_block(chat_checkpoint):
    model, processor = load(chat_checkpoint("multimodal")[0])
    cache = PromptCache(model)
    ids = [2, 5, 6, 470, 472, 472, 472, 472, 471, 7, 8]
    model.language_model(mx.array([ids[:6]]), cache.cache)  # a cache that stopped mid-image
    cache.tokens = ids[:6]
    assert cache.prepare(ids, [(4, 8)])[:1] == [472]
    assert len(cache.tokens) == 4


def test_prefill_chunks_keep_blocks_whole():
    blocks = [(3, 9), (12, 14)]
    chunks = list(prefill_chunks(20, 4, blocks))
    assert chunks[0] == (0, 3) and chunks[1] == (3, 9)
    assert chunks[-1][1] == 19
    assert all(not (s < b_start < e < b_end) for s, e in chunks for b_start, b_end in blocks)


def test_a_model_without_vision_tower_refuses_images_and_video(chat_checkpoint):
    from conftest import video_chat

    from mlx_gemma4.processing.images import ImageError
    from mlx_gemma4.processing.video import VideoError

    model, processor = load(chat_checkpoint("ple_kv_shared")[0])
    with pytest.raises(ImageError, match="no vision tower; it cannot take images"):
        next(stream_generate(model, processor, image_chat((40, 30)), max_tokens=2))
    with pytest.raises(VideoError, match="no vision tower; it cannot take video"):
        next(stream_generate(model, processor, video_chat(), max_tokens=2))
