"""Per-request features in the batch engine (tools, tool_choice, json_schema, logits processors,
repetition penalty, option sets): each request equals its own solo `stream_generate` run (tokens,
text, tool calls, finish reason), beside plain requests in the same batch."""

from __future__ import annotations

import shutil

import pytest
from checkpoints import PERSON, WEATHER, add_tool_tokens, scripted_turns
from conftest import id_prompts

from mlx_gemma4 import BatchGenerator, SamplingOptions, ToolCall, batch_generate, load
from mlx_gemma4 import stream_generate as solo_stream
from mlx_gemma4.errors import ConstraintError
from mlx_gemma4.options import MediaOptions

pytest.importorskip("llguidance")

Q = '<|"|>'
CALL = f"<|tool_call>call:get_weather{{city:{Q}Paris{Q}}}<tool_call|>"


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def tool_model(chat_checkpoint, tmp_path_factory):
    source, _ = chat_checkpoint("ple_kv_shared")
    folder = shutil.copytree(source, tmp_path_factory.mktemp("batch-tools"), dirs_exist_ok=True)
    add_tool_tokens(folder)
    return load(folder)


def requests(processor) -> list[tuple[object, dict]]:
    """(prompt, options) pairs; options may hold a factory for stateful logits processors."""
    scripted = processor.encode("Let me check. " + CALL + "<|tool_response>")[1:]
    plain_a, plain_b = id_prompts([11, 23], seed=21)
    return [
        (plain_a, {"max_tokens": 12}),
        (
            ask("Weather in Paris?"),
            {
                "tools": [WEATHER],
                "max_tokens": 60,
                "logits_processors": lambda: [scripted_turns([scripted])],
            },
        ),
        (ask("Call a tool."), {"tools": [WEATHER], "tool_choice": "get_weather", "max_tokens": 80}),
        (ask("Reply in JSON."), {"json_schema": PERSON, "max_tokens": 80}),
        (
            ask("Say something."),
            {"sampling": SamplingOptions(max_tokens=16, repetition_penalty=1.8)},
        ),
        (
            plain_b,
            {"repetition_penalty": 1.5, "repetition_context_size": 6, "max_tokens": 14},
        ),
        (ask("Reply in JSON, sampled."), {"json_schema": True, "max_tokens": 40, "seed": 3,
                                            "temperature": 1.0}),
    ]  # fmt: skip


def options(given: dict) -> dict:
    """The options with fresh logits processors (they keep state within one generation)."""
    made = dict(given)
    if callable(made.get("logits_processors")):
        made["logits_processors"] = made["logits_processors"]()
    return made


def test_each_request_equals_its_solo_run_beside_plain_ones(tool_model):
    model, processor = tool_model
    pairs = requests(processor)
    generator = BatchGenerator(model, processor, prefill_step_size=16)
    ids = [generator.submit(prompt, **options(given)) for prompt, given in pairs]
    responses: dict[int, list] = {i: [] for i in ids}
    while not generator.done:
        for response in generator.step():
            responses[response.request_id].append(response)
    for i, (prompt, given) in zip(ids, pairs, strict=True):
        batched = responses[i]
        alone = list(solo_stream(model, processor, prompt, **options(given)))
        assert [r.token for r in batched] == [r.token for r in alone], given
        assert [r.text for r in batched] == [r.text for r in alone]
        assert [r.tool_calls for r in batched] == [r.tool_calls for r in alone]
        assert batched[-1].finish_reason == alone[-1].finish_reason
        assert batched[-1].malformed_tool_call == alone[-1].malformed_tool_call
    scripted, forced = responses[ids[1]], responses[ids[2]]
    # the call text stays out of the text; the calls come as ToolCall objects
    assert "".join(r.text for r in scripted) == "Let me check. "
    assert [c for r in scripted for c in r.tool_calls] == [
        ToolCall("get_weather", {"city": "Paris"})
    ]
    assert scripted[-1].finish_reason == forced[-1].finish_reason == "tool_calls"
    assert [c.name for r in forced for c in r.tool_calls] == ["get_weather"]
    assert "".join(r.text for r in forced) == ""


def test_batch_generate_results_carry_the_calls_and_report_progress(tool_model, capsys):
    model, processor = tool_model
    prompts = [ask("Call a tool."), ask("Call another tool.")]
    results = batch_generate(
        model,
        processor,
        prompts,
        tools=[WEATHER],
        tool_choice="required",
        media_options=MediaOptions(max_soft_tokens=70),
        sampling=SamplingOptions(max_tokens=80),
        kv_budget_bytes=2**30,
        prefix_cache_bytes=2**24,
        verbose=True,
    )
    for prompt, result in zip(prompts, results, strict=True):
        alone = list(
            solo_stream(model, processor, prompt, tools=[WEATHER], tool_choice="required",
                        max_tokens=80)
        )  # fmt: skip
        assert result.tokens == [r.token for r in alone]
        assert result.tool_calls == [c for r in alone for c in r.tool_calls]
        assert len(result.tool_calls) == 1 and result.finish_reason == "tool_calls"
        assert result.text == "" and result.generation_tokens == len(alone)
    summary = capsys.readouterr().out
    tokens = sum(len(r.tokens) for r in results)
    assert f"2 prompts, {tokens} tokens generated in" in summary
    assert "tokens/s in total" in summary


def test_a_bad_constraint_is_refused_at_submit_and_the_others_go_on(tool_model):
    model, processor = tool_model
    generator = BatchGenerator(model, processor)
    good = generator.submit([2, 40, 41], max_tokens=4)
    with pytest.raises(ConstraintError, match="needs tools"):
        generator.submit(ask("hi"), tool_choice="required")
    with pytest.raises(ConstraintError, match="none of the tools"):
        generator.submit(ask("hi"), tools=[WEATHER], tool_choice="get_time")
    tokens = []
    while not generator.done:
        tokens += [r.token for r in generator.step() if r.request_id == good]
    assert tokens == [r.token for r in solo_stream(model, processor, [2, 40, 41], max_tokens=4)]
