"""The random sign diagonals of the randomized Hadamard rotations (weights and the KV cache)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np


def rotation_signs(dims: int, seed: int, site: int | None = None) -> mx.array:
    """The ±1 diagonal of a randomized Hadamard rotation, reproducible from `seed`.

    A quantized checkpoint numbers its rotation sites under one seed (`site` given: NumPy's
    generator keyed by (seed, site)); a quantized KV cache takes one seed per layer (`site`
    None: MLX's generator). Both streams are fixed: prompt-cache files store only the seed, and
    a checkpoint quantized again with the same seed must rotate the same way.
    """
    if site is None:
        flips = mx.random.bernoulli(0.5, (dims,), key=mx.random.key(seed))
        return mx.where(flips, 1.0, -1.0)
    rng = np.random.default_rng([seed, site])
    return mx.array(rng.choice(np.array([-1.0, 1.0], dtype=np.float32), size=dims))
