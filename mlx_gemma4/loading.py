"""Folder or Hub repo id -> model: files, config, safetensors, key mapping, quantization."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import struct
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .config import ModelConfig
from .errors import ConfigError, ModelNotFoundError, QuantizationError, WeightsError
from .models.gemma4 import TOWER_PREFIXES, Model
from .models.layers import CodebookLinear, Rotation
from .packing import AFFINE_BITS, FLOAT_MODES, MODES
from .processing import Processor

HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model"]
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
# MLX's quantization modes; the float modes each allow one (bits, group size) pair.
_FLOAT_MODE_OF = {spec: mode for mode, spec in FLOAT_MODES.items()}  # (bits, group) -> mode
_METHODS = ("affine", "turboquant")


# ----------------------------------------------------------------------------- files


def resolve_model_path(path_or_repo: str | os.PathLike, revision: str | None = None) -> Path:
    """A local folder as given, or a Hub repo id downloaded (or found in the HF cache)."""
    path = Path(path_or_repo).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelNotFoundError(f"{path} is a file; pass the checkpoint's folder instead")
        return path
    name = str(path_or_repo)
    if not _REPO_ID.match(name):
        raise ModelNotFoundError(
            f"{name}: no such folder, and not a Hub repo id of the form owner/name"
        )
    return _download(name, revision)


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS)
    except RevisionNotFoundError as e:
        raise ModelNotFoundError(f"{repo_id}: revision {revision!r} not found on the Hub") from e
    except RepositoryNotFoundError as e:
        raise ModelNotFoundError(
            f"{repo_id}: no such repo on the Hub (or it is private: log in with `hf auth login`)"
        ) from e
    except LocalEntryNotFoundError as e:
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hub is unreachable"
        raise ModelNotFoundError(
            f"{repo_id} is not in the Hugging Face cache and {why}; download it where the Hub "
            "is reachable, or pass a local folder: load_model('/path/to/checkpoint')"
        ) from e
    except OSError as e:
        raise ModelNotFoundError(
            f"{repo_id}: download failed ({e}); pass a local folder instead"
        ) from e
    return Path(folder)


def read_config(folder: Path) -> dict[str, Any]:
    file = folder / "config.json"
    if not file.is_file():
        raise ConfigError(f"{file}: missing; a checkpoint folder needs its config.json")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{file}: not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{file}: expected a JSON object at the top level")
    return raw


def weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise WeightsError(f"{index}: unreadable shard index ({e})") from e
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise WeightsError(
                f"{index} lists shards that are missing: {', '.join(missing)}; "
                "download the whole checkpoint again"
            )
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise WeightsError(f"{folder}: no .safetensors files; is this a Gemma 4 checkpoint?")
    return files


def check_safetensors(file: Path) -> None:
    """Fail with a clear message on a truncated or corrupt file, before MLX reads it."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise WeightsError(f"{file}: truncated ({size} bytes); download it again")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise WeightsError(f"{file}: truncated or not a safetensors file; download it again")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise WeightsError(f"{file}: corrupt safetensors header; download it again") from e
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
    expected = 8 + header_len + max(ends, default=0)
    if size < expected:
        raise WeightsError(f"{file}: truncated ({size} of {expected} bytes); download it again")


def read_weights(files: list[Path]) -> tuple[dict[str, mx.array], dict[str, Path]]:
    weights: dict[str, mx.array] = {}
    origin: dict[str, Path] = {}
    for file in files:
        check_safetensors(file)
        try:
            tensors = mx.load(str(file))
        except Exception as e:  # MLX reports parse failures as bare runtime errors
            raise WeightsError(f"{file}: could not be read ({e})") from e
        weights.update(tensors)
        origin.update(dict.fromkeys(tensors, file))
    return weights, origin


# ----------------------------------------------------------------------------- key mapping

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
    if config.audio_config is None:
        return config
    audio = ("audio_tower.", "embed_audio.")
    if any(_rename(key).startswith(audio) for key in weights):
        return config
    return dataclasses.replace(config, audio_config=None)


def _is_unused_shared_kv(key: str, first_shared: int) -> bool:
    match = re.match(r"language_model\.layers\.(\d+)\.self_attn\.(\w+)\.", key)
    return bool(match) and int(match[1]) >= first_shared and match[2] in _SHARED_KV_PARTS


# ----------------------------------------------------------------------------- quantization


def _quantization_of(
    path: str, module: nn.Module, weights: dict[str, mx.array], default_mode: str
) -> dict[str, Any]:
    """The (bits, group size, mode) a stored module was packed with, read off its shapes."""
    in_dims = module.weight.shape[-1]
    packed, scales = weights[f"{path}.weight"], weights[f"{path}.scales"]
    group_size = in_dims // scales.shape[-1]
    bits = packed.shape[-1] * 32 // in_dims
    if scales.dtype == mx.uint8:
        mode = _FLOAT_MODE_OF.get((bits, group_size))
        if mode is None:
            raise QuantizationError(
                f"{path}: {bits}-bit float quantization with group size {group_size} is not a "
                "mode MLX knows (mxfp4, nvfp4, mxfp8)"
            )
    else:
        mode = "affine"
        if default_mode != "affine" or bits not in AFFINE_BITS:
            raise QuantizationError(
                f"{path}: cannot read {bits}-bit {default_mode} weights; supported are affine "
                "2-8 bits and mxfp4 / nvfp4 / mxfp8"
            )
    return {"group_size": group_size, "bits": bits, "mode": mode}


def quantize_like_checkpoint(
    model: Model, weights: dict[str, mx.array], quantization: dict
) -> None:
    """Turn exactly the modules the checkpoint stores packed into quantized modules."""
    method = quantization.get("method", "affine")
    if method not in _METHODS:
        raise QuantizationError(
            f"quantization method {method!r} in config.json is unknown; "
            f"supported: {', '.join(_METHODS)}"
        )
    if method == "turboquant":
        _install_rotations(model, weights)
    _install_codebooks(model, weights)
    default_mode = quantization.get("mode", "affine")
    if default_mode not in MODES:
        raise QuantizationError(
            f"quantization mode {default_mode!r} in config.json is unknown; "
            f"supported: {', '.join(sorted(MODES))}"
        )

    def predicate(path: str, module: nn.Module):
        if f"{path}.scales" not in weights or not hasattr(module, "to_quantized"):
            return False
        return _quantization_of(path, module, weights, default_mode)

    nn.quantize(model, class_predicate=predicate)


def _install_rotations(model: Model, weights: dict[str, mx.array]) -> None:
    """A `Rotation` wherever the checkpoint stores one's signs (turboquant checkpoints)."""
    modules = dict(model.named_modules())
    for key in weights:
        if not key.endswith("_rotation.signs"):
            continue
        parent, _, name = key.removesuffix(".signs").rpartition(".")
        if parent not in modules:
            raise WeightsError(f"{key}: rotation of a module this model does not have")
        setattr(modules[parent], name, Rotation(weights[key].shape[-1]))


def _install_codebooks(model: Model, weights: dict[str, mx.array]) -> None:
    """A `CodebookLinear` wherever the checkpoint stores a codebook; sizes read off shapes."""
    modules = dict(model.named_modules())
    for key in weights:
        if not key.endswith(".codebook"):
            continue
        path = key.removesuffix(".codebook")
        module = modules.get(path)
        if not isinstance(module, nn.Linear) or f"{path}.scales" not in weights:
            raise WeightsError(f"{key}: a codebook for something that is not a linear layer")
        out_dims, in_dims = module.weight.shape
        bits = (weights[key].shape[-1] - 1).bit_length()
        group_size = in_dims // weights[f"{path}.scales"].shape[-1]
        parent, _, name = path.rpartition(".")
        setattr(
            modules[parent],
            name,
            CodebookLinear(in_dims, out_dims, bits, group_size, bias="bias" in module),
        )


# ----------------------------------------------------------------------------- checks, dtype


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


def default_dtype() -> mx.Dtype:
    """float32 on the CPU backend (its bf16 matmuls are slow), bfloat16 on a GPU."""
    return mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16


def resolve_dtype(dtype: str | mx.Dtype | None) -> mx.Dtype:
    if dtype is None:
        return default_dtype()
    if isinstance(dtype, mx.Dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def _cast_floats(weights: dict[str, mx.array], dtype: mx.Dtype) -> dict[str, mx.array]:
    return {
        k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()
    }


# ----------------------------------------------------------------------------- entry points


def load_model(
    path_or_repo: str | os.PathLike,
    *,
    dtype: str | mx.Dtype | None = None,
    revision: str | None = None,
) -> Model:
    """Load a Gemma 4 checkpoint (local folder or Hub repo id) as an MLX model.

    `dtype` defaults to float32 on the CPU backend and bfloat16 on a GPU; quantized
    checkpoints stay quantized (their scales take `dtype`).
    """
    compute_dtype = resolve_dtype(dtype)
    folder = resolve_model_path(path_or_repo, revision)
    raw_config = read_config(folder)
    try:
        config = ModelConfig.from_dict(raw_config)
    except ConfigError as e:
        raise ConfigError(f"{folder / 'config.json'}: {e}") from e
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{folder / 'config.json'}: unusable value ({e})") from e

    weights, origin = read_weights(weight_files(folder))
    config = without_absent_audio(config, weights)
    model = Model(config)
    weights, where, towers = canonical_weights(weights, origin, model)
    if config.quantization is not None:
        quantize_like_checkpoint(model, weights, config.quantization)
    elif any(k.endswith(".scales") for k in weights):
        raise QuantizationError(
            f"{folder}: weights are quantized but config.json has no 'quantization' entry"
        )
    check_weights(model, weights, where)
    model.load_weights(list(_cast_floats(weights, compute_dtype).items()))
    model.eval()
    mx.eval(model.parameters())
    built = {name for name in ("vision_tower", "audio_tower") if name in model}
    model.towers = frozenset(key.split(".")[0] for key in towers) | built
    model.path = folder
    return model


def load(
    path_or_repo: str | os.PathLike,
    *,
    dtype: str | mx.Dtype | None = None,
    revision: str | None = None,
) -> tuple[Model, Processor]:
    """A model and its processor (tokenizer, chat template, stop tokens) from one checkpoint."""
    model = load_model(path_or_repo, dtype=dtype, revision=revision)
    config = model.config
    return model, Processor.from_folder(model.path, config.eos_token_id, config.vision_config)
