"""The batch engine: every sequence's tokens equal its own solo run, whatever its company."""

from __future__ import annotations

import pytest
from conftest import id_prompts, media_messages, solo

from mlx_gemma4 import BatchGenerator, Gemma4Error, batch_generate, load, stream_generate
from mlx_gemma4.errors import BatchRequestError, PromptTooLongError


@pytest.mark.parametrize("variant", ["ple_kv_shared", "moe_k_eq_v", "dense"])
def test_greedy_batch_equals_solo_runs(chat_checkpoint, variant):
    model, processor = load(chat_checkpoint(variant)[0])
    # mixed lengths, on both sides of the sliding window (8), one a single token
    prompts = id_prompts([3, 30, 1, 12, 21])
    results = batch_generate(model, processor, prompts, max_tokens=14)
    for prompt, result in zip(prompts, results, strict=True):
        expected = solo(model, processor, prompt, max_tokens=14)
        assert result.tokens == expected
        assert result.prompt_tokens == len(prompt)
        assert result.generation_tokens == len(expected)
        assert result.finish_reason in ("stop", "length")


def test_sequences_join_mid_flight_and_leave(chat_checkpoint):
    model, processor = load(chat_checkpoint("ple_kv_shared")[0])
    prompts = id_prompts([25, 4, 17, 9], seed=1)
    budgets = [20, 6, 12, 16]
    generator = BatchGenerator(model, processor, prefill_step_size=5)
    tokens: dict[int, list[int]] = {}
    order = [generator.submit(prompts[0], max_tokens=budgets[0])]
    steps = 0
    while not generator.done or len(order) < len(prompts):
        if steps in (3, 7, 8) and len(order) < len(prompts):  # arrive while others decode
            i = len(order)
            order.append(generator.submit(prompts[i], max_tokens=budgets[i]))
        for response in generator.step():
            tokens.setdefault(response.request_id, []).append(response.token)
        steps += 1
    for request_id, prompt, budget in zip(order, prompts, budgets, strict=True):
        assert tokens[request_id] == solo(model, processor, prompt, max_tokens=budget)


def test_cancel_frees_the_row_and_the_others_go_on(chat_checkpoint):
    model, processor = load(chat_checkpoint("dense")[0])
    prompts = id_prompts([20, 11, 6], seed=2)
    generator = BatchGenerator(model, processor)
    ids = [generator.submit(p, max_tokens=12) for p in prompts]
    tokens = {i: [] for i in ids}
    for _ in range(4):
        for response in generator.step():
            tokens[response.request_id].append(response.token)
    assert generator.cancel(ids[0])
    assert all(cache.rows == 2 for cache in generator._caches)
    assert not generator.cancel(ids[0])
    while not generator.done:
        for response in generator.step():
            assert response.request_id != ids[0]
            tokens[response.request_id].append(response.token)
    for i, prompt in zip(ids[1:], prompts[1:], strict=True):
        assert tokens[i] == solo(model, processor, prompt, max_tokens=12)
    assert all(cache.keys is None and cache.rows == 0 for cache in generator._caches)


@pytest.mark.parametrize("variant", ["ple_kv_shared", "moe_k_eq_v"])
def test_quantized_kv_batch_equals_solo_runs(chat_checkpoint, variant):
    model, processor = load(chat_checkpoint(variant)[0])
    prompts = id_prompts([14, 2, 26], seed=6)
    results = batch_generate(model, processor, prompts, max_tokens=10, kv_bits=4)
    for prompt, result in zip(prompts, results, strict=True):
        assert result.tokens == solo(model, processor, prompt, max_tokens=10, kv_bits=4)


def test_a_4_bit_batch_wide_enough_for_the_float_route_equals_solo_runs(chat_checkpoint):
    """On the CPU a quantized product of MATRIX_ROWS or more rows multiplies through the float
    weight (models/dequantize.py), while a solo decode step uses the packed kernel: a batch of
    MATRIX_ROWS + 1 rows must still give every row its solo run's greedy tokens."""
    from mlx_gemma4.models.layers import MATRIX_ROWS
    from mlx_gemma4.quantize import quantize_model

    model, processor = load(chat_checkpoint("ple_kv_shared")[0])
    quantize_model(model, bits=4, group_size=32)
    prompts = id_prompts([3 + 4 * i for i in range(MATRIX_ROWS + 1)], seed=21)
    results = batch_generate(model, processor, prompts, max_tokens=16)
    for prompt, result in zip(prompts, results, strict=True):
        assert result.tokens == solo(model, processor, prompt, max_tokens=16)


def run_all(generator: BatchGenerator) -> dict[int, list]:
    responses: dict[int, list] = {}
    while not generator.done:
        for response in generator.step():
            responses.setdefault(response.request_id, []).append(response)
    return responses


def test_a_prompt_that_extends_an_earlier_one_prefills_only_its_new_tokens(chat_checkpoint):
    model, processor = load(chat_checkpoint("ple_kv_shared")[0])
    first = id_prompts([20], seed=7)[0]
    generator = BatchGenerator(model, processor, prefix_cache_bytes=2**24)
    start = generator.submit(first, max_tokens=6)
    assert [r.reused_tokens for r in run_all(generator)[start]] == [0] * 6
    assert len(generator.pool) == 1
    # the next turn: past the window (8) beyond the kept prefix, beside an unrelated request
    second = first + [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50]
    other = id_prompts([9], seed=8)[0]
    turn, unrelated = (generator.submit(p, max_tokens=8) for p in (second, other))
    responses = run_all(generator)
    assert responses[turn][0].reused_tokens == len(first) - 1
    assert responses[unrelated][0].reused_tokens == 1  # only <bos> in common
    assert [r.token for r in responses[turn]] == solo(model, processor, second, max_tokens=8)
    assert [r.token for r in responses[unrelated]] == solo(model, processor, other, max_tokens=8)
    # the extended prompt replaced the one it extends; a budget too small keeps nothing
    assert len(generator.pool) == 2
    tight = BatchGenerator(model, processor, prefix_cache_bytes=16)
    tight.submit(first, max_tokens=2)
    run_all(tight)
    assert len(tight.pool) == 0


def test_seeded_sampling_is_the_same_in_any_company(chat_checkpoint):
    model, processor = load(chat_checkpoint("ple_kv_shared")[0])
    prompt = id_prompts([10], seed=3)[0]
    settings = dict(max_tokens=10, temperature=1.3, top_k=40, seed=7)
    alone = batch_generate(model, processor, [prompt], **settings)[0].tokens
    generator = BatchGenerator(model, processor)
    generator.submit(id_prompts([15], seed=4)[0], max_tokens=10, temperature=0.9, seed=1)
    target = generator.submit(prompt, **settings)
    generator.submit(id_prompts([5], seed=5)[0], max_tokens=10, temperature=1.0)
    crowded = []
    while not generator.done:
        crowded += [r.token for r in generator.step() if r.request_id == target]
    assert crowded == alone
    assert alone == solo(model, processor, prompt, **settings)  # and as a solo run seeded alike


def test_text_prompts_chat_messages_stop_strings(chat_checkpoint):
    model, processor = load(chat_checkpoint("ple_kv_shared")[0])
    messages = [{"role": "user", "content": "hello there"}]
    prompts = ["hello", messages]
    results = batch_generate(model, processor, prompts, max_tokens=12, progress=True)
    for prompt, result in zip(prompts, results, strict=True):
        pieces = list(stream_generate(model, processor, prompt, max_tokens=12))
        assert result.tokens == [r.token for r in pieces]
        assert result.text == "".join(r.text for r in pieces)
    text = results[0].text
    assert len(text) > 3
    stop = text[2:4]  # a stop string cuts the text where the solo run cuts it
    cut = batch_generate(model, processor, ["hello"], max_tokens=12, stop=[stop])[0]
    solo_cut = list(stream_generate(model, processor, "hello", max_tokens=12, stop=[stop]))
    assert cut.finish_reason == "stop" == solo_cut[-1].finish_reason
    assert cut.text == "".join(r.text for r in solo_cut)
    assert cut.tokens == [r.token for r in solo_cut]


def test_an_image_and_audio_among_the_prompts(chat_checkpoint):
    model, processor = load(chat_checkpoint("multimodal")[0])
    prompts = [
        media_messages("image"),
        "hello there",
        media_messages("audio"),
        [{"role": "user", "content": "hi"}],
    ]
    settings = dict(max_tokens=8, max_soft_tokens=70)
    generator = BatchGenerator(model, processor, prefill_step_size=7)  # chunks around images
    ids = [generator.submit(prompt, **settings) for prompt in prompts]
    tokens = {i: [] for i in ids}
    while not generator.done:
        for response in generator.step():
            tokens[response.request_id].append(response.token)
    for i, prompt in zip(ids, prompts, strict=True):
        assert tokens[i] == solo(model, processor, prompt, **settings)


def test_bad_requests_are_refused_and_the_others_go_on(chat_checkpoint):
    model, processor = load(chat_checkpoint("dense")[0])
    with pytest.raises(BatchRequestError, match="prompts: the list is empty"):
        batch_generate(model, processor, [], max_tokens=4)
    generator = BatchGenerator(model, processor)
    good = generator.submit([2, 40, 41], max_tokens=5)
    context = model.config.text_config.max_position_embeddings
    with pytest.raises(PromptTooLongError, match="exceeds the model's context"):
        generator.submit([2] * context, max_tokens=5)
    with pytest.raises(BatchRequestError, match="prompt: it is empty"):
        generator.submit([], max_tokens=5)
    with pytest.raises(Gemma4Error, match="bits"):
        BatchGenerator(model, processor, kv_bits=1)
    tokens = []
    while not generator.done:
        tokens += [r.token for r in generator.step() if r.request_id == good]
    assert tokens == solo(model, processor, [2, 40, 41], max_tokens=5)


def test_a_row_at_its_last_token_takes_no_further_forward(chat_checkpoint):
    """Steps are pipelined (the next forward is queued before this step's tokens are read), but
    a row whose queued token is its last by max_tokens is left out of the next forward: its
    logits processors run exactly once per token it produces."""
    model, processor = load(chat_checkpoint("dense")[0])
    calls = {"short": 0, "long": 0}

    def counting(name):
        def processor_(_history, logits):
            calls[name] += 1
            return logits

        return processor_

    prompts = id_prompts([7, 12], seed=9)
    generator = BatchGenerator(model, processor)
    short = generator.submit(prompts[0], max_tokens=3, logits_processors=[counting("short")])
    long = generator.submit(prompts[1], max_tokens=9, logits_processors=[counting("long")])
    produced = {short: [], long: []}
    while not generator.done:
        for response in generator.step():
            produced[response.request_id].append(response)
    assert [len(produced[short]), len(produced[long])] == [3, 9]
    assert produced[short][-1].finish_reason == produced[long][-1].finish_reason == "length"
    assert calls == {"short": 3, "long": 9}
    for request, prompt, n in ((short, prompts[0], 3), (long, prompts[1], 9)):
        assert [r.token for r in produced[request]] == solo(model, processor, prompt, max_tokens=n)
