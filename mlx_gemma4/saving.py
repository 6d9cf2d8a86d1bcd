"""Write a loaded (possibly quantized) model as a checkpoint, in the layout the mlx-community
Gemma 4 repos use, so that `load_model`, mlx-lm (text only) and mlx-vlm all read it."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from .config import ASSISTANT_MODEL_TYPES, DTYPES, TURBOQUANT_MODEL_TYPE
from .errors import FileAccessError
from .files import atomic_directory
from .models.gemma4 import TOWER_PREFIXES, Model

# files that travel with the weights: tokenizer, chat template, generation and processor defaults
COMPANION_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "generation_config.json",
    "processor_config.json",
    "preprocessor_config.json",
)
_GATE_UP = ".experts.gate_up_proj"
_DOWN = ".experts.down_proj"


# ----------------------------------------------------------------------------- key layout


def community_name(path: str, multimodal: bool) -> str:
    """Our module path -> mlx-lm's (text only) or mlx-vlm's (multimodal) for the same module.

    The fused expert projection has two names there; see `community_weights`."""
    if path.startswith("language_model."):
        path = ("language_model.model." if multimodal else "model.") + path[
            len("language_model.") :
        ]
    elif path.startswith("lm_head.") or path == "lm_head":
        path = ("language_model." if multimodal else "") + path
    elif not path.startswith(TOWER_PREFIXES):
        raise ValueError(f"{path}: not a module of a Gemma 4 model")
    return path.replace(_DOWN, ".experts.switch_glu.down_proj")


def _split_gate_up(key: str) -> tuple[str, str]:
    return (
        key.replace(_GATE_UP, ".experts.switch_glu.gate_proj"),
        key.replace(_GATE_UP, ".experts.switch_glu.up_proj"),
    )


def community_weights(weights: dict[str, mx.array], multimodal: bool) -> dict[str, mx.array]:
    """Rename to the peers' layout; the fused expert gate/up stack (packed or not: the output
    axis is -2 in the weight, its scales and biases alike) splits into its two halves."""
    out = {}
    for key, value in weights.items():
        key = community_name(key, multimodal)
        if _GATE_UP in key:
            gate, up = _split_gate_up(key)
            out[gate], out[up] = (mx.contiguous(half) for half in mx.split(value, 2, axis=-2))
        else:
            out[key] = value
    return out


def community_quantization(entry: dict[str, Any], multimodal: bool) -> dict[str, Any]:
    """The config.json `quantization` entry with its per-module keys renamed like the weights."""
    out = {}
    for key, value in entry.items():
        if "." not in key and key != "lm_head":  # method, bits, group_size, mode, ...
            out[key] = value
            continue
        key = community_name(key, multimodal)
        for name in _split_gate_up(key) if _GATE_UP in key else (key,):
            out[name] = value
    return out


# ----------------------------------------------------------------------------- config, dtype


def stored_dtype(raw: dict[str, Any]) -> mx.Dtype | None:
    """The float dtype the checkpoint's config.json says its weights are stored in, if any."""
    text = raw.get("text_config") or raw
    name = raw.get("dtype") or raw.get("torch_dtype") or text.get("dtype")
    return DTYPES.get(name)


def checkpoint_config(model: Model, quantization: dict[str, Any] | None) -> dict[str, Any]:
    """config.json for the written weights. A turboquant checkpoint (rotated weights, which
    only this package undoes) gets a model_type peers refuse by name, the real one beside it."""
    config = dict(model.config.raw)
    if quantization is None:  # as loaded: float, or quantized with its entry already written
        return config
    config.pop("quantization_config", None)
    if config.get("model_type") == TURBOQUANT_MODEL_TYPE:
        config["model_type"] = config.pop("base_model_type")
    multimodal = "text_config" in config
    if config.get("model_type") in ASSISTANT_MODEL_TYPES:  # its keys are transformers' already
        entry = dict(quantization)
    else:
        entry = community_quantization(quantization, multimodal)
    config["quantization"] = entry
    config["quantization_config"] = entry  # mlx-community repos carry both
    if quantization.get("method") == "turboquant":
        config["base_model_type"] = config["model_type"]
        config["model_type"] = TURBOQUANT_MODEL_TYPE
    return config


def checkpoint_weights(model: Model, dtype: mx.Dtype | None = None) -> dict[str, mx.array]:
    """The model's tensors in the community layout, floats cast to `dtype` (default: the dtype
    the source checkpoint was stored in; scales and biases of packed modules included)."""
    dtype = dtype or stored_dtype(model.config.raw)
    weights = dict(tree_flatten(model.parameters()))
    if dtype is not None:
        weights = {
            k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v
            for k, v in weights.items()
        }
    if model.config.raw.get("model_type") in ASSISTANT_MODEL_TYPES:
        return weights  # transformers' names, which peers and this package read
    return community_weights(weights, multimodal="text_config" in model.config.raw)


# ----------------------------------------------------------------------------- writing


def require_writable_folder(folder: str | Path) -> Path:
    """Check, before any work, that `folder` can be created or replaced: its nearest existing
    parent is a folder we may write into. Raises FileAccessError."""
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise FileAccessError(f"cannot write {folder}: it is a file, not a folder")
    parent = folder.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise FileAccessError(f"cannot write {folder}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise FileAccessError(f"cannot write {folder}: permission denied in {parent}")
    return folder


def write_checkpoint(
    folder: Path, weights: dict[str, mx.array], config: dict[str, Any], source: Path | None
) -> None:
    """Weights, config.json and the source's companion files into an existing empty folder."""
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "mlx"})
    (folder / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    for name in COMPANION_FILES if source is not None else ():
        if (Path(source) / name).is_file():
            shutil.copy2(Path(source) / name, folder / name)


def save_model(
    model: Model,
    folder: str | Path,
    quantization: dict[str, Any] | None = None,
    dtype: mx.Dtype | None = None,
) -> Path:
    """Write `model` as a checkpoint folder, atomically: the complete folder replaces `folder`
    (and whatever it held) in one rename, and an interrupted or failed write (Ctrl-C, SIGTERM
    turned into an exception) leaves `folder` as it was.

    `quantization` is the entry `quantize_model` / `turboquant_model` returned. Weights are
    stored in the mlx-community layout, floats in `dtype` (default: the source checkpoint's
    stored dtype), with the source's tokenizer and processor files.
    """
    folder = require_writable_folder(folder)
    config = checkpoint_config(model, quantization)
    weights = checkpoint_weights(model, dtype)
    with atomic_directory(folder) as staging:
        write_checkpoint(staging, weights, config, getattr(model, "path", None))
    return folder
