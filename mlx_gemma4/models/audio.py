"""The Gemma 4 audio tower: convolutional subsampling, Conformer blocks, output projection.

Input is transformers' layout: log-mel `input_features` [B, frames, 128] and
`input_features_mask` [B, frames] (True where a frame is real audio). Two stride-2 convolutions
turn four frames (40 ms) into one soft token; the Conformer blocks attend within chunks of
`attention_chunk_size` tokens over a short left context, with relative position keys.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..config import AudioConfig
from .activations import fast_glu, fast_silu, fast_tanh, softmax
from .layers import ClippableLinear, Linear, RMSNorm

# transformers builds these norms with the default eps rather than the config's
_DEFAULT_EPS = 1e-6
_SUBSAMPLING_LAYERS = 2


def soft_token_count(frames: int) -> int:
    """Soft tokens the tower emits for `frames` consecutive real mel frames.

    Each subsampling convolution (kernel 3, stride 2, padding 1) halves the length, rounding up.
    """
    for _ in range(_SUBSAMPLING_LAYERS):
        frames = (frames + 2 * 1 - 3) // 2 + 1
    return max(frames, 0)


def soft_token_counts(input_features_mask: np.ndarray | mx.array) -> list[int]:
    """Soft tokens per clip of a [B, frames] mask: its real frames among every fourth one.

    This is what the tower keeps, so it is the number of audio placeholders each clip needs.
    """
    stride = 2**_SUBSAMPLING_LAYERS
    mask = np.asarray(input_features_mask).astype(bool)
    return [int(n) for n in mask[:, ::stride].sum(axis=1)]


class SubsampleLayer(nn.Module):
    """Conv2d 3x3 stride 2 over (time, frequency), LayerNorm over channels, ReLU."""

    def __init__(self, in_channels: int, out_channels: int, eps: float):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1, bias=False)
        self.norm = nn.LayerNorm(out_channels, eps=eps, bias=False)

    def __call__(self, x: mx.array, mask: mx.array) -> tuple[mx.array, mx.array]:
        x = self.conv(x * mask[:, :, None, None].astype(x.dtype))
        return nn.relu(self.norm(x)), mask[:, ::2]


class SubsampleConvProjection(nn.Module):
    def __init__(self, config: AudioConfig):
        super().__init__()
        first, second = config.subsampling_conv_channels
        eps = config.rms_norm_eps
        self.layer0 = SubsampleLayer(1, first, eps)
        self.layer1 = SubsampleLayer(first, second, eps)
        # the reference sizes the projection as if the mel bins were `first`
        self.input_proj_linear = Linear((first // 4) * second, config.hidden_size, bias=False)

    def __call__(self, features: mx.array, mask: mx.array) -> tuple[mx.array, mx.array]:
        """[B, frames, mels] -> [B, tokens, hidden] and the tokens' validity mask."""
        x, mask = self.layer0(features[..., None], mask)
        x, mask = self.layer1(x, mask)
        batch, length = x.shape[:2]
        # channels-last flattening is (frequency, channel), the reference's order
        return self.input_proj_linear(x.reshape(batch, length, -1)), mask


class FeedForward(nn.Module):
    """Macaron half-step feed-forward: clip, norm, Linear x4, SiLU, Linear, clip, norm, scale."""

    def __init__(self, config: AudioConfig):
        super().__init__()
        hidden, clip = config.hidden_size, config.use_clipped_linears
        self.ffw_layer_1 = ClippableLinear(hidden, hidden * 4, clip)
        self.ffw_layer_2 = ClippableLinear(hidden * 4, hidden, clip)
        self.pre_layer_norm = RMSNorm(hidden, eps=_DEFAULT_EPS)
        self.post_layer_norm = RMSNorm(hidden, eps=_DEFAULT_EPS)
        self.bound = config.gradient_clipping
        self.residual_weight = config.residual_weight

    def __call__(self, x: mx.array) -> mx.array:
        h = self.pre_layer_norm(mx.clip(x, -self.bound, self.bound))
        h = self.ffw_layer_2(fast_silu(self.ffw_layer_1(h)))
        h = self.post_layer_norm(mx.clip(h, -self.bound, self.bound))
        return x + h * self.residual_weight


def relative_position_embeddings(config: AudioConfig) -> mx.array:
    """Sinusoids [positions, hidden] for relative distances context/2, ..., 1, 0 ([sin, cos])."""
    context = _context_size(config)
    n = config.hidden_size // 2
    increment = math.log(10_000.0) / max(n - 1, 1)
    inv_timescales = mx.exp(mx.arange(n, dtype=mx.float32) * -increment)
    angles = mx.arange(context // 2, -1, -1, dtype=mx.float32)[:, None] * inv_timescales
    return mx.concatenate([mx.sin(angles), mx.cos(angles)], axis=-1)


def _context_size(config: AudioConfig) -> int:
    past = config.attention_context_left - 1
    return config.attention_chunk_size + past + config.attention_context_right


def to_chunks(x: mx.array, chunk: int) -> mx.array:
    """[B, T, ...] -> [B, chunks, chunk, ...], zero-padded at the end."""
    n = -(-x.shape[1] // chunk)
    x = _pad_time(x, 0, n * chunk - x.shape[1])
    return x.reshape(x.shape[0], n, chunk, *x.shape[2:])


def chunk_contexts(x: mx.array, chunk: int, past: int, context: int) -> mx.array:
    """[B, T, ...] -> [B, chunks, context, ...]: for each chunk, `past` steps before its start
    and then `context - past` steps, zero outside the sequence (overlapping windows, no gather)."""
    n = -(-x.shape[1] // chunk)
    pieces = -(-context // chunk)
    total = (n + pieces - 1) * chunk
    x = _pad_time(x, past, total - past - x.shape[1])
    x = x.reshape(x.shape[0], n + pieces - 1, chunk, *x.shape[2:])
    windows = mx.concatenate([x[:, i : i + n] for i in range(pieces)], axis=2)
    return windows[:, :, :context]


def _pad_time(x: mx.array, before: int, after: int) -> mx.array:
    if before == 0 and after == 0:
        return x
    return mx.pad(x, [(0, 0), (before, after)] + [(0, 0)] * (x.ndim - 2))


def _relative_shift(x: mx.array, context: int) -> mx.array:
    """[..., W, P] scores per relative position -> [..., W, context] scores per window slot.

    Row i of the result is row i of the input shifted right by i slots (zeros elsewhere), the
    Transformer-XL skew done with one pad and two reshapes.
    """
    *lead, width, positions = x.shape
    x = mx.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, context + 1 - positions)])
    x = x.reshape(*lead, width * (context + 1))[..., : width * context]
    return x.reshape(*lead, width, context)


@mx.compile
def _capped_logits(logits: mx.array, allowed: mx.array, cap: mx.array, invalid: mx.array):
    return mx.where(allowed, fast_tanh(logits / cap) * cap, invalid)


class AudioAttention(nn.Module):
    """Chunked local self-attention with relative position keys, a learned per-dimension query
    scale and a tanh logit cap; each token sees itself and the tokens just before it."""

    def __init__(self, config: AudioConfig):
        super().__init__()
        hidden, clip = config.hidden_size, config.use_clipped_linears
        self.n_heads = config.num_attention_heads
        self.head_dim = hidden // self.n_heads
        self.chunk = config.attention_chunk_size
        self.past = config.attention_context_left - 1
        self.context = _context_size(config)
        self._cap = mx.array(config.attention_logit_cap, dtype=mx.float32)
        self._invalid = mx.array(config.attention_invalid_logits_value, dtype=mx.float32)
        # scales written in base 2 by the original; kept as the reference computes them
        self.q_scale = self.head_dim**-0.5 / math.log(2)
        self.k_scale = math.log(1 + math.e) / math.log(2)

        self.q_proj = ClippableLinear(hidden, hidden, clip)
        self.k_proj = ClippableLinear(hidden, hidden, clip)
        self.v_proj = ClippableLinear(hidden, hidden, clip)
        self.post = ClippableLinear(hidden, hidden, clip)
        self.relative_k_proj = Linear(hidden, hidden, bias=False)
        self.per_dim_scale = mx.zeros((self.head_dim,))

    def __call__(self, x: mx.array, positions: mx.array, allowed: mx.array) -> mx.array:
        """x [B, T, hidden]; positions [P, hidden]; allowed [B, 1, chunks, chunk, context]."""
        batch, length, _ = x.shape
        shape = (batch, length, self.n_heads, self.head_dim)
        scale = self.q_scale * nn.softplus(self.per_dim_scale.astype(mx.float32))
        q = self.q_proj(x).astype(mx.float32).reshape(shape) * scale
        k = self.k_proj(x).astype(mx.float32).reshape(shape) * self.k_scale
        v = self.v_proj(x).astype(mx.float32).reshape(shape)

        q = to_chunks(q, self.chunk).transpose(0, 3, 1, 2, 4)  # [B, H, n, W, D]
        k = chunk_contexts(k, self.chunk, self.past, self.context).transpose(0, 3, 1, 4, 2)
        v = chunk_contexts(v, self.chunk, self.past, self.context).transpose(0, 3, 1, 2, 4)
        n = q.shape[2]

        relative = self.relative_k_proj(positions.astype(x.dtype)).astype(mx.float32)
        relative = relative.reshape(-1, self.n_heads, self.head_dim).transpose(1, 2, 0)
        by_distance = q.reshape(batch, self.n_heads, n * self.chunk, -1) @ relative
        by_distance = by_distance.reshape(batch, self.n_heads, n, self.chunk, -1)
        logits = q @ k + _relative_shift(by_distance, self.context)

        weights = softmax(_capped_logits(logits, allowed, self._cap, self._invalid))
        out = (weights @ v).transpose(0, 2, 3, 1, 4).reshape(batch, n * self.chunk, -1)
        return self.post(out[:, :length].astype(x.dtype))


def attention_allowed(mask: mx.array, config: AudioConfig) -> mx.array:
    """[B, T] token validity -> [B, 1, chunks, chunk, context]: which window slots each query
    may attend to (real tokens at distance 0 .. past - 1 behind it, or within the right
    context ahead of it), as the reference's sliding-window mask blocked into windows."""
    chunk, past, future = (
        config.attention_chunk_size,
        config.attention_context_left - 1,
        config.attention_context_right,
    )
    context = _context_size(config)
    real = chunk_contexts(mask[..., None], chunk, past, context)[..., 0]  # [B, n, context]
    distance = mx.arange(chunk)[:, None] + past - mx.arange(context)[None, :]
    near = ((distance >= 0) & (distance < past)) | ((distance < 0) & (-distance < future))
    return (real[:, :, None, :] & near)[:, None]


class DepthwiseCausalConv(nn.Module):
    """Per-channel causal convolution over time; weight [channels, kernel, 1] as MLX stores
    conv weights. A sum of shifted products: much faster than a grouped conv on the CPU."""

    def __init__(self, channels: int, kernel: int):
        super().__init__()
        self.weight = mx.zeros((channels, kernel, 1))

    def __call__(self, x: mx.array) -> mx.array:
        kernel, length = self.weight.shape[1], x.shape[1]
        taps = self.weight[:, :, 0].T.astype(x.dtype)  # [kernel, channels]
        padded = _pad_time(x, kernel - 1, 0)
        out = padded[:, :length] * taps[0]
        for i in range(1, kernel):
            out = out + padded[:, i : i + length] * taps[i]
        return out


class LightConv(nn.Module):
    """Norm, Linear x2 with GLU, causal depthwise conv, clip, norm, SiLU, Linear, residual."""

    def __init__(self, config: AudioConfig):
        super().__init__()
        hidden, clip, eps = config.hidden_size, config.use_clipped_linears, config.rms_norm_eps
        self.linear_start = ClippableLinear(hidden, hidden * 2, clip)
        self.linear_end = ClippableLinear(hidden, hidden, clip)
        self.depthwise_conv1d = DepthwiseCausalConv(hidden, config.conv_kernel_size)
        self.pre_layer_norm = RMSNorm(hidden, eps=eps)
        self.conv_norm = RMSNorm(hidden, eps=eps)
        self.bound = config.gradient_clipping

    def __call__(self, x: mx.array) -> mx.array:
        h = fast_glu(self.linear_start(self.pre_layer_norm(x)))
        h = mx.clip(self.depthwise_conv1d(h), -self.bound, self.bound)
        return x + self.linear_end(fast_silu(self.conv_norm(h)))


class ConformerLayer(nn.Module):
    def __init__(self, config: AudioConfig):
        super().__init__()
        hidden = config.hidden_size
        self.feed_forward1 = FeedForward(config)
        self.self_attn = AudioAttention(config)
        self.lconv1d = LightConv(config)
        self.feed_forward2 = FeedForward(config)
        self.norm_pre_attn = RMSNorm(hidden, eps=_DEFAULT_EPS)
        self.norm_post_attn = RMSNorm(hidden, eps=_DEFAULT_EPS)
        self.norm_out = RMSNorm(hidden, eps=_DEFAULT_EPS)
        self.bound = config.gradient_clipping

    def _clip(self, x: mx.array) -> mx.array:
        return mx.clip(x, -self.bound, self.bound)

    def __call__(self, x: mx.array, positions: mx.array, allowed: mx.array) -> mx.array:
        x = self.feed_forward1(x)
        h = self.self_attn(self.norm_pre_attn(self._clip(x)), positions, allowed)
        x = x + self.norm_post_attn(self._clip(h))
        x = self.feed_forward2(self.lconv1d(x))
        return self.norm_out(self._clip(x))


class AudioModel(nn.Module):
    def __init__(self, config: AudioConfig):
        super().__init__()
        self.config = config
        self.subsample_conv_projection = SubsampleConvProjection(config)
        self.layers = [ConformerLayer(config) for _ in range(config.num_hidden_layers)]
        self.output_proj = Linear(config.hidden_size, config.output_proj_dims, bias=True)
        self._positions = relative_position_embeddings(config)

    @property
    def dtype(self) -> mx.Dtype:
        """The compute dtype (read off a convolution: linears may be stored quantized)."""
        return self.subsample_conv_projection.layer0.conv.weight.dtype

    def encode(self, features: mx.array, mask: mx.array) -> tuple[mx.array, mx.array]:
        """[B, frames, mels] and [B, frames] -> every token [B, tokens, out] and its validity."""
        dtype = self.dtype
        x, valid = self.subsample_conv_projection(features.astype(dtype), mask)
        allowed = attention_allowed(valid, self.config)
        positions = self._positions.astype(dtype)
        for layer in self.layers:
            x = layer(x, positions, allowed)
        return self.output_proj(x), valid

    def __call__(self, input_features: mx.array, input_features_mask: mx.array) -> mx.array:
        """The real soft tokens of every clip, in order, concatenated: [tokens, out].

        Each clip runs alone, cut after its last real frame. That is the reference's batched
        computation exactly: padding frames are zeroed before each convolution and never
        attended to, and the light convolution only looks back.
        """
        mask = np.asarray(input_features_mask).astype(bool)
        input_features = mx.array(input_features)  # numpy in, too
        if input_features.ndim != 3 or mask.shape != tuple(input_features.shape[:2]):
            raise ValueError(
                f"input_features must be [clips, frames, mels] with input_features_mask "
                f"[clips, frames]; got {tuple(input_features.shape)} and {mask.shape}"
            )
        mels = self.config.subsampling_conv_channels[0]
        if input_features.shape[2] != mels:
            raise ValueError(
                f"the audio tower takes {mels} mel bins per frame, got {input_features.shape[2]}"
            )
        clips = []
        for i in range(mask.shape[0]):
            real = np.flatnonzero(mask[i])
            if real.size == 0:
                continue
            end = int(real[-1]) + 1
            tokens, valid = self.encode(
                input_features[i : i + 1, :end], mx.array(mask[i : i + 1, :end])
            )
            keep = np.flatnonzero(np.array(valid[0]))
            clips.append(tokens[0] if keep.size == tokens.shape[1] else tokens[0][mx.array(keep)])
        if not clips:
            return mx.zeros((0, self.config.output_proj_dims), self.dtype)
        return mx.concatenate(clips, axis=0)
