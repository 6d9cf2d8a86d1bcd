"""Quantized KV caches: memory and decode speed at long contexts, float against rotated-quantized.

    python benchmarks/kv_cache.py [--contexts 2048,8192,32768] [--decode 16] [--rounds 2]
                                  [--layers 5] [--shared 2] [--bundled-blas]

On an E2B-shaped checkpoint (real layer shapes, few layers) every cache is filled to the
context with random keys and values of the model's shapes: a decode step's cost does not
depend on their values, and prefilling 32K tokens takes minutes per setting on a CPU. The
quantized caches store those same keys and values through their own rotation and
quantization. Each setting then decodes greedily through its library's own generation loop;
rounds go round-robin over the settings and each figure is the median step over all rounds
(robust to the bursts of load that shared machines have). mlx-lm runs its
gemma4 model with its QuantizedKVCache (one width for keys and values, no rotation) in place
of the full-attention caches, as its `kv_bits` option does. KV bytes count the full-attention
layers' caches (sliding-window caches stay float and are the same in every setting). Two more
tables: one full-attention layer's decode step alone, and the attention error of both
libraries' quantized caches on LLM-like keys and values.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time

from common import (
    base_parser,
    e2b_shaped_checkpoint,
    load_mlx_lm,
    load_ours,
    parse,
    print_table,
)

# (label, key bits, value bits); None: float
SETTINGS = [("float", None, None), ("8-bit", 8, 8), ("4-bit", 4, 4), ("K8 / V4", 8, 4)]
MLX_LM_SETTINGS = [("float", None), ("8-bit", 8), ("4-bit", 4)]


def arguments() -> tuple[argparse.Namespace, str]:
    parser = base_parser(rounds=2)
    parser.add_argument("--contexts", default="2048,8192,32768", help="comma-separated")
    parser.add_argument("--decode", type=int, default=16, help="timed decode steps")
    parser.add_argument("--shared", type=int, default=2, help="KV-shared layers among them")
    parser.add_argument("--no-mlx-lm", action="store_true", help="skip the mlx-lm comparison")
    return parse(parser)


def random_contents(config, context: int) -> list[tuple]:
    """Random keys and values for each KV-owning layer: a full window, or the whole context."""
    import mlx.core as mx

    contents = []
    for layer in range(config.first_kv_shared_layer):
        length = min(config.sliding_window, context) if config.is_sliding(layer) else context
        shape = (1, config.layer_kv_heads(layer), length, config.layer_head_dim(layer))
        keys, values = mx.random.normal(shape), mx.random.normal(shape)
        mx.eval(keys, values)
        contents.append((keys, values))
    return contents


def our_caches(model, contents, context: int, key_bits, value_bits) -> list:
    import mlx.core as mx

    from mlx_gemma4.cache import QuantizedFullAttentionCache, SlidingWindowCache
    from mlx_gemma4.kv_quant import KVQuantization

    setting = None if key_bits is None else KVQuantization(key_bits, value_bits)
    caches = model.make_cache(setting)
    for cache, (keys, values) in zip(caches, contents, strict=True):
        if isinstance(cache, QuantizedFullAttentionCache):
            for start in range(0, context, 4096):
                part = slice(start, start + 4096)
                cache.update_and_fetch(keys[:, :, part], values[:, :, part])
        else:
            cache.state = (keys, values)
        if isinstance(cache, SlidingWindowCache):
            cache.meta_state = (cache.window, cache.spare, context, context - keys.shape[2])
    mx.eval([c.state for c in caches])
    return caches


def mlx_lm_caches(model, contents, context: int, bits) -> list:
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache, RotatingKVCache

    caches = model.make_cache()
    for i, (cache, (keys, values)) in enumerate(zip(caches, contents, strict=True)):
        if isinstance(cache, RotatingKVCache):
            cache.state = (keys, values, context, cache.keep, cache.max_size, keys.shape[2])
        else:
            cache.state = (keys, values, context)
            if bits is not None and isinstance(cache, KVCache):
                caches[i] = cache.to_quantized(group_size=64, bits=bits)
    mx.eval([c.keys for c in caches], [c.values for c in caches])
    return caches


def full_attention_bytes(caches) -> int:
    from mlx_lm.models.cache import RotatingKVCache

    from mlx_gemma4.cache import SlidingWindowCache

    return sum(c.nbytes for c in caches if not isinstance(c, SlidingWindowCache | RotatingKVCache))


def decode_ours(model, caches, n: int) -> list[float]:
    import mlx.core as mx

    from mlx_gemma4 import PromptCache
    from mlx_gemma4.generation import PromptInputs, generate_step

    prompt_cache = PromptCache(model)
    prompt_cache.cache = caches
    inputs = PromptInputs([7], mx.array([[7]]))
    greedy = lambda x: mx.argmax(x, -1)  # noqa: E731
    steps = generate_step(model, [7], inputs, prompt_cache, greedy, [], normalize=False)
    return [time.perf_counter() for _, _ in zip(steps, range(n + 1), strict=False)]


def decode_mlx_lm(model, caches, n: int) -> list[float]:
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    steps = generate_step(mx.array([7]), model, prompt_cache=caches, max_tokens=n + 1)
    return [time.perf_counter() for _ in steps]


def step_intervals(stamps: list[float]) -> list[float]:
    return [later - earlier for earlier, later in itertools.pairwise(stamps)]


def attention_step_times(config, contexts: list[int], steps: int, rounds: int) -> list[list]:
    """One full-attention layer's decode step (store one position, attend) in isolation:
    float (our attention, and MLX's fused kernel that the peers call), ours quantized, and
    mlx-lm's quantized attention (no rotation) at the same bits."""
    import mlx.core as mx
    from mlx_lm.models.base import quantized_scaled_dot_product_attention
    from mlx_lm.models.cache import QuantizedKVCache

    from mlx_gemma4.cache import FullAttentionCache, QuantizedFullAttentionCache
    from mlx_gemma4.kv_quant import KVQuantization
    from mlx_gemma4.models.attention import attention as float_attention
    from mlx_gemma4.models.attention import quantized_attention as ours

    layer = config.layer_types.index("full_attention")
    heads, kv_heads = config.num_attention_heads, config.layer_kv_heads(layer)
    head_dim = config.layer_head_dim(layer)

    def step_float(cache, q, k):
        return float_attention(q, *cache.update_and_fetch(k, k), scale=1.0)

    def step_fused(cache, q, k):
        return mx.fast.scaled_dot_product_attention(q, *cache.update_and_fetch(k, k), scale=1.0)

    def step_ours(cache, q, k):
        return ours(q, cache.update_and_fetch(k, k), scale=1.0)

    def step_mlx_lm(cache, q, k):
        keys, values = cache.update_and_fetch(k, k)
        return quantized_scaled_dot_product_attention(
            q, keys, values, scale=1.0, mask=None, group_size=64, bits=cache.bits
        )

    variants = [
        ("float", FullAttentionCache, step_float),
        ("float, mx.fast kernel", FullAttentionCache, step_fused),
    ]
    for bits in (8, 4):
        variants.append(
            (
                f"ours {bits}-bit",
                lambda b=bits: QuantizedFullAttentionCache(KVQuantization(b, b)),
                step_ours,
            )
        )
        variants.append((f"mlx-lm {bits}-bit", lambda b=bits: QuantizedKVCache(64, b), step_mlx_lm))
    rows = []
    for context in contexts:
        shape = (1, kv_heads, context, head_dim)
        keys, values = mx.random.normal(shape), mx.random.normal(shape)
        best = {}
        for _ in range(rounds):
            for name, make, step in variants:
                cache = make()
                cache.update_and_fetch(keys, values)
                q, k = (
                    mx.random.normal((1, heads, 1, head_dim)),
                    mx.random.normal(shape[:2] + (1, head_dim)),
                )
                mx.eval(step(cache, q, k))
                start = time.perf_counter()
                for _ in range(steps):
                    mx.eval(step(cache, q, k))
                best[name] = min(
                    best.get(name, float("inf")), (time.perf_counter() - start) / steps
                )
        rows += [
            [context, name, f"{best[name] * 1e3:.1f}", f"{best['float'] / best[name]:.2f}x"]
            for name, _, _ in variants
        ]
    return rows


def attention_quality(config, context: int = 2048) -> list[list]:
    """Attention-output error against float attention, and stored bits per element, of one
    full-attention layer's cache holding LLM-like keys and values: per-position norms that vary,
    and a few outlier channels (20x in keys, 5x in values), as real models' K/V have. Ours
    (rotation, one scale per vector) beside mlx-lm's QuantizedKVCache (group 64, no rotation)."""
    import mlx.core as mx
    import numpy as np
    from mlx_lm.models.base import quantized_scaled_dot_product_attention
    from mlx_lm.models.cache import QuantizedKVCache

    from mlx_gemma4.cache import QuantizedFullAttentionCache
    from mlx_gemma4.kv_quant import KVQuantization
    from mlx_gemma4.models.attention import quantized_attention as ours

    layer = config.layer_types.index("full_attention")
    heads, kv_heads = config.num_attention_heads, config.layer_kv_heads(layer)
    head_dim = config.layer_head_dim(layer)
    rng = np.random.default_rng(0)

    def llm_like(outlier_gain: float) -> mx.array:
        x = rng.normal(size=(1, kv_heads, context, head_dim))
        x[..., rng.choice(head_dim, 6, replace=False)] *= outlier_gain
        return mx.array(x * rng.lognormal(0, 0.3, (1, kv_heads, context, 1)), dtype=mx.float32)

    keys, values = llm_like(20.0), llm_like(5.0)
    queries = mx.array(rng.normal(size=(1, heads, 16, head_dim)), dtype=mx.float32)
    queries = queries * 3 / mx.sqrt(mx.mean(mx.square(queries @ keys.swapaxes(-1, -2))))
    reference = mx.fast.scaled_dot_product_attention(queries, keys, values, scale=1.0)

    def error(out: mx.array) -> str:
        return f"{(mx.linalg.norm(out - reference) / mx.linalg.norm(reference)).item():.4f}"

    rows = []
    for bits in (8, 6, 4, 3, 2):
        cache = QuantizedFullAttentionCache(KVQuantization(bits, bits))
        out = ours(queries, cache.update_and_fetch(keys, values), scale=1.0)
        row = [bits, f"{cache.nbytes * 8 / (2 * keys.size):.2f}", error(out)]
        if 32 % bits:  # mlx-lm's QuantizedKVCache sizes its buffers for widths dividing 32
            rows.append(row + ["-", "not supported"])
            continue
        peer = QuantizedKVCache(64, bits)
        quantized_keys, quantized_values = peer.update_and_fetch(keys, values)
        peer_out = quantized_scaled_dot_product_attention(
            queries,
            quantized_keys,
            quantized_values,
            scale=1.0,
            mask=None,
            group_size=64,
            bits=bits,
        )
        rows.append(row + [f"{peer.nbytes * 8 / (2 * keys.size):.2f}", error(peer_out)])
    return rows


def main() -> None:
    args, blas = arguments()
    import mlx.core as mx

    contexts = [int(c) for c in args.contexts.split(",")]
    folder = e2b_shaped_checkpoint(args.layers, args.shared)
    ours = load_ours(folder)
    config = ours.config.text_config
    peer = None if args.no_mlx_lm else load_mlx_lm(folder)

    runs = [("mlx-gemma4", label, kb, vb) for label, kb, vb in SETTINGS]
    if peer is not None:
        runs += [("mlx-lm", label, bits, bits) for label, bits in MLX_LM_SETTINGS]
    steps: dict[tuple, list[float]] = {}
    memory: dict[tuple, int] = {}
    failures: dict[tuple, str] = {}
    for context in contexts:
        contents = random_contents(config, context)
        for _ in range(args.rounds):
            for library, label, key_bits, value_bits in runs:
                key = (context, library, label)
                if key in failures:
                    continue
                if library == "mlx-gemma4":
                    caches = our_caches(ours, contents, context, key_bits, value_bits)
                    decode = decode_ours
                    model = ours
                else:
                    caches = mlx_lm_caches(peer, contents, context, key_bits)
                    decode, model = decode_mlx_lm, peer
                memory[key] = full_attention_bytes(caches)
                try:
                    intervals = step_intervals(decode(model, caches, args.decode))
                except Exception as e:  # mlx-lm's KV-shared layers cannot read quantized K/V
                    failures[key] = f"fails: {type(e).__name__}: {str(e).splitlines()[0][:60]}"
                    continue
                steps.setdefault(key, []).extend(intervals)
                tps = 1 / statistics.median(intervals)
                print(f"{context} {library} {label}: {tps:.2f} tok/s", file=sys.stderr)
                del caches
                mx.clear_cache()
        del contents

    step = {key: statistics.median(intervals) for key, intervals in steps.items()}
    rows = []
    for context in contexts:
        for library, label, _, _ in runs:
            key = (context, library, label)
            baseline = step.get((context, library, "float"))
            if key in failures:
                rows.append([context, library, label, f"{memory[key] / 2**20:.1f}", "-", "-"])
                rows[-1][-1] = failures[key]
                continue
            tps = 1 / step[key]
            ratio = f"{baseline / step[key]:.2f}x" if baseline else "-"
            rows.append(
                [context, library, label, f"{memory[key] / 2**20:.1f}", f"{tps:.2f}", ratio]
            )
    attention = attention_step_times(config, contexts, args.decode, args.rounds)
    quality = attention_quality(config)
    layers = f"{args.layers} layers, {args.shared} KV-shared"
    print_table(
        f"KV cache at long contexts (E2B-shaped, {layers}; float32; {blas}; "
        f"median step of {args.rounds} rounds of {args.decode} decode steps)",
        ["context", "library", "KV cache", "full-attn KV MiB", "decode tok/s", "vs float"],
        rows,
    )
    print_table(
        f"One full-attention layer's decode step alone ({config.num_attention_heads} heads, "
        f"head dim {config.layer_head_dim(config.layer_types.index('full_attention'))}; "
        "store one position, then attend)",
        ["context", "attention", "ms / step", "vs float"],
        attention,
    )
    print_table(
        "Attention error against float on LLM-like keys and values (2K positions; relative "
        "Frobenius error of the output; bits per element with scales)",
        ["bits", "ours bits/elem", "ours error", "mlx-lm bits/elem", "mlx-lm error"],
        quality,
    )


if __name__ == "__main__":
    main()
