"""The Gemma 4 text decoder: attention, MLP, decoder layer, per-layer embeddings, text model."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..cache import (
    FullAttentionCache,
    QuantizedFullAttentionCache,
    SlidingWindowCache,
    attention_mask,
    media_block_mask,
    vision_block_mask,
)
from ..config import FULL, SLIDING, TextConfig
from ..kv_quant import KVQuantization, QuantizedKV, require_packable
from .activations import geglu
from .attention import attention, quantized_attention
from .layers import Embedding, Linear, RMSNorm, RMSNormNoScale, rotated
from .moe import Experts, Router
from .rope import RoPE


class MLP(nn.Module):
    """GeGLU feed-forward with tanh-approximate GELU."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        x = rotated(self, "input_rotation", x)
        inner = geglu(self.gate_proj(x), self.up_proj(x))
        return self.down_proj(rotated(self, "inner_rotation", inner))


class Attention(nn.Module):
    """Attention with q/k norms, an unscaled v norm, and a scale of 1.0.

    KV-shared layers have no key/value weights and attend over their source layer's keys and
    values (float, or a `QuantizedKV`); `attention_k_eq_v` layers reuse the raw key projection
    as values.
    """

    def __init__(self, config: TextConfig, layer: int):
        super().__init__()
        self.head_dim = config.layer_head_dim(layer)
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.layer_kv_heads(layer)
        self.owns_kv = config.kv_source(layer) == layer
        self.values_from_keys = config.attention_k_eq_v and not config.is_sliding(layer)
        hidden, eps, bias = config.hidden_size, config.rms_norm_eps, config.attention_bias

        self.q_proj = Linear(hidden, self.n_heads * self.head_dim, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, eps=eps)
        if self.owns_kv:
            self.k_proj = Linear(hidden, self.n_kv_heads * self.head_dim, bias=bias)
            if not self.values_from_keys:
                self.v_proj = Linear(hidden, self.n_kv_heads * self.head_dim, bias=bias)
            self.k_norm = RMSNorm(self.head_dim, eps=eps)
            self.v_norm = RMSNormNoScale(eps)
        self.o_proj = Linear(self.n_heads * self.head_dim, hidden, bias=bias)
        self.rope = RoPE(self.head_dim, config.rope_parameters[config.layer_types[layer]])

    def __call__(
        self,
        x: mx.array,
        mask: Any,
        cache: Any,
        offset: int,
        shared_kv: tuple[mx.array, mx.array] | QuantizedKV | None,
    ) -> tuple[mx.array, tuple[mx.array, mx.array] | QuantizedKV]:
        batch, length, _ = x.shape
        x = rotated(self, "input_rotation", x)
        queries = self.q_norm(self.q_proj(x).reshape(batch, length, self.n_heads, -1))
        queries = self.rope(queries.transpose(0, 2, 1, 3), offset)

        if shared_kv is None:
            keys = self.k_proj(x).reshape(batch, length, self.n_kv_heads, -1)
            values = keys if self.values_from_keys else self.v_proj(x)
            values = values.reshape(batch, length, self.n_kv_heads, -1)
            keys = self.rope(self.k_norm(keys).transpose(0, 2, 1, 3), offset)
            values = self.v_norm(values).transpose(0, 2, 1, 3)
            kv = (keys, values) if cache is None else cache.update_and_fetch(keys, values)
        else:
            kv = shared_kv

        if isinstance(kv, QuantizedKV):
            out = quantized_attention(queries, kv, scale=1.0, mask=mask)
        else:
            out = attention(queries, *kv, scale=1.0, mask=mask)
        out = out.transpose(0, 2, 1, 3).reshape(batch, length, -1)
        return self.o_proj(rotated(self, "output_rotation", out)), kv


class DecoderLayer(nn.Module):
    def __init__(self, config: TextConfig, layer: int):
        super().__init__()
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Attention(config, layer)
        self.mlp = MLP(hidden, config.layer_mlp_size(layer))
        self.input_layernorm = RMSNorm(hidden, eps=eps)
        self.post_attention_layernorm = RMSNorm(hidden, eps=eps)
        self.pre_feedforward_layernorm = RMSNorm(hidden, eps=eps)
        self.post_feedforward_layernorm = RMSNorm(hidden, eps=eps)
        self.layer_scalar = mx.ones((1,))

        self.has_moe = config.enable_moe_block
        if self.has_moe:
            self.router = Router(config)
            self.experts = Experts(config)
            self.post_feedforward_layernorm_1 = RMSNorm(hidden, eps=eps)
            self.pre_feedforward_layernorm_2 = RMSNorm(hidden, eps=eps)
            self.post_feedforward_layernorm_2 = RMSNorm(hidden, eps=eps)

        self.has_per_layer_input = bool(config.hidden_size_per_layer_input)
        if self.has_per_layer_input:
            ple = config.hidden_size_per_layer_input
            self.per_layer_input_gate = Linear(hidden, ple, bias=False)
            self.per_layer_projection = Linear(ple, hidden, bias=False)
            self.post_per_layer_input_norm = RMSNorm(hidden, eps=eps)

    def _feed_forward(self, h: mx.array) -> mx.array:
        dense = self.mlp(self.pre_feedforward_layernorm(h))
        if not self.has_moe:
            return dense
        # dense MLP and experts run side by side; the router reads the un-normed residual
        flat = h.reshape(-1, h.shape[-1])
        indices, weights = self.router(flat)
        expert_input = rotated(self, "expert_rotation", self.pre_feedforward_layernorm_2(flat))
        sparse = self.experts(expert_input, indices, weights)
        sparse = self.post_feedforward_layernorm_2(sparse.reshape(h.shape))
        return self.post_feedforward_layernorm_1(dense) + sparse

    def __call__(
        self,
        x: mx.array,
        mask: Any,
        cache: Any,
        offset: int,
        shared_kv: tuple[mx.array, mx.array] | None,
        per_layer_input: mx.array | None,
    ) -> tuple[mx.array, tuple[mx.array, mx.array]]:
        attn, kv = self.self_attn(self.input_layernorm(x), mask, cache, offset, shared_kv)
        h = x + self.post_attention_layernorm(attn)
        h = h + self.post_feedforward_layernorm(self._feed_forward(h))
        if self.has_per_layer_input:
            gate = self.per_layer_input_gate(rotated(self, "per_layer_gate_rotation", h))
            gate = rotated(self, "per_layer_rotation", geglu(gate, per_layer_input))
            h = h + self.post_per_layer_input_norm(self.per_layer_projection(gate))
        return h * self.layer_scalar, kv


def _scaled(x: mx.array, scale: float) -> mx.array:
    # the reference rounds embedding scales to the activation dtype
    return x * mx.array(scale, dtype=x.dtype)


class TextModel(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.embed_tokens = Embedding(config.vocab_size, hidden)
        self.layers = [DecoderLayer(config, i) for i in range(config.num_hidden_layers)]
        self.norm = RMSNorm(hidden, eps=eps)
        self.kv_sources = [config.kv_source(i) for i in range(config.num_hidden_layers)]

        ple = config.hidden_size_per_layer_input
        if ple:
            n_layers = config.num_hidden_layers
            self.embed_tokens_per_layer = Embedding(
                config.vocab_size_per_layer_input, n_layers * ple
            )
            self.per_layer_model_projection = Linear(hidden, n_layers * ple, bias=False)
            self.per_layer_projection_norm = RMSNorm(ple, eps=eps)

    def embed(self, input_ids: mx.array) -> mx.array:
        return _scaled(self.embed_tokens(input_ids), self.config.hidden_size**0.5)

    def per_layer_inputs(self, input_ids: mx.array, embeddings: mx.array) -> mx.array:
        """Per-layer embeddings `[B, T, layers, P]`: token table plus a projection of the input."""
        config = self.config
        ple = config.hidden_size_per_layer_input
        table = _scaled(self.embed_tokens_per_layer(input_ids), ple**0.5)
        table = table.reshape(*input_ids.shape, config.num_hidden_layers, ple)
        projected = self.per_layer_model_projection(embeddings) * (config.hidden_size**-0.5)
        projected = projected.reshape(*embeddings.shape[:-1], config.num_hidden_layers, ple)
        projected = self.per_layer_projection_norm(projected)
        return (projected + table.astype(projected.dtype)) * (2.0**-0.5)

    def make_cache(self, kv_quantization: KVQuantization | None = None) -> list[Any]:
        """Caches of the KV-owning layers; `kv_quantization` quantizes the full-attention ones."""
        config = self.config

        def full(layer: int):
            if kv_quantization is None:
                return FullAttentionCache()
            require_packable(config.layer_head_dim(layer))
            return QuantizedFullAttentionCache(kv_quantization, seed=layer)

        return [
            SlidingWindowCache(config.sliding_window) if config.is_sliding(i) else full(i)
            for i in range(config.first_kv_shared_layer)
        ]

    def __call__(
        self,
        input_ids: mx.array,
        cache: list[Any] | None = None,
        embeddings: mx.array | None = None,
        vision_blocks: mx.array | None = None,
    ) -> mx.array:
        """Final-normed hidden states `[B, T, hidden]`.

        `embeddings` override the token lookup (multimodal soft tokens); `vision_blocks` [B, T]
        marks image blocks (-1: text) that attend both ways on sliding layers.
        """
        h = self.embed(input_ids) if embeddings is None else embeddings
        per_layer = (
            self.per_layer_inputs(input_ids, h) if self.config.hidden_size_per_layer_input else None
        )
        if cache is None:
            cache = self.make_cache()
        caches = list(cache) + [None] * (len(self.layers) - len(cache))

        offset = caches[0].offset
        masks = self._masks(caches, h.shape[1])
        if vision_blocks is not None:
            masks.update(self._vision_masks(caches, vision_blocks))
        kvs: list[tuple[mx.array, mx.array] | None] = [None] * len(self.layers)
        for i, (layer, layer_cache, source) in enumerate(
            zip(self.layers, caches, self.kv_sources, strict=True)
        ):
            h, kvs[i] = layer(
                h,
                masks[self.config.layer_types[i]],
                layer_cache,
                offset,
                kvs[source] if source != i else None,
                per_layer[:, :, i, :] if per_layer is not None else None,
            )
        return self.norm(h)

    def _vision_masks(self, caches: list[Any], blocks: mx.array) -> dict[str, mx.array]:
        """Masks where image blocks attend both ways: on sliding layers within the window, or
        (gemma4_unified) on every layer at any distance."""
        types = self.config.layer_types
        if not self.config.vision_blocks_everywhere:
            return {SLIDING: vision_block_mask(caches[types.index(SLIDING)], blocks)}
        return {kind: media_block_mask(caches[types.index(kind)], blocks) for kind in set(types)}

    def _masks(self, caches: list[Any], n_queries: int) -> dict[str, Any]:
        types = self.config.layer_types
        first = {kind: types.index(kind) for kind in (SLIDING, FULL) if kind in types}
        return {kind: attention_mask(caches[i], n_queries) for kind, i in first.items()}
