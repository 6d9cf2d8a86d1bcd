"""Adapter folders: `adapter_config.json` + `adapters.safetensors`, mlx-lm's layout.

The config carries mlx-lm's `fine_tune_type` and `lora_parameters` (rank, scale, dropout,
keys) and, for this package, alpha, the targets, whether the vision tower was adapted, and
the shape of the model it was made for, so that an adapter is never applied to another model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..errors import AdapterError
from ..files import access_error, atomic_file
from .lora import LoRASettings, apply_lora, factor_shapes

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapters.safetensors"


def model_signature(model: nn.Module) -> dict[str, Any]:
    """The facts an adapter depends on: the decoder's shape and the towers it has."""
    text = model.config.text_config
    return {
        "hidden_size": text.hidden_size,
        "num_hidden_layers": text.num_hidden_layers,
        "vocab_size": text.vocab_size,
        "num_attention_heads": text.num_attention_heads,
        "num_key_value_heads": text.num_key_value_heads,
        "intermediate_size": text.intermediate_size,
        "hidden_size_per_layer_input": text.hidden_size_per_layer_input or 0,
        "num_kv_shared_layers": text.num_kv_shared_layers or 0,
        "num_experts": text.num_experts if text.enable_moe_block else 0,
        "vision_hidden_size": model.config.vision_config.hidden_size
        if model.config.vision_config is not None
        else 0,
    }


def _describe(signature: dict[str, Any]) -> str:
    return (
        f"hidden size {signature['hidden_size']}, {signature['num_hidden_layers']} layers, "
        f"vocabulary {signature['vocab_size']}"
    )


def adapter_weights(model: nn.Module) -> dict[str, mx.array]:
    """The trainable LoRA factors by their paths in the model."""
    return dict(tree_flatten(model.trainable_parameters()))


def adapter_config(
    model: nn.Module, settings: LoRASettings, extra: dict | None = None
) -> dict[str, Any]:
    lora = settings.to_dict()
    keys = sorted({key.rpartition(".lora_")[0] for key in adapter_weights(model)})
    return {
        "fine_tune_type": "lora",
        "model_type": model.config.raw.get("model_type", "gemma4"),
        "num_layers": model.config.text_config.num_hidden_layers,
        "lora_parameters": {**lora, "keys": keys},
        "base_model": str(getattr(model, "path", "") or ""),
        "model_signature": model_signature(model),
        **(extra or {}),
    }


def save_adapter(
    model: nn.Module,
    folder: str | Path,
    settings: LoRASettings,
    weights_name: str = WEIGHTS_FILE,
    extra: dict | None = None,
) -> Path:
    """Write the factors (`weights_name`) and `adapter_config.json` into `folder`, each file
    atomically (the config last, so a folder with a config has its weights)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise access_error(folder, "write", error) from error
    weights = adapter_weights(model)
    with atomic_file(folder / weights_name) as temporary, temporary.open("wb") as handle:
        mx.save_safetensors(handle, weights, metadata={"format": "mlx"})
    text = json.dumps(adapter_config(model, settings, extra), indent=2)
    with atomic_file(folder / CONFIG_FILE) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return folder / weights_name


def read_adapter_config(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    file = folder / CONFIG_FILE
    if not folder.is_dir():
        raise AdapterError(f"{folder}: no such adapter folder")
    if not file.is_file():
        raise AdapterError(f"{folder}: no {CONFIG_FILE}; is this an adapter folder?")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
        settings = LoRASettings.from_dict(raw["lora_parameters"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise AdapterError(f"{file}: not a LoRA adapter config ({e})") from e
    if raw.get("fine_tune_type", "lora") != "lora":
        raise AdapterError(f"{file}: fine_tune_type {raw['fine_tune_type']!r}; only lora is read")
    return {**raw, "settings": settings}


def check_adapter_fits(raw: dict[str, Any], model: nn.Module, folder: Path) -> None:
    """Refuse an adapter whose recorded model signature differs from `model`'s."""
    made_for = raw.get("model_signature")
    mine = model_signature(model)
    if made_for is not None and any(made_for.get(k) != v for k, v in mine.items()):
        raise AdapterError(
            f"{folder}: this adapter was made for another model ({_describe(made_for)}); "
            f"the model has {_describe(mine)}"
        )


def load_adapter(model: nn.Module, folder: str | Path, weights_name: str = WEIGHTS_FILE) -> dict:
    """Put the adapter in `folder` on `model` (LoRA layers, factors loaded); returns its config
    (with `settings`). Nothing is changed on the model when the adapter does not fit it."""
    folder = Path(folder)
    raw = read_adapter_config(folder)
    check_adapter_fits(raw, model, folder)
    file = folder / weights_name
    if not file.is_file():
        raise AdapterError(f"{folder}: no {weights_name}; the adapter folder is incomplete")
    try:
        weights = mx.load(str(file))
    except (RuntimeError, ValueError, OSError) as e:
        raise AdapterError(f"{file}: not a readable safetensors file ({e})") from e
    problem = _mismatch(factor_shapes(model, raw["settings"]), weights)
    if problem:
        raise AdapterError(f"{file}: made for another model ({problem})")
    apply_lora(model, raw["settings"])
    model.load_weights(list(weights.items()), strict=False)
    model.freeze()
    mx.eval(model.parameters())
    return raw


def _mismatch(expected: dict[str, tuple], weights: dict[str, mx.array]) -> str | None:
    missing = sorted(set(expected) - set(weights))
    if missing:
        return f"it lacks {missing[0]}" + (f" and {len(missing) - 1} more" if missing[1:] else "")
    unexpected = sorted(set(weights) - set(expected))
    if unexpected:
        return f"{unexpected[0]} is not a LoRA factor of this model"
    for key, shape in expected.items():
        if tuple(weights[key].shape) != tuple(shape):
            return f"{key} is {tuple(weights[key].shape)}, this model needs {tuple(shape)}"
    return None
