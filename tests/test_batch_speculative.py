"""Speculative decoding in the batch engine: at temperature 0 every row's tokens equal its own
solo run without a drafter, whatever its company, with an assistant or a plain draft model,
rows rolled back by their own rejected counts in every cache kind."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from assistants import assistant, build_assistant, close_drafter  # noqa: F401  (fixtures)
from conftest import free_port, id_prompts, solo, start_serve

from mlx_gemma4 import BatchGenerator, batch_generate, load, load_model, stream_generate
from mlx_gemma4.drafters import AssistantDrafter
from mlx_gemma4.engine.batch_cache import BatchKVCache
from mlx_gemma4.engine.batch_drafters import AssistantRows, ModelRows
from mlx_gemma4.engine.speculative import BatchSpeculator
from mlx_gemma4.speculative import DraftLength

K = 3
# mixed lengths on both sides of the sliding window (8), one a single token
LENGTHS = [3, 30, 1, 12, 21]


@pytest.fixture(autouse=True)
def every_step_drafts(monkeypatch):
    """Draft K tokens every step, however few the target accepts: the rollback paths run."""
    monkeypatch.setattr(DraftLength, "adaptive", False)


@pytest.fixture
def short_lags(monkeypatch):
    """Realign rows once one lags three columns behind another: both the per-row writes of
    lagging rows and the realigning gather run within a short generation."""
    monkeypatch.setattr(BatchKVCache, "max_lag", 3)


def drafters(assistant, close_drafter, variant):  # noqa: F811
    folder, _ = assistant(variant, ordered=variant == "ple_kv_shared")
    return {"assistant": load_model(folder), "plain": close_drafter(variant)}


@pytest.mark.usefixtures("short_lags")
@pytest.mark.parametrize("variant", ["ple_kv_shared", "moe_k_eq_v"])
def test_greedy_rows_equal_their_solo_runs(chat_checkpoint, assistant, close_drafter, variant):  # noqa: F811
    model, processor = load(chat_checkpoint(variant)[0])
    prompts = id_prompts(LENGTHS)
    expected = [solo(model, processor, p, max_tokens=14) for p in prompts]
    for kind, drafter in drafters(assistant, close_drafter, variant).items():
        results = batch_generate(
            model, processor, prompts, max_tokens=14, draft_model=drafter, num_draft_tokens=K
        )
        assert [r.tokens for r in results] == expected, kind
        drafted = sum(r.drafted_tokens for r in results)
        accepted = sum(r.accepted_tokens for r in results)
        # a row drafts from its second step on (an assistant's row needs a hidden state)
        assert all(r.drafted_tokens > 0 for r in results if r.generation_tokens > 2)
        if kind == "plain":  # some drafts kept, some rolled back
            assert 0 < accepted < drafted
        for result in results:
            assert result.accepted_tokens <= result.drafted_tokens


def test_quantized_kv_rows_roll_back(chat_checkpoint, assistant, close_drafter):  # noqa: F811
    model, processor = load(chat_checkpoint("k_eq_v")[0])
    prompts = id_prompts([14, 2, 26], seed=6)
    expected = [solo(model, processor, p, max_tokens=12, kv_bits=4) for p in prompts]
    for kind, drafter in drafters(assistant, close_drafter, "k_eq_v").items():
        results = batch_generate(
            model, processor, prompts, max_tokens=12, kv_bits=4, draft_model=drafter,
            num_draft_tokens=K,
        )  # fmt: skip
        assert [r.tokens for r in results] == expected, kind
        assert sum(r.drafted_tokens - r.accepted_tokens for r in results) > 0


@pytest.mark.usefixtures("short_lags")
def test_rows_join_mid_flight_and_leave(chat_checkpoint, close_drafter):  # noqa: F811
    model, processor = load(chat_checkpoint("ple_kv_shared")[0])
    prompts = id_prompts([25, 4, 17, 9], seed=1)
    budgets = [20, 6, 12, 16]
    generator = BatchGenerator(
        model, processor, prefill_step_size=5, draft_model=close_drafter("ple_kv_shared"),
        num_draft_tokens=K,
    )  # fmt: skip
    tokens: dict[int, list[int]] = {}
    order = [generator.submit(prompts[0], max_tokens=budgets[0])]
    cancelled = generator.submit(id_prompts([11], seed=9)[0], max_tokens=30)
    steps = 0
    while not generator.done or len(order) < len(prompts):
        if steps in (2, 4, 5) and len(order) < len(prompts):  # arrive while others decode
            order.append(generator.submit(prompts[len(order)], max_tokens=budgets[len(order)]))
        if steps == 3:
            assert generator.cancel(cancelled)
        for response in generator.step():
            assert response.request_id != cancelled or steps < 3
            tokens.setdefault(response.request_id, []).append(response.token)
        steps += 1
    for request_id, prompt, budget in zip(order, prompts, budgets, strict=True):
        assert tokens[request_id] == solo(model, processor, prompt, max_tokens=budget)
    assert all(cache.rows == 0 for cache in generator.speculator.drafter.caches)


@pytest.mark.usefixtures("short_lags")
def test_the_batched_assistant_drafts_what_the_solo_one_drafts(
    chat_checkpoint,
    assistant,  # noqa: F811
    monkeypatch,
):
    """The random assistant is rarely right, so exactness alone says little about what it
    read: each row's drafts must be the solo drafter's, round for round."""
    model, processor = load(chat_checkpoint("ple_kv_shared")[0])
    drafter = load_model(assistant("ple_kv_shared", ordered=True)[0])
    prompts = id_prompts([3, 30, 12], seed=1)

    solo_rounds: list[list[int]] = []
    solo_propose = AssistantDrafter.propose

    def record_solo(self, token, hidden, k, sample):
        drafts, distributions = solo_propose(self, token, hidden, k, sample)
        solo_rounds.append([d.item() for d in drafts])
        return drafts, distributions

    monkeypatch.setattr(AssistantDrafter, "propose", record_solo)
    expected = []
    for prompt in prompts:
        solo_rounds.clear()
        options = dict(max_tokens=10, draft_model=drafter, num_draft_tokens=K)
        list(stream_generate(model, processor, prompt, **options))
        expected.append(list(solo_rounds))

    steps: list[list[tuple[int, int]]] = []
    batch_rounds: dict[int, list[list[int]]] = {}
    batch_plan, batch_propose = BatchSpeculator._plan, AssistantRows.propose

    def record_plan(self, running):
        allowed = batch_plan(self, running)
        steps.append([(r.id, n) for r, n in zip(running, allowed, strict=True)])
        return allowed

    def record_batch(self, tokens, hidden, k, sample):
        drafts, distributions = batch_propose(self, tokens, hidden, k, sample)
        for (request_id, allowed), row in zip(steps[-1], drafts.tolist(), strict=True):
            if allowed:
                batch_rounds.setdefault(request_id, []).append(row[:allowed])
        return drafts, distributions

    monkeypatch.setattr(BatchSpeculator, "_plan", record_plan)
    monkeypatch.setattr(AssistantRows, "propose", record_batch)
    generator = BatchGenerator(model, processor, draft_model=drafter, num_draft_tokens=K)
    ids = [generator.submit(p, max_tokens=10) for p in prompts]
    while not generator.done:
        generator.step()
    for request_id, solo_drafts in zip(ids, expected, strict=True):
        rounds = batch_rounds[request_id]
        assert len(rounds) >= 5
        assert rounds == [d[: len(r)] for d, r in zip(solo_drafts, rounds, strict=False)]


def no_token_7(history, logits):
    logits[:, 7] = -1e9
    return logits


def test_sampled_rows_and_logits_processors_use_the_solo_rule(chat_checkpoint, close_drafter):  # noqa: F811
    """top_k=1 sampling goes through the drafts' distributions and the acceptance rule yet
    must give the greedy tokens; a repetition penalty is a processor each position reads; a
    caller's processor follows one token at a time, so its row drafts nothing."""
    model, processor = load(chat_checkpoint("ple_kv_shared")[0])
    prompts = id_prompts([9, 24], seed=9)
    generator = BatchGenerator(
        model, processor, draft_model=close_drafter("ple_kv_shared"), num_draft_tokens=K
    )
    sampled = generator.submit(prompts[0], max_tokens=12, temperature=1.0, top_k=1)
    penalized = generator.submit(prompts[1], max_tokens=12, repetition_penalty=1.5)
    banned = generator.submit(prompts[1], max_tokens=12, logits_processors=[no_token_7])
    responses = {}
    while not generator.done:
        for response in generator.step():
            responses.setdefault(response.request_id, []).append(response)
    assert [r.token for r in responses[sampled]] == solo(
        model, processor, prompts[0], max_tokens=12
    )
    assert [r.token for r in responses[penalized]] == solo(
        model, processor, prompts[1], max_tokens=12, repetition_penalty=1.5
    )
    for request_id in (sampled, penalized):
        last = responses[request_id][-1]
        assert 0 < last.accepted_tokens < last.drafted_tokens
    options = dict(max_tokens=12, logits_processors=[no_token_7])
    assert [r.token for r in responses[banned]] == solo(model, processor, prompts[1], **options)
    assert responses[banned][-1].drafted_tokens == 0


def test_served_answers_with_a_drafter_equal_undrafted_ones(chat_checkpoint, assistant):  # noqa: F811
    openai = pytest.importorskip("openai")
    folder, _ = chat_checkpoint("ple_kv_shared")
    drafter, _ = assistant("ple_kv_shared", ordered=True)
    process, url = start_serve(folder, "--draft-model", drafter, "--draft-tokens", str(K))
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        questions = ["hello there", "what is up with you"]

        def ask(question: str, stream: bool):
            messages = [{"role": "user", "content": question}]
            settings = dict(model="tiny", messages=messages, max_tokens=12, temperature=0)
            if not stream:
                answer = client.chat.completions.create(**settings)
                return answer.choices[0].message.content or "", answer.usage
            chunks = list(
                client.chat.completions.create(
                    **settings, stream=True, stream_options={"include_usage": True}
                )
            )
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            return text, chunks[-1].usage

        with ThreadPoolExecutor(2) as pool:  # decoded together in the server's batch
            answers = list(pool.map(ask, questions, [False, True]))
    finally:
        process.terminate()
        process.wait(30)
    model, processor = load(folder)
    rejected = 0
    for question, (text, usage) in zip(questions, answers, strict=True):
        messages = [{"role": "user", "content": question}]
        pieces = list(stream_generate(model, processor, messages, max_tokens=12))
        assert text == "".join(p.text for p in pieces)
        assert usage.completion_tokens == len(pieces)
        # the draft length adapts to the step times: a request that joined after drafting
        # stopped paying may draft nothing (then its usage has no prediction counts)
        details = usage.completion_tokens_details
        if details is not None:
            assert details.accepted_prediction_tokens + details.rejected_prediction_tokens > 0
            rejected += details.rejected_prediction_tokens
    assert rejected > 0  # the server's second step drafts (and the random assistant misses)


def test_serve_with_a_drafter_for_another_target_is_one_line_and_exit_1(
    chat_checkpoint, gemma4, tmp_path
):
    folder, _ = chat_checkpoint("dense")
    build_assistant("dense", tmp_path / "narrow", False, backbone=32)
    result = gemma4(
        "serve", "--model", folder, "--port", free_port(), "--draft-model", tmp_path / "narrow"
    )
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0
    assert "hidden size 32" in result.stderr and "target's is 64" in result.stderr


def test_the_draft_length_adapts_to_a_drafter_it_keeps_rejecting(
    chat_checkpoint,
    assistant,  # noqa: F811
    monkeypatch,
):
    monkeypatch.setattr(DraftLength, "adaptive", True)
    model, processor = load(chat_checkpoint("ple_kv_shared")[0])
    drafter = load_model(assistant("ple_kv_shared", ordered=True)[0])
    prompts = id_prompts([3, 30, 12], seed=1)
    results = batch_generate(
        model, processor, prompts, max_tokens=24, draft_model=drafter, num_draft_tokens=K
    )
    assert [r.tokens for r in results] == [
        solo(model, processor, p, max_tokens=24) for p in prompts
    ]
    drafted = sum(r.drafted_tokens for r in results)
    # fixed K drafts K a step from each row's second step on: 3 x 22 x 3 here
    assert 0 < drafted <= sum(r.generation_tokens for r in results) // 2


@pytest.mark.usefixtures("short_lags")
@pytest.mark.parametrize("adaptive", [False, True])
def test_a_seeded_sampled_row_gives_its_solo_run_whatever_its_company(
    chat_checkpoint,
    assistant,  # noqa: F811
    close_drafter,  # noqa: F811
    monkeypatch,
    adaptive,
):
    """A seeded row draws with its own key and drafts by its own clock-free length, so beside
    greedy and unseeded rows, joining at another step, it repeats its solo speculative run;
    with the adaptive length too, which then drafts differently for each row."""
    monkeypatch.setattr(DraftLength, "adaptive", adaptive)
    model, processor = load(chat_checkpoint("ple_kv_shared")[0])
    prompts = id_prompts([6, 20, 11, 3], seed=4)
    seeds = {0: 5, 2: 7}  # the seeded rows; 1 is sampled unseeded, 3 greedy
    for kind, drafter in drafters(assistant, close_drafter, "ple_kv_shared").items():
        options = dict(draft_model=drafter, num_draft_tokens=K, max_tokens=16)
        expected = {}
        for row, seed in seeds.items():
            responses = list(
                stream_generate(
                    model, processor, prompts[row], temperature=1.0, seed=seed, **options
                )
            )
            expected[row] = ([r.token for r in responses], responses[-1].drafted_tokens)
        generator = BatchGenerator(model, processor, draft_model=drafter, num_draft_tokens=K)
        rows = {
            generator.submit(prompts[1], temperature=1.0, max_tokens=16): 1,
            generator.submit(prompts[3], max_tokens=16): 3,
        }
        tokens: dict[int, list[int]] = {}
        drafted: dict[int, int] = {}
        steps = 0
        while not generator.done or len(rows) < len(prompts):
            for row in seeds:
                if steps == row and row not in rows.values():  # joins at step 0 and step 2
                    request = generator.submit(
                        prompts[row], temperature=1.0, seed=seeds[row], max_tokens=16
                    )
                    rows[request] = row
            for response in generator.step():
                tokens.setdefault(rows[response.request_id], []).append(response.token)
                drafted[rows[response.request_id]] = response.drafted_tokens
            steps += 1
        for row in seeds:
            assert (tokens[row], drafted[row]) == expected[row], (kind, row)
            assert drafted[row] > 0, (kind, row)


def test_a_plain_draft_model_prefills_only_what_its_pool_lacks(
    chat_checkpoint,
    close_drafter,  # noqa: F811
    monkeypatch,
):
    """With a prefix pool, the next turn (a prompt that extends an earlier one) is prefilled
    in the draft model's caches only from where its pooled copy ends, as in the model's; an
    unrelated prompt, past the little it shares. Every answer is its solo run's."""
    from mlx_gemma4.prompt_cache import common_prefix

    model, processor = load(chat_checkpoint("ple_kv_shared")[0])
    first = id_prompts([20], seed=14)[0]
    second = first + id_prompts([11], seed=15)[0]  # the next turn, past the window (8)
    other = id_prompts([9], seed=16)[0]
    prefilled: list[int] = []
    forward = ModelRows._forward

    def counted(self, ids, caches):
        if caches is not self.caches:  # a joining row's prompt, alone
            prefilled.append(ids.shape[1])
        return forward(self, ids, caches)

    monkeypatch.setattr(ModelRows, "_forward", counted)
    generator = BatchGenerator(
        model, processor, prefix_cache_bytes=2**24, draft_model=close_drafter("ple_kv_shared"),
        num_draft_tokens=K,
    )  # fmt: skip
    reused = []
    for prompt in (first, second, other):
        generator.submit(prompt, max_tokens=8)
        responses = []
        while not generator.done:
            responses += generator.step()
        assert [r.token for r in responses] == solo(model, processor, prompt, max_tokens=8)
        reused.append(responses[0].reused_tokens)
    # second reuses first's prompt but its last token, in the model and in the drafter; other
    # only what it shares with them (its first token)
    shared = common_prefix(second, other)
    assert reused == [0, len(first) - 1, shared] and shared < 3
    assert prefilled == [len(first) - 1, len(second) - len(first), len(other) - 1 - shared]
