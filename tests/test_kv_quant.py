"""The rotated, quantized KV cache of full-attention layers: kernel path, error, wiring, files."""

from __future__ import annotations

import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import first_logits, gemma4_command, relative_error, to_numpy

import mlx_gemma4.kv_quant as kv_quant_module
import mlx_gemma4.models.attention as attention_module
import mlx_gemma4.models.text as text_module
from mlx_gemma4 import PromptCache, load, load_model, stream_generate
from mlx_gemma4.cache import FullAttentionCache, QuantizedFullAttentionCache, SlidingWindowCache
from mlx_gemma4.kv_quant import GAUSSIAN_STEP, KVQuantization, KVQuantizationError, quantize_vectors
from mlx_gemma4.models.attention import quantized_attention
from mlx_gemma4.packing import AFFINE_BITS, pack_codes


def random_kv(seed: int, length: int, heads: int = 4, kv_heads: int = 2, head_dim: int = 64):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(1, heads, length, head_dim)) / head_dim**0.25
    k = rng.normal(size=(1, kv_heads, length, head_dim)) / head_dim**0.25
    v = rng.normal(size=(1, kv_heads, length, head_dim))
    return (mx.array(a, dtype=mx.float32) for a in (q, k, v))


def float_attention(q, k, v, mask="causal"):
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=mask)


def fill(cache, k, v, chunks):
    """Feed `k`, `v` in chunks; return the last fetch."""
    start = 0
    for n in chunks:
        kv = cache.update_and_fetch(k[:, :, start : start + n], v[:, :, start : start + n])
        start += n
    return kv


@pytest.mark.parametrize("bits", AFFINE_BITS)
def test_codes_are_packed_as_mlx_reads_them(bits):
    codes = np.random.default_rng(bits).integers(0, 2**bits, (3, 128))
    packed = pack_codes(mx.array(codes, dtype=mx.uint32), bits)
    assert packed.dtype == mx.uint32 and packed.shape == (3, 128 * bits // 32)
    unit = dict(scales=mx.ones((3, 2)), biases=mx.zeros((3, 2)), group_size=64, bits=bits)
    np.testing.assert_array_equal(to_numpy(mx.dequantize(packed, **unit)), codes)


def reconstruct(x: np.ndarray, step: np.ndarray | float, bits: int) -> np.ndarray:
    """The stored quantizer's levels for `x`: (c - center) * step."""
    codes = np.clip(np.floor(x / step) + 2 ** (bits - 1), 0, 2**bits - 1)
    return (codes - (2**bits - 1) / 2) * step


def gaussian_mse(step: float, bits: int) -> float:
    """Mean squared error of the stored quantizer on N(0, 1)."""
    x = np.linspace(-12, 12, 480_001)
    density = np.exp(-(x**2) / 2) / np.sqrt(2 * np.pi)
    return float(((x - reconstruct(x, step, bits)) ** 2 * density).sum() * (x[1] - x[0]))


@pytest.mark.parametrize("bits", AFFINE_BITS)
def test_gaussian_steps_minimize_the_squared_error(bits):
    step = GAUSSIAN_STEP[bits]
    assert gaussian_mse(step, bits) < min(gaussian_mse(step * f, bits) for f in (0.99, 1.01))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_each_vector_takes_the_better_of_the_gaussian_and_the_unclipped_step(bits):
    rng = np.random.default_rng(bits)
    x = rng.normal(size=(256, 512)) * rng.uniform(0.1, 10, (256, 1))
    codes, scales = quantize_vectors(mx.array(x, dtype=mx.float32), bits)
    assert scales.shape == (256, 1) and scales.dtype == mx.float32
    center = (2**bits - 1) / 2
    unit = dict(group_size=128, bits=bits)
    restored = mx.dequantize(codes, scales * mx.ones((256, 4)), -center * scales, **unit)
    error = ((to_numpy(restored) - x) ** 2).sum(1)

    rms, peak = np.sqrt((x**2).mean(1, keepdims=True)), np.abs(x).max(1, keepdims=True)
    candidates = [GAUSSIAN_STEP[bits] * rms, peak / center]
    candidate_errors = [((reconstruct(x, s, bits) - x) ** 2).sum(1) for s in candidates]
    np.testing.assert_allclose(error, np.minimum(*candidate_errors), rtol=1e-3)
    # Gaussian vectors of 512 clip their rare tails at 2 and 4 bits, keep them at 8
    gaussian_share = (candidate_errors[0] < candidate_errors[1]).mean()
    assert gaussian_share > 0.9 if bits < 8 else gaussian_share < 0.1
    relative = error / (x**2).sum(1)
    assert relative.mean() < 1.05 * gaussian_mse(GAUSSIAN_STEP[bits], bits)


@pytest.mark.parametrize("path", ["packed", "unpacked"])
@pytest.mark.parametrize("bits", [(8, 8), (4, 2), (3, 6)])
def test_kernel_path_is_exact_for_the_stored_keys_and_values(bits, path, monkeypatch):
    """Scores and output equal float attention on the cache's dequantization, both from the
    packed arrays (`quantized_matmul`, the GPU path) and from blocks unpacked straight from the
    packed bytes (the CPU path; 2-, 4- and 8-bit codes by byte planes, 3 and 6 bits whole).
    Queries here come 4 at a time, as a long prefill chunk's do 512 at a time, and the CPU path
    unpacks 32 positions at a time."""
    monkeypatch.setattr(
        attention_module, "QUERY_BLOCK", 4 if bits == (4, 2) else attention_module.QUERY_BLOCK
    )
    monkeypatch.setattr(attention_module, "UNPACKED_BLOCK", 32 * 2 * 64)
    monkeypatch.setattr(attention_module, "on_cpu", lambda: path == "unpacked")
    q, k, v = random_kv(0, 300)  # past one 256-position growth step
    cache = QuantizedFullAttentionCache(KVQuantization(*bits))
    kv = fill(cache, k, v, [290, 1, 9])
    assert cache.offset == 300 and cache.keys[0].shape[2] == 512
    stored_k, stored_v = kv.dequantize()
    queries = q[:, :, -9:]
    boolean = mx.array(np.random.default_rng(1).random((1, 1, 9, 300)) > 0.3)
    for mask in ("causal", None, boolean, mx.where(boolean, 0.0, -1e9)):
        ours = quantized_attention(queries, kv, scale=1.0, mask=mask)
        reference = float_attention(queries, stored_k, stored_v, mask)
        assert relative_error(to_numpy(ours), to_numpy(reference)) < 1e-5


def attention_error(key_bits: int, value_bits: int, seed: int = 0) -> float:
    q, k, v = random_kv(seed, 64)
    kv = fill(QuantizedFullAttentionCache(KVQuantization(key_bits, value_bits)), k, v, [64])
    ours = quantized_attention(q, kv, scale=1.0, mask="causal")
    return relative_error(to_numpy(ours), to_numpy(float_attention(q, k, v)))


def test_error_shrinks_with_bits_and_key_and_value_widths_are_independent():
    errors = {bits: attention_error(bits, bits) for bits in (8, 6, 4, 2)}
    assert errors[8] < errors[6] < errors[4] < errors[2]
    assert errors[8] < 0.01 and errors[4] < 0.15

    q, k, v = random_kv(0, 64)
    stored = {}
    for bits in [(8, 2), (8, 8), (2, 2)]:
        cache = QuantizedFullAttentionCache(KVQuantization(*bits))
        stored[bits] = [to_numpy(a) for a in fill(cache, k, v, [64]).dequantize()]
    np.testing.assert_array_equal(stored[8, 2][0], stored[8, 8][0])  # keys: key bits only
    np.testing.assert_array_equal(stored[8, 2][1], stored[2, 2][1])  # values: value bits only
    assert errors[8] < attention_error(8, 2) and errors[8] < attention_error(2, 8)


def test_rotation_spreads_outlier_channels_and_lowers_the_key_error():
    rng = np.random.default_rng(0)
    keys = rng.normal(size=(1, 2, 128, 128))
    keys[..., [3, 70, 101]] *= 25.0  # a few outlier channels, as real models' keys have
    keys = mx.array(keys, dtype=mx.float32)
    kv = fill(QuantizedFullAttentionCache(KVQuantization(4, 4)), keys, keys, [128])
    rotated = to_numpy(kv.dequantize()[0])
    plain = to_numpy(
        mx.dequantize(*mx.quantize(keys, group_size=64, bits=4), group_size=64, bits=4)
    )
    reference = to_numpy(keys)

    def mse(x):
        return float(((x - reference) ** 2).mean() / (reference**2).mean())

    assert mse(rotated) < 0.5 * mse(plain)


def test_bad_settings_are_refused_in_one_line():
    assert KVQuantization.from_bits() is None
    assert KVQuantization.from_bits(4, value_bits=8) == KVQuantization(4, 8)
    with pytest.raises(KVQuantizationError, match="one of 2, 3, 4, 5, 6, 8"):
        KVQuantization.from_bits(7)
    with pytest.raises(KVQuantizationError, match="both key and value bits"):
        KVQuantization.from_bits(key_bits=4)
    with pytest.raises(KVQuantizationError, match="head dimension 48: it is not a multiple of 32"):
        quantize_vectors(mx.zeros((2, 48)), 4)


# --------------------------------------------------------------------------- the model


def run_model(model, ids: mx.array, kv_quantization, prefill: int) -> np.ndarray:
    """Prefill, then decode one token at a time; the logits of every position."""
    cache = model.make_cache(kv_quantization)
    outs = [model.logits(model.language_model(ids[:, :prefill], cache))]
    for t in range(prefill, ids.shape[1]):
        outs.append(model.logits(model.language_model(ids[:, t : t + 1], cache)))
    return to_numpy(mx.concatenate(outs, axis=1))


@pytest.mark.parametrize("variant", ["ple_kv_shared", "dense"])
def test_model_with_quantized_kv_tracks_the_float_cache(tiny, token_ids, monkeypatch, variant):
    model = load_model(tiny(variant)[0])
    config = model.config.text_config
    ids = mx.array(token_ids(1, 40))  # prefill 30, decode 10: well past the 8-token window
    reference = run_model(model, ids, None, prefill=30)

    calls = []
    monkeypatch.setattr(
        text_module,
        "quantized_attention",
        lambda *a, **k: calls.append(1) or quantized_attention(*a, **k),
    )
    errors = {
        bits: relative_error(run_model(model, ids, KVQuantization(bits, bits), 30), reference)
        for bits in (8, 4)
    }
    # measured: ple_kv_shared 0.025 / 0.21, dense 0.036 / 0.40 (tiny random models are touchy)
    assert errors[8] < 0.05 and errors[8] < errors[4]
    # every full-attention layer attends through the quantized form, KV-shared ones included
    full_layers = config.layer_types.count("full_attention")
    assert len(calls) == 2 * 11 * full_layers

    caches = model.make_cache(KVQuantization(8, 8))
    assert len(caches) == config.first_kv_shared_layer
    for layer, cache in enumerate(caches):
        expected = SlidingWindowCache if config.is_sliding(layer) else QuantizedFullAttentionCache
        assert type(cache) is expected
    assert FullAttentionCache in {type(c) for c in model.make_cache()}


def test_trim_and_prompt_cache_reuse_match_a_fresh_quantized_run(chat_checkpoint):
    model, processor = load(chat_checkpoint()[0])
    setting = KVQuantization(8, 4)
    shared = [2, *np.random.default_rng(0).integers(5, 90, 40).tolist()]
    cache = PromptCache(model, setting)
    first_logits(model, processor, shared + [11, 12, 13, 14, 15], cache)
    logits, last = first_logits(model, processor, shared + [20, 21], cache)
    assert last.reused_tokens == len(shared)  # the cache was trimmed back, not rebuilt
    assert isinstance(cache.cache[2], QuantizedFullAttentionCache)
    fresh, _ = first_logits(model, processor, shared + [20, 21], kv_key_bits=8, kv_value_bits=4)
    assert relative_error(logits, fresh) < 1e-4  # measured: 0.0

    # another setting is never served from this cache: it is rebuilt
    _, last = first_logits(model, processor, shared + [20, 21], cache, kv_bits=4)
    assert last.reused_tokens == 0 and cache.kv_quantization == KVQuantization(4, 4)


def test_quantized_prompt_cache_survives_a_file_round_trip(chat_checkpoint, tmp_path):
    model, processor = load(chat_checkpoint()[0])
    prompt = [2, *range(5, 45)]
    cache = PromptCache(model, KVQuantization(4, 6))
    first_logits(model, processor, prompt, cache)
    cache.save(tmp_path / "kv.safetensors")

    restored = PromptCache.load(model, tmp_path / "kv.safetensors")
    assert restored.kv_quantization == KVQuantization(4, 6) and restored.tokens == cache.tokens
    for ours, theirs in zip(restored.cache, cache.cache, strict=True):
        assert type(ours) is type(theirs) and ours.meta_state == theirs.meta_state
        for a, b in zip(ours.state, theirs.state, strict=True):
            np.testing.assert_array_equal(np.array(a), np.array(b))
    continued = prompt + [50, 51, 52]
    logits, last = first_logits(model, processor, continued, restored)
    assert last.reused_tokens == len(prompt)
    expected, _ = first_logits(model, processor, continued, cache)
    assert relative_error(logits, expected) < 1e-5


def test_stream_generate_with_kv_bits_and_bad_widths(chat_checkpoint):
    model, processor = load(chat_checkpoint()[0])
    answer = list(stream_generate(model, processor, "hello", max_tokens=5, kv_bits=4))
    assert answer and answer[-1].generation_tokens <= 5
    with pytest.raises(KVQuantizationError):
        next(stream_generate(model, processor, "hello", kv_bits=1))


def test_cli_flags_reach_the_cache(chat_checkpoint, monkeypatch):
    from typer.testing import CliRunner

    from mlx_gemma4.cli.app import app

    folder, _ = chat_checkpoint()
    made = []
    original = QuantizedFullAttentionCache.__init__

    def record(self, quantization, seed=0):
        made.append(quantization)
        original(self, quantization, seed)

    monkeypatch.setattr(QuantizedFullAttentionCache, "__init__", record)
    runner = CliRunner()
    common = ["--model", str(folder), "-n", "3", "--no-stats"]
    result = runner.invoke(app, ["generate", "--prompt", "hi", *common, "--kv-bits", "4"])
    assert result.exit_code == 0, result.output
    assert made and set(made) == {KVQuantization(4, 4)}

    made.clear()
    flags = ["--kv-key-bits", "8", "--kv-value-bits", "3"]
    result = runner.invoke(app, ["chat", *common, *flags], input="hello\nagain\n")
    assert result.exit_code == 0, result.output
    assert made and set(made) == {KVQuantization(8, 3)}

    # the console script: a bad width is one line, before the model loads
    bad = subprocess.run(
        [*gemma4_command(), "generate", "--prompt", "hi", *common, "--kv-bits", "7"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().count("\n") == 0 and "KV key bits must be one of" in bad.stderr


def package_imports(path) -> set[str]:
    """The mlx_gemma4 modules a source file imports, as dotted names under mlx_gemma4."""
    import ast

    package = path.parent.relative_to(MLX_GEMMA4.parent).parts
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = list(package[: len(package) - node.level + 1])
            found.add(".".join(base + ([node.module] if node.module else [])))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mlx_gemma4"):
            found.add(node.module)
    return found


MLX_GEMMA4 = Path(kv_quant_module.__file__).parent


def test_no_module_imports_upward():
    """models/ reads only the low modules beside it; the KV codec reads nothing from models/."""
    allowed = {
        f"mlx_gemma4.{name}"
        for name in ("config", "errors", "cache", "kv_quant", "packing", "collectives")
    }
    for path in sorted((MLX_GEMMA4 / "models").glob("*.py")):
        outside = {m for m in package_imports(path) if not m.startswith("mlx_gemma4.models")}
        assert outside <= allowed, (path.name, outside - allowed)
    for low in ("kv_quant.py", "cache.py", "packing.py", "rotation.py"):
        assert not any(m.startswith("mlx_gemma4.models") for m in package_imports(MLX_GEMMA4 / low))
