"""The trimmable sliding-window cache against attention over the full history."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_gemma4.cache import SlidingWindowCache

WINDOW = 6


def windowed_attention(q, keys, values, positions_q, window):
    """Naive reference: each query sees keys at positions (p - window, p]."""
    scores = q @ keys.swapaxes(-1, -2)
    k_pos = mx.arange(keys.shape[2])
    visible = (k_pos[None] <= positions_q[:, None]) & (k_pos[None] > positions_q[:, None] - window)
    scores = mx.where(visible, scores, -mx.inf)
    return mx.softmax(scores, axis=-1) @ values


def run(cache, keys, values, queries, chunks):
    outputs, start = [], 0
    for n in chunks:
        mask = cache.make_mask(n)  # made before the update, as the model does
        chunk = slice(start, start + n)
        k, v = cache.update_and_fetch(keys[:, :, chunk], values[:, :, chunk])
        q = queries[:, :, chunk]
        outputs.append(mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=mask))
        start += n
    return mx.concatenate(outputs, axis=2)


@pytest.fixture
def small_blocks(monkeypatch):
    """Tiny growth steps and spare, so compaction happens many times in a short sequence."""
    monkeypatch.setattr(SlidingWindowCache, "step", 3)


def random_qkv(length, seed=0):
    rng = np.random.default_rng(seed)
    return [mx.array(rng.standard_normal((1, 2, length, 8)).astype(np.float32)) for _ in range(3)]


@pytest.mark.parametrize("chunks", [[1] * 40, [5, 9, 1, 1, 7, 1, 1, 1, 14], [40]])
def test_matches_windowed_attention_through_compactions(small_blocks, chunks):
    q, k, v = random_qkv(40)
    cache = SlidingWindowCache(WINDOW, spare=2)
    ours = run(cache, k, v, q, chunks)
    expected = windowed_attention(q, k, v, mx.arange(40), WINDOW)
    assert mx.allclose(ours, expected, atol=1e-5)
    assert cache.offset == 40 and cache.size() == WINDOW
    # memory stays bounded: a window, the spare, and one chunk plus a growth step
    assert cache.stored <= WINDOW - 1 + 2 + max(chunks) + cache.step


def test_trim_then_continue_equals_never_having_seen_the_tail(small_blocks):
    q, k, v = random_qkv(30, seed=1)
    cache = SlidingWindowCache(WINDOW, spare=4)
    run(cache, k, v, q, [20])
    assert cache.trim(3) == 3 and cache.offset == 17
    # continue from position 17 with different tokens
    q2, k2, v2 = random_qkv(30, seed=2)
    mixed_k = mx.concatenate([k[:, :, :17], k2[:, :, 17:]], axis=2)
    mixed_v = mx.concatenate([v[:, :, :17], v2[:, :, 17:]], axis=2)
    tail = []
    for t in range(17, 30):
        kk, vv = cache.update_and_fetch(mixed_k[:, :, t : t + 1], mixed_v[:, :, t : t + 1])
        tail.append(mx.fast.scaled_dot_product_attention(q2[:, :, t : t + 1], kk, vv, scale=1.0))
    expected = windowed_attention(q2, mixed_k, mixed_v, mx.arange(30), WINDOW)[:, :, 17:]
    assert mx.allclose(mx.concatenate(tail, axis=2), expected, atol=1e-5)


def test_trim_never_drops_below_a_full_window(small_blocks):
    q, k, v = random_qkv(40)
    cache = SlidingWindowCache(WINDOW, spare=4)
    run(cache, k, v, q, [1] * 40)
    trimmed = cache.trim(100)
    assert 4 <= trimmed <= 4 + cache.step + 1  # at least the spare, never into the window
    assert cache.stored >= WINDOW - 1
    assert cache.is_trimmable()


def test_state_round_trip():
    q, k, v = random_qkv(12)
    cache = SlidingWindowCache(WINDOW)
    run(cache, k, v, q, [12])
    restored = SlidingWindowCache(1)
    restored.state, restored.meta_state = cache.state, cache.meta_state
    a = cache.update_and_fetch(k[:, :, :1], v[:, :, :1])
    b = restored.update_and_fetch(k[:, :, :1], v[:, :, :1])
    assert restored.offset == cache.offset == 13
    assert all(mx.array_equal(x, y) for x, y in zip(a, b, strict=True))
