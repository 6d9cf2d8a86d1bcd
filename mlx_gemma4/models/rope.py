"""Rotary position embeddings of the text decoder: default and proportional (partial) RoPE."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..errors import ConfigError


def rope_wavelengths(head_dim: int, params: dict[str, Any]) -> mx.array:
    """Per-pair wavelengths (1 / inverse frequency) in rotate-half layout.

    Proportional RoPE rotates only the first `partial_rotary_factor * head_dim / 2` pairs, with
    exponents over the FULL head dim; the other pairs get an infinite wavelength (no rotation).
    """
    rope_type = params.get("rope_type", "default")
    theta = float(params.get("rope_theta", 10_000.0))
    if rope_type == "default":
        rotated = head_dim // 2
    elif rope_type == "proportional":
        rotated = int(params.get("partial_rotary_factor", 1.0) * head_dim // 2)
    else:
        raise ConfigError(f"rope_type {rope_type!r} is not supported for Gemma 4 text layers")
    exponents = mx.arange(0, 2 * rotated, 2, dtype=mx.float32) / head_dim
    rotated_wavelengths = (theta**exponents) * params.get("factor", 1.0)
    still = mx.full((head_dim // 2 - rotated,), float("inf"), dtype=mx.float32)
    return mx.concatenate([rotated_wavelengths, still])


class RoPE(nn.Module):
    def __init__(self, head_dim: int, params: dict[str, Any]):
        super().__init__()
        self.head_dim = head_dim
        self._wavelengths = rope_wavelengths(head_dim, params)

    def __call__(self, x: mx.array, offset: int | mx.array = 0) -> mx.array:
        return mx.fast.rope(
            x,
            self.head_dim,
            traditional=False,
            base=None,
            scale=1.0,
            offset=offset,
            freqs=self._wavelengths,
        )
