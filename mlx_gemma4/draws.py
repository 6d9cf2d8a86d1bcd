"""What a sampled sequence's draws are made of, shared by the batch engine's samplers and
speculative decoding's token chooser: the filters its options ask for and its own random key.

Both must agree with `stream_generate`'s plain sampling (mlx-lm's `make_sampler`, seeded
through MLX's global generator) for a seeded sequence to draw the same tokens alone, beside
other rows, and while drafting.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

from .options import SamplingOptions


def logprob_filters(sampling: SamplingOptions) -> list[Callable[[mx.array], mx.array]]:
    """The filters on log-probabilities `sampling` asks for, in mlx-lm's order: nucleus,
    min-p, top-k."""
    filters = []
    if 0 < sampling.top_p < 1.0:
        filters.append(lambda x: apply_top_p(x, sampling.top_p))
    if sampling.min_p:
        filters.append(lambda x: apply_min_p(x, sampling.min_p))
    if sampling.top_k > 0:
        filters.append(lambda x: apply_top_k(x, sampling.top_k))
    return filters


class SeededKey:
    """A sequence's own random key, split as MLX's global generator splits when seeded alike
    (keep one half, draw with the other): its draws are what the global generator would give
    a run seeded with `seed`, whatever else draws meanwhile."""

    def __init__(self, seed: int):
        self._key = mx.random.key(seed)

    def next(self) -> mx.array:
        """The key for the next draw."""
        self._key, key = mx.random.split(self._key)
        return key
