"""Constrained decoding: a random tiny model writes schema-valid JSON and Gemma tool calls."""

from __future__ import annotations

import json
import re
import shutil

import mlx.core as mx
import numpy as np
import pytest

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from checkpoints import TOOL_TOKENS, add_tool_tokens  # noqa: E402

from mlx_gemma4 import load, parse_tool_calls, stream_generate  # noqa: E402
from mlx_gemma4.constrain import (  # noqa: E402
    CallGrammar,
    JsonConstraint,
    ToolCallConstraint,
    json_logits_processor,
    tool_call_logits_processor,
)
from mlx_gemma4.errors import ConstraintError  # noqa: E402

SHORT = {"type": "string", "maxLength": 6}
SCHEMAS = {
    "flat object": {
        "type": "object",
        "properties": {"name": SHORT, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
        "required": ["name", "age"],
    },
    "nested objects": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer", "minimum": 1, "maximum": 999},
                    "address": {
                        "type": "object",
                        "properties": {
                            "city": SHORT,
                            "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                        },
                        "required": ["city", "zip"],
                    },
                },
                "required": ["id", "address"],
            }
        },
        "required": ["user"],
    },
    "array with item limits": {
        "type": "array",
        "items": {"type": "integer", "minimum": -5, "maximum": 5},
        "minItems": 2,
        "maxItems": 4,
    },
    "array of objects": {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {"sku": SHORT, "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
            "required": ["sku", "qty"],
        },
        "minItems": 1,
        "maxItems": 3,
    },
    "string enum": {
        "type": "object",
        "properties": {"status": {"enum": ["draft", "active", "archived"]}},
        "required": ["status"],
    },
    "mixed enum": {"enum": ["red", 3, None, True]},
    "const": {"type": "object", "properties": {"kind": {"const": "event"}}, "required": ["kind"]},
    "integer bounds": {"type": "integer", "minimum": 10, "maximum": 20},
    "exclusive integer bounds": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 5},
    "number bounds": {
        "type": "object",
        "properties": {"score": {"type": "number", "minimum": 0, "maximum": 1}},
        "required": ["score"],
    },
    "optional fields": {
        "type": "object",
        "properties": {
            "a": {"type": "boolean"},
            "b": {"type": "integer", "minimum": 0, "maximum": 9},
            "c": {"type": "null"},
        },
        "required": ["b"],
    },
    "all optional": {
        "type": "object",
        "properties": {"x": {"type": "boolean"}, "y": {"type": "null"}},
    },
    "string pattern": {
        "type": "object",
        "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}},
        "required": ["code"],
    },
    "string lengths": {"type": "string", "minLength": 3, "maxLength": 5},
    "booleans": {
        "type": "object",
        "properties": {"on": {"type": "boolean"}, "off": {"type": "boolean"}},
        "required": ["on", "off"],
    },
    "null": {"type": "null"},
    "nullable": {
        "type": "object",
        "properties": {"note": {"type": ["string", "null"], "maxLength": 4}},
        "required": ["note"],
    },
    "anyOf": {
        "anyOf": [
            {"type": "integer", "minimum": 0, "maximum": 9},
            {"type": "object", "properties": {"v": {"type": "boolean"}}, "required": ["v"]},
        ]
    },
    "refs": {
        "$defs": {
            "point": {
                "type": "object",
                "properties": {
                    "x": {"type": "integer", "minimum": 0, "maximum": 9},
                    "y": {"type": "integer", "minimum": 0, "maximum": 9},
                },
                "required": ["x", "y"],
            }
        },
        "type": "object",
        "properties": {"from": {"$ref": "#/$defs/point"}, "to": {"$ref": "#/$defs/point"}},
        "required": ["from", "to"],
    },
    "tuple": {
        "type": "array",
        "prefixItems": [SHORT, {"type": "integer", "minimum": 0, "maximum": 3}],
        "items": False,
        "minItems": 2,
    },
    "unique enum array": {
        "type": "array",
        "items": {"enum": ["a", "b", "c"]},
        "maxItems": 2,
    },
    "date format": {
        "type": "object",
        "properties": {"day": {"type": "string", "format": "date"}},
        "required": ["day"],
    },
}


@pytest.fixture(scope="module")
def loaded(chat_checkpoint):
    folder, _ = chat_checkpoint()
    return load(folder)


def constrained(model, processor, processor_fn, prompt=None, **kwargs):
    prompt = prompt or [{"role": "user", "content": "Reply in JSON."}]
    responses = list(
        stream_generate(model, processor, prompt, logits_processors=[processor_fn], **kwargs)
    )
    return "".join(r.text for r in responses), "".join(r.thought for r in responses), responses[-1]


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_random_model_writes_valid_json(loaded, name):
    model, processor = loaded
    schema = SCHEMAS[name]
    text, _, last = constrained(
        model,
        processor,
        json_logits_processor(processor, schema),
        max_tokens=300,
        temperature=1.0,
        seed=0,
    )
    assert last.finish_reason == "stop" and last.token in processor.stop_token_ids, text
    jsonschema.validate(json.loads(text), schema)


def test_random_model_is_not_valid_json_unconstrained(loaded):
    """The tiny model's own answer is not JSON: the constraint, not luck, makes the above pass."""
    model, processor = loaded
    text = "".join(
        r.text
        for r in stream_generate(
            model, processor, [{"role": "user", "content": "Reply in JSON."}], max_tokens=40
        )
    )
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_any_json_object_walks_a_scripted_answer(loaded):
    """`True` allows any JSON object: every token of one is allowed in turn, then only stops."""
    _, processor = loaded
    fn = json_logits_processor(processor, True)
    prompt = processor.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True)
    answer = processor.encode('{"a":[1,{"b":null}],"c":"x y"}')[1:]
    history = list(prompt)
    logits = mx.zeros((1, 512))
    for token in [*answer, 106]:
        allowed = np.isfinite(np.array(fn(mx.array(history), logits)))[0]
        assert allowed[token]
        history.append(token)
    allowed = np.isfinite(np.array(fn(mx.array(history), logits)))[0]
    assert set(np.flatnonzero(allowed)) == processor.stop_token_ids


def opening_a_thought():
    """A processor to run before the constraint: the first sampled token opens a thought
    (`<|channel>`, 100), which the tiny random model would rarely choose itself."""
    prompt_length = []

    def processor(history, logits):
        prompt_length.append(prompt_length[0] if prompt_length else history.shape[0])
        if history.shape[0] == prompt_length[0]:
            return mx.where(mx.arange(logits.shape[-1]) == 100, 0.0, -mx.inf)[None]
        return logits

    return processor


def test_thought_is_free_then_the_answer_is_json(loaded):
    model, processor = loaded
    schema = SCHEMAS["flat object"]
    budget = 12
    fn = json_logits_processor(processor, schema, thought_budget=budget)
    responses = list(
        stream_generate(
            model,
            processor,
            [{"role": "user", "content": "Reply in JSON."}],
            enable_thinking=True,
            logits_processors=[opening_a_thought(), fn],
            max_tokens=300,
            temperature=1.0,
            seed=1,
        )
    )
    tokens = [r.token for r in responses]
    assert tokens[0] == 100 and 101 in tokens[1 : budget + 2]  # closed within the budget
    assert tokens.index(101) > 1  # the thought holds free tokens (its text, without a newline,
    # is the channel's name line, which the text stream consumes)
    text = "".join(r.text for r in responses)
    assert responses[-1].finish_reason == "stop"
    jsonschema.validate(json.loads(text), schema)


def test_thinking_state_machine_on_a_scripted_sequence(loaded):
    """With thinking on, the first token may open a thought; inside it anything goes (even
    braces); after `<channel|>` only the grammar's tokens; once the JSON closes only stops."""
    _, processor = loaded
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    fn = json_logits_processor(processor, schema)
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=True, enable_thinking=True
    )
    logits = mx.zeros((1, 512))

    def allowed(history):
        return np.isfinite(np.array(fn(mx.array(history), logits)))[0]

    history = list(prompt)
    first = allowed(history)
    assert first[100] and first[processor.encode("{")[-1]] and not first[processor.encode("x")[-1]]
    history.append(100)  # <|channel>
    for token in processor.encode("thought\nnot { json")[1:]:
        assert allowed(history).all()  # the thought is free
        history.append(token)
    assert allowed(history).all()
    history.append(101)  # <channel|>
    for token in processor.encode('{"ok":true}')[1:]:
        mask = allowed(history)
        assert mask[token] and not mask[101] and mask.sum() < 512
        history.append(token)
    assert set(np.flatnonzero(allowed(history))) == processor.stop_token_ids


def test_empty_thought_channel_starts_the_answer_at_once(loaded):
    """A prompt that ends with the empty thought `<|channel>thought\\n<channel|>` (what the real
    template appends with thinking off) is answered in JSON from the first token."""
    _, processor = loaded
    fn = json_logits_processor(processor, True)
    prompt = processor.encode("<|turn>user\nhi<turn|>\n<|turn>model\n<|channel>thought\n<channel|>")
    assert prompt[-1] == 101
    mask = np.isfinite(np.array(fn(mx.array(prompt), mx.zeros((1, 512)))))[0]
    assert mask[processor.encode("{")[-1]] and not mask[100] and mask.sum() < 10


def test_thought_budget_forces_the_thought_to_end(loaded):
    _, processor = loaded
    fn = json_logits_processor(processor, True, thought_budget=3)
    history = processor.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=True, enable_thinking=True
    )
    logits = mx.zeros((1, 512))
    fn(mx.array(history), logits)
    history.append(100)  # <|channel> opens the thought
    for token in processor.encode("abc")[1:]:
        assert np.isfinite(np.array(fn(mx.array(history), logits))).all()
        history.append(token)
    mask = np.isfinite(np.array(fn(mx.array(history), logits)))[0]
    assert np.flatnonzero(mask).tolist() == [101]


def test_prompt_that_opens_the_thought_starts_inside_it(loaded):
    _, processor = loaded
    fn = json_logits_processor(processor, True, thought_budget=0)
    prompt = processor.encode("<|turn>user\nhi<turn|>\n<|turn>model\n<|channel>")
    mask = np.isfinite(np.array(fn(mx.array(prompt), mx.zeros((1, 512)))))[0]
    assert np.flatnonzero(mask).tolist() == [101]


def test_logits_wider_than_the_vocabulary_are_masked(loaded):
    _, processor = loaded
    fn = json_logits_processor(processor, True)
    out = fn(mx.array(processor.encode("hi")), mx.zeros((1, 520)))
    assert out.shape == (1, 520) and np.isneginf(np.array(out)[0, 512:]).all()


# --- bad schemas --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "schema, message",
    [
        ('{"type": "object",', "not valid JSON"),
        ({"type": "objekt"}, "not a valid JSON Schema"),
        ({"type": "object", "properties": {"a": {"minLength": -1}}}, "properties/a/minLength"),
        ({"type": "string", "format": "uri-reference"}, "Unknown format"),
        ({"if": {"type": "string"}, "then": {"maxLength": 3}}, "Unimplemented keys"),
        (42, "expected a JSON object"),
    ],
)
def test_bad_schema_is_one_clear_line(loaded, schema, message):
    _, processor = loaded
    with pytest.raises(ConstraintError, match=re.escape(message)) as error:
        JsonConstraint(processor, schema)
    assert "\n" not in str(error.value)


# --- forced tool calls ----------------------------------------------------------------------------

TOOL_TOKENS_BY_TEXT = {text: token_id for token_id, text in TOOL_TOKENS.items()}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 8},
                "code": {"type": "string", "pattern": "^[A-Z]{2}$"},
                "unit": {"enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer"},
            },
            "required": ["city", "unit"],
        },
    },
}
SEARCH = {
    "type": "function",
    "function": {
        "name": "docs:search-v2",
        "parameters": {
            "type": "object",
            "properties": {
                "tags": {"type": "array", "items": {"type": "boolean"}},
                "exact": {"type": "boolean"},
            },
            "required": ["exact"],
        },
    },
}


@pytest.fixture(scope="module")
def tool_tiny(chat_checkpoint, tmp_path_factory):
    """The tiny checkpoint with Gemma's tool-call control tokens (tests/checkpoints.py)."""
    source, _ = chat_checkpoint()
    folder = shutil.copytree(source, tmp_path_factory.mktemp("tool-tokens"), dirs_exist_ok=True)
    add_tool_tokens(folder)
    return load(folder)


def test_the_grammar_uses_the_tokenizer_tool_tokens(tool_tiny):
    """The call grammar names the control tokens by the ids this tokenizer gives them."""
    _, processor = tool_tiny
    grammar = CallGrammar(processor).grammar([WEATHER["function"]])
    for text in ("<|tool_call>", "<tool_call|>", '<|"|>'):
        assert f"<[{TOOL_TOKENS_BY_TEXT[text]}]>" in grammar


def parse_call(text: str) -> tuple[str, dict]:
    calls = parse_tool_calls(text)
    assert len(calls) == 1, text
    return calls[0].name, calls[0].arguments


@pytest.mark.parametrize("choice", ["required", "get_weather", "docs:search-v2"])
def test_forced_tool_call_parses(tool_tiny, choice):
    model, processor = tool_tiny
    fn = tool_call_logits_processor(processor, [WEATHER, SEARCH], choice)
    tokens = []
    for response in stream_generate(
        model,
        processor,
        [{"role": "user", "content": "Call a tool."}],
        logits_processors=[fn],
        max_tokens=300,
        temperature=1.0,
        seed=3,
    ):
        tokens.append(response.token)
    assert response.finish_reason == "stop"
    text = processor.decode(tokens[:-1])
    name, arguments = parse_call(text)
    if choice != "required":
        assert name == choice
    tool = {"get_weather": WEATHER, "docs:search-v2": SEARCH}[name]
    jsonschema.validate(arguments, tool["function"]["parameters"])


def test_python_function_as_forced_tool(tool_tiny):
    def set_alarm(hour: int, label: str) -> str:
        """Set an alarm.

        Args:
            hour: The hour, 0 to 23.
            label: What the alarm is for.
        """
        return label

    _, processor = tool_tiny
    fn = tool_call_logits_processor(processor, [set_alarm], "set_alarm")
    history = processor.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True)
    logits = mx.zeros((1, 512))
    quote = processor.token_id('<|"|>')
    call = [
        processor.token_id("<|tool_call>"),
        *processor.encode("call:set_alarm{hour:7,label:")[1:],
    ]
    call += [quote, *processor.encode("wake {up}")[1:], quote, *processor.encode("}")[1:]]
    call.append(processor.token_id("<tool_call|>"))
    for token in call:
        assert np.isfinite(np.array(fn(mx.array(history), logits)))[0, token]
        history.append(token)
    assert parse_call(processor.decode(call)) == ("set_alarm", {"hour": 7, "label": "wake {up}"})
    mask = np.isfinite(np.array(fn(mx.array(history), logits)))[0]
    assert set(np.flatnonzero(mask)) == processor.stop_token_ids


def allows_all(fn, history: list[int], tokens: list[int]) -> bool:
    """Whether `fn` allows each of `tokens` in turn after `history` (which it extends)."""
    logits = mx.zeros((1, 512))
    for token in tokens:
        if not np.isfinite(np.array(fn(mx.array(history), logits)))[0, token]:
            return False
        history.append(token)
    return True


@pytest.mark.parametrize(
    "arguments, allowed",
    [
        ("{when:{day:<Q>mon<Q>,hours:[8,9]},quiet:true}", True),
        ("{when:{day:<Q>mon<Q>},quiet:true}", False),  # hours is required
        ("{when:{day:<Q>sun<Q>,hours:[]}}", False),  # day is an enum
        ("{when:{day:<Q>mon<Q>,hours:[1.5]}}", False),  # hours are integers
        ("{quiet:true,when:{day:<Q>mon<Q>,hours:[]}}", False),  # keys in declared order
        ("{when:{day:<Q>tue<Q>,hours:[]},extra:1}", False),  # no undeclared keys
    ],
)
def test_call_arguments_follow_nested_parameter_schemas(tool_tiny, arguments, allowed):
    _, processor = tool_tiny
    schedule = {
        "name": "schedule",
        "parameters": {
            "type": "object",
            "properties": {
                "when": {
                    "type": "object",
                    "properties": {
                        "day": {"enum": ["mon", "tue"]},
                        "hours": {"type": "array", "items": {"type": "integer"}},
                    },
                    "required": ["day", "hours"],
                },
                "quiet": {"type": "boolean"},
            },
            "required": ["when"],
        },
    }
    fn = tool_call_logits_processor(processor, [schedule])
    history = processor.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True)
    quote = processor.token_id('<|"|>')
    call = [processor.token_id("<|tool_call>"), *processor.encode("call:schedule")[1:]]
    for i, part in enumerate(arguments.split("<Q>")):
        call += ([quote] if i else []) + processor.encode(part)[1:]
    call.append(processor.token_id("<tool_call|>"))
    assert allows_all(fn, history, call) == allowed


@pytest.mark.parametrize(
    "others, allowed", [(None, False), (True, True), ({"type": "integer"}, True)]
)
def test_objects_take_undeclared_keys_only_when_the_schema_says(loaded, others, allowed):
    _, processor = loaded
    schema = {"type": "object", "properties": {"a": {"type": "boolean"}}}
    if others is not None:
        schema["additionalProperties"] = others
    fn = json_logits_processor(processor, schema)
    history = processor.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True)
    assert allows_all(fn, history, processor.encode('{"b":1}')[1:]) == allowed


def test_a_processor_serves_one_generation(loaded):
    _, processor = loaded
    fn = json_logits_processor(processor, True)
    prompt = mx.array(processor.encode("hi"))
    fn(prompt, mx.zeros((1, 512)))
    with pytest.raises(ConstraintError, match="one generation"):
        fn(prompt, mx.zeros((1, 512)))


def test_tool_choice_errors(tool_tiny, loaded):
    _, processor = tool_tiny
    with pytest.raises(ConstraintError, match="none of the tools"):
        ToolCallConstraint(processor, [WEATHER], "get_time")
    with pytest.raises(ConstraintError, match=re.escape("no <|tool_call>")):
        ToolCallConstraint(loaded[1], [WEATHER])
