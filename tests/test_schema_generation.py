"""`stream_generate(..., json_schema=...)` and `tool_choice` through a real (tiny, random) model:
the constraint is built from the rendered prompt, runs before the other logits processors, and
every bad request is one line before any model work."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from checkpoints import TOOL_TOKENS, WEATHER, add_tool_tokens  # noqa: E402

from mlx_gemma4 import generate, load, stream_generate  # noqa: E402
from mlx_gemma4.constrain import JsonConstraint, _schema_grammar  # noqa: E402
from mlx_gemma4.errors import ConstraintError  # noqa: E402

ASK = [{"role": "user", "content": "Reply in JSON."}]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["name", "age"],
}
TIME = {
    "type": "function",
    "function": {
        "name": "time:now",
        "parameters": {
            "type": "object",
            "properties": {"utc": {"type": "boolean"}},
            "required": ["utc"],
        },
    },
}
TOOL_ID = {text: token_id for token_id, text in TOOL_TOKENS.items()}
SAMPLED = {"max_tokens": 200, "temperature": 1.0}


@pytest.fixture(scope="module")
def loaded(chat_checkpoint):
    folder, _ = chat_checkpoint()
    return load(folder)


@pytest.fixture(scope="module")
def tool_loaded(chat_checkpoint, tmp_path_factory):
    source, _ = chat_checkpoint()
    folder = shutil.copytree(source, tmp_path_factory.mktemp("schema-tools"), dirs_exist_ok=True)
    add_tool_tokens(folder)
    return load(folder)


def recording(seen: list):
    """A logits processor that records (history, logits) and changes nothing."""

    def processor(history, logits):
        seen.append((history.tolist(), np.array(logits)))
        return logits

    return processor


def closing_bias(processor, bias: float = 8.0):
    """Run after the constraint: favour the tokens that close strings, objects and arrays (a
    random model otherwise writes an unbounded string for ever); the constraint still decides
    what is allowed."""
    closers = mx.array([processor.encode(c)[-1] for c in ['"', "}", "]"]])

    def process(_history, logits):
        return logits + mx.zeros((logits.shape[-1],)).at[closers].add(bias)

    return process


@pytest.mark.parametrize(
    "schema, check",
    [(PERSON, PERSON), (json.dumps(PERSON), PERSON), (True, {"type": "object"})],
    ids=["dict", "json string", "any object"],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_json_schema_answers_validate(loaded, schema, check, seed):
    model, processor = loaded
    bias = [closing_bias(processor)] if schema is True else []
    responses = list(
        stream_generate(
            model, processor, ASK, json_schema=schema, logits_processors=bias, seed=seed,
            **SAMPLED,
        )
    )  # fmt: skip
    text = "".join(r.text for r in responses)
    assert responses[-1].finish_reason == "stop", text
    jsonschema.validate(json.loads(text), check)


def test_generate_returns_the_json_text(loaded):
    model, processor = loaded
    text = generate(model, processor, ASK, json_schema=PERSON, seed=2, **SAMPLED)
    jsonschema.validate(json.loads(text), PERSON)


def test_the_constraint_runs_first_on_the_rendered_prompt(loaded):
    """The processors after the constraint see masked logits; the history it starts from is the
    rendered prompt with its generation prompt."""
    model, processor = loaded
    seen = []
    list(
        stream_generate(
            model, processor, ASK, json_schema=PERSON, logits_processors=[recording(seen)],
            max_tokens=3,
        )
    )  # fmt: skip
    rendered = processor.apply_chat_template(ASK, tokenize=True, add_generation_prompt=True)
    history, logits = seen[0]
    assert history == list(rendered)
    allowed = np.flatnonzero(np.isfinite(logits[0]))
    assert 0 < len(allowed) < 10 and processor.encode("{")[-1] in allowed
    assert 100 not in allowed  # thinking off: the prompt's empty thought channel is closed


def scripted_thought(tokens: list[int]):
    """Run after the constraint: force `tokens` (a thought) first, then leave the logits be."""
    step = [0]

    def processor(_history, logits):
        if step[0] >= len(tokens):
            return logits
        token = tokens[step[0]]
        step[0] += 1
        return mx.where(mx.arange(logits.shape[-1]) == token, 0.0, -mx.inf)[None]

    return processor


def test_thought_is_free_then_the_answer_is_json(loaded):
    model, processor = loaded
    thought = [100, *processor.encode("thought\nnot { json, [")[1:], 101]  # <|channel>...<channel|>
    responses = list(
        stream_generate(
            model, processor, ASK, json_schema=PERSON, enable_thinking=True,
            logits_processors=[scripted_thought(thought)], seed=3, **SAMPLED,
        )
    )  # fmt: skip
    assert [r.token for r in responses[: len(thought)]] == thought  # not refused by the grammar
    assert "not { json" in "".join(r.thought for r in responses)
    text = "".join(r.text for r in responses)
    assert responses[-1].finish_reason == "stop", text
    jsonschema.validate(json.loads(text), PERSON)


def test_with_thinking_on_the_first_token_may_open_a_thought(loaded):
    model, processor = loaded
    seen = []
    list(
        stream_generate(
            model, processor, ASK, json_schema=PERSON, enable_thinking=True,
            logits_processors=[recording(seen)], max_tokens=1,
        )
    )  # fmt: skip
    allowed = np.isfinite(seen[0][1][0])
    assert allowed[100] and allowed[processor.encode("{")[-1]] and allowed.sum() < 10


def test_compiled_schemas_are_reused(loaded):
    _, processor = loaded
    schema = {"type": "object", "properties": {"reused": {"type": "boolean"}}}
    JsonConstraint(processor, schema)
    hits = _schema_grammar.cache_info().hits
    JsonConstraint(processor, dict(schema))
    assert _schema_grammar.cache_info().hits == hits + 1


# --- tool_choice ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "choice, names",
    [
        ("required", {"get_weather", "time:now"}),
        ("get_weather", {"get_weather"}),
        ({"type": "function", "function": {"name": "time:now"}}, {"time:now"}),
    ],
    ids=["required", "name", "openai form"],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_forced_call_comes_out_as_a_tool_call(tool_loaded, choice, names, seed):
    model, processor = tool_loaded
    responses = list(
        stream_generate(
            model, processor, [{"role": "user", "content": "Call a tool."}],
            tools=[WEATHER, TIME], tool_choice=choice, seed=seed, **SAMPLED,
        )
    )  # fmt: skip
    calls = [call for r in responses for call in r.tool_calls]
    assert responses[-1].finish_reason == "tool_calls"
    assert "".join(r.text for r in responses) == "" and not responses[-1].malformed_tool_call
    assert len(calls) == 1 and calls[0].name in names
    tool = {"get_weather": WEATHER, "time:now": TIME}[calls[0].name]
    jsonschema.validate(calls[0].arguments, tool["function"]["parameters"])


def test_tool_choice_none_declares_the_tools_but_never_calls(tool_loaded):
    model, processor = tool_loaded
    seen = []
    responses = list(
        stream_generate(
            model, processor, [{"role": "user", "content": "Weather?"}], tools=[WEATHER],
            tool_choice="none", logits_processors=[recording(seen)], max_tokens=4,
        )
    )  # fmt: skip
    assert "declaration:get_weather" in processor.decode(seen[0][0])
    assert all(np.isneginf(logits[0, TOOL_ID["<|tool_call>"]]) for _, logits in seen)
    assert all(np.isfinite(logits[0, : TOOL_ID["<|tool_call>"]]).all() for _, logits in seen)
    assert not any(r.tool_calls for r in responses)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"json_schema": {"type": "objekt"}}, "not a valid JSON Schema"),
        ({"json_schema": '{"type": '}, "not valid JSON"),
        ({"json_schema": {"if": {"type": "string"}}}, "Unimplemented keys"),
        ({"json_schema": PERSON, "tools": [WEATHER], "tool_choice": "required"}, "pass one"),
        ({"tool_choice": "required"}, "needs tools"),
        ({"tools": [WEATHER], "tool_choice": "get_time"}, "none of the tools"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function"}}, "tool_choice: expected"),
    ],
)
def test_bad_requests_fail_before_any_model_work(tool_loaded, monkeypatch, kwargs, message):
    model, processor = tool_loaded
    calls = []
    text_model = type(model.language_model)
    real = text_model.__call__
    monkeypatch.setattr(text_model, "__call__", lambda *a, **k: calls.append(1) or real(*a, **k))
    with pytest.raises(ConstraintError, match=message) as error:
        list(stream_generate(model, processor, ASK, max_tokens=4, **kwargs))
    assert "\n" not in str(error.value) and calls == []
    list(stream_generate(model, processor, ASK, max_tokens=1))
    assert calls  # the wrapper does count the model's work
