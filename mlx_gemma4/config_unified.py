"""Config of Gemma 4 12B (`model_type: gemma4_unified`): its text defaults and the two
encoder-free embedders that stand where the other sizes have vision and audio towers.

Its text decoder is the shared one (`TextConfig`) with these differences, read off transformers'
`Gemma4UnifiedTextConfig` and `Gemma4UnifiedModel`: no per-layer embeddings and no MoE block;
a 1024-token default window; image and video blocks attend to each other both ways on every
layer (full-attention ones too) and, on sliding layers, past the window
(`vision_blocks_everywhere`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

UNIFIED_MODEL_TYPE = "gemma4_unified"

# transformers' Gemma4UnifiedTextConfig defaults where they differ from Gemma4TextConfig's; a
# saved config.json may leave default values out.
UNIFIED_TEXT_DEFAULTS: dict[str, Any] = {
    "hidden_size_per_layer_input": 0,
    "sliding_window": 1024,
    "max_position_embeddings": 262_144,
    "use_bidirectional_attention": "vision",
}
# Keys of gemma4_text that a gemma4_unified decoder does not have; a config naming them is refused.
_NOT_IN_UNIFIED = ("enable_moe_block",)


def _fields(cls, raw: dict[str, Any]) -> dict[str, Any]:
    known = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in raw.items() if k in known and v is not None}


def unified_text_raw(raw: dict[str, Any]) -> dict[str, Any]:
    """The text part of a gemma4_unified config.json with the 12B's defaults filled in."""
    text = {**UNIFIED_TEXT_DEFAULTS, **(raw.get("text_config") or {})}
    if "vocab_size" in raw and "vocab_size" not in (raw.get("text_config") or {}):
        text["vocab_size"] = raw["vocab_size"]
    for key in _NOT_IN_UNIFIED:
        if text.get(key):
            raise ConfigError(f"text_config.{key} is set, but gemma4_unified models have no {key}")
    # these sizes have no per-layer embeddings, whatever a converter wrote
    text["hidden_size_per_layer_input"] = 0
    mode = text.get("use_bidirectional_attention")
    if mode not in (None, "vision"):
        raise ConfigError(
            f"text_config.use_bidirectional_attention {mode!r} is not supported for "
            "gemma4_unified (only 'vision' or null)"
        )
    text["vision_blocks_everywhere"] = mode == "vision"
    text["unified"] = True
    return text


@dataclass
class UnifiedVisionConfig:
    """The encoder-free image embedder; defaults are transformers' `Gemma4UnifiedVisionConfig`."""

    patch_size: int = 16
    pooling_kernel_size: int = 3
    mm_embed_dim: int = 3840
    mm_posemb_size: int = 1120
    output_proj_dims: int = 3840
    rms_norm_eps: float = 1e-6

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> UnifiedVisionConfig:
        config = cls(**_fields(cls, raw))
        if config.output_proj_dims != config.mm_embed_dim:
            raise ConfigError(
                f"vision_config.output_proj_dims {config.output_proj_dims} differs from "
                f"mm_embed_dim {config.mm_embed_dim}; the embedder projects one into the other"
            )
        return config

    @property
    def model_patch_size(self) -> int:
        """Side of one merged patch in pixels (16 x 3 = 48): one soft token each."""
        return self.patch_size * self.pooling_kernel_size

    @property
    def patch_values(self) -> int:
        return 3 * self.model_patch_size**2


@dataclass
class UnifiedAudioConfig:
    """The waveform embedder; defaults are transformers' `Gemma4UnifiedAudioConfig`."""

    audio_embed_dim: int = 640  # samples per soft token (40 ms at 16 kHz)
    rms_norm_eps: float = 1e-6

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> UnifiedAudioConfig:
        return cls(**_fields(cls, raw))
