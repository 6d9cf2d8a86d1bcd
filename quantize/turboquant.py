"""TurboQuant-style weights: a random Hadamard rotation of each linear's input, then quantization.

Rotating the input dimension (x -> H·D·x, weight W -> W·(H·D)ᵀ) leaves the model's function
unchanged and turns heavy-tailed rows and outlier input channels into near-Gaussian ones, which
quantize far better. The rotated weight is then packed as MLX affine groups fitted for least
squared error (the fast path: `quantized_matmul` / `gather_qmm` as before) or, where asked, as
Lloyd-Max codebook indices for the Gaussian times a scale per group, layer by layer unless the
affine groups measure better for the bits they store. What is not rotated (embeddings, router,
PLE projection, the experts' down projection) gets the same fitted affine groups, in MLX's own
format.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from mlx_gemma4.errors import QuantizationError
from mlx_gemma4.models.layers import CodebookLinear, Rotation
from mlx_gemma4.packing import AFFINE_BITS, AFFINE_GROUPS, pack_codes
from mlx_gemma4.rotation import rotation_signs

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
# Candidate shrinkings of each end of a group's [min, max] range, and of its RMS scale for
# codebooks.
_CLIP_RATIOS = np.linspace(0.5, 1.0, 6)
_SCALE_RATIOS = np.linspace(0.7, 1.3, 13)
# Rounds of least-squares scale and bias for the chosen integers, then rounding again.
_REFIT_ROUNDS = 4
_FIT_ELEMENTS = 2**20  # weights fitted at once (bounds the candidates' memory)


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
    weight: np.ndarray | mx.array, bits: int, group_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(integers, scales, biases) with weight ≈ scale·q + bias for least squared error."""
    q, scales, biases = affine_groups(mx.array(weight), bits, group_size)
    return np.array(q), np.array(scales), np.array(biases)


def affine_groups(
    weight: mx.array, bits: int, group_size: int
) -> tuple[mx.array, mx.array, mx.array]:
    """`fit_affine` in MLX arrays: integers (uint8), scales and biases in float32.

    MLX's `mx.quantize` spans each group's full [min, max]. Here the low end may move inwards
    (clipping a rare extreme buys a finer step for the rest), then, from the best low end, the
    high end; each group keeps its best pair, then scale and bias are refitted by least squares
    for those integers and the group rounded again, while that lowers the error.
    """
    groups = weight.astype(mx.float32).reshape(-1, group_size)
    chunk = max(1, _FIT_ELEMENTS // group_size)
    fitted = []
    for start in range(0, groups.shape[0], chunk):
        fitted.append(_fit_affine_groups(groups[start : start + chunk], bits))
        mx.eval(fitted[-1])
    q, scale, bias = (mx.concatenate(parts) for parts in zip(*fitted, strict=True))
    shape = (*weight.shape[:-1], -1)
    return q.reshape(weight.shape), scale.reshape(shape), bias.reshape(shape)


@functools.partial(mx.compile, shapeless=True)
def _affine_candidate(groups: mx.array, scale: mx.array, bias: mx.array, top: mx.array):
    """(squared error per group, integers, scale, bias) of one scale and bias per group."""
    scale = mx.maximum(scale, 1e-12)
    q = mx.clip(mx.round((groups - bias) / scale), 0, top)
    error = mx.square(groups - (q * scale + bias)).sum(-1, keepdims=True)
    return error, q, scale, bias


def _keep_better(best: list[mx.array] | None, candidate: tuple[mx.array, ...]) -> list[mx.array]:
    if best is None:
        return list(candidate)
    better = candidate[0] < best[0]
    return [mx.where(better, new, old) for new, old in zip(candidate, best, strict=True)]


def _fit_affine_groups(groups: mx.array, bits: int) -> tuple[mx.array, mx.array, mx.array]:
    top = mx.array(2**bits - 1, mx.float32)
    low, high = groups.min(-1, keepdims=True), groups.max(-1, keepdims=True)
    best = None
    for ratio in _CLIP_RATIOS:
        best = _keep_better(
            best, _affine_candidate(groups, (high - low * ratio) / top, low * ratio, top)
        )
    low = best[3]
    for ratio in _CLIP_RATIOS[:-1]:
        best = _keep_better(best, _affine_candidate(groups, (high * ratio - low) / top, low, top))
    for _ in range(_REFIT_ROUNDS):
        best = _keep_better(best, _affine_candidate(groups, *_least_squares(groups, best[1]), top))
    _, q, scale, bias = best
    return q.astype(mx.uint8), scale, bias


def _least_squares(groups: mx.array, q: mx.array) -> tuple[mx.array, mx.array]:
    """Per group, the (scale, bias) minimizing ‖group − (scale·q + bias)‖²."""
    q_mean, mean = q.mean(-1, keepdims=True), groups.mean(-1, keepdims=True)
    spread = mx.square(q - q_mean).sum(-1, keepdims=True)
    scale = ((q - q_mean) * (groups - mean)).sum(-1, keepdims=True) / mx.maximum(spread, 1e-12)
    return scale, mean - scale * q_mean


# ----------------------------------------------------------------------------- the model


def _child(module: nn.Module, dotted: str) -> nn.Module | None:
    for name in filter(None, dotted.split(".")):
        module = module.get(name) if isinstance(module, nn.Module) else None
        if module is None:
            return None
    return module


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
    """The rotated float module packed as fitted affine groups or, when `codebook` asks, as a
    codebook unless the affine groups measure better; its error.

    The rotated input is close to isotropic whatever the activations' outlier channels, so the
    error of a layer's output follows the error of its rotated weight, and the two forms are
    compared on that weight error, as stored (in the weight's dtype). The codebook form stores
    no biases, so at equal error it is the cheaper one: each form's relative error is weighed
    by 2^(its stored bits per weight), the rate-distortion exchange of a Gaussian source (one
    more bit halves the error), so the affine groups win only where they beat the codebook by
    more than what their biases cost.
    """
    bits, group_size, mode = params["bits"], params["group_size"], params["mode"]
    weight = module.weight
    if mode != "affine":  # the float modes have no range to fit
        packed = module.to_quantized(group_size=group_size, bits=bits, mode=mode)
        restored = mx.dequantize(
            packed.weight, packed.scales, None, group_size=group_size, bits=bits, mode=mode
        )
        return packed, relative_error(weight, restored)

    packed = module.to_quantized(group_size=group_size, bits=bits, mode="affine")
    error = _fit_into(packed, weight)
    if codebook and isinstance(module, nn.Linear):
        array = np.array(weight.astype(mx.float32))
        coded = _codebook_linear(module, array, bits, group_size)
        coded_error = relative_error(weight, coded.float_weight())
        if coded_error * 2 ** stored_bits(coded) <= error * 2 ** stored_bits(packed):
            return coded, coded_error
    return packed, error


def stored_bits(module: nn.Module) -> float:
    """Bits per weight a quantized module stores: its packed integers with their scales,
    biases and codebook (a linear's own bias is not counted)."""
    weights = module.weight.size * 32 // module.bits
    stored = sum(v.nbytes for k, v in tree_flatten(module.parameters()) if k != "bias")
    return stored * 8 / weights


def _fit_into(packed: nn.Module, weight: mx.array) -> float:
    """Overwrite an affine-quantized module's packing of `weight` with fitted groups; its error."""
    bits, group_size = packed.bits, packed.group_size
    q, scales, biases = affine_groups(weight, bits, group_size)
    packed.weight = pack_codes(q, bits)
    packed.scales = scales.astype(packed.scales.dtype)
    packed.biases = biases.astype(packed.biases.dtype)
    restored = mx.dequantize(
        packed.weight, packed.scales, packed.biases, group_size=group_size, bits=bits
    )
    return relative_error(weight, restored)


def _codebook_linear(
    module: nn.Linear, weight: np.ndarray, bits: int, group_size: int
) -> CodebookLinear:
    indices, scales, values = fit_codebook(weight, bits, group_size)
    out_dims, in_dims = weight.shape
    dtype = module.weight.dtype
    coded = CodebookLinear(in_dims, out_dims, bits, group_size, bias="bias" in module)
    coded.weight = pack_codes(mx.array(indices), bits)
    coded.scales = mx.array(scales).astype(dtype)
    coded.codebook = mx.array(values).astype(dtype)
    if "bias" in module:
        coded.bias = module.bias
    return coded


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
    `codebook` gives each linear layer a codebook unless fitted affine groups reconstruct its
    rotated weight better, counting the bits they store; expert stacks keep affine groups.
    The router, the PLE projection, the experts' down projection and the embeddings are not
    rotated: they get `quantize_model`'s schemes, with fitted affine groups. Returns the
    config.json `quantization` entry, with the method recorded.
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
    floats = {path: m.weight for path, m in model.named_modules() if hasattr(m, "to_quantized")}
    rest = quantize_float_modules(
        model, bits=bits, group_size=group_size, mode=mode, override=override, errors=errors
    )
    for path, module in model.named_modules():
        if path in floats and getattr(module, "mode", None) == "affine" and "biases" in module:
            error = _fit_into(module, floats[path])
            if errors is not None:
                errors[path] = error
    return {**rest, **entry, "method": "turboquant", "rotation_seed": seed, "codebook": codebook}
