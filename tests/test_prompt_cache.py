"""Prompt-cache reuse across chat turns (sliding-window layers included) and across processes."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from conftest import first_logits, force_tokens

from mlx_gemma4 import PromptCache, load, stream_generate
from mlx_gemma4.prompt_cache import PromptCacheError


@pytest.mark.parametrize("variant", ["ple_kv_shared", "moe_k_eq_v"])
def test_second_turn_processes_only_its_new_tokens(chat_checkpoint, variant):
    model, processor = load(chat_checkpoint(variant)[0])
    cache = PromptCache(model)
    turn1 = [{"role": "user", "content": "tell me something about the weather today"}]
    answer = "it is sunny"
    forced = force_tokens(processor.encode(answer)[1:])
    # thinking on: with it off, Gemma's template ends the prompt with an empty thought channel
    # that the next turn's history does not repeat, so the last answer is processed again
    thinking = {"enable_thinking": True}
    replies = list(
        stream_generate(
            model,
            processor,
            turn1,
            max_tokens=30,
            prompt_cache=cache,
            logits_processors=[forced],
            **thinking,
        )
    )
    assert "".join(r.text for r in replies) == answer
    turn2 = turn1 + [
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "and tomorrow?"},
    ]
    prompt2 = processor.apply_chat_template(turn2, tokenize=True, **thinking)
    new_tokens = len(processor.encode("\n<|turn>user\nand tomorrow?<turn|>\n<|turn>model\n")) - 1

    logits, last = first_logits(model, processor, turn2, cache, **thinking)
    assert last.reused_tokens == len(prompt2) - new_tokens
    assert last.reused_tokens > 8 * 3  # the history runs well past the sliding window
    fresh, _ = first_logits(model, processor, turn2, **thinking)
    assert np.abs(logits - fresh).max() <= 1e-4 * np.abs(fresh).max()


def test_diverging_tail_trims_sliding_caches_and_matches_a_fresh_run(chat_checkpoint):
    model, processor = load(chat_checkpoint()[0])
    rng = np.random.default_rng(0)
    shared = [2, *rng.integers(5, 90, 40).tolist()]
    cache = PromptCache(model)
    first_logits(model, processor, shared + [11, 12, 13, 14, 15], cache)
    before = len(cache.tokens)
    logits, last = first_logits(model, processor, shared + [20, 21], cache)
    assert last.reused_tokens == len(shared)
    assert before > len(shared) + 5 - 1
    fresh, _ = first_logits(model, processor, shared + [20, 21])
    assert np.abs(logits - fresh).max() <= 1e-4 * np.abs(fresh).max()


def test_identical_prompt_reprocesses_only_its_last_token(chat_checkpoint):
    model, processor = load(chat_checkpoint()[0])
    cache = PromptCache(model)
    prompt = [2, *range(5, 40)]
    first_logits(model, processor, prompt, cache)
    _, last = first_logits(model, processor, prompt, cache)
    assert last.reused_tokens == len(prompt) - 1


def test_prompt_cache_survives_a_file_round_trip(chat_checkpoint, tmp_path):
    model, processor = load(chat_checkpoint()[0])
    prompt = [2, *range(5, 45)]
    cache = PromptCache(model)
    first_logits(model, processor, prompt, cache)
    cache.save(tmp_path / "chat.safetensors")

    restored = PromptCache.load(model, tmp_path / "chat.safetensors")
    assert restored.tokens == cache.tokens
    continued = prompt + [50, 51, 52]
    logits, last = first_logits(model, processor, continued, restored)
    assert last.reused_tokens == len(prompt)
    fresh, _ = first_logits(model, processor, continued)
    assert np.abs(logits - fresh).max() <= 1e-4 * np.abs(fresh).max()


def test_prompt_cache_file_for_another_model_is_refused(chat_checkpoint, tmp_path):
    model, processor = load(chat_checkpoint()[0])
    cache = PromptCache(model)
    first_logits(model, processor, [2, 5, 6, 7], cache)
    cache.save(tmp_path / "c.safetensors")
    other, _ = load(chat_checkpoint("dense")[0])
    with pytest.raises(PromptCacheError, match="saved for another model"):
        PromptCache.load(other, tmp_path / "c.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"nonsense")
    with pytest.raises(PromptCacheError, match="not a prompt-cache file"):
        PromptCache.load(model, tmp_path / "junk.safetensors")


def test_interrupted_generation_leaves_a_usable_cache(chat_checkpoint):
    model, processor = load(chat_checkpoint()[0])
    cache = PromptCache(model)
    prompt = [2, *range(5, 30)]
    for response in stream_generate(model, processor, prompt, max_tokens=20, prompt_cache=cache):
        if response.generation_tokens == 3:
            break  # the consumer stops early, as Ctrl-C in the chat does
    assert len(cache.tokens) == mx.array(cache.cache[0].offset).item()
    logits, _ = first_logits(model, processor, prompt + [60], cache)
    fresh, _ = first_logits(model, processor, prompt + [60])
    assert np.abs(logits - fresh).max() <= 1e-4 * np.abs(fresh).max()


def _interrupt_at_call(n: int):
    """A logits processor that raises KeyboardInterrupt at its `n`-th call: inside a decode
    step, after the step has advanced the caches and before its token is recorded."""
    calls = {"n": 0}

    def processor(_history, logits):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return logits

    return processor


@pytest.mark.parametrize("variant", ["ple_kv_shared", "moe_k_eq_v"])
def test_ctrl_c_mid_step_keeps_every_finished_token_cached(chat_checkpoint, variant):
    model, processor = load(chat_checkpoint(variant)[0])
    cache = PromptCache(model)
    prompt = [2, *range(5, 30)]  # longer than the sliding window
    answer = []
    with pytest.raises(KeyboardInterrupt):
        for response in stream_generate(
            model,
            processor,
            prompt,
            max_tokens=40,
            prompt_cache=cache,
            logits_processors=[_interrupt_at_call(6)],
        ):
            answer.append(response.token)
    assert len(answer) == 4  # the 5th token's step was queued, the 6th one interrupted
    assert cache.tokens == prompt + answer
    assert all(layer.offset == len(cache.tokens) for layer in cache.cache)

    continued = prompt + answer + [60, 61]
    logits, last = first_logits(model, processor, continued, cache)
    assert last.reused_tokens == len(prompt) + len(answer)
    fresh, _ = first_logits(model, processor, continued)
    assert np.abs(logits - fresh).max() <= 1e-4 * np.abs(fresh).max()


def test_an_interrupted_prefill_chunk_is_rolled_back(chat_checkpoint):
    model, processor = load(chat_checkpoint()[0])
    cache = PromptCache(model)
    prompt = [2, *range(5, 25)]
    first_logits(model, processor, prompt, cache)
    held = list(cache.tokens)
    # what a prefill chunk cut short leaves: the caches hold 12 positions `tokens` does not
    model.language_model(mx.array([list(range(40, 52))]), cache.cache)
    assert all(layer.offset == len(held) + 12 for layer in cache.cache)

    cache.roll_back_to_tokens()
    assert cache.tokens == held
    assert all(layer.offset == len(held) for layer in cache.cache)
    continued = prompt + [60, 61, 62]
    logits, last = first_logits(model, processor, continued, cache)
    assert last.reused_tokens == len(prompt)
    fresh, _ = first_logits(model, processor, continued)
    assert np.abs(logits - fresh).max() <= 1e-4 * np.abs(fresh).max()
