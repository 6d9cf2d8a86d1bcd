"""TurboQuant-style weights: a random Hadamard rotation of each linear's input, then quantization.

Rotating the input dimension (x -> H·D·x, weight W -> W·(H·D)ᵀ) leaves the model's function
unchanged and turns heavy-tailed rows and outlier input channels into near-Gaussian ones, which
quantize far better. The rotated weight is then packed either as MLX affine groups, fitted for
least squared error (the fast path: `quantized_matmul` / `gather_qmm` as before), or as Lloyd-Max
codebook indices for the Gaussian times a scale per group.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_gemma4.errors import QuantizationError
from mlx_gemma4.models.layers import CodebookLinear, Rotation
from mlx_gemma4.packing import AFFINE_BITS, AFFINE_GROUPS

from .affine import (
    Override,
    check_scheme,
    quantize_float_modules,
    relative_error,
    require_float_model,
)

# (module under a decoder layer, its rotation's name, the linears reading that one activation)
SITES = (
    ("self_attn", "input_rotation", ("q_proj", "k_proj", "v_proj")),
    ("self_attn", "output_rotation", ("o_proj",)),
    ("mlp", "input_rotation", ("gate_proj", "up_proj")),
    ("mlp", "inner_rotation", ("down_proj",)),
    ("", "expert_rotation", ("experts.gate_up_proj",)),
    ("", "per_layer_gate_rotation", ("per_layer_input_gate",)),
    ("", "per_layer_rotation", ("per_layer_projection",)),
)
# Candidate shrinkings of a group's [min, max] range, and of its RMS scale for codebooks.
_CLIP_RATIOS = np.linspace(0.5, 1.0, 11)
_SCALE_RATIOS = np.linspace(0.7, 1.3, 13)


# ----------------------------------------------------------------------------- codebooks


def _normal_cdf(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def _normal_pdf(x: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


@functools.cache
def lloyd_max_codebook(bits: int, tolerance: float = 1e-12) -> tuple[np.ndarray, float]:
    """The 2^bits centroids minimizing E[(X − q(X))²] for X ~ N(0, 1), and that MSE.

    Lloyd's iteration on the exact density: boundaries at the midpoints of the centroids,
    centroids at the conditional means of their cells, E[X | a < X < b] = (φ(a) − φ(b)) / P.
    """
    levels = 2**bits
    centroids = np.linspace(-2.0, 2.0, levels) * (1.0 - 1.0 / levels)
    mse = math.inf
    for _ in range(10_000):
        edges = np.concatenate([[-np.inf], (centroids[1:] + centroids[:-1]) / 2, [np.inf]])
        mass = np.diff(_normal_cdf(edges))
        centroids = (_normal_pdf(edges[:-1]) - _normal_pdf(edges[1:])) / mass
        new_mse = 1.0 - float((mass * centroids**2).sum())
        if mse - new_mse < tolerance:
            return centroids, new_mse
        mse = new_mse
    return centroids, mse


def _best_per_group(candidates):
    """From (error [G, 1], *arrays) candidates, keep per group the arrays with least error."""
    best = None
    for error, *arrays in candidates:
        if best is None:
            best = [error, *arrays]
            continue
        better = error < best[0]
        best = [np.where(better, new, old) for new, old in zip([error, *arrays], best, strict=True)]
    return best


def fit_codebook(
    weight: np.ndarray, bits: int, group_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indices [..., in], scales [..., in/group], codebook) for `weight` [..., in]."""
    codebook, _ = lloyd_max_codebook(bits)
    boundaries = (codebook[1:] + codebook[:-1]) / 2
    groups = weight.reshape(-1, group_size).astype(np.float32)
    rms = np.sqrt((groups**2).mean(axis=-1, keepdims=True)) + 1e-12

    def candidate(scale):
        indices = np.searchsorted(boundaries, groups / scale).astype(np.uint8)
        values = codebook[indices].astype(np.float32)
        # the least-squares scale for these indices
        energy = (values**2).sum(-1, keepdims=True) + 1e-12
        scale = (groups * values).sum(-1, keepdims=True) / energy
        error = ((groups - scale * values) ** 2).sum(-1, keepdims=True)
        return error, indices, scale

    error, indices, scale = _best_per_group(candidate(rms * r) for r in _SCALE_RATIOS)
    for _ in range(2):  # alternate assignment and scale while that helps
        error, indices, scale = _best_per_group(
            [(error, indices, scale), candidate(np.where(scale == 0, rms, np.abs(scale)))]
        )
    return (
        indices.reshape(weight.shape),
        scale.reshape(*weight.shape[:-1], -1),
        codebook.astype(np.float32),
    )


# ----------------------------------------------------------------------------- affine groups


def fit_affine(
    weight: np.ndarray, bits: int, group_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(integers, scales, biases) with weight ≈ scale·q + bias, each group's range clipped for
    least squared error (MLX's `mx.quantize` always spans the full range)."""
    top = 2**bits - 1
    groups = weight.reshape(-1, group_size).astype(np.float32)
    low, high = groups.min(-1, keepdims=True), groups.max(-1, keepdims=True)

    def candidate(ratio):
        bias = low * ratio
        scale = np.maximum((high - low) * ratio / top, 1e-12)
        q = np.clip(np.round((groups - bias) / scale), 0, top)
        error = ((groups - (q * scale + bias)) ** 2).sum(-1, keepdims=True)
        return error, q.astype(np.uint8), scale, bias

    _, q, scale, bias = _best_per_group(candidate(r) for r in _CLIP_RATIOS)
    shape = (*weight.shape[:-1], -1)
    return q.reshape(weight.shape), scale.reshape(shape), bias.reshape(shape)


def pack_indices(q: np.ndarray, bits: int) -> np.ndarray:
    """Integers [..., n] < 2^bits -> uint32 [..., n·bits/32], laid out as MLX packs them
    (one little-endian bit stream per row)."""
    bit_planes = (q[..., None] >> np.arange(bits, dtype=np.uint8)) & 1
    stream = bit_planes.reshape(*q.shape[:-1], -1)
    return np.ascontiguousarray(np.packbits(stream, axis=-1, bitorder="little")).view(np.uint32)


# ----------------------------------------------------------------------------- the model


def _child(module: nn.Module, dotted: str) -> nn.Module | None:
    for name in filter(None, dotted.split(".")):
        module = module.get(name) if isinstance(module, nn.Module) else None
        if module is None:
            return None
    return module


def rotation_signs(dims: int, seed: int, site: int) -> mx.array:
    """The ±1 diagonal of rotation number `site`, reproducible from the checkpoint's seed."""
    rng = np.random.default_rng([seed, site])
    return mx.array(rng.choice(np.array([-1.0, 1.0], dtype=np.float32), size=dims))


def _params(
    path: str, module: nn.Module, defaults: dict[str, Any], override: Override | None
) -> dict[str, Any] | None:
    """The scheme a module gets, or None where it stays in float."""
    choice = override(path, module) if override else None
    if choice is False:
        return None
    params = {**defaults, **(choice if isinstance(choice, dict) else {})}
    if module.weight.shape[-1] % params["group_size"]:
        return None
    return params


def _quantize_rotated(
    module: nn.Module, params: dict[str, Any], codebook: bool
) -> tuple[nn.Module, float]:
    """The rotated float module packed as a codebook or fitted affine groups; its error."""
    bits, group_size, mode = params["bits"], params["group_size"], params["mode"]
    weight = module.weight
    if mode != "affine":  # the float modes have no range to fit
        packed = module.to_quantized(group_size=group_size, bits=bits, mode=mode)
        restored = mx.dequantize(
            packed.weight, packed.scales, None, group_size=group_size, bits=bits, mode=mode
        )
        return packed, relative_error(weight, restored)

    array = np.array(weight.astype(mx.float32))
    if codebook and isinstance(module, nn.Linear):
        indices, scales, values = fit_codebook(array, bits, group_size)
        out_dims, in_dims = weight.shape
        packed = CodebookLinear(in_dims, out_dims, bits, group_size, bias="bias" in module)
        packed.weight = mx.array(pack_indices(indices, bits))
        packed.scales = mx.array(scales).astype(weight.dtype)
        packed.codebook = mx.array(values).astype(weight.dtype)
        if "bias" in module:
            packed.bias = module.bias
        return packed, relative_error(weight, packed.float_weight())

    q, scales, biases = fit_affine(array, bits, group_size)
    packed = module.to_quantized(group_size=group_size, bits=bits, mode="affine")
    packed.weight = mx.array(pack_indices(q, bits))
    packed.scales = mx.array(scales).astype(weight.dtype)
    packed.biases = mx.array(biases).astype(weight.dtype)
    restored = mx.dequantize(
        packed.weight, packed.scales, packed.biases, group_size=group_size, bits=bits
    )
    return packed, relative_error(weight, restored)


def check_turboquant(bits: int, group_size: int, mode: str, codebook: bool) -> None:
    if not codebook:
        check_scheme(bits, group_size, mode)
        return
    if mode != "affine":
        raise QuantizationError(f"codebooks replace the {mode} grid; drop one of the two")
    if bits not in AFFINE_BITS or group_size not in AFFINE_GROUPS:
        raise QuantizationError(
            f"codebooks take {', '.join(map(str, AFFINE_BITS))} bits and groups of "
            f"{', '.join(map(str, AFFINE_GROUPS))} (got {bits} bits, group size {group_size})"
        )


def rotate_model(
    model: nn.Module, *, seed: int = 0, rotate: Callable[[str, nn.Module], bool] | None = None
) -> list[tuple[str, nn.Module, str]]:
    """Give each rotation site a `Rotation` and rotate the weights of the linears it feeds.

    The model computes the same function afterwards (up to rounding). A site is rotated when
    `rotate(path, linear)` holds for any of its linears (all, by default). Returns (path, the
    linear's parent, its name) for every rotated linear.
    """
    rotated_linears = []
    site_number = 0
    for index, layer in enumerate(model.language_model.layers):
        prefix = f"language_model.layers.{index}"
        for parent_name, rotation_name, linear_names in SITES:
            parent = _child(layer, parent_name)
            found = []
            for name in linear_names:
                module = _child(layer, f"{parent_name}.{name}")
                if module is not None and hasattr(module, "to_quantized"):
                    owner, _, leaf = f"{parent_name}.{name}".rpartition(".")
                    path = ".".join(filter(None, (prefix, parent_name, name)))
                    found.append((path, module, _child(layer, owner), leaf))
            if parent is None or not found:
                continue
            if rotate is not None and not any(rotate(path, m) for path, m, *_ in found):
                continue
            dims = found[0][1].weight.shape[-1]
            rotation = Rotation(dims, rotation_signs(dims, seed, site_number))
            site_number += 1
            setattr(parent, rotation_name, rotation)
            for path, module, owner, leaf in found:
                # W·Rᵀ has the rotated rows of W: R applied along the input axis
                dtype = module.weight.dtype
                module.weight = rotation(module.weight.astype(mx.float32)).astype(dtype)
                rotated_linears.append((path, owner, leaf))
    return rotated_linears


def turboquant_model(
    model: nn.Module,
    *,
    bits: int = 4,
    group_size: int = 64,
    mode: str = "affine",
    seed: int = 0,
    codebook: bool = False,
    override: Override | None = None,
    errors: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Rotate and quantize the decoder's linears, the rest as `quantize_model` does, in place.

    Each activation that feeds linears gets one `Rotation` (q/k/v share one, gate/up share
    one, the experts one per layer). Sites whose linears all stay in float are not rotated.
    `codebook` applies to linear layers; expert stacks keep fitted affine groups (gather_qmm).
    The router, the PLE projection, the experts' down projection and the embeddings are not
    rotated: they get plain `quantize_model` affine groups. Returns the config.json
    `quantization` entry, with the method recorded.
    """
    check_turboquant(bits, group_size, mode, codebook)
    require_float_model(model)
    defaults = {"bits": bits, "group_size": group_size, "mode": mode}
    entry: dict[str, Any] = {}

    def scheme(path: str, module: nn.Module) -> dict[str, Any] | None:
        return _params(path, module, defaults, override)

    for path, owner, leaf in rotate_model(model, seed=seed, rotate=scheme):
        module = getattr(owner, leaf)
        params = scheme(path, module)
        if params is None:
            entry[path] = False
            continue
        packed, error = _quantize_rotated(module, params, codebook)
        setattr(owner, leaf, packed)
        if errors is not None:
            errors[path] = error
        if params != defaults:
            entry[path] = params
    rest = quantize_float_modules(
        model, bits=bits, group_size=group_size, mode=mode, override=override, errors=errors
    )
    return {**rest, **entry, "method": "turboquant", "rotation_seed": seed, "codebook": codebook}
