"""Activations shared by the dense MLP, the experts and the per-layer input gate."""

from __future__ import annotations

from functools import partial

import mlx.core as mx
import mlx.nn as nn


@partial(mx.compile, shapeless=True)
def geglu(gate: mx.array, up: mx.array) -> mx.array:
    """tanh-approximate GELU of `gate` times `up`, compiled into one fused pass."""
    return nn.gelu_approx(gate) * up
