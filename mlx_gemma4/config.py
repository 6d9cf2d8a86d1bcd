"""Config dataclasses for Gemma 4, read from either config.json form.

Hub checkpoints name the full-attention head size and KV heads with top-level keys
(`global_head_dim`, `num_global_key_value_heads`); transformers >= 5.2x writes a
`per_layer_config` map instead. Both normalize to the same `TextConfig`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from .config_unified import (
    UNIFIED_MODEL_TYPE,
    UnifiedAudioConfig,
    UnifiedVisionConfig,
    unified_text_raw,
)
from .errors import ConfigError

SLIDING = "sliding_attention"
FULL = "full_attention"

TEXT_MODEL_TYPE = "gemma4_text"
MULTIMODAL_MODEL_TYPE = "gemma4"
# A turboquant checkpoint's model_type: its weights are rotated, which only this package
# undoes, so peers (mlx-lm, mlx-vlm) must refuse it by name; `base_model_type` holds the real one.
TURBOQUANT_MODEL_TYPE = "mlx_gemma4_turboquant"
# The float dtypes weights are stored and computed in, by the names config.json gives them
DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}

_DEFAULT_ROPE = {
    SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
    FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
}


def _known_fields(cls, raw: dict[str, Any]) -> dict[str, Any]:
    """The entries of a config.json dict that name fields of `cls` (nulls mean the default)."""
    known = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in raw.items() if k in known and v is not None}


@dataclass
class TextConfig:
    """The text decoder's hyper-parameters; defaults are transformers' `Gemma4TextConfig` ones."""

    vocab_size: int = 262_144
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 30
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    global_head_dim: int = 512
    num_global_key_value_heads: int | None = None
    rms_norm_eps: float = 1e-6
    sliding_window: int = 512
    layer_types: list[str] = field(default_factory=list)
    rope_parameters: dict[str, dict[str, Any]] = field(default_factory=dict)
    final_logit_softcapping: float | None = None
    vocab_size_per_layer_input: int = 262_144
    hidden_size_per_layer_input: int = 256
    attention_k_eq_v: bool = False
    num_kv_shared_layers: int = 0
    use_double_wide_mlp: bool = False
    enable_moe_block: bool = False
    num_experts: int | None = None
    top_k_experts: int | None = None
    moe_intermediate_size: int | None = None
    use_bidirectional_attention: str | None = None
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 131_072
    pad_token_id: int = 0
    hidden_activation: str = "gelu_pytorch_tanh"
    attention_bias: bool = False
    # gemma4_unified (12B): image/video blocks attend both ways on every layer, past the window
    vision_blocks_everywhere: bool = False
    unified: bool = False

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TextConfig:
        config = cls(**_known_fields(cls, raw))
        config._normalize(raw.get("per_layer_config"))
        return config

    def _normalize(self, per_layer_config: dict[str, Any] | None) -> None:
        if not self.layer_types:
            # transformers' default: every sixth layer is full attention
            self.layer_types = [
                FULL if (i + 1) % 6 == 0 else SLIDING for i in range(self.num_hidden_layers)
            ]
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is "
                f"{self.num_hidden_layers}; fix config.json so they agree"
            )
        unknown = set(self.layer_types) - {SLIDING, FULL}
        if unknown:
            raise ConfigError(f"unknown layer types {sorted(unknown)} in config.json")
        # the reference forces the last layer to full attention
        self.layer_types[-1] = FULL
        self.rope_parameters = {**_DEFAULT_ROPE, **(self.rope_parameters or {})}

        if per_layer_config:
            self._read_per_layer_config(per_layer_config)
        elif not self.attention_k_eq_v:
            # the reference only honours the global KV head count on k_eq_v models
            self.num_global_key_value_heads = None

        if self.hidden_activation not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ConfigError(
                f"hidden_activation {self.hidden_activation!r} is not supported (Gemma 4 uses "
                "gelu_pytorch_tanh)"
            )
        if self.enable_moe_block and not (
            self.num_experts and self.top_k_experts and self.moe_intermediate_size
        ):
            raise ConfigError(
                "enable_moe_block is set but num_experts, top_k_experts or "
                "moe_intermediate_size is missing from config.json"
            )
        if self.num_kv_shared_layers:
            sources = set(self.layer_types[: self.first_kv_shared_layer])
            if sources != set(self.layer_types):
                raise ConfigError(
                    "num_kv_shared_layers leaves a layer type with no earlier layer to share "
                    "K/V from; check layer_types and num_kv_shared_layers in config.json"
                )

    def _read_per_layer_config(self, per_layer_config: dict[str, Any]) -> None:
        full_layers = [i for i, t in enumerate(self.layer_types) if t == FULL]
        overrides = [per_layer_config.get(str(i)) or per_layer_config.get(i) for i in full_layers]
        head_dims = {o.get("head_dim") for o in overrides if o}
        kv_heads = {o.get("num_key_value_heads") for o in overrides if o}
        if len(head_dims) > 1 or len(kv_heads) > 1:
            raise ConfigError(
                "per_layer_config gives full-attention layers different head sizes; "
                "this package supports one size for all full layers"
            )
        if head_dims and None not in head_dims:
            self.global_head_dim = head_dims.pop()
        self.num_global_key_value_heads = kv_heads.pop() if kv_heads else None

    @property
    def first_kv_shared_layer(self) -> int:
        return self.num_hidden_layers - self.num_kv_shared_layers

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    def layer_head_dim(self, layer: int) -> int:
        return self.head_dim if self.is_sliding(layer) else self.global_head_dim

    def layer_kv_heads(self, layer: int) -> int:
        if self.is_sliding(layer) or self.num_global_key_value_heads is None:
            return self.num_key_value_heads
        return self.num_global_key_value_heads

    def kv_source(self, layer: int) -> int:
        """The layer whose keys and values `layer` attends over (itself unless KV-shared)."""
        first_shared = self.first_kv_shared_layer
        if layer < first_shared:
            return layer
        kind = self.layer_types[layer]
        return max(i for i in range(first_shared) if self.layer_types[i] == kind)

    @property
    def variant(self) -> str:
        """The released size these shapes match, else the family they belong to."""
        if self.unified:
            return "12B" if self.hidden_size == 3840 else "unified (12B family)"
        if self.enable_moe_block:
            known = self.hidden_size == 2816 and self.num_experts == 128
            return "26B-A4B" if known else "MoE (26B-A4B family)"
        if self.hidden_size_per_layer_input:
            return {1536: "E2B", 2560: "E4B"}.get(self.hidden_size, "PLE (E2B/E4B family)")
        return "31B" if self.hidden_size == 5376 else "dense (31B family)"

    def layer_mlp_size(self, layer: int) -> int:
        doubled = self.use_double_wide_mlp and layer >= self.first_kv_shared_layer
        return self.intermediate_size * (2 if doubled else 1)


@dataclass
class VisionConfig:
    """The vision tower's hyper-parameters; defaults are transformers' `Gemma4VisionConfig` ones."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 16
    num_attention_heads: int = 12
    num_key_value_heads: int = 12
    head_dim: int = 64
    rms_norm_eps: float = 1e-6
    patch_size: int = 16
    position_embedding_size: int = 10 * 1024
    pooling_kernel_size: int = 3
    use_clipped_linears: bool = False
    standardize: bool = False
    rope_theta: float = 100.0

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> VisionConfig:
        values = _known_fields(cls, raw)
        rope = raw.get("rope_parameters") or {}
        if "rope_theta" in rope:
            values["rope_theta"] = rope["rope_theta"]
        if rope.get("rope_type", "axial") != "axial":
            raise ConfigError(
                f"vision rope_type {rope['rope_type']!r} is not supported (axial only)"
            )
        return cls(**values)


@dataclass
class AudioConfig:
    """The audio tower's hyper-parameters; defaults are transformers' `Gemma4AudioConfig` ones."""

    hidden_size: int = 1024
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    hidden_act: str = "silu"
    subsampling_conv_channels: list[int] = field(default_factory=lambda: [128, 32])
    conv_kernel_size: int = 5
    residual_weight: float = 0.5
    attention_chunk_size: int = 12
    attention_context_left: int = 13
    attention_context_right: int = 0
    attention_logit_cap: float = 50.0
    attention_invalid_logits_value: float = -1.0e9
    use_clipped_linears: bool = True
    rms_norm_eps: float = 1e-6
    gradient_clipping: float = 1e10
    output_proj_dims: int = 1536

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> AudioConfig:
        config = cls(**_known_fields(cls, raw))
        config.subsampling_conv_channels = list(config.subsampling_conv_channels)
        if config.hidden_act != "silu":
            raise ConfigError(
                f"audio hidden_act {config.hidden_act!r} is not supported (Gemma 4 uses silu)"
            )
        if len(config.subsampling_conv_channels) != 2:
            raise ConfigError(
                "audio subsampling_conv_channels must list two channel counts, got "
                f"{config.subsampling_conv_channels}"
            )
        if config.hidden_size % config.num_attention_heads:
            raise ConfigError(
                f"audio hidden_size {config.hidden_size} is not a multiple of "
                f"num_attention_heads {config.num_attention_heads}"
            )
        return config


@dataclass
class ModelConfig:
    """Top-level config: the text decoder plus the tower configs of a multimodal checkpoint."""

    text_config: TextConfig
    model_type: str = TEXT_MODEL_TYPE
    vision_config: VisionConfig | None = None
    audio_config: AudioConfig | None = None
    image_token_id: int = 258_880
    video_token_id: int = 258_884
    audio_token_id: int = 258_881
    quantization: dict[str, Any] | None = None
    eos_token_id: list[int] = field(default_factory=lambda: [1])
    bos_token_id: int = 2
    raw: dict[str, Any] = field(default_factory=dict, repr=False)
    # gemma4_unified's encoder-free embedders (no vision or audio tower)
    vision_embedder: UnifiedVisionConfig | None = None
    audio_embedder: UnifiedAudioConfig | None = None

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        model_type = raw.get("model_type")
        if model_type == TURBOQUANT_MODEL_TYPE:
            model_type = raw.get("base_model_type")
        if model_type == MULTIMODAL_MODEL_TYPE:
            text_raw = dict(raw.get("text_config") or {})
            if "vocab_size" in raw and "vocab_size" not in text_raw:
                text_raw["vocab_size"] = raw["vocab_size"]
        elif model_type == TEXT_MODEL_TYPE:
            text_raw = raw
        elif model_type == UNIFIED_MODEL_TYPE:
            return cls._from_unified_dict(raw)
        else:
            raise ConfigError(
                f"model_type {model_type!r} is not a Gemma 4 model (expected "
                f"{MULTIMODAL_MODEL_TYPE!r}, {UNIFIED_MODEL_TYPE!r} or {TEXT_MODEL_TYPE!r})"
            )
        eos = raw.get("eos_token_id", text_raw.get("eos_token_id", 1))
        return cls(
            text_config=TextConfig.from_dict(text_raw),
            model_type=model_type,
            vision_config=VisionConfig.from_dict(raw["vision_config"])
            if raw.get("vision_config")
            else None,
            audio_config=AudioConfig.from_dict(raw["audio_config"])
            if raw.get("audio_config")
            else None,
            **{
                k: raw[k]
                for k in ("image_token_id", "video_token_id", "audio_token_id")
                if k in raw
            },
            quantization=raw.get("quantization") or text_raw.get("quantization"),
            eos_token_id=list(eos) if isinstance(eos, (list, tuple)) else [eos],
            bos_token_id=raw.get("bos_token_id", text_raw.get("bos_token_id", 2)),
            raw=raw,
        )

    @classmethod
    def _from_unified_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        """Gemma 4 12B: the shared text decoder and the encoder-free embedders."""
        text = TextConfig.from_dict(unified_text_raw(raw))
        # token ids, stop ids and quantization read as for gemma4; the text config replaced
        towerless = {k: v for k, v in raw.items() if k not in ("vision_config", "audio_config")}
        config = cls.from_dict({**towerless, "model_type": MULTIMODAL_MODEL_TYPE})
        config.text_config, config.model_type, config.raw = text, UNIFIED_MODEL_TYPE, raw
        if raw.get("vision_config"):
            config.vision_embedder = UnifiedVisionConfig.from_dict(raw["vision_config"])
        if raw.get("audio_config"):
            config.audio_embedder = UnifiedAudioConfig.from_dict(raw["audio_config"])
        return config


# ----------------------------------------------------------------------------- assistant drafters

ASSISTANT_MODEL_TYPE = "gemma4_assistant"
# the 12B's drafter: the same network, its decoder a gemma4_unified_text one (12B defaults)
UNIFIED_ASSISTANT_MODEL_TYPE = "gemma4_unified_assistant"
ASSISTANT_MODEL_TYPES = (ASSISTANT_MODEL_TYPE, UNIFIED_ASSISTANT_MODEL_TYPE)


class DrafterTextConfig(TextConfig):
    """An assistant's decoder: every layer reads its keys and values from the target model."""

    def _normalize(self, per_layer_config: dict[str, Any] | None) -> None:
        self.num_kv_shared_layers = 0  # no layer of its own to share from: skip that check
        super()._normalize(per_layer_config)
        self.num_kv_shared_layers = self.num_hidden_layers

    def kv_source(self, layer: int) -> int:
        return -1  # the target's last layer of the same kind, handed in at each call


@dataclass
class AssistantConfig:
    """A multi-token-prediction drafter (transformers' `Gemma4AssistantConfig`, or
    `Gemma4UnifiedAssistantConfig` for the 12B: same fields, 12B text defaults).

    `backbone_hidden_size` is the target's width; `use_ordered_embeddings` scores the
    vocabulary through `num_centroids` token clusters, of which the
    `centroid_intermediate_top_k` likeliest are scored and the rest masked.
    """

    text_config: DrafterTextConfig
    backbone_hidden_size: int = 1536
    use_ordered_embeddings: bool = False
    num_centroids: int = 2048
    centroid_intermediate_top_k: int = 32
    model_type: str = ASSISTANT_MODEL_TYPE
    quantization: dict[str, Any] | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> AssistantConfig:
        text_raw = dict(raw.get("text_config") or {})
        if not text_raw:
            raise ConfigError("an assistant config.json needs its text_config")
        model_type = raw.get("model_type") or ASSISTANT_MODEL_TYPE
        defaults = {}
        if model_type == UNIFIED_ASSISTANT_MODEL_TYPE:
            text_raw = unified_text_raw({"text_config": text_raw})
            defaults["backbone_hidden_size"] = 3840  # the 12B's width
        text = DrafterTextConfig.from_dict(text_raw)
        if text.hidden_size_per_layer_input or text.enable_moe_block:
            raise ConfigError(
                "an assistant's text_config must have hidden_size_per_layer_input 0 and no MoE"
            )
        config = cls(
            text_config=text,
            model_type=model_type,
            **{
                **defaults,
                **{
                    k: raw[k]
                    for k in (
                        "backbone_hidden_size",
                        "use_ordered_embeddings",
                        "num_centroids",
                        "centroid_intermediate_top_k",
                    )
                    if raw.get(k) is not None
                },
            },
            quantization=raw.get("quantization"),
            raw=raw,
        )
        if config.use_ordered_embeddings and text.vocab_size % config.num_centroids:
            raise ConfigError(
                f"vocab_size {text.vocab_size} is not a multiple of num_centroids "
                f"{config.num_centroids}"
            )
        return config
