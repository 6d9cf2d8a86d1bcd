"""The Gemma 4 vision tower: patch embedding, 2-D RoPE encoder, position pooling, embedder."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..config import VisionConfig
from ..errors import ImageError
from .activations import geglu
from .attention import attention
from .layers import ClippableLinear, Linear, RMSNorm, RMSNormNoScale


def axial_rope(x: mx.array, positions: mx.array, theta: float) -> mx.array:
    """Rotate the first half of each head by the patch's x, the second half by its y.

    x: [B, heads, N, head_dim]; positions: [B, N, 2]. Rotate-half layout within each half.
    """
    half = x.shape[-1] // 2
    inv_freq = 1.0 / (theta ** (mx.arange(0, half, 2, dtype=mx.float32) / half))
    parts = []
    for axis in range(2):
        angles = positions[..., axis, None].astype(mx.float32) * inv_freq  # [B, N, half/2]
        angles = mx.concatenate([angles, angles], axis=-1)[:, None]  # [B, 1, N, half]
        cos, sin = mx.cos(angles).astype(x.dtype), mx.sin(angles).astype(x.dtype)
        part = x[..., axis * half : (axis + 1) * half]
        rotated = mx.concatenate([-part[..., half // 2 :], part[..., : half // 2]], axis=-1)
        parts.append(part * cos + rotated * sin)
    return mx.concatenate(parts, axis=-1)


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        hidden, head_dim, clip = config.hidden_size, config.head_dim, config.use_clipped_linears
        self.n_heads, self.n_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.theta = config.rope_theta
        self.q_proj = ClippableLinear(hidden, self.n_heads * head_dim, clip)
        self.k_proj = ClippableLinear(hidden, self.n_kv_heads * head_dim, clip)
        self.v_proj = ClippableLinear(hidden, self.n_kv_heads * head_dim, clip)
        self.o_proj = ClippableLinear(self.n_heads * head_dim, hidden, clip)
        self.q_norm = RMSNorm(head_dim, eps=config.rms_norm_eps)
        self.k_norm = RMSNorm(head_dim, eps=config.rms_norm_eps)
        self.v_norm = RMSNormNoScale(config.rms_norm_eps)

    def __call__(self, x: mx.array, positions: mx.array) -> mx.array:
        batch, length, _ = x.shape

        def heads(projection, norm, n):
            return norm(projection(x).reshape(batch, length, n, -1)).transpose(0, 2, 1, 3)

        queries = axial_rope(heads(self.q_proj, self.q_norm, self.n_heads), positions, self.theta)
        keys = axial_rope(heads(self.k_proj, self.k_norm, self.n_kv_heads), positions, self.theta)
        values = heads(self.v_proj, self.v_norm, self.n_kv_heads)
        out = attention(queries, keys, values, scale=1.0)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(batch, length, -1))


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        hidden, inner, clip = (
            config.hidden_size,
            config.intermediate_size,
            config.use_clipped_linears,
        )
        self.gate_proj = ClippableLinear(hidden, inner, clip)
        self.up_proj = ClippableLinear(hidden, inner, clip)
        self.down_proj = ClippableLinear(inner, hidden, clip)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(geglu(self.gate_proj(x), self.up_proj(x)))


class VisionEncoderLayer(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = VisionAttention(config)
        self.mlp = VisionMLP(config)
        self.input_layernorm = RMSNorm(hidden, eps=eps)
        self.post_attention_layernorm = RMSNorm(hidden, eps=eps)
        self.pre_feedforward_layernorm = RMSNorm(hidden, eps=eps)
        self.post_feedforward_layernorm = RMSNorm(hidden, eps=eps)

    def __call__(self, x: mx.array, positions: mx.array) -> mx.array:
        h = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), positions))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class VisionEncoder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layers = [VisionEncoderLayer(config) for _ in range(config.num_hidden_layers)]


class PatchEmbedder(nn.Module):
    """Patches (flattened in (p, p, C) order, pixels in [0, 1]) plus learned x and y positions."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.input_proj = Linear(3 * config.patch_size**2, config.hidden_size, bias=False)
        self.position_embedding_table = mx.ones(
            (2, config.position_embedding_size, config.hidden_size)
        )

    def __call__(self, pixels: mx.array, positions: mx.array) -> mx.array:
        # the compute dtype is the position table's: the projection may be stored quantized
        table = self.position_embedding_table
        h = self.input_proj((2 * (pixels - 0.5)).astype(table.dtype))
        return h + (table[0][positions[..., 0]] + table[1][positions[..., 1]]).astype(h.dtype)


class VisionPooler(nn.Module):
    """Average k x k blocks of patches by position, then scale by sqrt(hidden), in float32
    (the scaled values may pass the float16 range)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.kernel = config.pooling_kernel_size
        self.root_hidden = config.hidden_size**0.5

    def __call__(self, h: mx.array, positions: mx.array, length: int) -> tuple[mx.array, mx.array]:
        """[B, n, H] patches of one layout -> [B, length, H] float32 soft tokens, valid mask."""
        k = self.kernel
        columns = positions[..., 0].max(axis=-1, keepdims=True) + 1
        block = positions[..., 0] // k + (columns // k) * (positions[..., 1] // k)
        weights = (block[..., None] == mx.arange(length)).astype(mx.float32) / (k * k)
        pooled = weights.swapaxes(1, 2) @ h.astype(mx.float32)
        return pooled * self.root_hidden, weights.max(axis=1) > 0


class VisionModel(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.patch_embedder = PatchEmbedder(config)
        self.encoder = VisionEncoder(config)
        self.pooler = VisionPooler(config)
        if config.standardize:
            self.std_bias = mx.zeros((config.hidden_size,))
            self.std_scale = mx.ones((config.hidden_size,))

    def encode(self, pixels: mx.array, positions: mx.array, length: int) -> mx.array:
        """Images of one patch layout, real patches only [B, n, 3 p^2] -> soft tokens
        [B * tokens, hidden].

        Padding patches are left out rather than masked: the reference masks them as keys and
        discards their outputs, so this is the same computation, and unmasked attention takes
        the faster kernel.
        """
        h = self.patch_embedder(pixels, positions)
        for layer in self.encoder.layers:
            h = layer(h, positions)
        pooled, valid = self.pooler(h, positions, length)
        keep = mx.array(np.flatnonzero(np.array(valid[0])))
        pooled = pooled[:, keep].reshape(-1, h.shape[-1])
        if self.config.standardize:
            pooled = (pooled - self.std_bias.astype(mx.float32)) * self.std_scale.astype(mx.float32)
        return pooled.astype(h.dtype)

    def __call__(self, pixel_values: mx.array, positions: mx.array) -> mx.array:
        """[B, patches, 3 p^2] pixels and [B, patches, 2] (x, y) positions (-1: padding)
        -> the soft tokens of every image, padding removed, concatenated: [tokens, hidden].

        Consecutive images with the same patch layout (a video's frames) are encoded together.
        """
        length = pixel_values.shape[1] // self.config.pooling_kernel_size**2
        layouts = np.array(positions)
        # an index past the learned position table would read out of bounds, silently
        if layouts.max(initial=-1) >= self.config.position_embedding_size:
            raise ImageError(
                f"an image is {layouts.max() + 1} patches along one side, more than this "
                f"checkpoint's position table ({self.config.position_embedding_size}); give a "
                "less elongated image or a smaller soft-token budget"
            )
        images, start = [], 0
        while start < len(layouts):
            end = start + 1
            while end < len(layouts) and np.array_equal(layouts[end], layouts[start]):
                end += 1
            patches = mx.array(np.flatnonzero((layouts[start] >= 0).all(axis=-1)))
            images.append(
                self.encode(pixel_values[start:end, patches], positions[start:end, patches], length)
            )
            start = end
        return mx.concatenate(images, axis=0)


class MultimodalEmbedder(nn.Module):
    """Soft tokens of a tower -> the text model's embedding space."""

    def __init__(self, tower_size: int, text_size: int, eps: float):
        super().__init__()
        self.embedding_pre_projection_norm = RMSNormNoScale(eps)
        self.embedding_projection = Linear(tower_size, text_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.embedding_projection(self.embedding_pre_projection_norm(x))
