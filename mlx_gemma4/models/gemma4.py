"""The whole Gemma 4 model: the text decoder and its language-model head."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..config import ModelConfig
from .layers import Linear
from .text import TextModel

# Checkpoint prefixes of the modality towers; their weights are read but not yet used.
TOWER_PREFIXES = ("vision_tower.", "embed_vision.", "audio_tower.", "embed_audio.")


class Model(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        text = config.text_config
        self.language_model = TextModel(text)
        if not text.tie_word_embeddings:
            self.lm_head = Linear(text.hidden_size, text.vocab_size, bias=False)

    def make_cache(self) -> list[Any]:
        """Per-layer caches for the layers that own keys and values (KV-shared layers own none)."""
        return self.language_model.make_cache()

    def logits(self, hidden: mx.array) -> mx.array:
        if "lm_head" in self:
            out = self.lm_head(hidden)
        else:
            out = self.language_model.embed_tokens.as_linear(hidden)
        cap = self.config.text_config.final_logit_softcapping
        if cap:
            out = mx.tanh(out / cap) * cap
        return out

    def __call__(self, input_ids: mx.array, cache: list[Any] | None = None) -> mx.array:
        """`[B, T]` token ids -> `[B, T, vocab]` logits; `cache` carries earlier positions."""
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
        return self.logits(self.language_model(input_ids, cache))
