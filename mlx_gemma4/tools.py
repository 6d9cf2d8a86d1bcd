"""Function calling: tools declared to the model, tool calls read back from its output.

Gemma 4 writes a call as `<|tool_call>call:NAME{key:value,...}<tool_call|>`, in its own value
syntax: strings between `<|"|>` quotes (anything but that quote inside, braces and newlines
included), numbers, `true` / `false` / `null`, `{...}` objects whose keys are bare or quoted, and
`[...]` arrays. The chat template renders calls the same way, so what the model reads and what it
writes agree.

Leniency, decided here once for the parser and the stream alike:
- the opener may be followed by `call:NAME`, `:NAME` (a seen drift) or just `NAME`;
- JSON spellings are read too: `"..."` strings and keys, and Python's `None`, `True`, `False`;
- whitespace between tokens is skipped, a trailing comma in an object or array is allowed;
- the closer `<tool_call|>` may be missing when the call's braces close;
- a call without the opener (`call:NAME{...}`, the model drifting out of the format) counts only
  when it starts a word and ends in `<tool_call|>`: the closer is strong evidence, while a bare
  `call:x{` is too common in prose to take;
- anything else after an opener is a malformed call: it is returned as text and listed, never
  dropped, so the caller can show it and flag it.
"""

from __future__ import annotations

import errno
import importlib.util
import inspect
import json
import re
import sys
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ToolError
from .files import access_error

OPEN = "<|tool_call>"
CLOSE = "<tool_call|>"
QUOTE = '<|"|>'
DRIFT = "call:"

Tool = dict[str, Any] | Callable[..., Any]


# Tools in ----------------------------------------------------------------------------------------


def _declare_callable(function: Callable[..., Any]) -> dict[str, Any]:
    from transformers.utils import get_json_schema

    try:
        return get_json_schema(function)
    except Exception as error:  # transformers' TypeHint- and DocstringParsingException
        message = str(error).split("\n")[0]
        raise ToolError(f"tool {function.__name__!r}: cannot describe it: {message}") from None


def _declare_dict(tool: dict[str, Any], where: str) -> dict[str, Any]:
    function = tool.get("function") if tool.get("type") == "function" else tool
    if not isinstance(function, dict):
        raise ToolError(f"{where}: expected {{'type': 'function', 'function': {{...}}}}")
    name = function.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ToolError(f"{where}: the function has no name")
    parameters = function.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise ToolError(f"tool {name!r}: 'parameters' must be a JSON schema object")
    if parameters and not isinstance(parameters.get("properties", {}), dict):
        raise ToolError(f"tool {name!r}: 'parameters.properties' must be an object")
    return {"type": "function", "function": dict(function)}


def _one_type(schema: Any) -> Any:
    """A schema whose properties each have one type: Google's template renders a property's type
    list (`["string", "null"]`, or what `int | str` hints give) as garbage, so "null" becomes
    `nullable` and the first other type is kept, as the template's older revision did."""
    if not isinstance(schema, dict):
        return schema
    schema = dict(schema)
    if isinstance(schema.get("properties"), dict):
        schema["properties"] = {
            name: _one_type(spec) for name, spec in schema["properties"].items()
        }
    if isinstance(schema.get("items"), dict):
        schema["items"] = _one_type(schema["items"])
    types = schema.get("type")
    if isinstance(types, list):
        named = [kind for kind in types if kind != "null"]
        if len(named) < len(types):
            schema["nullable"] = True
        if named:
            schema["type"] = named[0]
        else:
            del schema["type"]
    return schema


def tool_declarations(tools: Iterable[Tool]) -> list[dict[str, Any]]:
    """OpenAI-style function declarations, as the chat template takes them, for OpenAI function
    tools (`{"type": "function", "function": {...}}`, or the bare `{...}`) and Python callables
    (schema from type hints and the docstring); properties get one type each (see `_one_type`).
    Raises ToolError naming a tool that cannot be described, and on two tools with one name."""
    declarations = []
    for index, tool in enumerate(tools):
        if callable(tool):
            declarations.append(_declare_callable(tool))
        elif isinstance(tool, dict):
            declarations.append(_declare_dict(tool, f"tool {index}"))
        else:
            raise ToolError(
                f"tool {index}: expected a function or a dict, got {type(tool).__name__}"
            )
    for declaration in declarations:
        function = declaration["function"]
        if function.get("parameters"):
            function["parameters"] = _one_type(function["parameters"])
    names = [declaration["function"]["name"] for declaration in declarations]
    for name in names:
        if names.count(name) > 1:
            raise ToolError(f"tool {name!r} is declared twice: give each tool its own name")
    return declarations


def load_tools_file(path: str | Path) -> list[dict[str, Any]]:
    """Declarations from a JSON file: a list of tools, or an object with a "tools" list."""
    try:
        text = Path(path).read_text()
    except OSError as error:
        raise access_error(path, "read the tools file", error) from None
    except UnicodeDecodeError:
        raise ToolError(f"tools file {path}: not a text file") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ToolError(
            f"tools file {path}: not valid JSON (line {error.lineno}, column {error.colno}: "
            f"{error.msg})"
        ) from None
    if isinstance(data, dict) and "tools" in data:
        data = data["tools"]
    if not isinstance(data, list):
        raise ToolError(f'tools file {path}: expected a list of tools or {{"tools": [...]}}')
    for index, tool in enumerate(data):
        if not isinstance(tool, dict):
            raise ToolError(f"tools file {path}: tool {index} is not an object")
    try:
        return tool_declarations(data)
    except ToolError as error:
        raise ToolError(f"tools file {path}: {error}") from None


def load_tools_module(path: str | Path) -> list[Callable[..., Any]]:
    """The public functions defined in a Python file, checked to be declarable as tools."""
    path = Path(path)
    if not path.exists():
        raise access_error(path, "read the tools module", FileNotFoundError(errno.ENOENT, ""))
    if not path.is_file() or path.suffix != ".py":
        raise ToolError(f"tools module {path}: not a Python file (expected a .py file)")
    name = f"gemma4_tools_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look their module up there
    try:
        spec.loader.exec_module(module)
    except BaseException as error:  # the module's own code: anything may happen, exit included
        del sys.modules[name]
        if isinstance(error, KeyboardInterrupt):
            raise
        raise ToolError(
            f"tools module {path}: importing it failed: {type(error).__name__}: {error}"
        ) from None
    functions = [
        function
        for name, function in inspect.getmembers(module, inspect.isfunction)
        if not name.startswith("_") and function.__module__ == module.__name__
    ]
    if not functions:
        raise ToolError(f"tools module {path}: defines no public functions")
    tool_declarations(functions)
    return functions


def load_tools(path: str | Path) -> list[Tool]:
    """The tools of a file: a Python module's public functions (`.py`, runnable), else JSON
    declarations (declared to the model only)."""
    if Path(path).suffix == ".py":
        return load_tools_module(path)
    return load_tools_file(path)


# History in the template's form ------------------------------------------------------------------


def _decode_object(text: str) -> Any:
    """The dict a JSON object string encodes, else the string itself."""
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return text
    return value if isinstance(value, dict) else text


def _with_decoded_arguments(call: dict[str, Any]) -> dict[str, Any]:
    function = dict(call.get("function") or {})
    arguments = function.get("arguments")
    if arguments is None:
        function["arguments"] = {}
    elif isinstance(arguments, str):
        function["arguments"] = _decode_object(arguments) if arguments.strip() else {}
    return {**call, "function": function}


def _tool_message_content(content: Any) -> Any:
    if isinstance(content, list):  # OpenAI content parts
        content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return _decode_object(content) if isinstance(content, str) else content


def _is_open_tool_turn(message: dict[str, Any] | None) -> bool:
    """An assistant turn that ends in tool responses: the template leaves it open."""
    return bool(
        message is not None
        and message.get("role") == "assistant"
        and message.get("tool_responses")
        and not message.get("content")
    )


def append_answer(history: list[dict[str, Any]], answer: Any) -> None:
    """Add the model's answer to `history`: into the tool turn it ends with, if open (the model
    answered in that turn, and the history then renders as exactly what it generated), else as
    a new assistant message."""
    if _is_open_tool_turn(history[-1] if history else None):
        history[-1] = {**history[-1], "content": answer}
    else:
        history.append({"role": "assistant", "content": answer})


def normalize_tool_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI-style tool messages in the form Gemma's template renders.

    `{"role": "tool", "tool_call_id", "name"?, "content"}` messages become `tool_responses` of
    the assistant turn that made the calls (the name looked up by call id when absent, content
    that is a JSON object decoded to a dict), and the answer after them joins that turn (see
    `append_answer`); JSON-string call arguments become dicts. Messages already in the template's
    form pass unchanged. The input is not modified."""
    result: list[dict[str, Any]] = []
    names_by_id: dict[str, str] = {}
    answered_by_tool_messages = False  # whether result[-1] took its responses from tool messages
    for message in messages:
        role = message.get("role")
        if role == "tool":
            name = message.get("name") or names_by_id.get(message.get("tool_call_id", ""))
            response = {"response": _tool_message_content(message.get("content"))}
            if name:
                response = {"name": name, **response}
            if not result or result[-1].get("role") != "assistant":
                result.append({"role": "assistant"})
            turn = result[-1]
            turn["tool_responses"] = [*turn.get("tool_responses", []), response]
            answered_by_tool_messages = True
            continue
        if role == "assistant" and not message.get("tool_calls") and answered_by_tool_messages:
            append_answer(result, message.get("content"))
            answered_by_tool_messages = False
            continue
        message = dict(message)
        if role == "assistant" and message.get("tool_calls"):
            message["tool_calls"] = [_with_decoded_arguments(c) for c in message["tool_calls"]]
            for call in message["tool_calls"]:
                if call.get("id"):
                    names_by_id[call["id"]] = call["function"].get("name", "")
        result.append(message)
        answered_by_tool_messages = False
    return result


# Calls out ---------------------------------------------------------------------------------------


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}", compare=False)

    def to_openai(self) -> dict[str, Any]:
        """The call as an OpenAI chat completion reports it (arguments as a JSON string)."""
        arguments = json.dumps(self.arguments, ensure_ascii=False)
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": arguments},
        }

    def to_text(self) -> str:
        """The call in Gemma's syntax, as the model writes it (`parse_tool_calls` reads it)."""
        return f"{OPEN}{DRIFT}{self.name}{_gemma_value(self.arguments)}{CLOSE}"

    def to_message(self) -> dict[str, Any]:
        """The call as the chat template takes it in an assistant turn (arguments as a dict)."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


def _gemma_key(key: str) -> str:
    bare = _BARE_KEY.fullmatch(key) and key == key.strip() and QUOTE not in key
    return key if bare else f"{QUOTE}{key}{QUOTE}"


def _gemma_value(value: Any) -> str:
    """A JSON value in Gemma's call syntax: `<|"|>` strings, bare keys where they can be."""
    if isinstance(value, str):
        return f"{QUOTE}{value}{QUOTE}"
    if isinstance(value, dict):
        entries = (f"{_gemma_key(str(k))}:{_gemma_value(v)}" for k, v in value.items())
        return "{" + ",".join(entries) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(_gemma_value(item) for item in value) + "]"
    return json.dumps(value)  # numbers, true, false, null


class _Incomplete(Exception):
    """The text ends inside a call: more may come."""


class _Malformed(Exception):
    """The text cannot be a call."""


_NUMBER = re.compile(r"-?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_WORD = re.compile(r"[-+\w.]+")
_LITERALS = {"true": True, "false": False, "null": None, "True": True, "False": False, "None": None}
_NAME = re.compile(r"[^\s{}\[\]<>,\"']+")
_BARE_KEY = re.compile(r"[^:{}\[\],\"<]+")


class _CallParser:
    """Recursive descent over one call, from just after its opener (or at `call:`)."""

    def __init__(self, text: str, pos: int):
        self.text = text
        self.pos = pos

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def at(self, literal: str) -> bool:
        """Whether `literal` comes next; _Incomplete if the text ends partway through it."""
        rest = self.text[self.pos : self.pos + len(literal)]
        if rest == literal:
            return True
        if len(rest) < len(literal) and literal.startswith(rest):
            raise _Incomplete
        return False

    def expect(self, literal: str) -> None:
        if not self.at(literal):
            raise _Malformed(f"expected {literal!r} at {self.pos}")
        self.pos += len(literal)

    def match(self, pattern: re.Pattern) -> str:
        found = pattern.match(self.text, self.pos)
        if found is None:
            raise _Incomplete if self.pos >= len(self.text) else _Malformed(f"at {self.pos}")
        if found.end() == len(self.text):  # the token may go on in the next piece
            raise _Incomplete
        self.pos = found.end()
        return found.group()

    def call(self, require_prefix: bool) -> ToolCall:
        if require_prefix:
            self.expect(DRIFT)
        else:
            self.skip_space()
            if self.at(DRIFT):
                self.pos += len(DRIFT)
            elif self.at(":"):
                self.pos += 1
        name = self.match(_NAME)
        self.skip_space()
        return ToolCall(name, self.object())

    def value(self) -> Any:
        self.skip_space()
        if self.pos >= len(self.text):
            raise _Incomplete
        char = self.text[self.pos]
        if char == "{":
            return self.object()
        if char == "[":
            return self.array()
        if char == '"':
            return self.json_string()
        if self.at(QUOTE):
            return self.quoted()
        word = self.match(_WORD)
        if word in _LITERALS:
            return _LITERALS[word]
        if _NUMBER.fullmatch(word):
            return float(word) if any(c in word for c in ".eE") else int(word)
        raise _Malformed(f"unknown value {word!r}")

    def quoted(self) -> str:
        self.expect(QUOTE)
        end = self.text.find(QUOTE, self.pos)
        if end < 0:
            raise _Incomplete
        value, self.pos = self.text[self.pos : end], end + len(QUOTE)
        return value

    def json_string(self) -> str:
        try:
            value, self.pos = json.decoder.scanstring(self.text, self.pos + 1)
        except json.JSONDecodeError as error:
            raise (_Incomplete if error.msg.startswith("Unterminated") else _Malformed) from None
        return value

    def key(self) -> str:
        self.skip_space()
        if self.at(QUOTE):
            return self.quoted()
        if self.at('"'):
            return self.json_string()
        key = self.match(_BARE_KEY).strip()
        if not key:
            raise _Malformed(f"empty key at {self.pos}")
        return key

    def items(self, end: str, read: Callable[[], Any]) -> list[Any]:
        """Comma-separated entries up to `end` (a trailing comma allowed)."""
        entries = []
        self.skip_space()
        while not self.at(end):
            entries.append(read())
            self.skip_space()
            if self.at(","):
                self.pos += 1
                self.skip_space()
            elif not self.at(end):
                raise _Malformed(f"expected ',' or {end!r} at {self.pos}")
        self.pos += len(end)
        return entries

    def object(self) -> dict[str, Any]:
        self.expect("{")
        return dict(self.items("}", self.entry))

    def entry(self) -> tuple[str, Any]:
        key = self.key()
        self.skip_space()
        self.expect(":")
        return key, self.value()

    def array(self) -> list[Any]:
        self.expect("[")
        return self.items("]", self.value)

    def closer(self, required: bool, final: bool) -> None:
        """Consume `<tool_call|>` (after optional whitespace) if it comes next."""
        start = self.pos
        self.skip_space()
        try:
            if self.at(CLOSE):
                self.pos += len(CLOSE)
                return
        except _Incomplete:
            if not final:
                raise
        if self.pos == len(self.text) and not final:
            raise _Incomplete  # the closer may still come
        if required:
            raise _Malformed("no closing <tool_call|>")
        self.pos = start  # the whitespace stays text


def _starts_word(text: str, pos: int, before: str) -> bool:
    previous = text[pos - 1] if pos else before[-1:]
    return not previous or not (previous.isalnum() or previous in "_.:-")


def _next_candidate(text: str, pos: int, before: str) -> int:
    """Where the next call may start: an opener, or `call:` starting a word (-1: none)."""
    opener = text.find(OPEN, pos)
    limit = len(text) if opener < 0 else opener
    drift = text.find(DRIFT, pos, limit)
    while drift >= 0 and not _starts_word(text, drift, before):
        drift = text.find(DRIFT, drift + 1, limit)
    return drift if drift >= 0 else opener


def _partial_tail(text: str, pos: int, before: str) -> int:
    """Start of a tail that may grow into an opener or a drifted call (len(text): none)."""
    for start in range(max(pos, len(text) - len(OPEN) + 1), len(text)):
        tail = text[start:]
        if OPEN.startswith(tail) or (DRIFT.startswith(tail) and _starts_word(text, start, before)):
            return start
    return len(text)


def _malformed_end(text: str, start: int) -> int:
    """A malformed call runs to its closer, or up to the next opener (-1: not known yet)."""
    closer = text.find(CLOSE, start + 1)
    opener = text.find(OPEN, start + 1)
    if closer >= 0 and (opener < 0 or closer < opener):
        return closer + len(CLOSE)
    return opener


def _scan(text: str, final: bool, before: str = "") -> tuple[list[tuple[str, Any]], str]:
    """Events ("text", str), ("call", ToolCall), ("malformed", str) in order, and the tail that
    must wait for more text (always empty when `final`). `before` is the text already shown."""
    events: list[tuple[str, Any]] = []
    pos = 0
    while pos < len(text):
        start = _next_candidate(text, pos, before)
        if start < 0:
            start = len(text) if final else _partial_tail(text, pos, before)
            if start > pos:
                events.append(("text", text[pos:start]))
            return events, text[start:]
        if start > pos:
            events.append(("text", text[pos:start]))
        drifted = not text.startswith(OPEN, start)
        parser = _CallParser(text, start if drifted else start + len(OPEN))
        try:
            call = parser.call(require_prefix=drifted)
            parser.closer(required=drifted, final=final)
            events.append(("call", call))
            pos = parser.pos
        except _Incomplete:
            if not final:
                return events, text[start:]
            if drifted:
                events.append(("text", text[start:]))
            else:
                events.append(("malformed", text[start:]))
            return events, ""
        except _Malformed:
            if drifted:  # not a call after all: `call:` is text
                events.append(("text", DRIFT))
                pos = start + len(DRIFT)
                continue
            end = _malformed_end(text, start)
            if end < 0:
                if not final:
                    return events, text[start:]
                end = len(text)
            events.append(("malformed", text[start:end]))
            pos = end
    return events, ""


def _inside_call(held: str) -> bool:
    """Whether held text is an opened call whose braces (outside `<|"|>` strings) are not all
    closed yet. Such a call cannot complete, and can only end as malformed at a closer or at the
    next opener, so the stream need not parse it again until one of those comes."""
    if not held.startswith(OPEN):
        return False
    outside = held.split(QUOTE)[::2]
    return sum(part.count("{") for part in outside) > sum(part.count("}") for part in outside)


def _marker_since(text: str, start: int) -> bool:
    """Whether a closer, or an opener after the first character, ends after `start`."""
    return (
        text.find(CLOSE, max(0, start - len(CLOSE) + 1)) >= 0
        or text.find(OPEN, max(1, start - len(OPEN) + 1)) >= 0
    )


def _merge_text(events: list[tuple[str, Any]]) -> str:
    return "".join(value for kind, value in events if kind in ("text", "malformed"))


def split_tool_calls(text: str) -> tuple[str, list[ToolCall], list[str]]:
    """(the text without its well-formed calls, the calls, the malformed call segments). Malformed
    segments stay in the returned text, where they were; the list says which they are."""
    events, _ = _scan(text, final=True)
    calls = [value for kind, value in events if kind == "call"]
    malformed = [value for kind, value in events if kind == "malformed"]
    return _merge_text(events), calls, malformed


def parse_tool_calls(text: str) -> list[ToolCall]:
    """The well-formed tool calls in a model's output, in order."""
    return split_tool_calls(text)[1]


class ToolCallStream:
    """Separates tool calls from text while it streams in.

    `feed(piece)` returns the text that is safe to show (call text never appears in it) and the
    calls completed by this piece; text that may be the start of a call is held back until it is
    known. `finish()` returns what is still held, as text (an unterminated call is malformed call
    text), a call left without its closer, and whether any malformed call text was seen;
    `malformed` lists those segments."""

    def __init__(self) -> None:
        self._held = ""
        self._shown = ""  # the last characters shown, for word boundaries
        self.calls: list[ToolCall] = []
        self.malformed: list[str] = []

    def _take(self, events: list[tuple[str, Any]]) -> tuple[str, list[ToolCall]]:
        calls = [value for kind, value in events if kind == "call"]
        self.calls.extend(calls)
        self.malformed.extend(value for kind, value in events if kind == "malformed")
        if events:  # a call ends in `>` (its closer or brace): either way not a word character
            kind, value = events[-1]
            self._shown = value[-1:] if kind != "call" else ">"
        return _merge_text(events), calls

    def feed(self, piece: str) -> tuple[str, list[ToolCall]]:
        text, start = self._held + piece, len(self._held)
        if _inside_call(text) and not _marker_since(text, start):
            self._held = text  # nothing can have changed: skip parsing it again
            return "", []
        events, self._held = _scan(self._held + piece, final=False, before=self._shown)
        return self._take(events)

    def finish(self) -> tuple[str, list[ToolCall], bool]:
        """(the held text, calls that complete only now, whether any call text was malformed)."""
        events, self._held = _scan(self._held, final=True, before=self._shown)
        text, calls = self._take(events)
        return text, calls, bool(self.malformed)
