"""Gemma 4 12B (gemma4_unified): float32 logits and greedy generation against transformers on
tiny random checkpoints, for text, images, video frames and audio."""

from __future__ import annotations

import itertools

import mlx.core as mx
import numpy as np
import pytest
import torch
from checkpoints import MM_TOKENS, WINDOW
from conftest import media_messages, reference_greedy, relative_error, to_numpy
from unified_checkpoints import merged_patches, tiny_unified, token_types, waveform_frames

from mlx_gemma4 import load, load_model, stream_generate

TOLERANCE = 1e-4
IMAGE, VIDEO, AUDIO = MM_TOKENS["image_token_id"], MM_TOKENS["video_token_id"], 476
BOI, EOI = MM_TOKENS["boi_token_id"], MM_TOKENS["eoi_token_id"]
BOA, EOA = MM_TOKENS["boa_token_id"], MM_TOKENS["eoa_token_index"]


@pytest.fixture(scope="module")
def unified(tmp_path_factory):
    folder, reference = tiny_unified(tmp_path_factory)
    return folder, reference, load_model(folder, dtype="float32")


def text(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(5, 400, n).tolist()


def reference_logits(reference, ids, **inputs) -> np.ndarray:
    tensors = {name: torch.tensor(np.asarray(value)) for name, value in inputs.items()}
    types = token_types(ids, IMAGE, VIDEO, AUDIO)
    with torch.no_grad():
        out = reference(torch.tensor(ids), mm_token_type_ids=torch.tensor(types), **tensors)
    return out.logits.float().numpy()


def test_text_batch_of_two(unified):
    _, reference, model = unified
    ids = np.array([[2, *text(3 * WINDOW, 0)], [2, *text(3 * WINDOW, 1)]])
    logits = to_numpy(model(mx.array(ids)))
    assert relative_error(logits, reference_logits(reference, ids)) < TOLERANCE


def image_prompt(counts: list[int], seed: int = 0) -> list[int]:
    ids = [2, *text(3, seed)]
    for i, n in enumerate(counts):
        ids += [BOI, *[IMAGE] * n, EOI, *text(2, seed + i + 1)]
    return ids


@pytest.mark.parametrize(
    "grids, budget",
    [
        ([(3, 2)], 70),  # one small image
        ([(2, 2), (3, 3), (1, 4)], 70),  # three images; a block longer than the window
        ([(6, 3)], 140),  # a wide image, a larger budget
        ([(5, 4), (1, 1)], 140),  # a one-patch image
    ],
)
def test_images(unified, grids, budget):
    _, reference, model = unified
    pixels, positions = merged_patches(grids, budget, seed=len(grids))
    ids = np.array([image_prompt([c * r for c, r in grids])])
    logits = model(
        mx.array(ids), pixel_values=mx.array(pixels), image_position_ids=mx.array(positions)
    )
    expected = reference_logits(reference, ids, pixel_values=pixels, image_position_ids=positions)
    assert relative_error(to_numpy(logits), expected) < TOLERANCE
    # the image blocks attend both ways: a causal-only pass differs
    features = {IMAGE: model.vision_features(mx.array(pixels), mx.array(positions))}
    text_ids, embeddings, _ = model.text_model_inputs(mx.array(ids), features)
    causal = model.logits(model.language_model(text_ids, None, embeddings))
    assert relative_error(to_numpy(causal), expected) > 100 * TOLERANCE


# This tiny random model amplifies noise in the soft tokens a hundredfold or more by the logits
# (5e-7 relative noise moves them by up to 3e-4 on a 36-token image, even in float64), so prompts
# with many image tokens are checked here at the soft tokens, where the embedder's own error is.
@pytest.mark.parametrize("grid, budget", [((20, 14), 280), ((7, 5), 140), ((1, 9), 70)])
def test_image_soft_tokens(unified, grid, budget):
    _, reference, model = unified
    pixels, positions = merged_patches([grid, (2, 1)], budget, seed=grid[0])
    ours = to_numpy(model.vision_features(mx.array(pixels), mx.array(positions)))
    with torch.no_grad():
        out = reference.model.get_image_features(torch.tensor(pixels), torch.tensor(positions))
    expected = torch.cat(out.pooler_output).numpy()
    assert ours.shape == (grid[0] * grid[1] + 2, reference.config.text_config.hidden_size)
    assert relative_error(ours, expected) < 2e-6


def test_video_frames(unified):
    _, reference, model = unified
    frames, per_frame = 3, 6
    pixels, positions = merged_patches([(3, 2)] * frames, 70, seed=5)
    ids = [2, *text(2, 7)]
    for f in range(frames):  # each frame: its timestamp text, then its soft tokens
        ids += [*text(3, 10 + f), BOI, *[VIDEO] * per_frame, EOI]
    ids = np.array([ids + text(2, 20)])
    logits = model(
        mx.array(ids), pixel_values_videos=mx.array(pixels), video_position_ids=mx.array(positions)
    )
    expected = reference_logits(
        reference,
        ids,
        pixel_values_videos=pixels,
        video_position_ids=positions,
        num_frames_per_video=np.array([frames]),
    )
    assert relative_error(to_numpy(logits), expected) < TOLERANCE


def test_audio_padded_batch(unified):
    _, reference, model = unified
    lengths = [9, 4]
    features, mask = waveform_frames(lengths, seed=2)
    ids = [2, *text(2, 3)]
    for n in lengths:
        ids += [BOA, *[AUDIO] * n, EOA, *text(2, n)]
    ids = np.array([ids])
    logits = model(
        mx.array(ids), input_features=mx.array(features), input_features_mask=mx.array(mask)
    )
    expected = reference_logits(reference, ids, input_features=features, input_features_mask=mask)
    assert relative_error(to_numpy(logits), expected) < TOLERANCE


def test_chunked_prefill_then_decode_past_the_window(unified):
    """Prompt chunks that never cut an image block, then one token at a time, through the
    caches, as generation runs it: the same logits as one full pass."""
    _, reference, model = unified
    pixels, positions = merged_patches([(4, 3)], 70, seed=9)
    ids = image_prompt([12], seed=4) + text(4 * WINDOW, 30)
    expected = reference_logits(
        reference, np.array([ids]), pixel_values=pixels, image_position_ids=positions
    )
    features = {IMAGE: model.vision_features(mx.array(pixels), mx.array(positions))}
    text_ids, embeddings, blocks = model.text_model_inputs(mx.array([ids]), features)
    cache = model.make_cache()
    image_end = ids.index(EOI) + 1
    cuts = [0, 2, image_end, image_end + 5, *range(image_end + 6, len(ids) + 1)]
    logits = []
    for start, end in itertools.pairwise(cuts):
        hidden = model.language_model(
            text_ids[:, start:end],
            cache,
            embeddings[:, start:end],
            blocks[:, start:end] if end - start > 1 else None,
        )
        logits.append(to_numpy(model.logits(hidden)))
    assert relative_error(np.concatenate(logits, axis=1), expected) < TOLERANCE


def test_transformers_per_layer_config_form(tmp_path_factory):
    folder, reference = tiny_unified(tmp_path_factory, hub_form=False, tokenizer=False)
    assert "per_layer_config" in (folder / "config.json").read_text()
    ids = np.array([[2, *text(2 * WINDOW, 5)]])
    logits = to_numpy(load_model(folder, dtype="float32")(mx.array(ids)))
    assert relative_error(logits, reference_logits(reference, ids)) < TOLERANCE


@pytest.mark.parametrize("modality", ["text", "image", "video", "audio"])
def test_greedy_generation_matches_transformers(unified, modality):
    folder, reference, _ = unified
    model, processor = load(folder, dtype="float32")
    if modality == "text":
        messages = [{"role": "user", "content": "hello there"}]
    else:
        messages = media_messages(modality)
    inputs = processor(messages, max_soft_tokens=70, video_soft_tokens=70)
    ids = np.array(inputs["input_ids"])[0].tolist()
    media = {name: np.array(value) for name, value in inputs.items() if name != "input_ids"}
    if modality == "video":
        media["num_frames_per_video"] = np.array([media["pixel_values_videos"].shape[0]])
    media["mm_token_type_ids"] = token_types([ids], IMAGE, VIDEO, AUDIO)
    n = 12
    expected = reference_greedy(reference, ids, n, processor.stop_token_ids, **media)
    ours = [
        r.token
        for r in stream_generate(
            model,
            processor,
            messages,
            max_tokens=n,
            max_soft_tokens=70,
            video_soft_tokens=70,
            prefill_step_size=5,  # small chunks, none cutting a media block
        )
    ]
    assert ours == expected[: len(ours)] and len(ours) >= min(len(expected), 2)
