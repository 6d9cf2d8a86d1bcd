"""MLX affine (and mxfp4 / nvfp4 / mxfp8) quantization of a loaded model, in place."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlx_gemma4.errors import QuantizationError
from mlx_gemma4.packing import AFFINE_BITS, AFFINE_GROUPS, FLOAT_MODES, MODES

# Returns None to use the defaults, False to keep a module in float, or a dict of
# {"bits", "group_size", "mode"} to quantize it differently.
Override = Callable[[str, nn.Module], "dict[str, Any] | bool | None"]

# Modules whose error moves every token: the MoE router and the per-layer-embedding projection.
SENSITIVE = ("router.proj", "per_layer_model_projection")
EMBEDDINGS = ("embed_tokens", "embed_tokens_per_layer", "lm_head")
SENSITIVE_BITS = 8
# Modules whose input mlx-vlm casts to the weight's dtype (uint32 once packed): left in float
# unless an override asks, so that our checkpoints read right there too. Both are small.
PEER_FLOAT = ("patch_embedder.input_proj", "relative_k_proj")


def check_scheme(bits: int, group_size: int, mode: str = "affine") -> None:
    """One clear error for a (bits, group size, mode) MLX cannot pack."""
    if mode not in MODES:
        raise QuantizationError(f"mode {mode!r} is unknown; supported: {', '.join(MODES)}")
    if mode in FLOAT_MODES:
        if (bits, group_size) != FLOAT_MODES[mode]:
            need_bits, need_group = FLOAT_MODES[mode]
            raise QuantizationError(
                f"{mode} needs {need_bits} bits and group size {need_group} "
                f"(got {bits} bits, group size {group_size})"
            )
        return
    if bits not in AFFINE_BITS:
        raise QuantizationError(
            f"affine quantization takes {', '.join(map(str, AFFINE_BITS))} bits (got {bits})"
        )
    if group_size not in AFFINE_GROUPS:
        raise QuantizationError(
            f"affine group size must be one of {', '.join(map(str, AFFINE_GROUPS))} "
            f"(got {group_size})"
        )


def default_group_size(mode: str) -> int:
    return FLOAT_MODES[mode][1] if mode in FLOAT_MODES else 64


def mixed_recipe(group_size: int, embeddings: bool = False) -> Override:
    """Keep the router and the PLE projection (and optionally embeddings, LM head) at 8 bits."""
    names = SENSITIVE + (EMBEDDINGS if embeddings else ())
    high = {"bits": SENSITIVE_BITS, "group_size": group_size, "mode": "affine"}
    if group_size not in AFFINE_GROUPS:  # float modes' groups (16) are not affine groups
        high["group_size"] = 32

    def override(path: str, _module: nn.Module):
        return dict(high) if path.endswith(names) else None

    return override


RECIPES = {
    "uniform": None,
    "mixed": lambda group_size: mixed_recipe(group_size),
    "mixed-embeddings": lambda group_size: mixed_recipe(group_size, embeddings=True),
}


def recipe_override(recipe: str, group_size: int) -> Override | None:
    if recipe not in RECIPES:
        raise QuantizationError(f"recipe {recipe!r} is unknown; supported: {', '.join(RECIPES)}")
    make = RECIPES[recipe]
    return make(group_size) if make else None


def relative_error(weight: mx.array, approximation: mx.array) -> float:
    """‖W − Ŵ‖ / ‖W‖ (Frobenius), in float32."""
    weight = weight.astype(mx.float32)
    difference = approximation.astype(mx.float32) - weight
    return float(mx.linalg.norm(difference.flatten()) / mx.linalg.norm(weight.flatten()))


def affine_error(weight: mx.array, group_size: int, bits: int, mode: str) -> float:
    packed = mx.quantize(weight, group_size=group_size, bits=bits, mode=mode)
    biases = packed[2] if len(packed) > 2 else None
    restored = mx.dequantize(
        packed[0], packed[1], biases, group_size=group_size, bits=bits, mode=mode
    )
    return relative_error(weight, restored)


def require_float_model(model: nn.Module) -> None:
    """Refuse a model that is quantized already: packing packed weights again does nothing."""
    packed = next((path for path, m in model.named_modules() if hasattr(m, "scales")), None)
    if packed is not None:
        raise QuantizationError(
            f"the model is quantized already ({packed} and others are packed); quantize its "
            "float (unquantized) checkpoint instead"
        )


def quantize_model(
    model: nn.Module,
    *,
    bits: int = 4,
    group_size: int = 64,
    mode: str = "affine",
    override: Override | None = None,
    errors: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Quantize every quantizable module of a float model; return the config.json
    `quantization` entry.

    Modules whose input dimension is not a multiple of the group size stay in float and are
    listed as `false` in the returned entry, as are the ones `override` keeps in float.
    `errors`, when given, receives each quantized module's relative weight error. A model
    that is quantized already is refused (QuantizationError).
    """
    check_scheme(bits, group_size, mode)
    require_float_model(model)
    return quantize_float_modules(
        model, bits=bits, group_size=group_size, mode=mode, override=override, errors=errors
    )


def quantize_float_modules(
    model: nn.Module,
    *,
    bits: int,
    group_size: int,
    mode: str,
    override: Override | None = None,
    errors: dict[str, float] | None = None,
) -> dict[str, Any]:
    """`quantize_model` on the modules still in float (turboquant packs some first)."""
    check_scheme(bits, group_size, mode)
    entry: dict[str, Any] = {
        "method": "affine",
        "group_size": group_size,
        "bits": bits,
        "mode": mode,
    }

    def predicate(path: str, module: nn.Module):
        if not hasattr(module, "to_quantized"):
            return False
        params = {"group_size": group_size, "bits": bits, "mode": mode}
        choice = override(path, module) if override else None
        if choice is None and path.endswith(PEER_FLOAT):
            choice = False
        if choice is False:
            entry[path] = False
            return False
        if isinstance(choice, dict):
            params.update(choice)
            check_scheme(params["bits"], params["group_size"], params["mode"])
            entry[path] = params
        if module.weight.shape[-1] % params["group_size"]:
            entry[path] = False
            return False
        if errors is not None:
            errors[path] = affine_error(module.weight, **params)
        return params

    nn.quantize(model, class_predicate=predicate)
    return entry
