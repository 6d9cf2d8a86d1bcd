"""Tiny random Gemma 4 12B (`gemma4_unified`) checkpoints built by transformers, and inputs laid
out as its processor lays them out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from checkpoints import _TEXT_BASE, MM_TOKENS, jitter, save_reference

MERGED_PATCH = 48
PATCH_VALUES = 3 * MERGED_PATCH**2
FRAME = 640  # waveform samples per audio soft token
POSITIONS = 128  # the tiny position table: images up to 128 merged patches a side


def unified_config(audio: bool = True, vision: bool = True):
    from transformers import (
        Gemma4UnifiedAudioConfig,
        Gemma4UnifiedConfig,
        Gemma4UnifiedTextConfig,
        Gemma4UnifiedVisionConfig,
    )

    text = {k: v for k, v in _TEXT_BASE.items() if k != "hidden_size_per_layer_input"}
    return Gemma4UnifiedConfig(
        text_config=Gemma4UnifiedTextConfig(**text),
        vision_config=Gemma4UnifiedVisionConfig(
            mm_embed_dim=32, output_proj_dims=32, mm_posemb_size=POSITIONS
        )
        if vision
        else None,
        audio_config=Gemma4UnifiedAudioConfig() if audio else None,
        **MM_TOKENS,
    )


def build_unified(folder: Path, seed: int = 0, hub_form: bool = True, **parts):
    from transformers import Gemma4UnifiedForConditionalGeneration

    torch.manual_seed(seed)
    model = Gemma4UnifiedForConditionalGeneration(unified_config(**parts)).eval()
    jitter(model, seed)
    save_reference(model, folder, hub_form)
    return model


def merged_patches(grids: list[tuple[int, int]], max_tokens: int, seed: int = 0):
    """Random pixels and (x, y) positions for images of `grids` (merged-patch columns, rows),
    padded to `max_tokens` with (-1, -1), as transformers' unified image processor lays them out."""
    rng = np.random.default_rng(seed)
    pixels = rng.random((len(grids), max_tokens, PATCH_VALUES), dtype=np.float32)
    positions = np.full((len(grids), max_tokens, 2), -1, dtype=np.int64)
    for i, (columns, rows) in enumerate(grids):
        grid = np.stack(np.meshgrid(np.arange(columns), np.arange(rows)), -1).reshape(-1, 2)
        positions[i, : len(grid)] = grid
        pixels[i, len(grid) :] = 0.0
    return pixels, positions


def waveform_frames(lengths: list[int], seed: int = 0):
    """Random waveform frames for clips of `lengths` frames, zero-padded to the longest, and
    the mask (True: real frame), as transformers' unified feature extractor lays them out."""
    rng = np.random.default_rng(seed)
    frames = max(lengths)
    features = (0.1 * rng.standard_normal((len(lengths), frames, FRAME))).astype(np.float32)
    mask = np.arange(frames)[None, :] < np.array(lengths)[:, None]
    return features * mask[..., None], mask


_BUILT: dict[tuple, tuple[Path, torch.nn.Module]] = {}


def tiny_unified(tmp_path_factory, hub_form: bool = True, tokenizer: bool = True, **parts):
    """(checkpoint folder, transformers model) of a tiny gemma4_unified model, built once per
    session for each set of arguments; `parts`: `vision=False` / `audio=False` leave one out."""
    from checkpoints import save_tokenizer

    key = (hub_form, tokenizer, tuple(sorted(parts.items())))
    if key not in _BUILT:
        folder = tmp_path_factory.mktemp("unified")
        model = build_unified(folder, hub_form=hub_form, **parts)
        if tokenizer:
            save_tokenizer(folder)
        _BUILT[key] = (folder, model)
    return _BUILT[key]


def token_types(ids, image: int, video: int, audio: int) -> np.ndarray:
    """transformers' `mm_token_type_ids` for `ids`: 1 image, 2 video, 3 audio, 0 text."""
    ids = np.asarray(ids)
    return (1 * (ids == image) + 2 * (ids == video) + 3 * (ids == audio)).astype(np.int64)
