"""The memory model: KV bytes equal what the caches hold, weight bytes what the model holds, and
a long prompt stays under the predicted peak."""

from __future__ import annotations

import json

import mlx.core as mx
import pytest
import torch
from checkpoints import _TEXT_BASE, VOCAB, jitter, save_reference, save_tokenizer

from mlx_gemma4 import load, load_model
from mlx_gemma4.config import ModelConfig
from mlx_gemma4.errors import MemoryModelError
from mlx_gemma4.generation import prefill_chunks, stream_generate
from mlx_gemma4.kv_quant import KVQuantization
from mlx_gemma4.memory import config_weight_bytes, estimate_memory, kv_cache_bytes, weight_bytes
from mlx_gemma4.models import attention as attention_module

VARIANTS = ["dense", "ple_kv_shared", "k_eq_v", "moe_k_eq_v"]


def prefill(model, cache, ids: mx.array, step: int) -> None:
    """Feed `ids` [1, n] to the caches as `generate_step` does: chunks, then the last token."""
    n = ids.shape[1]
    for start, end in prefill_chunks(n, step, []):
        model.language_model(ids[:, start:end], cache)
        mx.eval([c.state for c in cache])
    model.language_model(ids[:, n - 1 :], cache)
    mx.eval([c.state for c in cache])


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kv_bits", [None, 4, 8])
@pytest.mark.parametrize(("length", "step"), [(5, 2048), (700, 256), (1000, 300)])
def test_kv_bytes_equal_what_the_caches_hold(tiny, token_ids, variant, kv_bits, length, step):
    model = load_model(tiny(variant)[0])
    quantization = KVQuantization.from_bits(kv_bits)
    cache = model.make_cache(quantization)
    prefill(model, cache, mx.array(token_ids(1, length)), step)
    held = sum(c.nbytes for c in cache)
    text = model.config.text_config
    predicted = kv_cache_bytes(
        text, length, dtype=mx.float32, kv_quantization=quantization, prefill_step_size=step
    )
    assert predicted == held
    # ... and a batch holds that per sequence
    estimate = estimate_memory(
        model, length, batch=3, kv_quantization=quantization, prefill_step_size=step
    )
    assert estimate.kv_total == 3 * held


@pytest.mark.parametrize("variant", [*VARIANTS, "multimodal"])
def test_weight_bytes_from_the_config_equal_the_loaded_model(tiny, variant):
    folder = tiny(variant)[0]
    model = load_model(folder, dtype="float32")
    config = ModelConfig.from_dict(json.loads((folder / "config.json").read_text()))
    assert config_weight_bytes(config, mx.float32) == weight_bytes(model)
    assert estimate_memory(model, 16).weights == weight_bytes(model)


def test_weight_bytes_of_a_quantized_checkpoint(tiny, tmp_path, gemma4):
    folder = tmp_path / "q4"
    result = gemma4("quantize", "-m", tiny("dense")[0], "-o", folder, "-b", "4", "-g", "32")
    assert result.returncode == 0, result.stderr
    model = load_model(folder, dtype="float32")
    packed = sum(
        p.nbytes for name, p in _named_parameters(model) if name.endswith((".scales", ".biases"))
    )
    assert packed > 0  # it is quantized
    config = ModelConfig.from_dict(json.loads((folder / "config.json").read_text()))
    assert config_weight_bytes(config, mx.float32) == weight_bytes(model)
    assert weight_bytes(model) < weight_bytes(load_model(tiny("dense")[0]))


def _named_parameters(model):
    from mlx.utils import tree_flatten

    return tree_flatten(model.parameters())


def test_bad_values_are_refused(tiny):
    model = load_model(tiny("dense")[0])
    with pytest.raises(MemoryModelError, match="batch"):
        estimate_memory(model, 10, batch=0)
    with pytest.raises(MemoryModelError, match="max_position_embeddings"):
        estimate_memory(model, 10**6)


def test_cli_prints_the_breakdown(tiny, gemma4):
    folder = tiny("ple_kv_shared")[0]
    result = gemma4("info", folder, "--context", "1000", "--batch", "2", "--kv-bits", "4")
    assert result.returncode == 0, result.stderr
    estimate = estimate_memory(
        load_model(folder), 1000, batch=2, kv_quantization=KVQuantization(4, 4)
    )
    for label, value in estimate.breakdown().items():
        assert f"memory: {label}" in result.stdout
        assert value in result.stdout
    for bad in (["--context", "0"], ["--context", "10", "--kv-bits", "7"], ["--batch", "-1"]):
        result = gemma4("info", folder, *bad)
        assert result.returncode == 1
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


# ----------------------------------------------------------------------------- long prompts


def long_checkpoint(folder, layer_types: list[str]):
    """A tiny text checkpoint (one query head) that takes 200K-token prompts."""
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    config = Gemma4TextConfig(
        **{
            **_TEXT_BASE,
            "num_hidden_layers": len(layer_types),
            "layer_types": layer_types,
            "num_attention_heads": 1,
            "num_key_value_heads": 1,
            "max_position_embeddings": 200_000,
        }
    )
    torch.manual_seed(0)
    model = Gemma4ForCausalLM(config).eval()
    jitter(model, 0)
    save_reference(model, folder)
    save_tokenizer(folder)
    return load(folder)


def measured_and_predicted(model, processor, length: int, kv_bits: int | None = None):
    """Peak bytes above what was live before `stream_generate`, and the model's prediction of
    the same (everything but the weights, which were live before)."""
    ids = mx.random.randint(3, VOCAB - 12, (length,), key=mx.random.key(0)).tolist()
    mx.clear_cache()
    before = mx.get_active_memory()
    for _ in stream_generate(model, processor, ids, max_tokens=2, kv_bits=kv_bits):
        pass
    measured = mx.get_peak_memory() - before  # stream_generate resets the peak first
    estimate = estimate_memory(model, length + 2, kv_quantization=KVQuantization.from_bits(kv_bits))
    return measured, estimate.peak - estimate.weights


def test_a_128k_prompt_stays_under_the_predicted_peak(tmp_path):
    """Chunked prefill, the LM head on the last position only, no full-length temporary: a
    [T, vocab] logits array or a T x T mask would be gigabytes here; the caches are 32 MiB."""
    model, processor = long_checkpoint(tmp_path, ["sliding_attention", "full_attention"])
    measured, predicted = measured_and_predicted(model, processor, 131_072)
    assert measured <= predicted < 2 * measured, (measured, predicted)


@pytest.mark.parametrize("kv_bits", [None, 4])
def test_full_attention_scores_stay_under_the_predicted_peak(tmp_path, kv_bits):
    """A full-attention layer whose output feeds later caches attends over the whole context
    for every chunk: its score blocks dominate the peak."""
    model, processor = long_checkpoint(
        tmp_path, ["full_attention", "sliding_attention", "full_attention"]
    )
    measured, predicted = measured_and_predicted(model, processor, 16_384, kv_bits)
    assert measured <= predicted < 2 * measured, (measured, predicted)


def test_query_blocks_are_not_all_alive_at_once(monkeypatch):
    """The CPU path's score blocks bound memory only if each is done before the next starts;
    left lazy, MLX ran them side by side (as much memory as one unbounded block)."""
    queries = mx.random.normal((1, 1, 2048, 32), key=mx.random.key(1))
    keys = mx.random.normal((1, 1, 8192, 32), key=mx.random.key(2))
    mx.eval(queries, keys)

    def peak(max_scores: int) -> int:
        monkeypatch.setattr(attention_module, "_MAX_SCORES", max_scores)
        mx.clear_cache()
        mx.reset_peak_memory()
        before = mx.get_active_memory()
        mx.eval(attention_module.attention(queries, keys, keys, 1.0, "causal"))
        return mx.get_peak_memory() - before

    one_block, four_blocks = peak(2048 * 8192), peak(512 * 8192)
    assert four_blocks < 0.5 * one_block, (four_blocks, one_block)


@pytest.mark.parametrize("bits", [None, 4])
def test_wider_layers_stay_under_the_predicted_peak(tmp_path, gemma4, bits):
    """Hidden 256, MLP 1024: activations (and, quantized, the float copy of a weight the CPU
    prefill makes) weigh next to the scores."""
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    folder = tmp_path / "wide"
    wide = dict(
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=3,
        layer_types=["sliding_attention", "full_attention", "full_attention"],
        max_position_embeddings=8192,
    )
    torch.manual_seed(0)
    save_reference(Gemma4ForCausalLM(Gemma4TextConfig(**{**_TEXT_BASE, **wide})).eval(), folder)
    save_tokenizer(folder)
    if bits:
        quantized = tmp_path / "wide-q"
        result = gemma4("quantize", "-m", folder, "-o", quantized, "-b", str(bits), "-g", "64")
        assert result.returncode == 0, result.stderr
        save_tokenizer(quantized)
        folder = quantized
    model, processor = load(folder)
    measured, predicted = measured_and_predicted(model, processor, 2600)
    assert measured <= predicted < 2 * measured, (measured, predicted)
