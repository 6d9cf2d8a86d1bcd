"""Tools in (declarations, files, modules, OpenAI tool messages) and tool calls out (parsing,
streaming), checked against Google's chat template where it renders them."""

from __future__ import annotations

import json
import random
import string

import pytest
from checkpoints import GEMMA4_TEMPLATE

from mlx_gemma4.errors import FileAccessError, Gemma4Error, ToolError
from mlx_gemma4.tool_calls import ToolCall, ToolCallStream, parse_tool_calls, split_tool_calls
from mlx_gemma4.tools import (
    load_tools_file,
    load_tools_module,
    normalize_tool_messages,
    tool_declarations,
)

Q = '<|"|>'


@pytest.fixture(scope="module")
def render(tmp_path_factory):
    from checkpoints import chat_renderer

    return chat_renderer(tmp_path_factory.mktemp("tokenizer"))


def calls_of(text):
    return [(call.name, call.arguments) for call in parse_tool_calls(text)]


# Parsing -----------------------------------------------------------------------------------------

PARSED = {
    "simple": (
        f"<|tool_call>call:get_weather{{city:{Q}Paris{Q}}}<tool_call|>",
        [("get_weather", {"city": "Paris"})],
    ),
    "string_with_syntax_inside": (
        f'<|tool_call>call:note{{text:{Q}a {{b}}, "c": d,\ne [f]{Q}}}<tool_call|>',
        [("note", {"text": 'a {b}, "c": d,\ne [f]'})],
    ),
    "numbers": (
        "<|tool_call>call:n{a:0,b:-12,c:3.25,d:-0.5,e:1e-07,f:2.5E+21,g:10}<tool_call|>",
        [("n", {"a": 0, "b": -12, "c": 3.25, "d": -0.5, "e": 1e-07, "f": 2.5e21, "g": 10})],
    ),
    "literals": (
        "<|tool_call>call:l{t:true,f:false,n:null,p:None,q:True}<tool_call|>",
        [("l", {"t": True, "f": False, "n": None, "p": None, "q": True})],
    ),
    "nested": (
        f"<|tool_call>call:q{{filter:{{{Q}tag{Q}:[{Q}a{Q},{Q}b{Q}],range:{{lo:0,hi:[1,[2]]}}}},"
        f"empty:{{}},none:[]}}<tool_call|>",
        [
            (
                "q",
                {
                    "filter": {"tag": ["a", "b"], "range": {"lo": 0, "hi": [1, [2]]}},
                    "empty": {},
                    "none": [],
                },
            )
        ],
    ),
    "several": (
        f"<|tool_call>call:a{{x:1}}<tool_call|><|tool_call>call:b{{y:{Q}z{Q}}}<tool_call|>",
        [("a", {"x": 1}), ("b", {"y": "z"})],
    ),
    "namespaced_names": (
        "<|tool_call>call:google:mcp:search{}<tool_call|>"
        "<|tool_call>call:files.read-v2{}<tool_call|><|tool_call>call:a/b{}<tool_call|>",
        [("google:mcp:search", {}), ("files.read-v2", {}), ("a/b", {})],
    ),
    "bare_opener": ("<|tool_call>:ping{n:1}<tool_call|>", [("ping", {"n": 1})]),
    "no_prefix": ("<|tool_call>ping{}<tool_call|>", [("ping", {})]),
    "whitespace": (
        f"<|tool_call> call:f {{ a : 1 ,\n b : [ 1 , 2 ] , c : {Q}x{Q} }} <tool_call|>",
        [("f", {"a": 1, "b": [1, 2], "c": "x"})],
    ),
    "trailing_commas": ("<|tool_call>call:f{a:[1,2,],}<tool_call|>", [("f", {"a": [1, 2]})]),
    "json_spelling": (
        '<|tool_call>call:f{"city": "Par\\"is", "n": [1, null]}<tool_call|>',
        [("f", {"city": 'Par"is', "n": [1, None]})],
    ),
    "missing_closer": ("<|tool_call>call:f{a:1}", [("f", {"a": 1})]),
    "drifted_with_closer": (
        f"Let me check.\ncall:get_weather{{city:{Q}Oslo{Q}}}<tool_call|>",
        [("get_weather", {"city": "Oslo"})],
    ),
    "drifted_without_closer_is_text": ("You can call:f{a:1} later.", []),
    "call_inside_a_word_is_text": ("recall:f{a:1}<tool_call|>", []),
    "name_starting_with_call": ("<|tool_call>call:call_me{}<tool_call|>", [("call_me", {})]),
    "opener_inside_a_string": (
        f"<|tool_call>call:echo{{s:{Q}<|tool_call>call:x{{}}{Q}}}<tool_call|>",
        [("echo", {"s": "<|tool_call>call:x{}"})],
    ),
}


@pytest.mark.parametrize("case", PARSED)
def test_parse_tool_calls(case):
    text, expected = PARSED[case]
    assert calls_of(text) == expected


def test_split_keeps_text_around_calls():
    text = f"Before. <|tool_call>call:f{{a:{Q}x{Q}}}<tool_call|> After."
    rest, calls, malformed = split_tool_calls(text)
    assert rest == "Before.  After." and calls == [ToolCall("f", {"a": "x"})] and malformed == []


MALFORMED = {
    "missing_value": "<|tool_call>call:f{a:}<tool_call|>",
    "unknown_word": "<|tool_call>call:f{a:yes}<tool_call|>",
    "unterminated_string": f"<|tool_call>call:f{{a:{Q}oops}}<tool_call|>",
    "no_braces": "<|tool_call>call:f<tool_call|>",
    "no_name": "<|tool_call>call:{a:1}<tool_call|>",
    "missing_comma": "<|tool_call>call:f{a:1 b:2}<tool_call|>",
    "truncated": f"<|tool_call>call:f{{a:{Q}half",
    "unclosed_array": "<|tool_call>call:f{a:[1,2}<tool_call|>",
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_calls_are_text_and_flagged(case):
    text = "Hello " + MALFORMED[case] + " bye"
    rest, calls, malformed = split_tool_calls(text)
    assert calls == []
    assert rest == text  # nothing is dropped
    assert len(malformed) == 1 and malformed[0] in text and malformed[0].startswith("<|tool_call>")


def test_a_malformed_call_does_not_hide_the_next_one():
    text = "<|tool_call>call:f{a:?}<|tool_call>call:g{b:2}<tool_call|>"
    rest, calls, malformed = split_tool_calls(text)
    assert rest == "<|tool_call>call:f{a:?}" == malformed[0]
    assert calls == [ToolCall("g", {"b": 2})]


def test_tool_call_ids_and_openai_form():
    first, second = ToolCall("f", {"a": [1, "é"]}), ToolCall("f", {"a": [1, "é"]})
    assert first == second and first.id != second.id
    openai = first.to_openai()
    assert openai["id"] == first.id and openai["type"] == "function"
    assert openai["function"]["name"] == "f"
    assert json.loads(openai["function"]["arguments"]) == {"a": [1, "é"]}
    assert first.to_message()["function"]["arguments"] == {"a": [1, "é"]}


# Round trip through Google's template ------------------------------------------------------------

KEY_CHARACTERS = string.ascii_letters + string.digits + "_.-"
TEXT_PIECES = ["a", "Z", " ", "{", "}", "[", "]", ",", ":", '"', "'", "\n", "\\", "é", "<", "|"]
TEXT_PIECES += ["call:", "<tool_call|>", "<|tool_call>", "null", "1"]


def random_key(rng: random.Random) -> str:
    return "".join(rng.choice(KEY_CHARACTERS) for _ in range(rng.randint(1, 8)))


def random_value(rng: random.Random, depth: int):
    kinds = ["str", "int", "float", "bool", "none"] + (["dict", "list"] if depth < 4 else [])
    kind = rng.choice(kinds)
    if kind == "str":
        return "".join(rng.choice(TEXT_PIECES) for _ in range(rng.randint(0, 8)))
    if kind == "int":
        return rng.choice([0, -1, rng.randint(-(10**12), 10**12)])
    if kind == "float":
        return rng.choice([0.5, -1e-9, 3e22, rng.uniform(-1e6, 1e6), float(rng.randint(-5, 5))])
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "none":
        return None
    if kind == "dict":
        return {random_key(rng): random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))}
    return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]


@pytest.mark.parametrize("seed", range(30))
def test_calls_rendered_by_the_template_parse_back(render, seed):
    rng = random.Random(seed)
    names = ["f", "get_weather", "mcp:files.read-v2", "call"]
    calls = [
        ToolCall(rng.choice(names), {random_key(rng): random_value(rng, 1) for _ in range(4)})
        for _ in range(rng.randint(1, 3))
    ]
    messages = [
        {"role": "user", "content": "Go"},
        {"role": "assistant", "tool_calls": [call.to_message() for call in calls]},
    ]
    text = render(messages, GEMMA4_TEMPLATE, generation_prompt=False)
    model_turn = text.split("<|turn>model\n", 1)[1]
    rest, parsed, malformed = split_tool_calls(model_turn)
    assert parsed == calls and malformed == [] and rest == "<turn|>\n"
    assert_streams_like_split(model_turn, rng)


# Streaming ---------------------------------------------------------------------------------------


def stream(text: str, pieces: list[str]):
    tool_stream = ToolCallStream()
    shown, calls = [], []
    for piece in pieces:
        text_piece, new_calls = tool_stream.feed(piece)
        shown.append(text_piece)
        calls.extend(new_calls)
    tail, last_calls, flagged = tool_stream.finish()
    shown.append(tail)
    calls.extend(last_calls)
    return shown, calls, flagged, tool_stream


def random_pieces(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 12))))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


def assert_streams_like_split(text: str, rng: random.Random) -> None:
    rest, calls, malformed = split_tool_calls(text)
    for pieces in (list(text), [text], random_pieces(text, rng), random_pieces(text, rng)):
        shown, streamed, flagged, tool_stream = stream(text, pieces)
        assert "".join(shown) == rest
        assert streamed == calls == tool_stream.calls
        assert tool_stream.malformed == malformed and flagged == bool(malformed)
        if not malformed:  # call text never shows, not even a piece of an opener
            assert all("<|tool_call>" not in piece for piece in shown)


STREAMED = [
    *(text for text, _ in PARSED.values()),
    *(f"ok {text} more" for text in MALFORMED.values()),
    "Plain text, no calls at all.",
    "a <|tool| b <|tool_call",
    "ends with c",
    "I will call:",
    "x call:f{a:1}",
    f"Sure. <|tool_call>call:f{{a:1}}<tool_call|>then<|tool_call>call:g{{s:{Q}}}{Q}}}<tool_call|>",
]


@pytest.mark.parametrize("index", range(len(STREAMED)))
def test_stream_agrees_with_split_however_text_is_cut(index):
    assert_streams_like_split(STREAMED[index], random.Random(index))


def test_stream_reports_a_call_when_it_closes():
    tool_stream = ToolCallStream()
    assert tool_stream.feed("Checking. <|tool_call>call:f{a:") == ("Checking. ", [])
    assert tool_stream.feed(f"{Q}x{Q}") == ("", [])
    text, calls = tool_stream.feed("}<tool_call|>")
    assert text == "" and calls == [ToolCall("f", {"a": "x"})]
    assert tool_stream.feed(" Done.") == (" Done.", [])
    assert tool_stream.finish() == ("", [], False)


def test_stream_returns_an_unterminated_call_as_flagged_text():
    tool_stream = ToolCallStream()
    assert tool_stream.feed("Hm <|tool_call>call:f{a:1,") == ("Hm ", [])
    assert tool_stream.finish() == ("<|tool_call>call:f{a:1,", [], True)
    assert tool_stream.malformed == ["<|tool_call>call:f{a:1,"]


def test_stream_holds_only_what_may_start_a_call():
    tool_stream = ToolCallStream()
    assert tool_stream.feed("Hello <|to") == ("Hello ", [])
    assert tool_stream.feed("ast|>") == ("<|toast|>", [])
    assert tool_stream.feed(" and ca") == (" and ", [])
    assert tool_stream.feed("t") == ("cat", [])
    assert tool_stream.feed(" decal") == (" decal", [])  # `cal` inside a word cannot be a call


# Tools in ----------------------------------------------------------------------------------------


def get_weather(city: str, unit: str = "celsius") -> dict:
    """Current weather for a city.

    Args:
        city: The city's name.
        unit: "celsius" or "fahrenheit".
    """
    return {"city": city, "unit": unit}


def undocumented(city: str):
    return city


def unhinted(city):
    """Does things.

    Args:
        city: A city.
    """


class Place:
    pass


def custom_hint(place: Place) -> str:
    """Uses a class JSON schema cannot describe.

    Args:
        place: A place.
    """
    return str(place)


OPENAI_TOOL = {
    "type": "function",
    "function": {
        "name": "lookup",
        "description": "Look a word up.",
        "parameters": {"type": "object", "properties": {"word": {"type": "string"}}},
    },
}


def test_declarations_from_callables_and_openai_tools():
    declarations = tool_declarations(
        [get_weather, OPENAI_TOOL, OPENAI_TOOL["function"] | {"name": "x"}]
    )
    weather, lookup, bare = declarations
    assert weather["type"] == "function"
    assert weather["function"]["name"] == "get_weather"
    assert weather["function"]["description"] == "Current weather for a city."
    assert weather["function"]["parameters"]["properties"]["city"] == {
        "type": "string",
        "description": "The city's name.",
    }
    assert weather["function"]["parameters"]["required"] == ["city"]
    assert lookup == OPENAI_TOOL
    assert bare == {"type": "function", "function": OPENAI_TOOL["function"] | {"name": "x"}}


def test_declared_callable_renders_like_its_schema(render):
    """The template gets the same declaration for a function as for its hand-written schema."""
    messages = [{"role": "user", "content": "Weather?"}]
    schema = tool_declarations([get_weather])
    assert render(messages, tools=schema) == render(messages, tools=[get_weather])
    assert "<|tool>declaration:get_weather{" in render(messages, tools=schema)


def either(value: int | str, note: str | None = None) -> str:
    """Echo.

    Args:
        value: A number or a word.
        note: Optional.
    """
    return f"{value} {note}"


def test_type_lists_become_one_type(render):
    """Google's template renders a property's type list as garbage; declarations have none."""
    listed = {
        "name": "listed",
        "parameters": obj({"x": {"type": ["string", "null"]}, "y": {"type": ["null"]}}),
    }
    declarations = tool_declarations([either, listed])
    assert declarations[0]["function"]["parameters"]["properties"] == {
        "value": {"type": "integer", "description": "A number or a word."},
        "note": {"type": "string", "nullable": True, "description": "Optional."},
    }
    text = render([{"role": "user", "content": "Hi"}], tools=declarations)
    assert 'x:{nullable:true,type:<|"|>STRING<|"|>}' in text and "['" not in text
    assert "['" in render([{"role": "user", "content": "Hi"}], tools=[either])  # raw schema


def obj(properties):
    return {"type": "object", "properties": properties}


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and isinstance(error.value, Gemma4Error)
    return message


@pytest.mark.parametrize(
    "tools, words",
    [
        ([undocumented], ["'undocumented'", "docstring"]),
        ([unhinted], ["'unhinted'", "type hint"]),
        ([custom_hint], ["'custom_hint'", "Place", "custom class"]),
        ([42], ["tool 0", "int"]),
        ([{"type": "function", "function": {"description": "x"}}], ["tool 0", "no name"]),
        ([{"type": "function", "function": "f"}], ["tool 0", "expected"]),
        ([OPENAI_TOOL, OPENAI_TOOL], ["'lookup'", "twice"]),
        ([{"name": "p", "parameters": [1]}], ["'p'", "parameters"]),
        ([{"name": "p", "parameters": {"properties": []}}], ["'p'", "properties"]),
    ],
)
def test_undescribable_tools_are_one_line_errors(tools, words):
    with pytest.raises(ToolError) as error:
        tool_declarations(tools)
    message = one_line(error)
    assert all(word in message for word in words), message


def test_tools_file(tmp_path):
    listed = tmp_path / "tools.json"
    listed.write_text(json.dumps([OPENAI_TOOL]))
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"tools": [OPENAI_TOOL]}))
    assert load_tools_file(listed) == load_tools_file(wrapped) == [OPENAI_TOOL]


@pytest.mark.parametrize(
    "content, words",
    [
        (None, ["missing.json", "no such file"]),
        ("[{", ["bad.json", "not valid JSON", "line 1"]),
        ('{"name": "f"}', ["bad.json", "expected a list"]),
        ("[1]", ["bad.json", "tool 0 is not an object"]),
        ('[{"type": "function", "function": {}}]', ["bad.json", "no name"]),
    ],
)
def test_bad_tools_files_are_one_line_errors(tmp_path, content, words):
    path = tmp_path / ("missing.json" if content is None else "bad.json")
    if content is not None:
        path.write_text(content)
    with pytest.raises((ToolError, FileAccessError)) as error:
        load_tools_file(path)
    message = one_line(error)
    assert all(word in message for word in words), message


MODULE = '''
from json import dumps  # imported: not a tool
from dataclasses import dataclass


@dataclass
class Point:
    x: int


def add(a: int, b: int) -> int:
    """Add two numbers.

    Args:
        a: First.
        b: Second.
    """
    return a + b


def _helper():
    return 1
'''


def test_tools_module(tmp_path):
    path = tmp_path / "my_tools.py"
    path.write_text(MODULE)
    functions = load_tools_module(path)
    assert [f.__name__ for f in functions] == ["add"]
    assert functions[0](a=2, b=3) == 5


@pytest.mark.parametrize(
    "name, content, words",
    [
        ("missing.py", None, ["missing.py", "no such file"]),
        ("tools.json", "[]", ["tools.json", ".py"]),
        ("broken.py", "def f(:\n", ["broken.py", "SyntaxError"]),
        ("raises.py", "import no_such_module_here\n", ["raises.py", "ModuleNotFoundError"]),
        ("exits.py", "raise SystemExit(3)\n", ["exits.py", "SystemExit"]),
        ("empty.py", "X = 1\n", ["empty.py", "no public functions"]),
        ("nodoc.py", "def f(x: int):\n    return x\n", ["'f'", "docstring"]),
    ],
)
def test_bad_tools_modules_are_one_line_errors(tmp_path, name, content, words):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises((ToolError, FileAccessError)) as error:
        load_tools_module(path)
    message = one_line(error)
    assert all(word in message for word in words), message


# OpenAI tool messages ----------------------------------------------------------------------------

OPENAI_HISTORY = [
    {"role": "system", "content": "Use tools."},
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "c1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            },
            {"id": "c2", "type": "function", "function": {"name": "now", "arguments": None}},
        ],
    },
    {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 21, "sky": "clear"}'},
    {"role": "tool", "tool_call_id": "c2", "name": "now", "content": "12:00"},
    {
        "role": "assistant",
        "tool_calls": [
            {"id": "c3", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}
        ],
    },
    {"role": "tool", "tool_call_id": "c3", "content": [{"type": "text", "text": "[25]"}]},
    {"role": "assistant", "content": "Paris 21, Rome 25."},
    {"role": "user", "content": "Thanks"},
]

TEMPLATE_HISTORY = [
    {"role": "system", "content": "Use tools."},
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {
        "role": "assistant",
        "tool_calls": [
            {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"function": {"name": "now", "arguments": {}}},
        ],
        "tool_responses": [
            {"name": "get_weather", "response": {"temp": 21, "sky": "clear"}},
            {"name": "now", "response": "12:00"},
        ],
    },
    {
        "role": "assistant",
        "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Rome"}}}],
        "tool_responses": [{"name": "get_weather", "response": "[25]"}],
        "content": "Paris 21, Rome 25.",
    },
    {"role": "user", "content": "Thanks"},
]


def without_answer(turn: dict) -> dict:
    return {key: value for key, value in turn.items() if key != "content"}


@pytest.mark.parametrize(
    "length, by_hand",
    [
        (9, TEMPLATE_HISTORY),  # the whole conversation
        (5, TEMPLATE_HISTORY[:3]),  # the model is to go on after the first tool answers
        (7, [*TEMPLATE_HISTORY[:3], without_answer(TEMPLATE_HISTORY[3])]),
    ],
)
def test_openai_tool_messages_render_like_tool_responses(render, length, by_hand):
    tools = tool_declarations([get_weather])
    normalized = normalize_tool_messages(OPENAI_HISTORY[:length])
    for thinking in (False, True):
        ours = render(normalized, tools=tools, thinking=thinking)
        assert ours == render(by_hand, tools=tools, thinking=thinking)


def test_normalizing_leaves_the_input_alone():
    before = json.dumps(OPENAI_HISTORY)
    normalized = normalize_tool_messages(OPENAI_HISTORY)
    assert json.dumps(OPENAI_HISTORY) == before
    assert [m["role"] for m in normalized] == ["system", "user", "assistant", "assistant", "user"]
    assert normalized[2]["tool_responses"][0] == {
        "name": "get_weather",
        "response": {"temp": 21, "sky": "clear"},
    }


def test_messages_in_the_template_form_pass_unchanged():
    assert normalize_tool_messages(TEMPLATE_HISTORY) == TEMPLATE_HISTORY
    separate_answer = [
        *TEMPLATE_HISTORY[:3],
        {"role": "assistant", "content": "Fine."},  # renders as a new turn: the caller's choice
    ]
    assert normalize_tool_messages(separate_answer) == separate_answer


def test_orphan_tool_messages_keep_their_content():
    normalized = normalize_tool_messages([{"role": "tool", "content": "42"}])
    assert normalized == [{"role": "assistant", "tool_responses": [{"response": "42"}]}]
