"""Sampling a batch: each row by its own settings, rows that share settings in one call."""

from __future__ import annotations

import mlx.core as mx

from ..draws import SeededKey, logprob_filters
from ..options import SamplingOptions


class RowSampler:
    """A request's sampler. A seeded one draws with its own random key, so it samples the same
    tokens whatever else is in the batch (and the same as a solo run seeded alike); unseeded
    ones draw from the global generator and share one call with their like."""

    def __init__(self, sampling: SamplingOptions):
        self.temperature = sampling.temperature
        self.filters = logprob_filters(sampling)
        self.key = None if sampling.seed is None else SeededKey(sampling.seed)
        # rows whose samplers have equal `group`s are sampled together; a seeded one alone
        settings = (self.temperature, sampling.top_p, sampling.min_p, sampling.top_k)
        self.group = (
            ("greedy",) if self.temperature == 0 else settings if self.key is None else self
        )

    def __call__(self, logits: mx.array) -> mx.array:
        """Logits [rows, vocab] -> tokens [rows]."""
        if self.temperature == 0:
            return mx.argmax(logits, axis=-1)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        for apply in self.filters:
            logprobs = apply(logprobs)
        key = None if self.key is None else self.key.next()
        return mx.random.categorical(logprobs * (1 / self.temperature), key=key)


def sample_rows(logits: mx.array, samplers: list[RowSampler]) -> mx.array:
    """One token per row of `logits` [rows, vocab], row i by `samplers[i]`: one call per group
    of rows with the same settings (a single argmax when every row is greedy)."""
    groups: dict[object, list[int]] = {}
    for row, sampler in enumerate(samplers):
        groups.setdefault(sampler.group, []).append(row)
    if len(groups) == 1:
        return samplers[0](logits)
    tokens = mx.zeros(len(samplers), dtype=mx.uint32)
    for rows in groups.values():
        index = mx.array(rows)
        tokens[index] = samplers[rows[0]](logits[index]).astype(mx.uint32)
    return tokens
