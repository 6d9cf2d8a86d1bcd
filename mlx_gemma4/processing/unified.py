"""Media for Gemma 4 12B (`gemma4_unified`), laid out as transformers' unified processors do.

Images and video frames are resized exactly as for the other sizes, then cut into merged
48 x 48 patches (16 px patches merged 3 x 3) in row-major order, each flattened in (row, column,
channel) order: that is `images.process_images` with the merged patch as the patch and no
pooling, so one patch is one soft token and batches pad to the soft-token budget.

Audio is the raw 16 kHz waveform cut into frames of 640 samples (40 ms), the last frame
zero-padded; each frame is one soft token. Clips are cut to 30 s (750 tokens) as for the
other sizes, and a batch is padded with zero frames (mask False) to its longest clip.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from ..config import ModelConfig
from .audio import MAX_SAMPLES, AudioFeatures


@dataclass
class WaveformFrames(AudioFeatures):
    """`AudioFeatures` whose features are raw waveform frames [clips, frames, frame samples]."""

    def take(self, indices: list[int] | None = None) -> tuple[mx.array, mx.array]:
        """(input_features, input_features_mask) of the clips at `indices` (all by default),
        padded only to the longest of those clips."""
        indices = list(range(len(self.lengths))) if indices is None else list(indices)
        frames = max(self.soft_tokens[i] for i in indices)
        return mx.array(self.features[indices, :frames]), mx.array(self.mask[indices, :frames])


def waveform_frames(waves: list[np.ndarray], frame: int = 640) -> WaveformFrames:
    """16 kHz clips -> frames of `frame` samples, batched as transformers'
    `Gemma4UnifiedAudioFeatureExtractor` batches them."""
    waves = [np.asarray(w, dtype=np.float32)[:MAX_SAMPLES] for w in waves]
    counts = [-(-len(w) // frame) for w in waves]
    features = np.zeros((len(waves), max(counts) * frame), dtype=np.float32)
    for i, wave in enumerate(waves):
        features[i, : len(wave)] = wave
    mask = np.arange(max(counts))[None, :] < np.array(counts)[:, None]
    features = features.reshape(len(waves), max(counts), frame)
    return WaveformFrames(features, mask, counts, [len(w) for w in waves])


def configure_processor(processor, config: ModelConfig) -> None:
    """Make a `Processor` lay media out for a gemma4_unified model with this config."""
    vision = config.vision_embedder
    if vision is not None:
        processor.patch_size, processor.pooling = vision.model_patch_size, 1
    audio = config.audio_embedder
    if audio is not None:
        frame = audio.audio_embed_dim
        processor.extract_audio = lambda waves: waveform_frames(waves, frame)
