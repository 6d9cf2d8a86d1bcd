"""Scaled dot-product attention: MLX's fused kernel, or on the CPU two BLAS matmuls around a
fused softmax.

MLX's CPU backend has no fused attention: `mx.fast.scaled_dot_product_attention` falls back to
a softmax that evaluates `exp` one scalar at a time, which dominates long prefills and the
vision tower. For more than a few queries the CPU path here
does the same math with the fast softmax of `activations`, in query blocks of bounded size;
decode steps over more than a few hundred positions gain as much.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import mlx.core as mx

from ..kv_quant import QuantizedKV, code_center, rotate, unit_affine, unrotate
from .activations import softmax
from .layers import on_cpu

# Below this many scores per head (queries x keys), MLX's path is as fast: its softmax is short.
# Above it, even for one query (a decode step), BLAS is faster (benchmarks/kv_cache.py times
# one layer's step both ways).
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


def _finish_before_next(blocks: list[mx.array], n_queries: int, block: int) -> None:
    """Evaluate the newest query block when more follow: left lazy, the blocks of one call are
    scheduled side by side and their scores are all alive at once, which undoes the bound."""
    if n_queries > block:
        mx.eval(blocks[-1])


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
        _finish_before_next(out, n_queries, block)
    out = out[0] if len(out) == 1 else mx.concatenate(out, axis=-2)
    out = out.reshape(batch, heads, n_queries, -1)
    return out.astype(queries.dtype)


# ----------------------------------------------------------------------------- quantized KV cache
# Attention never dequantizes the whole cache. R is orthogonal, so q·k = (Rq)·(Rk): the scores
# are the rotated queries times the codes, scaled per position afterwards; the values' scales
# multiply the probabilities first, and R^T brings the output back. On a GPU the products with
# the codes are `quantized_matmul` with unit scales. MLX's CPU `quantized_matmul` runs a
# matrix-vector product per query row (several times slower than BLAS for a decode step's rows),
# so on the CPU the codes are unpacked a block of positions at a time, straight from the packed
# bytes where codes fill whole bytes (2, 4 and 8 bits), and multiplied with BLAS. A prefill chunk
# longer than `QUERY_BLOCK` unpacks the cache once per query block: the price of never holding
# all of it in float.

QUERY_BLOCK = 512  # queries attended at once in a long prefill chunk
UNPACKED_BLOCK = 2**19  # cache elements unpacked at once on the CPU (2 MiB in float32)


def _causal(n_queries: int, n_keys: int) -> mx.array:
    queries = mx.arange(n_keys - n_queries, n_keys)
    return queries[:, None] >= mx.arange(n_keys)[None]


def quantized_attention(
    queries: mx.array, kv: QuantizedKV, *, scale: float, mask: Any = None
) -> mx.array:
    """Attention of `queries` [B, H, L, D] over a quantized cache; H may be a multiple of its
    KV heads (grouped-query attention). `mask`: None, "causal", or a bool / additive array
    broadcastable to [B, H, L, T].

    Long prefill chunks go `QUERY_BLOCK` queries at a time, so the scores held at once stay
    [B, H, QUERY_BLOCK, T] however long the chunk is.
    """
    length, n_keys = queries.shape[2], kv.keys[0].shape[2]
    if length <= QUERY_BLOCK:
        return _attend(queries, kv, scale, mask)
    if isinstance(mask, str):
        mask = _causal(length, n_keys)
    blocks = []
    for start in range(0, length, QUERY_BLOCK):
        rows = slice(start, start + QUERY_BLOCK)
        block_mask = mask if mask is None or mask.shape[-2] == 1 else mask[..., rows, :]
        blocks.append(_attend(queries[:, :, rows], kv, scale, block_mask))
        _finish_before_next(blocks, length, QUERY_BLOCK)
    return mx.concatenate(blocks, axis=2)


def _attend(queries: mx.array, kv: QuantizedKV, scale: float, mask: Any) -> mx.array:
    batch, n_heads, length, head_dim = queries.shape
    kv_heads = kv.keys[0].shape[1]
    per_kv = n_heads // kv_heads
    if scale != 1.0:
        queries = queries * scale
    # the query heads of one KV head become rows of one matrix against that head's keys
    rows = rotate(queries, kv.signs).reshape(batch, kv_heads, per_kv * length, head_dim)
    key_codes, key_scales = kv.keys
    scores = _times_codes_transposed(rows, key_codes, kv.key_bits) * key_scales.swapaxes(-1, -2)
    if mask is not None:
        n_keys = scores.shape[-1]
        scores = scores.reshape(batch, kv_heads, per_kv, length, n_keys)
        if isinstance(mask, str):
            mask = _causal(length, n_keys)
        elif mask.ndim == 4:  # [B, H or 1, L, T] -> [B, kv heads or 1, per_kv or 1, L, T]
            head_groups = 1 if mask.shape[1] == 1 else per_kv
            mask = mask.reshape(mask.shape[0], -1, head_groups, *mask.shape[2:])
        if mask.dtype == mx.bool_:
            scores = mx.where(mask, scores, mx.finfo(scores.dtype).min)
        else:
            scores = scores + mask.astype(scores.dtype)
        scores = scores.reshape(batch, kv_heads, per_kv * length, n_keys)
    value_codes, value_scales = kv.values
    weights = softmax(scores) * value_scales.swapaxes(-1, -2)
    out = _times_codes(weights, value_codes, kv.value_bits).astype(queries.dtype)
    return unrotate(out.reshape(batch, n_heads, length, head_dim), kv.signs)


def _times_codes_transposed(rows: mx.array, codes: mx.array, bits: int) -> mx.array:
    """Rows [B, H_kv, R, D] times the centered codes [B, H_kv, T, D], transposed -> [..., R, T]."""
    if not on_cpu():
        return mx.quantized_matmul(
            rows, codes, transpose=True, **unit_affine(codes, bits, rows.dtype)
        )
    blocks = []
    for planes in _unpacked_blocks(codes, bits):
        stride = len(planes)
        products = [rows[..., k::stride] @ plane.swapaxes(-1, -2) for k, plane in enumerate(planes)]
        blocks.append(sum(products[1:], products[0]))
    raw = mx.concatenate(blocks, axis=-1) if len(blocks) > 1 else blocks[0]
    return raw - _plane_offset(bits) * rows.sum(axis=-1, keepdims=True)


def _times_codes(weights: mx.array, codes: mx.array, bits: int) -> mx.array:
    """Weights [B, H_kv, R, T] times the centered codes [B, H_kv, T, D] -> [B, H_kv, R, D]."""
    if not on_cpu():
        return mx.quantized_matmul(
            weights, codes, transpose=False, **unit_affine(codes, bits, weights.dtype)
        )
    outputs, start = None, 0
    for planes in _unpacked_blocks(codes, bits):
        block = weights[..., start : start + planes[0].shape[-2]]
        start += planes[0].shape[-2]
        products = [block @ plane for plane in planes]
        outputs = (
            products if outputs is None else [a + b for a, b in zip(outputs, products, strict=True)]
        )
    # plane k holds dimensions k, k + stride, ...: interleave them back
    raw = (
        outputs[0]
        if len(outputs) == 1
        else mx.stack(outputs, axis=-1).reshape(*weights.shape[:-1], -1)
    )
    return raw - _plane_offset(bits) * weights.sum(axis=-1, keepdims=True)


def _unpacked_blocks(codes: mx.array, bits: int) -> Iterator[list[mx.array]]:
    """The stored codes, a block of positions at a time, as float32 planes: plane k of `stride`
    holds head dimensions k, k + stride, ... (a single plane when codes straddle bytes)."""
    batch, heads, n_keys, words = codes.shape
    head_dim = words * 32 // bits
    block = max(1, UNPACKED_BLOCK // (batch * heads * head_dim))
    for start in range(0, n_keys, block):
        yield _code_planes(codes[..., start : start + block, :], bits)


def _code_planes(codes: mx.array, bits: int) -> list[mx.array]:
    """Float32 planes whose entries minus `_plane_offset(bits)` are the centered codes."""
    if 8 % bits:
        return [mx.dequantize(codes, **unit_affine(codes, bits, mx.float32))]
    return _BYTE_PLANES[bits](codes.view(mx.uint8))


def _byte_plane_unpacker(bits: int) -> Callable[[mx.array], list[mx.array]]:
    """One fused kernel from packed bytes to planes of c - 2^(bits-1): nearly centered, so the
    products' sums stay small and lose nothing to the correction that finishes centering."""
    stride, mask, half = 8 // bits, 2**bits - 1, 2 ** (bits - 1)

    def unpack(packed_bytes: mx.array) -> list[mx.array]:
        # codes sit lowest bits first (MLX's packing, little-endian)
        planes = [(packed_bytes >> (bits * k)) & mask for k in range(stride)]
        return [plane.astype(mx.float32) - half for plane in planes]

    # shapeless: the last block's length changes every decode step, and these integer constants
    # do not suffer the broadcast slowdown that keeps `activations` compiled per shape
    return mx.compile(unpack, shapeless=True)


_BYTE_PLANES = {bits: _byte_plane_unpacker(bits) for bits in (2, 4, 8)}


def _plane_offset(bits: int) -> float:
    """What `_code_planes` entries exceed the centered codes by."""
    if 8 % bits:
        return 0.0  # mx.dequantize centered them
    return code_center(bits) - 2 ** (bits - 1)  # byte planes hold c - 2^(bits-1)
