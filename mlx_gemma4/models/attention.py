"""Scaled dot-product attention: MLX's fused kernel, or on the CPU two BLAS matmuls around a
fused softmax.

MLX's CPU backend has no fused attention: `mx.fast.scaled_dot_product_attention` falls back to
a softmax that evaluates `exp` one scalar at a time, which dominates long prefills and the
vision tower (4.1 s of an 8.5 s vision layer). For more than a few queries the CPU path here
does the same math with the fast softmax of `activations`, in query blocks of bounded size;
decode steps over more than a few hundred positions gain as much.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from .activations import softmax
from .layers import on_cpu

# Below this many scores per head (queries x keys), MLX's path is as fast: its softmax is short.
# Above it, even for one query (a decode step), BLAS is 3-4x faster (5.9 ms against 27 ms for
# E2B's 8 heads of 512 over 8K positions).
_MIN_SCORES = 256
# Score blocks of at most this many elements (1 GB in float32).
_MAX_SCORES = 2**28
_MASKED = -1e30


def _grouped_mask(mask: Any, n_queries: int, n_keys: int, kv_heads: int) -> mx.array | None:
    """None, "causal" or a mask broadcastable to [B, H, L, S] -> None or an array broadcastable
    to the grouped scores [B, H_kv, H / H_kv, L, S]."""
    if mask is None:
        return None
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"unknown attention mask {mask!r}")
        queries = mx.arange(n_keys - n_queries, n_keys)[:, None]
        return mx.arange(n_keys)[None] <= queries
    if mask.ndim < 4:
        return mask
    batch, heads = mask.shape[:2]
    if heads == 1:
        return mask[:, :, None]
    return mask.reshape(batch, kv_heads, heads // kv_heads, *mask.shape[2:])


def attention(
    queries: mx.array, keys: mx.array, values: mx.array, scale: float, mask: Any = None
) -> mx.array:
    """queries [B, H, L, D], keys / values [B, H_kv, S, D] (H a multiple of H_kv) -> [B, H, L, D].

    `mask`: None, "causal", a boolean mask (True: attend) or an additive one, broadcastable to
    [B, H, L, S], as `mx.fast.scaled_dot_product_attention` takes them.
    """
    batch, heads, n_queries, _ = queries.shape
    kv_heads, n_keys = keys.shape[1], keys.shape[2]
    if not on_cpu() or n_queries * n_keys < _MIN_SCORES:
        return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask)
    groups = heads // kv_heads
    # the query heads sharing a KV head become rows of one GEMM: [B, H_kv, groups * L, D]
    q = queries.astype(mx.float32)
    if scale != 1.0:
        q = q * scale
    q = q.reshape(batch, kv_heads, groups, n_queries, -1)
    keys_t = keys.astype(mx.float32).swapaxes(-1, -2)
    values = values.astype(mx.float32)
    mask = _grouped_mask(mask, n_queries, n_keys, kv_heads)
    block = max(1, _MAX_SCORES // (batch * heads * n_keys))
    out = []
    for start in range(0, n_queries, block):
        part = q if block >= n_queries else q[..., start : start + block, :]
        rows = part.shape[-2]
        scores = part.reshape(batch, kv_heads, groups * rows, -1) @ keys_t
        if mask is not None:
            scores = scores.reshape(batch, kv_heads, groups, rows, n_keys)
            allowed = mask[..., start : start + block, :] if mask.shape[-2] > 1 else mask
            if allowed.dtype == mx.bool_:
                scores = mx.where(allowed, scores, _MASKED)
            else:
                scores = scores + allowed.astype(mx.float32)
            scores = scores.reshape(batch, kv_heads, groups * rows, n_keys)
        out.append((softmax(scores) @ values).reshape(batch, kv_heads, groups, rows, -1))
    out = out[0] if len(out) == 1 else mx.concatenate(out, axis=-2)
    out = out.reshape(batch, heads, n_queries, -1)
    return out.astype(queries.dtype)
