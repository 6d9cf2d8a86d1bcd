"""Merge a LoRA adapter into its model and write a checkpoint `load_model` reads.

Each adapted linear becomes a float linear with W + scale * (A B)^T. Over a quantized base the
merged weights are quantized again: with `bits` every quantizable module is quantized afresh
(from a float base too), without it the merged modules take back the scheme they had.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from ..errors import AdapterError, QuantizationError
from ..models.layers import Linear
from ..models.moe import ExpertLinear
from ..saving import require_writable_folder, save_model
from .adapters import load_adapter
from .lora import LORA_MODULES, dense_weight, fuse_lora


def _packed_schemes(model: nn.Module) -> dict[str, dict[str, Any]]:
    """(bits, group size, mode) of each LoRA layer's packed base, by the fused module's path."""
    schemes = {}
    for path, module in model.named_modules():
        if not isinstance(module, LORA_MODULES):
            continue
        for sub_path, sub in module.named_modules():
            if "scales" in sub and sub.mode != "codebook":
                site = path if sub_path == "linear" else f"{path}.{sub_path.rsplit('.linear')[0]}"
                schemes[site] = {"bits": sub.bits, "group_size": sub.group_size, "mode": sub.mode}
    return schemes


def fuse_model(model: nn.Module, adapter: str | Path, bits: int | None = None) -> dict | None:
    """Apply and merge `adapter` into `model` in place; returns the config.json quantization
    entry to save with (None: a float checkpoint)."""
    from ..quantize import quantize_model
    from ..quantize.affine import default_group_size

    quantization = model.config.quantization
    if quantization is not None and quantization.get("method") == "turboquant":
        raise AdapterError(
            "fusing into a turboquant checkpoint is not supported; fuse into its float "
            "checkpoint, then quantize the result"
        )
    load_adapter(model, adapter)
    schemes = _packed_schemes(model)
    fuse_lora(model)
    model.unfreeze()
    if bits is not None:
        # re-quantize from float: the packed modules left are dequantized first
        _dequantize_all(model)
        return quantize_model(model, bits=bits, group_size=default_group_size("affine"))
    if quantization is None:
        return None

    def predicate(path: str, module: nn.Module):
        return schemes.get(path, False) if hasattr(module, "to_quantized") else False

    nn.quantize(model, class_predicate=predicate)
    return _entry_of(model, quantization)


def _entry_of(model: nn.Module, base: dict[str, Any]) -> dict[str, Any]:
    """The quantization entry of a packed model in this package's module paths: the base's
    defaults, and each packed module whose scheme differs from them."""
    defaults = {k: base[k] for k in ("group_size", "bits") if k in base}
    entry: dict[str, Any] = {"method": "affine", "mode": base.get("mode", "affine"), **defaults}
    for path, module in model.named_modules():
        if "scales" not in module or module.mode == "codebook":
            continue
        scheme = {"group_size": module.group_size, "bits": module.bits, "mode": module.mode}
        if any(scheme[k] != entry.get(k) for k in scheme):
            entry[path] = scheme
    return entry


def _dequantize_all(model: nn.Module) -> None:
    """Every packed module back to float (what `bits` re-quantizes from)."""
    packed = [(p, m) for p, m in model.named_modules() if "scales" in m]
    for path, module in packed:
        if not hasattr(module, "group_size") or module.mode == "codebook":
            raise QuantizationError(f"{path}: cannot dequantize {type(module).__name__} to refit")
    replaced = []
    for path, module in packed:
        weight = dense_weight(module).astype(module.scales.dtype)
        if weight.ndim == 3:
            float_module = ExpertLinear(*weight.shape[:1], weight.shape[2], weight.shape[1])
        else:
            float_module = Linear(weight.shape[1], weight.shape[0], bias="bias" in module)
            if "bias" in module:
                float_module.bias = module.bias
        float_module.weight = weight
        replaced.append((path, float_module))
    if replaced:
        model.update_modules(tree_unflatten(replaced))


def fuse(model: nn.Module, adapter: str | Path, out: str | Path, bits: int | None = None) -> Path:
    """Merge `adapter` into `model` and write the result to `out` atomically (a complete
    folder or nothing); `bits` re-quantizes the whole model."""
    out = require_writable_folder(out)
    entry = fuse_model(model, adapter, bits)
    mx.eval(model.parameters())
    return save_model(model, out, quantization=entry)
