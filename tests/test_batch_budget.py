"""The KV budget of the batch engine: requests wait for room, never overrun it, and stay exact."""

from __future__ import annotations

import pytest
from assistants import assistant, close_drafter  # noqa: F401  (fixtures)
from conftest import id_prompts, solo

from mlx_gemma4 import BatchGenerator, load
from mlx_gemma4.engine.batch_cache import BatchKVCache
from mlx_gemma4.errors import BatchRequestError
from mlx_gemma4.memory import kv_cache_bytes


def held_kv_bytes(generator: BatchGenerator) -> int:
    """Bytes the KV caches hold now: the batch's rows (a draft model's too) plus a prompt being
    prefilled alone."""
    batch = sum(cache.nbytes for cache in generator._caches)
    if generator.speculator is not None:
        batch += sum(cache.nbytes for cache in getattr(generator.speculator.drafter, "caches", ()))
    prefilling = [r.prompt_cache for r in generator._pending if r.admitted]
    return batch + sum(layer.nbytes for c in prefilling for layer in c.cache)


def run_within_budget(generator: BatchGenerator, ids: list[int]) -> tuple[dict, list[dict]]:
    """Step to the end; each request's tokens, and per step what ran and what was held."""
    tokens: dict[int, list[int]] = {i: [] for i in ids}
    steps = []
    while not generator.done:
        responses = generator.step()
        for response in responses:
            tokens[response.request_id].append(response.token)
        steps.append(
            dict(
                running=generator.running,
                decoded={r.request_id for r in responses},
                finished={r.request_id for r in responses if r.finish_reason},
                reserved=generator.kv_reserved_bytes,
                held=held_kv_bytes(generator),
            )
        )
        assert generator.kv_reserved_bytes <= generator.kv_budget_bytes
        assert held_kv_bytes(generator) <= generator.kv_reserved_bytes
    return tokens, steps


@pytest.mark.parametrize("kv_bits", [None, 4])
def test_a_budget_for_two_runs_two_at_a_time_and_all_stay_exact(chat_checkpoint, kv_bits):
    model, processor = load(chat_checkpoint("ple_kv_shared")[0])
    # three requests of one size: prompt + max_tokens = 40 positions, past the window (8)
    prompts = id_prompts([12, 25, 6], seed=11)
    budgets = [40 - len(p) for p in prompts]
    probe = BatchGenerator(model, processor, kv_bits=kv_bits, prefill_step_size=8)
    need = probe.row_kv_bytes(40)
    budget = 3 * need - 1
    generator = BatchGenerator(
        model, processor, kv_bits=kv_bits, prefill_step_size=8, kv_budget_bytes=budget
    )
    ids = [generator.submit(p, max_tokens=n) for p, n in zip(prompts, budgets, strict=True)]
    tokens, steps = run_within_budget(generator, ids)

    assert max(step["running"] for step in steps) == 2
    # the third decodes only after one of the first two finished
    first_finish = min(i for i, s in enumerate(steps) if s["finished"] & set(ids[:2]))
    third_start = min(i for i, s in enumerate(steps) if ids[2] in s["decoded"])
    assert third_start > first_finish
    # two admitted requests of one size reserve the memory model's KV for each
    text = model.config.text_config
    per_sequence = kv_cache_bytes(
        text,
        40 + BatchKVCache.step,
        dtype=model.language_model.norm.weight.dtype,
        kv_quantization=generator.kv_quantization,
        prefill_step_size=8,
    )
    assert need == per_sequence
    assert {s["reserved"] for s in steps} == {0, need, 2 * need}
    assert max(s["held"] for s in steps) > 0
    assert generator.kv_reserved_bytes == 0
    for i, prompt, n in zip(ids, prompts, budgets, strict=True):
        assert tokens[i] == solo(model, processor, prompt, max_tokens=n, kv_bits=kv_bits)


def test_mixed_sizes_reserve_the_widest_row_for_each(chat_checkpoint):
    model, processor = load(chat_checkpoint("dense")[0])
    prompts = id_prompts([30, 3, 14, 9], seed=12)
    budgets = [20, 6, 9, 12]
    probe = BatchGenerator(model, processor)
    needs = [probe.row_kv_bytes(len(p) + n) for p, n in zip(prompts, budgets, strict=True)]
    generator = BatchGenerator(model, processor, kv_budget_bytes=2 * max(needs) + needs[1])
    ids = [generator.submit(p, max_tokens=n) for p, n in zip(prompts, budgets, strict=True)]
    tokens, steps = run_within_budget(generator, ids)
    assert max(s["running"] for s in steps) == 2  # the longest row sets every row's width
    assert 3 * needs[0] > generator.kv_budget_bytes >= 3 * needs[2]
    for i, prompt, n in zip(ids, prompts, budgets, strict=True):
        assert tokens[i] == solo(model, processor, prompt, max_tokens=n)


def test_a_request_larger_than_the_budget_is_refused_and_the_others_go_on(chat_checkpoint):
    model, processor = load(chat_checkpoint("dense")[0])
    prompts = id_prompts([10, 7], seed=13)
    probe = BatchGenerator(model, processor)
    generator = BatchGenerator(model, processor, kv_budget_bytes=2 * probe.row_kv_bytes(20))
    ids = [generator.submit(p, max_tokens=10) for p in prompts]
    with pytest.raises(BatchRequestError, match="needs .* of KV cache, more than") as refused:
        generator.submit(prompts[0], max_tokens=2000)
    assert "\n" not in str(refused.value)
    with pytest.raises(BatchRequestError, match="kv_budget_bytes: 0 is not positive"):
        BatchGenerator(model, processor, kv_budget_bytes=0)
    tokens, _ = run_within_budget(generator, ids)
    for i, prompt in zip(ids, prompts, strict=True):
        assert tokens[i] == solo(model, processor, prompt, max_tokens=10)


def test_a_waiting_request_takes_its_prefix_when_admitted(chat_checkpoint):
    model, processor = load(chat_checkpoint("ple_kv_shared")[0])
    first = id_prompts([20], seed=14)[0]
    second = first + [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50]  # the next turn, past the window
    probe = BatchGenerator(model, processor)
    one_at_a_time = 2 * probe.row_kv_bytes(len(second) + 8) - 1
    generator = BatchGenerator(
        model, processor, prefix_cache_bytes=2**24, kv_budget_bytes=one_at_a_time
    )
    ids = [generator.submit(first, max_tokens=6), generator.submit(second, max_tokens=8)]
    responses: dict[int, list] = {i: [] for i in ids}
    while not generator.done:
        assert generator.running <= 1
        for response in generator.step():
            responses[response.request_id].append(response)
    # it waited for the first turn, whose prefilled prompt the pool then held
    assert responses[ids[1]][0].reused_tokens == len(first) - 1
    assert [r.token for r in responses[ids[1]]] == solo(model, processor, second, max_tokens=8)


def test_a_draft_models_own_caches_count_in_the_budget(chat_checkpoint, assistant, close_drafter):  # noqa: F811
    """A plain draft model keeps a cache row per request beside the target's: a row's need
    counts both, so the caches held (the drafter's included) stay within the reservation. An
    assistant reads the target's caches and adds nothing."""
    from mlx_gemma4 import load_model

    model, processor = load(chat_checkpoint("ple_kv_shared")[0])
    undrafted = BatchGenerator(model, processor, prefill_step_size=8)
    drafts = 1 + 3 + BatchKVCache.max_lag  # the columns a drafting row may also take
    helper = load_model(assistant("ple_kv_shared", ordered=True)[0])
    assisted = BatchGenerator(
        model, processor, prefill_step_size=8, draft_model=helper, num_draft_tokens=3
    )
    assert assisted.row_kv_bytes(40 - drafts) == undrafted.row_kv_bytes(40)
    options = dict(
        prefill_step_size=8, draft_model=close_drafter("ple_kv_shared"), num_draft_tokens=3
    )
    need = BatchGenerator(model, processor, **options).row_kv_bytes(40)
    # the drafter is the model itself at 8 bits: its caches take about as much again
    assert need > 1.5 * undrafted.row_kv_bytes(40)

    prompts = id_prompts([12, 25, 6], seed=11)
    budgets = [40 - len(p) for p in prompts]
    generator = BatchGenerator(model, processor, kv_budget_bytes=3 * need - 1, **options)
    ids = [generator.submit(p, max_tokens=n) for p, n in zip(prompts, budgets, strict=True)]
    tokens, steps = run_within_budget(generator, ids)
    assert max(step["running"] for step in steps) == 2
    assert max(s["held"] for s in steps) > 0
    for i, prompt, n in zip(ids, prompts, budgets, strict=True):
        assert tokens[i] == solo(model, processor, prompt, max_tokens=n)
