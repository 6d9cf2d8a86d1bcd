"""The training forward pass: the inference forward over whole sequences, without storage.

It runs the same `TextModel.__call__` as generation, so KV-shared layers read the keys and
values of their source layer exactly as they do when generating; only the caches differ.
`PassThroughCache` stores nothing: it hands each layer's keys and values straight back and
gives the masks a cache at offset 0 would (sliding windows included).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_causal_mask

from ..processing.processor import Media
from .data import Batch


class PassThroughCache:
    """A cache for one whole sequence: keys and values pass through, masks are causal (and
    windowed on sliding layers)."""

    masks_rows = True  # `attention_mask` asks this cache for its mask
    offset = 0
    stored = 0

    def __init__(self, window: int | None = None):
        self.window = window

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        return keys, values

    def make_mask(self, n_queries: int):
        if self.window is None or n_queries <= self.window:
            return "causal" if n_queries > 1 else None
        return create_causal_mask(n_queries, 0, window_size=self.window)


def training_caches(model: nn.Module) -> list[PassThroughCache]:
    config = model.config.text_config
    return [
        PassThroughCache(config.sliding_window if config.is_sliding(i) else None)
        for i in range(config.first_kv_shared_layer)
    ]


def media_features(
    model: nn.Module, media: list[Media], train_vision: bool = False
) -> dict[int, mx.array]:
    """Soft tokens of each row's media, in row order, by placeholder token id.

    Each row's media go through the towers on their own, as they do when that conversation
    is a prompt. Frozen towers get no gradient (nothing to compute, nothing to leak)."""
    config = model.config
    parts: dict[int, list[mx.array]] = {}

    def add(token_id: int, features: mx.array, trainable: bool) -> None:
        parts.setdefault(token_id, []).append(features if trainable else mx.stop_gradient(features))

    for row in media:
        if row.images is not None:
            add(config.image_token_id, model.vision_features(*row.images.take()), train_vision)
        if row.video_frames is not None:
            pixels, positions = row.video_frames.take()
            add(
                config.video_token_id,
                model.vision_features(pixels, positions, "video"),
                train_vision,
            )
        if row.audio is not None:
            add(config.audio_token_id, model.audio_features(*row.audio.take()), False)
    return {k: v[0] if len(v) == 1 else mx.concatenate(v, axis=0) for k, v in parts.items()}


def hidden_states(model: nn.Module, inputs: mx.array, media: list[Media], train_vision=False):
    """Final-normed hidden states [B, T, hidden] of a batch of whole sequences."""
    features = media_features(model, media, train_vision)
    text_ids, embeddings, blocks = model.text_model_inputs(inputs, features)
    return model.language_model(text_ids, training_caches(model), embeddings, blocks)


def training_logits(
    model: nn.Module, inputs: mx.array, media: list[Media] | None = None
) -> mx.array:
    """[B, T, vocab] logits of the training forward (what the tests hold against inference)."""
    media = media or [Media() for _ in range(inputs.shape[0])]
    return model.logits(hidden_states(model, inputs, media))


def batch_loss(model: nn.Module, batch: Batch, train_vision: bool = False) -> mx.array:
    """Mean cross-entropy over the trained tokens. Only their positions go through the LM
    head: with a 262k vocabulary the logits of every position would dominate memory."""
    hidden = hidden_states(model, batch.inputs, batch.media, train_vision)
    picked = hidden.reshape(-1, hidden.shape[-1])[batch.positions]
    logits = model.logits(picked).astype(mx.float32)
    return nn.losses.cross_entropy(logits, batch.labels, reduction="sum") / batch.tokens
