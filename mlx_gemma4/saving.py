"""Write a loaded (possibly quantized) model back out as a checkpoint `load_model` reads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from .models.gemma4 import Model

# files that travel with the weights: tokenizer, chat template, generation defaults
COMPANION_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "generation_config.json",
    "processor_config.json",
)


def save_model(
    model: Model, folder: str | Path, quantization: dict[str, Any] | None = None
) -> Path:
    """Save weights (this package's key layout) and config.json, plus the source's tokenizer."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = dict(model.config.raw)
    config.pop("quantization_config", None)
    if quantization is not None:
        config["quantization"] = quantization
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "mlx"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    source = getattr(model, "path", None)
    for name in COMPANION_FILES if source else ():
        if (Path(source) / name).is_file():
            shutil.copy2(Path(source) / name, folder / name)
    return folder
