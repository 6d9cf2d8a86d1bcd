"""Gemma 4's multi-token-prediction assistant: a small drafter that runs on the target's state.

It owns no KV cache. Each step reads the keys and values of the target's last sliding- and
last full-attention layer, and takes the embedding of the newest token concatenated with the
target's final hidden state at the position before it. Its own output, projected back to the
target's width, stands in for that hidden state at the next draft step; every draft step of
a round sits at the same position.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..config import SLIDING, AssistantConfig
from ..kv_quant import QuantizedKV
from .layers import Linear
from .text import TextModel

SharedKV = dict[str, tuple[mx.array, mx.array] | QuantizedKV]


class CentroidHead(nn.Module):
    """Scores only the tokens of the likeliest clusters ("masked_embedding" in checkpoints).

    The vocabulary is split into `num_centroids` clusters of equal size, listed in
    `token_ordering`; the `top_k` clusters whose centroid scores highest get their tokens
    scored against the tied embeddings, every other token gets one value below the lowest score:
    the lowest of the whole call, as transformers takes it, or with `per_row` each row's own
    (rows that are independent sequences, whose drafts must not depend on one another).
    """

    def __init__(self, config: AssistantConfig):
        super().__init__()
        text = config.text_config
        self.top_k = config.centroid_intermediate_top_k
        self.num_centroids = config.num_centroids
        self.centroids = Linear(text.hidden_size, config.num_centroids, bias=False)
        self.token_ordering = mx.zeros((text.vocab_size,), dtype=mx.int32)

    def __call__(self, h: mx.array, embed_tokens: nn.Module, per_row: bool = False) -> mx.array:
        batch, length, _ = h.shape
        vocab = self.token_ordering.shape[0]
        scores = self.centroids(h)
        clusters = mx.argpartition(-scores, kth=self.top_k - 1, axis=-1)[..., : self.top_k]
        members = self.token_ordering.astype(mx.int32).reshape(self.num_centroids, -1)
        token_ids = members[clusters].reshape(batch, length, -1)
        rows = embed_tokens(token_ids)  # the tied head's rows for those tokens only
        logits = (h[..., None, :] @ rows.swapaxes(-1, -2)).squeeze(-2)
        floor = (logits.min(axis=(1, 2), keepdims=True) if per_row else logits.min()) - 1.0
        full = mx.full((batch, length, vocab), floor, dtype=logits.dtype)
        return mx.put_along_axis(full, token_ids, logits, axis=-1)


class AssistantModel(nn.Module):
    """The drafter: input projection, a few decoder layers over the target's K/V, head."""

    path: Path | None
    towers: frozenset[str] = frozenset()  # it reads text only

    def __init__(self, config: AssistantConfig):
        super().__init__()
        self.config = config
        self.path = None
        text = config.text_config
        self.model = TextModel(text)
        self.pre_projection = Linear(2 * config.backbone_hidden_size, text.hidden_size, bias=False)
        self.post_projection = Linear(text.hidden_size, config.backbone_hidden_size, bias=False)
        if config.use_ordered_embeddings:
            self.masked_embedding = CentroidHead(config)

    @property
    def vocab_size(self) -> int:
        return self.config.text_config.vocab_size

    def __call__(
        self,
        token_embedding: mx.array,
        target_hidden: mx.array,
        position: int | mx.array,
        shared_kv: SharedKV,
        masks: dict[str, mx.array] | None = None,
    ) -> tuple[mx.array, mx.array]:
        """(logits [B, L, vocab], hidden [B, L, backbone width] for the next draft step).

        `token_embedding` is the target's (scaled) embedding of the newest token and
        `target_hidden` the target's final hidden state before it, both [B, L, backbone
        width]; `position` is the newest token's position; `shared_kv` maps each layer kind
        to the keys and values of the target's last layer of that kind, over the positions
        before `position`. A batch of rows gives per-row `position`s [B] and `masks` (layer
        kind -> [B, 1, 1, keys]) picking each row's keys; without them every key is seen
        (the last window + 1 on sliding layers). Such rows are independent sequences: a
        centroid head fills each row's unscored tokens by its own scores.
        """
        text = self.config.text_config
        h = self.pre_projection(mx.concatenate([token_embedding, target_hidden], axis=-1))
        if masks is None:
            visible = {kind: self._visible(kind, kv) for kind, kv in shared_kv.items()}
        else:
            visible = shared_kv
        for kind, layer in zip(text.layer_types, self.model.layers, strict=True):
            mask = None if masks is None else masks[kind]
            h, _ = layer(h, mask, None, position, visible[kind], None)
        h = self.model.norm(h)
        if self.config.use_ordered_embeddings:
            logits = self.masked_embedding(h, self.model.embed_tokens, per_row=masks is not None)
        else:
            logits = self.model.embed_tokens.as_linear(h)
        return logits, self.post_projection(h)

    def _visible(self, kind: str, kv: Any) -> Any:
        """The reference's sliding mask seen from one query: the last window + 1 keys."""
        if kind != SLIDING or isinstance(kv, QuantizedKV):
            return kv
        keep = self.config.text_config.sliding_window + 1
        keys, values = kv
        if keys.shape[2] <= keep:
            return kv
        return keys[..., -keep:, :], values[..., -keep:, :]
