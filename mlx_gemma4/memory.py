"""What a model needs in memory at a given context: weights, KV caches, and the transient peak of
one prefill chunk.

The KV bytes follow the caches' own growth rules (`cache.py`, mlx-lm's `KVCache`) over the
prefill schedule `generate_step` uses, so they equal the bytes the caches hold. The transient is
an upper estimate of what one chunk of `prefill_step_size` tokens allocates on top of them: the
widest layer's activations, the attention scores in the bounded blocks of `models/attention.py`,
the copy a growing full-attention cache makes, and the LM head on the last position only.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .cache import FullAttentionCache, QuantizedFullAttentionCache, SlidingWindowCache
from .checkpoint import read_config, resolve_model_path
from .config import ModelConfig, TextConfig
from .errors import MemoryModelError
from .generation import prefill_chunks
from .kv_quant import KVQuantization
from .models import attention as attention_module
from .models.gemma4 import Model
from .models.layers import QuantizedLinear, on_cpu
from .models.unified import model_for

__all__ = [
    "MemoryEstimate",
    "config_model",
    "config_weight_bytes",
    "estimate_memory",
    "kv_cache_bytes",
    "layer_kv_bytes",
    "model_for_estimate",
    "weight_bytes",
]

_FLOAT32 = 4
SLIDING_SPARE = 256  # `SlidingWindowCache`'s default spare positions, as make_cache builds it
_TOKEN_ID_ARRAYS = 4  # int32 / bool copies of the whole prompt (ids, placeholders, history)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a model needs for `batch` sequences of `context` tokens; `peak` is their sum."""

    context: int
    batch: int
    kv_precision: str
    weights: int
    kv_per_sequence: int
    kv_total: int
    activations: int  # the widest layers' arrays for one prefill chunk
    dequantized_weight: int  # the float copy of a quantized weight the CPU prefill makes
    attention_scores: int  # score blocks (and their mask) of one full-attention layer
    cache_growth: int  # a full-attention cache copied while it grows
    logits: int  # the LM head on the last position of each sequence
    prompt_ids: int  # the prompt's token-id arrays

    @property
    def prefill_transient(self) -> int:
        return (
            self.activations
            + self.dequantized_weight
            + self.attention_scores
            + self.cache_growth
            + self.logits
            + self.prompt_ids
        )

    @property
    def peak(self) -> int:
        return self.weights + self.kv_total + self.prefill_transient

    def breakdown(self) -> dict[str, str]:
        """Label -> human-readable size, in the order `gemma4 info --context` prints them."""
        return {
            "context": f"{self.context:,} tokens x batch {self.batch}",
            "KV precision": self.kv_precision,
            "weights": format_bytes(self.weights),
            "KV cache per sequence": format_bytes(self.kv_per_sequence),
            "KV cache total": format_bytes(self.kv_total),
            "prefill activations": format_bytes(self.activations),
            "dequantized weight": format_bytes(self.dequantized_weight),
            "attention scores": format_bytes(self.attention_scores),
            "cache growth copy": format_bytes(self.cache_growth),
            "logits (last position)": format_bytes(self.logits),
            "prompt token ids": format_bytes(self.prompt_ids),
            "predicted peak": format_bytes(self.peak),
        }


def format_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n} B"


# ----------------------------------------------------------------------------- weights


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every array a model holds (packed weights, scales, rotations, codebooks)."""
    return sum(p.nbytes for _, p in tree_flatten(model.parameters()))


def config_model(config: ModelConfig, dtype: mx.Dtype = mx.bfloat16) -> Model:
    """The model a checkpoint with this config would load as, in `dtype`, packed as its
    `quantization` entry says (every layer the entry's bits and group size allow).

    Built lazily: its arrays are never evaluated, so only their shapes cost anything.
    """
    model = model_for(config)
    model.set_dtype(dtype)
    quantization = config.quantization
    if quantization:
        group_size, bits = quantization.get("group_size", 64), quantization.get("bits", 4)
        mode = quantization.get("mode", "affine")

        def packable(_: str, module: nn.Module) -> bool:
            weight = getattr(module, "weight", None)
            return (
                hasattr(module, "to_quantized")
                and weight is not None
                and weight.shape[-1] % group_size == 0
            )

        nn.quantize(model, group_size, bits, mode=mode, class_predicate=packable)
    return model


def config_weight_bytes(config: ModelConfig, dtype: mx.Dtype = mx.bfloat16) -> int:
    """Bytes of the weights a checkpoint with this config would hold (see `config_model`)."""
    return weight_bytes(config_model(config, dtype))


def model_for_estimate(
    path_or_repo: str | os.PathLike, *, revision: str | None = None
) -> tuple[Model, bool]:
    """The model a checkpoint's memory is estimated on, and whether its weights were read.

    A local folder with weights is loaded (`load_model`: the estimate counts what it holds).
    A folder holding only config.json, or a Hub repo id (only its config.json is downloaded),
    gives the model that config describes in the dtype `load_model` would use (`config_model`:
    its arrays are never evaluated, only their shapes count).
    """
    from .loading import default_dtype, load_model, model_config

    local = os.path.exists(os.path.expanduser(path_or_repo))
    folder = resolve_model_path(path_or_repo, revision, patterns=["config.json"])
    if local and any(folder.glob("*.safetensors")):
        return load_model(folder), True
    model = config_model(model_config(read_config(folder), folder), default_dtype())
    model.path = folder
    return model, False


# ----------------------------------------------------------------------------- KV caches


def _prefill_schedule(context: int, step: int) -> list[int]:
    """Token counts fed to the caches: `generate_step`'s prefill chunks, then one at a time."""
    sizes = [end - start for start, end in prefill_chunks(context, step, [])]
    return sizes + [1] * (context - sum(sizes))


def _full_positions(schedule: Iterable[int], step: int, trims_to_offset: bool) -> int:
    """Positions a growing full-attention cache holds room for after `schedule`.

    mlx-lm's `KVCache` cuts a partly used block back to the offset before it appends
    (`trims_to_offset`); `QuantizedFullAttentionCache` always does."""
    capacity = offset = 0
    for n in schedule:
        if offset + n > capacity:
            grow = (n + step - 1) // step * step
            capacity = (offset if trims_to_offset or offset % step else capacity) + grow
        offset += n
    return capacity


def _sliding_positions(schedule: Iterable[int], window: int, spare: int, step: int) -> int:
    """Positions a `SlidingWindowCache` buffer holds after `schedule` (its `_make_room` rule)."""
    capacity = end = stored = 0
    for n in schedule:
        if capacity == 0 or end + n > capacity:
            retain = min(stored, window - 1 + spare)
            capacity, end, stored = retain + n + step, retain, retain
        end += n
        stored += n
    return capacity


def layer_kv_bytes(
    config: TextConfig,
    context: int,
    *,
    dtype: mx.Dtype = mx.float32,
    kv_quantization: KVQuantization | None = None,
    prefill_step_size: int = 2048,
) -> list[int]:
    """Bytes each KV-owning layer's cache holds after `context` tokens went through it.

    KV-shared layers own no cache; `attention_k_eq_v` full layers still store their values
    apart (normed differently from the keys). Quantized full layers store packed codes plus one
    float32 scale per position and head, for keys and values each.
    """
    schedule = _prefill_schedule(context, prefill_step_size)
    sliding = _sliding_positions(
        schedule, config.sliding_window, SLIDING_SPARE, SlidingWindowCache.step
    )
    if kv_quantization is None:
        full = _full_positions(schedule, FullAttentionCache.step, trims_to_offset=False)
    else:
        full = _full_positions(schedule, QuantizedFullAttentionCache.step, trims_to_offset=True)
    sizes = []
    for layer in range(config.first_kv_shared_layer):
        heads, head_dim = config.layer_kv_heads(layer), config.layer_head_dim(layer)
        if config.is_sliding(layer):
            sizes.append(sliding * heads * 2 * head_dim * dtype.size)
        elif kv_quantization is None:
            sizes.append(full * heads * 2 * head_dim * dtype.size)
        else:
            bits = kv_quantization.key_bits + kv_quantization.value_bits
            sizes.append(full * heads * (head_dim * bits // 8 + 2 * _FLOAT32))
    return sizes


def kv_cache_bytes(config: TextConfig, context: int, **kwargs) -> int:
    """Bytes the caches of one sequence hold after `context` tokens (`layer_kv_bytes`' options)."""
    return sum(layer_kv_bytes(config, context, **kwargs))


# ----------------------------------------------------------------------------- prefill transient


def _layer_activations(config: TextConfig, rows: int, itemsize: int) -> int:
    """Arrays alive at once for `rows` = batch x chunk tokens: residual stream and norms, two
    layers' queries / keys / values and MLP gate, up and product (and the experts' per-choice
    copies), plus the per-layer inputs of all layers, held for the whole chunk."""
    widest = 0
    for layer in range(config.first_kv_shared_layer):
        heads, head_dim = config.layer_kv_heads(layer), config.layer_head_dim(layer)
        attention = config.num_attention_heads * head_dim * 2 + heads * head_dim * 4
        mlp = 3 * config.layer_mlp_size(layer)
        if config.enable_moe_block:
            mlp += config.top_k_experts * (3 * config.moe_intermediate_size + config.hidden_size)
        widest = max(widest, attention + mlp)
    per_layer = 3 * config.num_hidden_layers * (config.hidden_size_per_layer_input or 0)
    # MLX may start a layer's attention while the previous layer's arrays are still alive
    return rows * itemsize * (4 * config.hidden_size + 2 * widest + per_layer)


def _dequantized_weight(model: Model, itemsize: int) -> int:
    """On the CPU a quantized linear applied to a chunk is dequantized first (`layers.
    QuantizedLinear`): the largest such float copy of a decoder weight."""
    if not on_cpu():
        return 0
    sizes = [
        module.weight.shape[0] * module.weight.shape[1] * 32 // module.bits * itemsize
        for _, module in model.language_model.named_modules()
        if isinstance(module, QuantizedLinear)
    ]
    return max(sizes, default=0)


def _prefill_attention_layers(config: TextConfig) -> range:
    """Layers whose attention runs over a whole prefill chunk.

    A chunk is evaluated only as far as the caches need it: the last KV-owning layer computes
    its keys and values but not its attention, and KV-shared layers do not run at all."""
    return range(max(0, config.first_kv_shared_layer - 1))


def _attention_scores(
    config: TextConfig, batch: int, chunk: int, context: int, quantized: bool, itemsize: int
) -> int:
    """The largest attention temporary of one layer: over a prefill chunk, or over the whole
    context for the single query of the last prompt token.

    CPU float: score blocks of at most `_MAX_SCORES` elements, with the masked scores, the
    softmax and its exponentials alive at once (four blocks), the chunk's causal mask twice
    (built, then sliced per block), and the cache cast to float32 when stored narrower.
    Quantized full layers: `QUERY_BLOCK` queries of scores at a time, likewise. A GPU's fused
    kernel keeps no scores for float caches.
    """
    heads = config.num_attention_heads
    last_query = 4 * batch * heads * context * _FLOAT32
    largest = last_query
    for layer in _prefill_attention_layers(config):
        sliding = config.is_sliding(layer)
        keys = min(context, config.sliding_window - 1 + chunk) if sliding else context
        if quantized and not sliding:
            rows = min(chunk, attention_module.QUERY_BLOCK)
            unpacked = attention_module.UNPACKED_BLOCK * _FLOAT32 * 8
        elif on_cpu():
            rows = min(chunk, max(1, attention_module._MAX_SCORES // (batch * heads * keys)))
            unpacked = 0
            if itemsize != _FLOAT32:
                kv_width = config.layer_kv_heads(layer) * config.layer_head_dim(layer)
                unpacked = batch * keys * kv_width * 2 * _FLOAT32
        else:
            continue
        scores = batch * heads * rows * keys * _FLOAT32
        largest = max(largest, 4 * scores + 2 * chunk * keys + unpacked)
    return largest


def estimate_memory(
    model: Model | ModelConfig,
    context: int,
    *,
    batch: int = 1,
    kv_quantization: KVQuantization | None = None,
    prefill_step_size: int = 2048,
    dtype: mx.Dtype | None = None,
) -> MemoryEstimate:
    """The memory `batch` sequences of `context` tokens need: a loaded `model` counts its own
    arrays; a `ModelConfig` counts the weights it describes in `dtype` (default bfloat16)."""
    for name, value in (
        ("context", context),
        ("batch", batch),
        ("prefill_step_size", prefill_step_size),
    ):
        if not isinstance(value, int) or value < 1:
            raise MemoryModelError(f"{name} must be a positive whole number, not {value!r}")
    if not isinstance(model, Model):
        model = config_model(model, dtype or mx.bfloat16)
    config, weights = model.config, weight_bytes(model)
    activation_dtype = model.language_model.norm.weight.dtype
    text = config.text_config
    if context > text.max_position_embeddings:
        raise MemoryModelError(
            f"context {context:,} exceeds the model's max_position_embeddings "
            f"({text.max_position_embeddings:,}); ask for at most that many tokens"
        )
    itemsize = activation_dtype.size
    kv_args = dict(
        dtype=activation_dtype,
        kv_quantization=kv_quantization,
        prefill_step_size=prefill_step_size,
    )
    per_layer = layer_kv_bytes(text, context, **kv_args)
    full_layers = [size for i, size in enumerate(per_layer) if not text.is_sliding(i)]
    chunk = min(prefill_step_size, max(1, context - 1))
    return MemoryEstimate(
        context=context,
        batch=batch,
        kv_precision=str(kv_quantization)
        if kv_quantization
        else str(activation_dtype).split(".")[-1],
        weights=weights,
        kv_per_sequence=sum(per_layer),
        kv_total=batch * sum(per_layer),
        activations=_layer_activations(text, batch * chunk, itemsize),
        dequantized_weight=_dequantized_weight(model, itemsize),
        attention_scores=_attention_scores(
            text, batch, chunk, context, kv_quantization is not None, itemsize
        ),
        cache_growth=batch * max(full_layers, default=0),
        logits=3 * batch * text.vocab_size * _FLOAT32,
        prompt_ids=_TOKEN_ID_ARRAYS * batch * context * _FLOAT32,
    )
