"""The built-in template renders byte for byte what Google's Gemma 4 template renders.

`tests/data/gemma4-interleaved.jinja` is Google's chat template for the instruction-tuned Gemma 4
checkpoints, revision with interleaved thinking (reasoning kept between tool calls after the last
user turn, `<|think|>` followed by a newline), copied unchanged from the public copy in llama.cpp
(`models/templates/google-gemma-4-31B-it-interleaved.jinja`). It is reference data: every test here
renders the same messages through transformers' `apply_chat_template` with that template and with
our `BUILTIN_TEMPLATE`, and asserts the two strings are equal.
"""

from __future__ import annotations

import random

import pytest
from checkpoints import GEMMA4_TEMPLATE

from mlx_gemma4.processing.chat_template import BUILTIN_TEMPLATE


@pytest.fixture(scope="module")
def render(tmp_path_factory):
    from checkpoints import chat_renderer

    return chat_renderer(tmp_path_factory.mktemp("render"))


def assert_same(render, messages, tools=None):
    """Equal renderings with thinking on and off, with and without the generation prompt."""
    for thinking in (False, True):
        for generation_prompt in (False, True):
            real = render(messages, GEMMA4_TEMPLATE, tools, thinking, generation_prompt)
            ours = render(messages, BUILTIN_TEMPLATE, tools, thinking, generation_prompt)
            assert ours == real, f"thinking={thinking} generation_prompt={generation_prompt}"


def function(name, parameters=None, description="Does a thing.", **extra):
    spec = {"name": name, "description": description, **extra}
    if parameters is not None:
        spec["parameters"] = parameters
    return {"type": "function", "function": spec}


def obj(properties, required=None, **extra):
    schema = {"type": "object", "properties": properties, **extra}
    if required is not None:
        schema["required"] = required
    return schema


WEATHER = function(
    "get_weather",
    obj(
        {
            "city": {"type": "string", "description": "City name, e.g. Paris"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "description": "Unit"},
            "days": {"type": "integer", "nullable": True},
        },
        required=["city"],
    ),
    description="Current weather for a city.",
)

TOOL_SETS = {
    "flat": [WEATHER],
    "several": [WEATHER, function("ping", obj({})), function("mcp:search.v2-beta", obj({}))],
    "no_parameters": [function("now")],
    "parameters_without_properties": [function("noop", {"type": "object"})],
    "parameters_without_type": [function("odd", {"properties": {"a": {"type": "string"}}})],
    "no_description": [{"type": "function", "function": {"name": "bare", "parameters": obj({})}}],
    "response_declaration": [
        function("lookup", obj({"q": {"type": "string"}}), response={"type": "object"}),
        function("count", obj({}), response={"description": "How many", "type": "object"}),
        function("other", obj({}), response={"description": "Text", "type": "string"}),
    ],
    "nested_objects": [
        function(
            "book",
            obj(
                {
                    "guest": obj(
                        {"name": {"type": "string"}, "address": obj({"zip": {"type": "string"}})},
                        required=["name"],
                        description="Who stays",
                    ),
                    "plain": {"type": "object"},
                    "untyped_inner": {"type": "object", "extra": {"type": "number"}},
                    "nullable_obj": {"type": "object", "nullable": True, "properties": {}},
                },
                required=["guest"],
            ),
        )
    ],
    "arrays": [
        function(
            "batch",
            obj(
                {
                    "ids": {"type": "array", "items": {"type": "integer"}, "description": "Ids"},
                    "rows": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {"k": {"type": "string"}, "v": {"type": "number"}},
                            "required": ["k"],
                        },
                    },
                    "mixed": {"type": "array", "items": {"type": ["string", "null"]}},
                    "limits": {
                        "type": "array",
                        "items": {"type": "string", "enum": ["a", "b"], "description": None},
                        "minItems": 1,
                    },
                    "any": {"type": "array"},
                    "empty_items": {"type": "array", "items": {}},
                    "nested": {"type": "array", "items": {"type": "array", "items": {"x": 1}}},
                }
            ),
        )
    ],
    "keyword_property_names": [
        function("kw", obj({"type": {"type": "string"}, "description": {"type": "string"}}))
    ],
    "case_insensitive_sort": [
        function("sorting", obj({"b": {"type": "string"}, "A": {"type": "string"}, "a_": {}}))
    ],
    "upper_case_types": [function("upper", obj({"x": {"type": "STRING"}, "y": {"type": "Array"}}))],
    "list_type": [function("typed", obj({"x": {"type": ["string", "null"]}}))],
    "special_text": [
        function("quote", obj({"s": {"type": "string", "description": 'Has "quotes", {braces}'}}))
    ],
}


@pytest.mark.parametrize("system", [None, "system", "developer"])
@pytest.mark.parametrize("tools", TOOL_SETS)
def test_tool_declarations(render, tools, system):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    if system:
        messages.insert(0, {"role": system, "content": "  You help.  "})
    assert_same(render, messages, TOOL_SETS[tools])


def call(name, arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


ARGUMENTS = {
    "empty": {},
    "strings": {"city": "Paris", "note": 'a "b", {c}: d\nnew line'},
    "scalars": {"n": 3, "x": -1.5, "big": 1e21, "small": 1e-7, "ok": True, "no": False, "z": None},
    "nested": {"filter": {"tags": ["a", "b"], "range": {"lo": 0, "hi": 10}}, "list": [[1, 2], []]},
    "sort": {"b": 1, "A": 2, "a": 3},
    "json_string": '{"city": "Paris"}',
    "gemma_string": 'city:<|"|>Paris<|"|>',
}


@pytest.mark.parametrize("arguments", ARGUMENTS)
def test_tool_call_arguments(render, arguments):
    messages = [
        {"role": "user", "content": "Go"},
        {"role": "assistant", "tool_calls": [call("act", ARGUMENTS[arguments])]},
    ]
    assert_same(render, messages, [WEATHER])


def test_several_calls_and_responses_in_one_turn(render):
    messages = [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                call("get_weather", {"city": "Paris"}),
                call("get_weather", {"city": "Rome"}),
            ],
            "tool_responses": [
                {"name": "get_weather", "response": {"temp": 21, "sky": "clear"}},
                {"name": "get_weather", "response": {"temp": 25.5, "sky": None}},
            ],
        },
    ]
    assert_same(render, messages, [WEATHER])
    messages.append({"role": "assistant", "content": "Paris 21, Rome 25.5."})
    messages.append({"role": "user", "content": "Thanks"})
    assert_same(render, messages, [WEATHER])


RESPONSES = {
    "mapping": {"temp": 20, "detail": {"wind": [1, 2]}},
    "string": "20 degrees",
    "number": 20,
    "list": [1, "two", None],
    "boolean": False,
    "none": None,
    "empty_mapping": {},
}


@pytest.mark.parametrize("response", RESPONSES)
def test_tool_response_values(render, response):
    messages = [
        {"role": "user", "content": "Go"},
        {
            "role": "assistant",
            "tool_calls": [call("get_weather", {"city": "Paris"})],
            "tool_responses": [{"name": "get_weather", "response": RESPONSES[response]}],
        },
    ]
    assert_same(render, messages, [WEATHER])


def test_tool_response_without_name(render):
    messages = [
        {"role": "user", "content": "Go"},
        {"role": "assistant", "tool_responses": [{"response": {"ok": True}}]},
    ]
    assert_same(render, messages)


def test_calls_after_responses_continue_the_open_turn(render):
    messages = [
        {"role": "user", "content": "Plan a trip"},
        {
            "role": "assistant",
            "tool_calls": [call("get_weather", {"city": "Paris"})],
            "tool_responses": [{"name": "get_weather", "response": {"temp": 5}}],
        },
        {
            "role": "assistant",
            "tool_calls": [call("get_weather", {"city": "Nice"})],
            "tool_responses": [{"name": "get_weather", "response": {"temp": 15}}],
        },
        {"role": "assistant", "content": "Go to Nice."},
    ]
    assert_same(render, messages, [WEATHER])
    assert_same(render, messages[:3], [WEATHER])


def test_reasoning_is_kept_only_after_the_last_user_turn(render):
    earlier = {
        "role": "assistant",
        "reasoning_content": "Old plan.",
        "tool_calls": [call("get_weather", {"city": "Oslo"})],
        "tool_responses": [{"name": "get_weather", "response": {"temp": -3}}],
    }
    later = {**earlier, "reasoning_content": "New plan.", "tool_calls": [call("ping", {})]}
    messages = [
        {"role": "user", "content": "Oslo?"},
        earlier,
        {"role": "assistant", "content": "Cold."},
        {"role": "user", "content": "And now?"},
        later,
    ]
    assert_same(render, messages, [WEATHER])
    text = render(messages, BUILTIN_TEMPLATE, [WEATHER], thinking=True)
    assert "New plan." in text and "Old plan." not in text


def test_thoughts_in_model_text_are_dropped(render):
    messages = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<|channel>thought\nadd<channel|> 4 "},
        {"role": "user", "content": "3+3?"},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "a<channel|>b<|channel>thought\nx<channel|>c"},
                {"type": "text", "text": "d<|channel>unclosed"},
            ],
        },
        {"role": "user", "content": [{"type": "text", "text": "  keep <|channel>this  "}]},
    ]
    assert_same(render, messages)


def test_media_parts(render):
    messages = [
        {"role": "system", "content": "Look and listen."},
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "text", "text": "What is this?"},
                {"type": "audio"},
                {"type": "video"},
                {"type": "image", "url": "x.png"},
            ],
        },
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": [{"type": "text", "text": "And this?"}, {"type": "audio"}]},
    ]
    assert_same(render, messages, [WEATHER])


def test_multimodal_tool_turn(render):
    """Read a city off a photo, call the weather tool, answer."""
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Weather here?"}]},
        {
            "role": "assistant",
            "tool_calls": [call("get_weather", {"city": "Paris"})],
            "tool_responses": [{"name": "get_weather", "response": {"temp": 18}}],
            "content": [{"type": "image"}],
        },
    ]
    assert_same(render, messages, [WEATHER])


def test_plain_conversations(render):
    assert_same(render, [{"role": "user", "content": " Hi "}])
    assert_same(render, [{"role": "system", "content": "Only a system turn."}])
    assert_same(
        render,
        [
            {"role": "developer", "content": "Terse."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Bye"},
        ],
    )


def test_thinking_off_ends_the_prompt_with_an_empty_thought_channel(render):
    messages = [{"role": "user", "content": "Hi"}]
    text = render(messages, BUILTIN_TEMPLATE, thinking=False)
    assert text == "<bos><|turn>user\nHi<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"
    text = render(messages, BUILTIN_TEMPLATE, thinking=True)
    assert text == "<bos><|turn>system\n<|think|>\n<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\n"


# Random schemas and conversations: the cases above cannot think of everything.

NAMES = ["a", "B", "city", "zip_code", "x1", "type", "items", "Value", "nested.name"]
TYPES = ["string", "integer", "number", "boolean", "object", "array", "null", "STRING"]


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    kind = rng.choice(TYPES if depth < 3 else TYPES[:4])
    schema: dict = {"type": kind}
    if rng.random() < 0.5:
        schema["description"] = rng.choice(["Some text", "with: colon", "", "x, y {z}"])
    if rng.random() < 0.2:
        schema["nullable"] = rng.random() < 0.5
    if kind == "string" and rng.random() < 0.4:
        schema["enum"] = rng.sample(["red", "green", "blue", "a b"], rng.randint(0, 3))
    if kind == "object":
        if rng.random() < 0.8:
            schema["properties"] = random_properties(rng, depth + 1)
            if schema["properties"] and rng.random() < 0.6:
                schema["required"] = rng.sample(sorted(schema["properties"]), 1)
    if kind == "array" and rng.random() < 0.8:
        schema["items"] = random_schema(rng, depth + 1)
        if rng.random() < 0.3:
            schema["items"]["minItems"] = rng.randint(0, 3)
    return schema


def random_properties(rng: random.Random, depth: int) -> dict:
    return {rng.choice(NAMES): random_schema(rng, depth) for _ in range(rng.randint(0, 4))}


def random_value(rng: random.Random, depth: int = 0):
    choices = ["str", "int", "float", "bool", "none"] + (["dict", "list"] if depth < 3 else [])
    kind = rng.choice(choices)
    if kind == "str":
        return rng.choice(["", "Paris", 'q"uote', "a,b:c{d}[e]", "line\nbreak", " pad "])
    if kind == "int":
        return rng.randint(-1000, 1000)
    if kind == "float":
        return rng.choice([0.5, -2.25, 1e-9, 3.0e22, rng.uniform(-10, 10)])
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "none":
        return None
    if kind == "dict":
        return {rng.choice(NAMES): random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))}
    return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]


def random_conversation(rng: random.Random) -> tuple[list[dict], list[dict]]:
    tools = [
        function(f"tool_{i}", obj(random_properties(rng, 0), required=[]))
        for i in range(rng.randint(0, 3))
    ]
    messages: list[dict] = []
    if rng.random() < 0.5:
        messages.append({"role": rng.choice(["system", "developer"]), "content": "Be helpful."})
    for _ in range(rng.randint(1, 4)):
        messages.append({"role": "user", "content": rng.choice(["Hi", " What? ", "Do it"])})
        for _ in range(rng.randint(0, 2)):
            step: dict = {"role": "assistant"}
            if rng.random() < 0.3:
                step["reasoning_content"] = "Thinking about it."
            step["tool_calls"] = [
                call(f"tool_{i}", random_value(rng, 1) if rng.random() < 0.9 else "raw:1")
                for i in range(rng.randint(1, 2))
            ]
            if rng.random() < 0.8:
                step["tool_responses"] = [
                    {"name": c["function"]["name"], "response": random_value(rng, 1)}
                    for c in step["tool_calls"]
                ]
            messages.append(step)
        if rng.random() < 0.7:
            messages.append({"role": "assistant", "content": "<|channel>t<channel|>Done."})
    return messages, tools


@pytest.mark.parametrize("seed", range(40))
def test_random_conversations(render, seed):
    rng = random.Random(seed)
    messages, tools = random_conversation(rng)
    assert_same(render, messages, tools)


@pytest.mark.parametrize("thinking", [False, True])
def test_processor_renders_tools_like_the_real_template(chat_checkpoint, render, thinking):
    """A checkpoint without a template: the processor's prompt is what Google's template gives."""
    from mlx_gemma4 import load

    _, processor = load(chat_checkpoint()[0])
    assert not processor.has_own_template
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Weather?"}]},
        {
            "role": "assistant",
            "tool_calls": [call("get_weather", {"city": "Paris"})],
            "tool_responses": [{"name": "get_weather", "response": {"temp": 18}}],
        },
    ]
    ours = processor.apply_chat_template(messages, tools=[WEATHER], enable_thinking=thinking)
    assert ours == render(messages, GEMMA4_TEMPLATE, [WEATHER], thinking)


def test_the_older_revision_differs_only_where_the_newer_one_changed(render):
    """`tests/data/gemma4.jinja` is the template's earlier revision (llama.cpp's
    `models/templates/gemma4.jinja`). It agrees with the interleaved one, which we follow, except
    for the newline after `<|think|>`, reasoning kept between tool calls, and a tool call after
    tool responses going on in the open turn rather than opening a new one."""
    from pathlib import Path

    older = (Path(__file__).parent / "data" / "gemma4.jinja").read_text()
    step = {
        "role": "assistant",
        "tool_calls": [call("get_weather", {"city": "Paris"})],
        "tool_responses": [{"name": "get_weather", "response": {"temp": 18}}],
    }
    one_step = [{"role": "user", "content": "Weather?"}, step]
    assert render(one_step, older, [WEATHER]) == render(one_step, BUILTIN_TEMPLATE, [WEATHER])
    thinking = render(one_step, older, [WEATHER], thinking=True)
    ours = render(one_step, BUILTIN_TEMPLATE, [WEATHER], thinking=True)
    assert ours == thinking.replace("<|think|>", "<|think|>\n")
    reasoned = [one_step[0], {**step, "reasoning_content": "Plan."}]
    assert "Plan." not in render(reasoned, older)
    assert "<|turn>model\n<|channel>thought\nPlan.<channel|>" in render(reasoned, BUILTIN_TEMPLATE)
    two_steps = [*one_step, {**step, "reasoning_content": ""}]
    assert render(two_steps, older).count("<|turn>model") == 2
    assert render(two_steps, BUILTIN_TEMPLATE).count("<|turn>model") == 1
