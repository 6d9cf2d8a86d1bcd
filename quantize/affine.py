"""MLX affine (and mxfp4 / nvfp4 / mxfp8) quantization of a loaded model, in place."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.nn as nn

# Returns None to use the defaults, False to keep a module in float, or a dict of
# {"bits", "group_size"} to quantize it differently.
Override = Callable[[str, nn.Module], "dict[str, Any] | bool | None"]


def quantize_model(
    model: nn.Module,
    *,
    bits: int = 4,
    group_size: int = 64,
    mode: str = "affine",
    override: Override | None = None,
) -> dict[str, Any]:
    """Quantize every quantizable module; return the config.json `quantization` entry.

    Modules whose input dimension is not a multiple of the group size stay in float and are
    listed as `false` in the returned entry, as are the ones `override` keeps in float.
    """
    entry: dict[str, Any] = {"group_size": group_size, "bits": bits, "mode": mode}

    def predicate(path: str, module: nn.Module):
        if not hasattr(module, "to_quantized"):
            return False
        params = {"group_size": group_size, "bits": bits, "mode": mode}
        choice = override(path, module) if override else None
        if choice is False:
            entry[path] = False
            return False
        if isinstance(choice, dict):
            params.update(choice)
            entry[path] = params
        if module.weight.shape[-1] % params["group_size"]:
            entry[path] = False
            return False
        return params

    nn.quantize(model, class_predicate=predicate)
    return entry
