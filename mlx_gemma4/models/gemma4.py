"""The whole Gemma 4 model: towers, soft tokens scattered into the text, decoder, LM head."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..config import ModelConfig
from ..errors import AudioError, Gemma4Error, ImageError, VideoError
from ..kv_quant import KVQuantization
from .activations import softcap
from .audio import AudioModel
from .layers import Linear
from .text import TextModel
from .vision import MultimodalEmbedder, VisionModel

# Checkpoint prefixes of the modality towers; those a model does not build are set aside.
TOWER_PREFIXES = (
    "vision_tower.",
    "embed_vision.",
    "audio_tower.",
    "embed_audio.",
    "vision_embedder.",  # gemma4_unified's encoder-free image embedder
)

# media kind -> (the tower it needs, the error raised when the checkpoint has none, its message)
_TOWER_OF: dict[str, tuple[str, type[Gemma4Error], str]] = {
    "image": (
        "vision_tower",
        ImageError,
        "this checkpoint has no vision tower; it cannot take images",
    ),
    "video": (
        "vision_tower",
        VideoError,
        "this checkpoint has no vision tower; it cannot take video",
    ),
    "audio": (
        "audio_tower",
        AudioError,
        "this checkpoint has no audio tower; it cannot take audio (E2B/E4B can)",
    ),
}


def vision_block_ids(is_vision: mx.array) -> mx.array:
    """Number each contiguous run of image tokens (0, 1, ...); text gets -1."""
    previous = mx.concatenate([mx.zeros_like(is_vision[:, :1]), is_vision[:, :-1]], axis=1)
    starts = is_vision & mx.logical_not(previous)
    return mx.where(is_vision, mx.cumsum(starts.astype(mx.int32), axis=1) - 1, -1)


def scatter_soft_tokens(h: mx.array, slots: mx.array, features: mx.array) -> mx.array:
    """Put `features` [n, hidden] into the `slots` [B, T] positions of `h`, in order."""
    order = mx.maximum(mx.cumsum(slots.reshape(-1).astype(mx.int32)) - 1, 0)
    return mx.where(slots[..., None], features[order].reshape(h.shape).astype(h.dtype), h)


class Model(nn.Module):
    """Gemma 4: the text decoder and the modality towers the config asks for.

    `path` is the checkpoint folder it was loaded from (None when built in memory); `towers`
    names the towers the checkpoint has ("vision_tower", "audio_tower"), built or set aside.
    """

    path: Path | None
    towers: frozenset[str]
    # the modules that turn media into soft tokens (gemma4_unified has embedders instead)
    encoders: tuple[str, ...] = ("vision_tower", "audio_tower")

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.path = None
        text = config.text_config
        self.language_model = TextModel(text)
        if not text.tie_word_embeddings:
            self.lm_head = Linear(text.hidden_size, text.vocab_size, bias=False)
        vision = config.vision_config
        if vision is not None:
            self.vision_tower = VisionModel(vision)
            self.embed_vision = MultimodalEmbedder(
                vision.hidden_size, text.hidden_size, vision.rms_norm_eps
            )
        audio = config.audio_config
        if audio is not None:
            self.audio_tower = AudioModel(audio)
            self.embed_audio = MultimodalEmbedder(
                audio.output_proj_dims, text.hidden_size, audio.rms_norm_eps
            )
        self.towers = frozenset(name for name in self.encoders if name in self)

    @property
    def encodes_media(self) -> bool:
        """Whether this model built any module that turns media into soft tokens."""
        return any(name in self for name in self.encoders)

    def require_tower(self, kind: str) -> None:
        """Raise the one-line error of `kind` ("image", "video", "audio") when this model has
        no tower to encode it."""
        tower, error, message = _TOWER_OF[kind]
        if tower not in self:
            raise error(message)

    def make_cache(self, kv_quantization: KVQuantization | None = None) -> list[Any]:
        """Per-layer caches for the layers that own keys and values (KV-shared layers own none);
        `kv_quantization` stores the full-attention layers' keys and values quantized."""
        return self.language_model.make_cache(kv_quantization)

    def shard(self, group: Any = None, experts: str = "auto") -> Model:
        """Tensor parallelism over `group` (default: `mx.distributed.init()`); see
        `mlx_gemma4.models.sharding.shard`."""
        from .sharding import shard

        return shard(self, group or mx.distributed.init(), experts=experts)

    def pipeline(self, group: Any = None, split: list[int] | None = None) -> Model:
        """Pipeline parallelism over `group`, a contiguous span of layers per rank; see
        `mlx_gemma4.models.sharding.pipeline`."""
        from .sharding import pipeline

        return pipeline(self, group or mx.distributed.init(), split=split)

    def logits(self, hidden: mx.array) -> mx.array:
        if "lm_head" in self:
            out = self.lm_head(hidden)
        else:
            out = self.language_model.embed_tokens.as_linear(hidden)
        cap = self.config.text_config.final_logit_softcapping
        return softcap(out, cap) if cap else out

    def soft_token_slots(self, input_ids: mx.array) -> mx.array:
        """Placeholders whose embedding comes from a tower rather than the token table."""
        config = self.config
        slots = (input_ids == config.image_token_id) | (input_ids == config.video_token_id)
        return slots | (input_ids == config.audio_token_id)

    def vision_features(
        self, pixel_values: mx.array, position_ids: mx.array, kind: str = "image"
    ) -> mx.array:
        """Soft tokens [n, hidden] of images (or video frames: `kind="video"`), in order;
        padding dropped."""
        self.require_tower(kind)
        return self.embed_vision(self.vision_tower(pixel_values, position_ids))

    def audio_features(
        self, input_features: mx.array, input_features_mask: mx.array | None = None
    ) -> mx.array:
        """Soft tokens [n, hidden] of audio clips, in order; padding dropped.

        `input_features` [clips, frames, 128] log-mel and `input_features_mask` [clips, frames]
        (True: real frame; None: all real) take transformers' layouts. Clip i gives
        `audio.soft_token_counts(mask)[i]` tokens.
        """
        self.require_tower("audio")
        if input_features_mask is None:
            input_features_mask = mx.ones(input_features.shape[:2], dtype=mx.bool_)
        return self.embed_audio(self.audio_tower(input_features, input_features_mask))

    def text_ids(self, input_ids: mx.array) -> mx.array:
        """Token ids as the text model reads them: on a multimodal checkpoint, placeholders look
        up the pad token (in the embeddings and the PLE table), as the reference embeds them,
        including a placeholder the model itself generates."""
        if not self.encodes_media:
            return input_ids
        pad = self.config.text_config.pad_token_id
        return mx.where(self.soft_token_slots(input_ids), pad, input_ids)

    def text_model_inputs(
        self, input_ids: mx.array, features: dict[int, mx.array] | None = None
    ) -> tuple[mx.array, mx.array | None, mx.array | None]:
        """(token ids, embeddings or None, image block ids or None) for the text model.

        `features` maps a placeholder token id (image, video or audio) to the soft tokens
        [n, hidden] that fill its placeholders, in order.
        """
        if not self.encodes_media:
            return input_ids, None, None
        text_ids = self.text_ids(input_ids)
        embeddings = None
        for token_id, soft_tokens in (features or {}).items():
            if embeddings is None:
                embeddings = self.language_model.embed(text_ids)
            placeholders = input_ids == token_id
            if soft_tokens.shape[0] != (expected := int(placeholders.sum().item())):
                raise ValueError(
                    f"the media give {soft_tokens.shape[0]} soft tokens for {expected} "
                    f"placeholders (token {token_id}); build both with the same processor"
                )
            embeddings = scatter_soft_tokens(embeddings, placeholders, soft_tokens)
        blocks = None
        bidirectional = self.config.text_config.use_bidirectional_attention == "vision"
        if bidirectional and input_ids.shape[1] > 1:
            visual = (input_ids == self.config.image_token_id) | (
                input_ids == self.config.video_token_id
            )
            if visual.any().item():
                blocks = vision_block_ids(visual)
        return text_ids, embeddings, blocks

    def __call__(
        self,
        input_ids: mx.array,
        cache: list[Any] | None = None,
        pixel_values: mx.array | None = None,
        image_position_ids: mx.array | None = None,
        pixel_values_videos: mx.array | None = None,
        video_position_ids: mx.array | None = None,
        input_features: mx.array | None = None,
        input_features_mask: mx.array | None = None,
    ) -> mx.array:
        """`[B, T]` token ids -> `[B, T, vocab]` logits; `cache` carries earlier positions.

        `pixel_values` [images, patches, 3 p^2] and `image_position_ids` [images, patches, 2]
        take transformers' layouts, as do `pixel_values_videos` and `video_position_ids` (the
        frames of all videos, concatenated); so do `input_features` [clips, frames, 128] and
        `input_features_mask` [clips, frames]. Soft tokens fill their placeholders in order.
        """
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
        features = {}
        if pixel_values is not None:
            features[self.config.image_token_id] = self.vision_features(
                pixel_values, image_position_ids
            )
        if pixel_values_videos is not None:
            features[self.config.video_token_id] = self.vision_features(
                pixel_values_videos, video_position_ids, kind="video"
            )
        if input_features is not None:
            features[self.config.audio_token_id] = self.audio_features(
                input_features, input_features_mask
            )
        text_ids, embeddings, blocks = self.text_model_inputs(input_ids, features)
        return self.logits(self.language_model(text_ids, cache, embeddings, blocks))
