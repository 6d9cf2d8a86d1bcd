"""Gemma 4 12B (`gemma4_unified`): encoder-free image and audio embedders over the shared decoder.

There is no vision or audio tower. An image is cut into 48 x 48 pixel patches (16 px patches
merged 3 x 3), each flattened in (row, column, channel) order; a patch goes through LayerNorm,
a dense projection and LayerNorm, gets a learned position embedding per axis (table
`[mm_posemb_size, 2, width]`: x looks up column 0, y column 1), a last LayerNorm, and the shared
multimodal embedder (RMSNorm without scale, bias-free linear to the text width). Video frames are
images. Audio is raw 16 kHz waveform cut into 640-sample frames (40 ms), each frame one soft token
through the multimodal embedder alone. Padding patches and frames are dropped before any of it:
every patch and frame is embedded on its own, so that is the reference's computation.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..config import UNIFIED_MODEL_TYPE, ModelConfig, UnifiedVisionConfig
from ..errors import AudioError, Gemma4Error, ImageError, VideoError
from .gemma4 import Model
from .layers import Linear
from .vision import MultimodalEmbedder

# media kind -> (the embedder it needs, the error raised when the checkpoint has none, its message)
_EMBEDDER_OF: dict[str, tuple[str, type[Gemma4Error], str]] = {
    "image": (
        "vision_embedder",
        ImageError,
        "this checkpoint has no image embedder; it cannot take images",
    ),
    "video": (
        "vision_embedder",
        VideoError,
        "this checkpoint has no image embedder; it cannot take video",
    ),
    "audio": (
        "embed_audio",
        AudioError,
        "this checkpoint has no audio embedder; it cannot take audio",
    ),
}


def _blockwise_mean(x: mx.array, block: int) -> mx.array:
    """Mean over the last axis, summed in `block`-sized parts first: float32 sums of thousands
    of values lose about ten times more precision in one serial pass (the CPU backend's)."""
    parts = x.reshape(*x.shape[:-1], -1, block).sum(axis=-1)
    return parts.sum(axis=-1, keepdims=True) / x.shape[-1]


class VisionEmbedder(nn.Module):
    """Merged pixel patches -> LayerNorm, dense, LayerNorm, + 2-D position embedding, LayerNorm."""

    def __init__(self, config: UnifiedVisionConfig):
        super().__init__()
        width = config.mm_embed_dim
        # float32 reductions over a 6912-value patch run per 16 px sub-patch (768 values)
        self.sub_patch = 3 * config.patch_size**2
        object.__setattr__(self, "_split", {})  # a derived copy, not a parameter
        self.patch_ln1 = nn.LayerNorm(config.patch_values)
        self.patch_dense = Linear(config.patch_values, width, bias=True)
        self.patch_ln2 = nn.LayerNorm(width)
        self.pos_embedding = mx.zeros((config.mm_posemb_size, 2, width))
        self.pos_norm = nn.LayerNorm(width)

    def _embed_patches(self, patches: mx.array) -> mx.array:
        """LayerNorm and dense over whole patches; in float32 the long sums go by sub-patch."""
        dense = self.patch_dense
        if patches.dtype != mx.float32 or not isinstance(dense, nn.Linear):
            return dense(self.patch_ln1(patches))
        norm, block = self.patch_ln1, self.sub_patch
        centered = patches - _blockwise_mean(patches, block)
        variance = _blockwise_mean(centered * centered, block)
        h = centered * mx.rsqrt(variance + norm.eps) * norm.weight + norm.bias
        parts = h.reshape(h.shape[0], -1, block).transpose(1, 0, 2)  # [sub-patches, n, block]
        return (parts @ self._split_weight()).sum(axis=0) + dense.bias

    def _split_weight(self) -> mx.array:
        """The dense weight as [sub-patches, block, width], made contiguous once per weight."""
        weight = self.patch_dense.weight
        kept = self._split.get("weight")
        if kept is None or kept[0] is not weight:
            split = weight.reshape(weight.shape[0], -1, self.sub_patch).transpose(1, 2, 0)
            kept = (weight, mx.contiguous(split))
            self._split["weight"] = kept
        return kept[1]

    def __call__(self, patches: mx.array, positions: mx.array) -> mx.array:
        """[n, 3 * 48^2] pixels in [0, 1] and their [n, 2] (x, y) positions -> [n, width]."""
        # as the reference, pixels take the embedder's dtype
        h = self.patch_ln2(self._embed_patches(patches.astype(self.patch_ln1.weight.dtype)))
        table = self.pos_embedding.astype(h.dtype)
        h = h + (table[positions[:, 0], 0] + table[positions[:, 1], 1])
        return self.pos_norm(h)


def _real_rows(mask: np.ndarray) -> mx.array:
    """Flat indices of the True entries of `mask` (rows to keep, padding left out)."""
    return mx.array(np.flatnonzero(mask.reshape(-1)))


class UnifiedModel(Model):
    """Gemma 4 12B: the shared text decoder with the encoder-free image and audio embedders.

    Takes the layouts transformers' `Gemma4UnifiedProcessor` produces: `pixel_values`
    [images, tokens, 3 * 48^2] with `image_position_ids` [images, tokens, 2] (padding (-1, -1)),
    the same for video frames, and `input_features` [clips, frames, 640] raw samples with
    `input_features_mask` [clips, frames].
    """

    encoders = ("vision_embedder", "embed_audio")

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        hidden = config.text_config.hidden_size
        vision = config.vision_embedder
        if vision is not None:
            self.vision_embedder = VisionEmbedder(vision)
            self.embed_vision = MultimodalEmbedder(vision.mm_embed_dim, hidden, vision.rms_norm_eps)
        audio = config.audio_embedder
        if audio is not None:
            self.embed_audio = MultimodalEmbedder(audio.audio_embed_dim, hidden, audio.rms_norm_eps)
        self.towers = frozenset(name for name in self.encoders if name in self)

    def require_tower(self, kind: str) -> None:
        embedder, error, message = _EMBEDDER_OF[kind]
        if embedder not in self:
            raise error(message)

    def vision_features(
        self, pixel_values: mx.array, position_ids: mx.array, kind: str = "image"
    ) -> mx.array:
        """Soft tokens [n, hidden] of images (or video frames), in order; padding dropped."""
        self.require_tower(kind)
        error = VideoError if kind == "video" else ImageError
        vision = self.config.vision_embedder
        positions = np.asarray(position_ids)
        if pixel_values.ndim != 3 or pixel_values.shape[-1] != vision.patch_values:
            raise error(
                f"pixel values of shape {tuple(pixel_values.shape)}: this model takes "
                f"[images, tokens, {vision.patch_values}] merged {vision.model_patch_size}-pixel "
                "patches (use its processor)"
            )
        if positions.shape != (*pixel_values.shape[:2], 2):
            raise error(
                f"position ids of shape {positions.shape} do not match pixel values of shape "
                f"{tuple(pixel_values.shape)}; expected [images, tokens, 2]"
            )
        if positions.max(initial=-1) >= vision.mm_posemb_size:
            raise error(
                f"a patch position {positions.max()} exceeds the model's position table "
                f"({vision.mm_posemb_size}); the image is too large for this checkpoint"
            )
        real = _real_rows((positions != -1).all(axis=-1))
        patches = pixel_values.reshape(-1, vision.patch_values)[real]
        xy = mx.array(positions.reshape(-1, 2))[real]
        return self.embed_vision(self.vision_embedder(patches, xy))

    def audio_features(
        self, input_features: mx.array, input_features_mask: mx.array | None = None
    ) -> mx.array:
        """Soft tokens [n, hidden] of audio clips, in order; padding frames dropped.

        `input_features` [clips, frames, 640] are raw waveform frames; `input_features_mask`
        [clips, frames] (True: real frame; None: all real)."""
        self.require_tower("audio")
        samples = self.config.audio_embedder.audio_embed_dim
        if input_features.ndim != 3 or input_features.shape[-1] != samples:
            raise AudioError(
                f"input features of shape {tuple(input_features.shape)}: this model takes "
                f"[clips, frames, {samples}] raw waveform frames (use its processor)"
            )
        if input_features_mask is None:
            mask = np.ones(input_features.shape[:2], dtype=bool)
        else:
            mask = np.asarray(input_features_mask).astype(bool)
        if mask.shape != tuple(input_features.shape[:2]):
            raise AudioError(
                f"input_features_mask of shape {mask.shape} does not match input features of "
                f"shape {tuple(input_features.shape)}; expected [clips, frames]"
            )
        frames = input_features.reshape(-1, samples)
        if not mask.all():
            frames = frames[_real_rows(mask)]
        return self.embed_audio(frames)


def model_for(config: ModelConfig) -> Model:
    """The model class a config asks for: `UnifiedModel` for gemma4_unified, else `Model`."""
    return UnifiedModel(config) if config.model_type == UNIFIED_MODEL_TYPE else Model(config)
