"""What a quantized checkpoint came to: bits per weight, size on disk, weight errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

WORST_SHOWN = 5


@dataclass
class QuantizationSummary:
    folder: Path
    bits_per_weight: float  # whole checkpoint, on disk
    bytes_on_disk: int
    bits_per_quantized_weight: float | None  # packed modules only: codes, scales, biases
    mean_error: float | None  # relative weight error, over the quantized modules
    worst: list[tuple[str, float]] = field(default_factory=list)
    kept_in_float: list[str] = field(default_factory=list)


def _is_packed(module: nn.Module) -> bool:
    return hasattr(module, "bits") and hasattr(module, "scales")


def _stored_bytes(array: mx.array, dtype: mx.Dtype | None) -> int:
    if dtype is not None and mx.issubdtype(array.dtype, mx.floating):
        return array.size * dtype.size
    return array.nbytes


def summarize(
    model: nn.Module,
    entry: dict[str, Any],
    folder: str | Path,
    errors: dict[str, float] | None = None,
    dtype: mx.Dtype | None = None,
) -> QuantizationSummary:
    """Describe the checkpoint `save_model` wrote to `folder` from `model` (quantized with
    `entry`, the relative errors in `errors`, floats stored in `dtype`)."""
    folder = Path(folder)
    weights = packed_bits = packed_weights = 0
    packed_paths = set()
    for path, module in model.named_modules():
        if _is_packed(module):
            packed_paths.add(path)
            params = dict(tree_flatten(module.parameters()))
            packed_bits += sum(
                _stored_bytes(p, dtype) * 8 for k, p in params.items() if k != "bias"
            )
            packed_weights += module.weight.size * 32 // module.bits
    weights = packed_weights + sum(
        p.size
        for key, p in tree_flatten(model.parameters())
        if key.rpartition(".")[0] not in packed_paths and not key.endswith("_rotation.signs")
    )
    on_disk = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    errors = errors or {}
    worst = sorted(errors.items(), key=lambda item: -item[1])[:WORST_SHOWN]
    return QuantizationSummary(
        folder=folder,
        bits_per_weight=on_disk * 8 / max(weights, 1),
        bytes_on_disk=on_disk,
        bits_per_quantized_weight=packed_bits / packed_weights if packed_weights else None,
        mean_error=sum(errors.values()) / len(errors) if errors else None,
        worst=worst,
        kept_in_float=[path for path, value in entry.items() if value is False],
    )
