"""Tool calls read back from the model's output: `ToolCall`, the parser and the stream.

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

import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

OPEN = "<|tool_call>"
CLOSE = "<tool_call|>"
QUOTE = '<|"|>'
DRIFT = "call:"


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
