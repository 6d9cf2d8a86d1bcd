"""Checkpoint tensors -> this package's module tree: key names, expert layout, conv layout,
tensors that are computed or unused rather than loaded; one clear error for a mismatch."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from .config import ModelConfig
from .errors import WeightsError
from .models.gemma4 import TOWER_PREFIXES, Model

# (checkpoint prefix, our prefix); the first match wins
_PREFIXES = [
    ("model.language_model.", "language_model."),  # transformers, multimodal
    ("language_model.model.", "language_model."),  # mlx-vlm / mlx-lm multimodal
    ("language_model.lm_head.", "lm_head."),
    ("model.", "language_model."),  # transformers / mlx-lm, text only
]
_SHARED_KV_PARTS = ("k_proj", "v_proj", "k_norm", "v_norm")
_CLIP_BOUNDS = ("input_min", "input_max", "output_min", "output_max")
_AUDIO_CONVS = (".conv.weight", ".depthwise_conv1d.weight")
_AUDIO_CONSTANTS = ("rel_pos_enc.inv_timescales", "self_attn.softcap")


def _rename(key: str) -> str:
    if key.removeprefix("model.").startswith(TOWER_PREFIXES):
        return key.removeprefix("model.")
    for prefix, ours in _PREFIXES:
        if key.startswith(prefix):
            key = ours + key[len(prefix) :]
            break
    # transformers stores experts as bare tensors
    if key.endswith((".experts.gate_up_proj", ".experts.down_proj")):
        key += ".weight"
    return key


def _fuse_switch_experts(weights: dict[str, mx.array]) -> None:
    """mlx-lm / mlx-vlm split experts into switch_glu.{gate,up,down}_proj; we keep gate_up fused."""
    gates = [k for k in weights if ".experts.switch_glu.gate_proj." in k]
    for gate_key in gates:
        base, part = gate_key.split(".experts.switch_glu.gate_proj.")
        up_key = f"{base}.experts.switch_glu.up_proj.{part}"
        if up_key not in weights:
            raise WeightsError(f"{gate_key} has no matching {up_key}")
        gate, up = weights.pop(gate_key), weights.pop(up_key)
        if gate.shape != up.shape:
            raise WeightsError(
                f"{base}.experts: gate and up projections are stored with different shapes "
                f"{gate.shape} and {up.shape} (quantized differently?)"
            )
        weights[f"{base}.experts.gate_up_proj.{part}"] = mx.concatenate([gate, up], axis=-2)
    for key in [k for k in weights if ".experts.switch_glu.down_proj." in k]:
        weights[key.replace(".switch_glu.down_proj.", ".down_proj.")] = weights.pop(key)


def canonical_weights(
    weights: dict[str, mx.array], origin: dict[str, Path], model: Model
) -> tuple[dict[str, mx.array], dict[str, Path], dict[str, mx.array]]:
    """Rename checkpoint keys to this package's module tree.

    Returns the model's weights, the file each came from, and the weights of modality towers
    this package does not build yet (set aside).
    """
    text = model.config.text_config
    renamed: dict[str, mx.array] = {}
    where: dict[str, Path] = {}
    towers: dict[str, mx.array] = {}
    clipped = (
        model.config.vision_config is not None and model.config.vision_config.use_clipped_linears
    )
    audio = model.config.audio_config
    audio_clipped = audio is not None and audio.use_clipped_linears
    audio_shapes = (
        {f"audio_tower.{k}": v.shape for k, v in tree_flatten(model.audio_tower.parameters())}
        if "audio_tower" in model
        else {}
    )
    for key, value in weights.items():
        new = _rename(key)
        if new.startswith(TOWER_PREFIXES) and new.split(".")[0] not in model:
            towers[new] = value
            continue
        if new.startswith("vision_tower.") and new.endswith(_CLIP_BOUNDS) and not clipped:
            continue
        if new.startswith("audio_tower."):
            if new.endswith(_CLIP_BOUNDS) and not audio_clipped:
                continue
            if new.endswith(_AUDIO_CONSTANTS):  # computed, not loaded
                continue
            if new.endswith(_AUDIO_CONVS) and new in audio_shapes:
                value = _channels_last(value, audio_shapes[new])
        if "rotary_emb" in new or (new == "lm_head.weight" and text.tie_word_embeddings):
            continue
        if _is_unused_shared_kv(new, text.first_kv_shared_layer):
            continue
        renamed[new] = value
        where[new] = origin[key]
    _fuse_switch_experts(renamed)
    return renamed, where, towers


def _channels_last(weight: mx.array, shape: tuple[int, ...]) -> mx.array:
    """A PyTorch conv weight [out, in, *kernel] in MLX's [out, *kernel, in] layout (weights
    converted for MLX already are left alone)."""
    if tuple(weight.shape) == tuple(shape):
        return weight
    moved = mx.moveaxis(weight, 1, -1)
    return moved if tuple(moved.shape) == tuple(shape) else weight


def without_absent_audio(config: ModelConfig, weights: dict[str, mx.array]) -> ModelConfig:
    """Build no audio tower when the checkpoint has no audio weights (a text and vision export
    of an audio model); audio input then gets the no-audio-tower error. A tower with only some
    of its weights is still reported as missing tensors."""
    if config.audio_config is None and config.audio_embedder is None:
        return config
    audio = ("audio_tower.", "embed_audio.")
    if any(_rename(key).startswith(audio) for key in weights):
        return config
    return dataclasses.replace(config, audio_config=None, audio_embedder=None)


def _is_unused_shared_kv(key: str, first_shared: int) -> bool:
    match = re.match(r"language_model\.layers\.(\d+)\.self_attn\.(\w+)\.", key)
    return bool(match) and int(match[1]) >= first_shared and match[2] in _SHARED_KV_PARTS


def check_weights(model: Model, weights: dict[str, mx.array], where: dict[str, Path]) -> None:
    """One clear error for missing, unexpected or mis-shaped tensors."""

    def source(key: str) -> str:
        return str(where.get(key, "checkpoint"))

    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    if missing:
        shown = ", ".join(missing[:3]) + (
            f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        )
        raise WeightsError(f"checkpoint is missing {len(missing)} tensors: {shown}")
    unexpected = sorted(set(weights) - set(expected))
    if unexpected:
        key = unexpected[0]
        raise WeightsError(
            f"{source(key)}: unexpected tensor {key} (and {len(unexpected) - 1} more); "
            "does config.json match these weights?"
        )
    for key, param in expected.items():
        if weights[key].shape != param.shape:
            raise WeightsError(
                f"{source(key)}: {key} has shape {tuple(weights[key].shape)}, config.json "
                f"implies {tuple(param.shape)}"
            )
