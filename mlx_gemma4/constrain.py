"""Constrained decoding: JSON-schema answers and forced tool calls, masked in MLX before sampling.

The grammar engine is llguidance (chosen by measured mask time at Gemma 4's 262k vocabulary,
its millisecond grammar compilation, and wheels without torch for macOS arm64 and Linux; see
benchmarks/structured.py). A constraint compiles once; `logits_processor()` then gives a fresh
processor for one generation, used as `stream_generate(..., logits_processors=[it])`.

With thinking on, the thought is free: the constraint starts after `<channel|>`, or at once when
the prompt already ends with it (the empty thought channel templates append with thinking off).
"""

from __future__ import annotations

import functools
import json
import weakref
from collections.abc import Callable
from typing import Any

import mlx.core as mx
import numpy as np

from .errors import ConstraintError

INSTALL_HINT = "pip install 'mlx-gemma4[structured]'"
THINK, TURN_OPEN = "<|think|>", "<|turn>"
CHANNEL_OPEN, CHANNEL_CLOSE = "<|channel>", "<channel|>"
TOOL_CALL_OPEN, TOOL_CALL_CLOSE, TOOL_QUOTE = "<|tool_call>", "<tool_call|>", '<|"|>'
EMPTY = '""'  # the empty string in Lark: an alternative that writes nothing

SHIFTS = mx.arange(32, dtype=mx.uint32)  # bit i of a mask word is token 32 * word + i
_engine_tokenizers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_checked_grammars: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _llguidance():
    try:
        import llguidance
    except ImportError as e:
        raise ConstraintError(f"constrained output needs llguidance: {INSTALL_HINT}") from e
    return llguidance


def engine_tokenizer(processor):
    """The engine's view of the processor's vocabulary, built once per tokenizer (costly at 262k):
    token bytes for the masks, the stop tokens as the grammar's end."""
    llguidance = _llguidance()
    hf = processor.tokenizer._tokenizer
    stops = tuple(sorted(processor.stop_token_ids))
    per_stops = _engine_tokenizers.setdefault(hf, {})
    if stops not in per_stops:
        per_stops[stops] = llguidance.LLTokenizer(
            hf.backend_tokenizer.to_str(), n_vocab=len(hf), eos_token=list(stops)
        )
    return per_stops[stops]


def one_line(message: str, limit: int = 300) -> str:
    """An engine's or validator's message as one line of bounded length."""
    text = " ".join(message.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _checked(processor, grammar: str, what: str) -> str:
    """The grammar, or one ConstraintError line naming what the engine cannot enforce.
    Grammars that passed are remembered per tokenizer (chats repeat the same schema)."""
    passed = _checked_grammars.setdefault(processor.tokenizer._tokenizer, set())
    key = (tuple(sorted(processor.stop_token_ids)), grammar)
    if key not in passed:
        _validate(grammar, engine_tokenizer(processor), what)
        passed.add(key)
    return grammar


def _validate(grammar: str, tokenizer, what: str) -> None:
    """One ConstraintError line naming what the engine cannot enforce (tokenizer None: the
    checks that need no vocabulary)."""
    is_error, messages = _llguidance().LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
    if is_error:
        raise ConstraintError(f"{what}: {one_line(messages[0])}; remove or rewrite that part")


# --- JSON schemas ------------------------------------------------------------------------------


def load_schema(schema: dict | str | bool) -> dict:
    """A JSON schema from a dict, a JSON string or True (any JSON object), checked against its
    metaschema."""
    if schema is True:
        return {"type": "object"}
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise ConstraintError(f"json_schema: not valid JSON ({e})") from e
    if not isinstance(schema, dict):
        raise ConstraintError(
            "json_schema: expected a JSON object, a JSON string or True, "
            f"got {type(schema).__name__}"
        )
    try:
        from jsonschema import SchemaError, validators
    except ImportError as e:
        raise ConstraintError(f"checking a JSON schema needs jsonschema: {INSTALL_HINT}") from e
    try:
        validators.validator_for(schema).check_schema(schema)
    except SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "top level"
        raise ConstraintError(
            f"json_schema is not a valid JSON Schema at {where}: {one_line(e.message)}"
        ) from None
    return schema


def closed_objects(schema: Any) -> Any:
    """`schema` with `additionalProperties: false` on every object that lists its properties and
    says nothing about others: the answer then holds the declared keys only (still valid for the
    original schema), instead of inventing more. `allOf` branches are left open, as closing them
    would make each refuse the others' keys."""
    if isinstance(schema, list):
        return [closed_objects(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {
        key: value
        if key in ("allOf", "enum", "const", "default", "examples")
        else closed_objects(value)
        for key, value in schema.items()
    }
    open_ended = "additionalProperties" in schema or "patternProperties" in schema
    if isinstance(schema.get("properties"), dict) and not open_ended:
        closed["additionalProperties"] = False
    return closed


def schema_key(schema: dict | str | bool) -> str | bool:
    """`schema` as the grammar cache's key: True, or JSON text (key order kept: it orders the
    answer's members)."""
    if schema is True or isinstance(schema, str):
        return schema
    try:
        return json.dumps(schema)
    except (TypeError, ValueError) as e:
        raise ConstraintError(f"json_schema: not expressible as JSON ({e})") from e


@functools.lru_cache(maxsize=64)
def _schema_grammar(key: str | bool) -> str:
    grammar = _llguidance().LLMatcher.grammar_from_json_schema(
        closed_objects(load_schema(key)), defaults={"whitespace_flexible": False}
    )
    _validate(grammar, None, "json_schema")
    return grammar


def check_json_schema(schema: dict | str | bool) -> None:
    """One ConstraintError line for a schema that is not JSON, not a valid JSON Schema, or uses
    what the engine cannot enforce; needs no tokenizer (so no model) to tell."""
    _schema_grammar(schema_key(schema))


def json_grammar(processor, schema: dict | str | bool) -> str:
    """The engine grammar of compact JSON (no whitespace between tokens) valid for `schema`."""
    return _checked(processor, _schema_grammar(schema_key(schema)), "json_schema")


# --- Gemma's tool-call syntax ------------------------------------------------------------------


def tool_function(tool: Any) -> dict:
    """{"name", "parameters", ...} of an OpenAI-style tool, a bare function dict or a callable."""
    if callable(tool):
        from transformers.utils import get_json_schema

        try:
            tool = get_json_schema(tool)
        except Exception as e:  # transformers raises several types for undescribable functions
            raise ConstraintError(f"tool {getattr(tool, '__name__', tool)!r}: {e}") from e
    function = tool.get("function", tool) if isinstance(tool, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise ConstraintError(
            f"tool {tool!r}: expected {{'type': 'function', 'function': {{'name', ...}}}}"
        )
    return function


def regex_to_lark(pattern: str, ascii_classes: str) -> str:
    return _llguidance().regex_to_lark(pattern, ascii_classes)


class CallGrammar:
    """Lark rules for `call:NAME{key:value,...}` in Gemma's value syntax, following each tool's
    parameter schema: keys and their order, required keys, value types, enums and consts,
    array items, nested objects, string lengths and anchored (`^...$`) patterns. Not enforced:
    unanchored patterns, formats, number bounds, array lengths, `$ref`, combinators (anyOf,
    oneOf and allOf take any value)."""

    def __init__(self, processor):
        ids = {t: processor.token_id(t) for t in (TOOL_CALL_OPEN, TOOL_CALL_CLOSE, TOOL_QUOTE)}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise ConstraintError(
                f"this tokenizer has no {', '.join(missing)} token: it cannot write Gemma calls"
            )
        self.open, self.close, self.quote = (f"<[{ids[t]}]>" for t in ids)
        self.rules: list[str] = []

    def rule(self, body: str) -> str:
        name = f"r{len(self.rules)}"
        self.rules.append(f"{name}: {body}")
        return name

    def value(self, schema: Any) -> str:
        if not isinstance(schema, dict):
            return "any_value"
        if "enum" in schema or "const" in schema:
            options = schema.get("enum", [schema.get("const")])
            return self.rule(" | ".join(self.literal(v) for v in options))
        kind = schema.get("type")
        if isinstance(kind, list):
            return self.rule(" | ".join(self.value({**schema, "type": k}) for k in kind))
        if kind == "string":
            return self.string(schema)
        if kind == "integer":
            return "INTEGER"
        if kind == "number":
            return "NUMBER"
        if kind == "boolean":
            return "boolean"
        if kind == "null":
            return '"null"'
        if kind == "array":
            item = self.value(schema.get("items"))
            return self.rule(f'"[" ({item} ("," {item})*)? "]"')
        if kind == "object" and schema.get("properties"):
            return self.object(schema["properties"], set(schema.get("required", [])))
        if kind == "object":
            return "any_object"
        return "any_value"

    def string(self, schema: dict) -> str:
        """A quoted string; `maxLength` / `minLength` and an anchored `pattern` are enforced."""
        pattern = schema.get("pattern")
        if isinstance(pattern, str) and pattern.startswith("^") and pattern.endswith("$"):
            text = regex_to_lark(pattern[1:-1], "dw")
        elif "maxLength" in schema or "minLength" in schema:
            text = f"(.|\\n){{{schema.get('minLength', 0)},{schema.get('maxLength', '')}}}"
        else:
            return "string"
        token = f"T{len(self.rules)}"
        self.rules.append(f"{token}: /{text}/")
        return self.rule(f"{self.quote} {token} {self.quote}")

    def literal(self, value: Any) -> str:
        if isinstance(value, str):
            return f"{self.quote} {json.dumps(value)} {self.quote}"
        if isinstance(value, (dict, list)):
            raise ConstraintError(f"tool parameters: enum values must be scalars, got {value!r}")
        return json.dumps(json.dumps(value))  # true, false, null and numbers as their text

    def object(self, properties: dict, required: set[str]) -> str:
        """Members in declared order, the optional ones skippable, commas only between members."""
        keys = list(properties)
        tails: dict[tuple[int, bool], str] = {}

        def members(i: int, comma: bool) -> str:
            if i == len(keys):
                return ""
            if (i, comma) not in tails:
                sep = '"," ' if comma else ""
                here = f"{sep}{json.dumps(keys[i] + ':')} {self.value(properties[keys[i]])}"
                rest = members(i + 1, True)
                body = f"{here} {rest}".strip()
                if keys[i] not in required:
                    body = f"{body} | {members(i + 1, comma) or EMPTY}"
                tails[(i, comma)] = self.rule(body)
            return tails[(i, comma)]

        return self.rule(f'"{{" {members(0, False)} "}}"')

    def grammar(self, functions: list[dict]) -> str:
        calls = []
        for function in functions:
            args = self.value({"type": "object", **(function.get("parameters") or {})})
            calls.append(f"{json.dumps('call:' + function['name'])} {args}")
        start = f"start: {self.open} ({' | '.join(calls)}) {self.close}"
        generic = [
            f"string: {self.quote} TEXT {self.quote}",
            "TEXT: /(.|\\n)*/",
            r"INTEGER: /-?(0|[1-9][0-9]*)/",
            r"NUMBER: /-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?/",
            'boolean: "true" | "false"',
            'any_value: string | NUMBER | boolean | "null" | any_object | any_array',
            'any_object: "{" (KEY ":" any_value ("," KEY ":" any_value)*)? "}"',
            'any_array: "[" (any_value ("," any_value)*)? "]"',
            r"KEY: /[A-Za-z_][A-Za-z0-9_.\-]*/",
        ]
        return "\n".join([start, *self.rules, *generic]) + "\n"


def chosen_functions(tools: list, tool_choice: str) -> list[dict]:
    """The functions a forced call may go to: all of `tools` for "required", else the one
    named `tool_choice`."""
    functions = [tool_function(tool) for tool in tools]
    if not functions:
        raise ConstraintError("tool_choice needs at least one tool")
    if tool_choice == "required":
        return functions
    named = [f for f in functions if f["name"] == tool_choice]
    if not named:
        known = ", ".join(f["name"] for f in functions)
        raise ConstraintError(f"tool_choice {tool_choice!r} is none of the tools ({known})")
    return named


def tool_call_grammar(processor, tools: list, tool_choice: str = "required") -> str:
    """The engine grammar of one `<|tool_call>call:NAME{...}<tool_call|>`: any of `tools` for
    tool_choice="required", else the function named `tool_choice`."""
    functions = chosen_functions(tools, tool_choice)
    grammar = _llguidance().LLMatcher.grammar_from_lark(CallGrammar(processor).grammar(functions))
    return _checked(processor, grammar, "tool parameters")


# --- the logits processor ----------------------------------------------------------------------


class Constraint:
    """A compiled grammar for one processor's vocabulary; `logits_processor()` per generation."""

    def __init__(self, processor, grammar: str, thought_budget: int | None = None):
        self.processor = processor
        self.grammar = grammar
        self.thought_budget = thought_budget
        self.tokenizer = engine_tokenizer(processor)

    def logits_processor(self) -> ConstrainedLogits:
        return ConstrainedLogits(self)


class JsonConstraint(Constraint):
    """The answer is compact JSON valid for `schema` (a dict, a JSON string, or True for any
    JSON object), then a stop token. `thought_budget` ends a thought after that many tokens."""

    def __init__(self, processor, schema: dict | str | bool, thought_budget: int | None = None):
        super().__init__(processor, json_grammar(processor, schema), thought_budget)


class ToolCallConstraint(Constraint):
    """The answer is one Gemma tool call, to any of `tools` (tool_choice="required") or to the
    function named by `tool_choice`, then a stop token."""

    def __init__(
        self,
        processor,
        tools: list,
        tool_choice: str = "required",
        thought_budget: int | None = None,
    ):
        super().__init__(
            processor, tool_call_grammar(processor, tools, tool_choice), thought_budget
        )


# States of one generation.
AWAIT, THOUGHT, ANSWER, DONE = "await", "thought", "answer", "done"


class ConstrainedLogits:
    """`(tokens, logits) -> logits` with every token the grammar forbids at -inf.

    `tokens` is the whole history, prompt first, as `stream_generate` passes it: the first call
    sees the prompt alone, each later one the tokens sampled since. With thinking on (the prompt
    holds `<|think|>` and does not end with `<channel|>`) the first token may open a thought,
    which runs free until `<channel|>`; the answer is then constrained.
    """

    def __init__(self, constraint: Constraint):
        llguidance = _llguidance()
        processor = constraint.processor
        self.matcher = llguidance.LLMatcher(constraint.tokenizer, constraint.grammar)
        if self.matcher.is_error():
            raise ConstraintError(f"grammar: {self.matcher.get_error()}")
        self.vocab = len(processor.tokenizer._tokenizer)
        self.words = np.zeros((self.vocab + 31) // 32, dtype=np.int32)
        self.stops = sorted(processor.stop_token_ids)
        self.think = processor.token_id(THINK)
        self.channel_open = processor.token_id(CHANNEL_OPEN)
        self.channel_close = processor.token_id(CHANNEL_CLOSE)
        self.turn_open = processor.token_id(TURN_OPEN)
        self.thought_budget = constraint.thought_budget
        self.thought_tokens = 0
        self.state: str | None = None
        self.seen = 0

    def start(self, prompt: list[int]) -> str:
        """The state after the prompt: inside a thought it opened, after one it closed (the
        empty thought of thinking off), or at the model turn's start."""
        for token in reversed(prompt):
            if token == self.channel_close:
                return ANSWER
            if token == self.channel_open:
                return THOUGHT
            if token == self.turn_open:
                break
        thinking = self.think is not None and self.think in prompt
        return AWAIT if thinking and self.channel_open is not None else ANSWER

    def advance(self, token: int) -> None:
        """Move the state machine past one sampled token."""
        if self.state == AWAIT:
            if token == self.channel_open:
                self.state = THOUGHT
                return
            self.state = ANSWER
        if self.state == THOUGHT:
            self.thought_tokens += 1
            if token == self.channel_close:
                self.state = ANSWER
            return
        if self.state == ANSWER:
            if not self.matcher.consume_token(token):
                raise ConstraintError(
                    f"token {token} broke the grammar: {self.matcher.get_error()}"
                )
            if self.matcher.is_stopped():
                self.state = DONE

    def allowed(self) -> mx.array | None:
        """A boolean mask over the vocabulary, or None when every token is allowed."""
        if self.state == THOUGHT:
            if self.thought_budget is None or self.thought_tokens < self.thought_budget:
                return None
            return self.only([self.channel_close])
        if self.state == DONE:
            return self.only(self.stops)
        self.matcher.unsafe_compute_mask_ptr(self.words.ctypes.data, self.words.nbytes)
        if self.state == AWAIT:
            bits = self.words.view(np.uint32)
            bits[self.channel_open // 32] |= np.uint32(1 << (self.channel_open % 32))
        # Unpacked in MLX: the device gets the 32 KB of packed words, not 262 KB of flags.
        packed = mx.array(self.words.view(np.uint32))
        return ((packed[:, None] >> SHIFTS) & 1).reshape(-1)[: self.vocab]

    def only(self, ids: list[int]) -> mx.array:
        mask = np.zeros(self.vocab, dtype=np.uint8)
        mask[ids] = 1
        return mx.array(mask)

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        if self.state is None:
            prompt = tokens.tolist()
            self.state, self.seen = self.start(prompt), len(prompt)
        else:
            if tokens.shape[0] <= self.seen:
                raise ConstraintError(
                    "a constrained logits processor serves one generation; "
                    "make a new one with constraint.logits_processor()"
                )
            for token in tokens[self.seen :].tolist():
                self.advance(token)
            self.seen = tokens.shape[0]
        allowed = self.allowed()
        if allowed is None:
            return logits
        width = logits.shape[-1]
        if width > self.vocab:  # ids past the tokenizer's vocabulary are never allowed
            allowed = mx.concatenate([allowed, mx.zeros(width - self.vocab, dtype=allowed.dtype)])
        return mx.where(allowed.astype(mx.bool_), logits, -mx.inf)


def json_logits_processor(
    processor, schema: dict | str | bool, thought_budget: int | None = None
) -> Callable[[mx.array, mx.array], mx.array]:
    """A fresh logits processor making the answer JSON valid for `schema` (see JsonConstraint)."""
    return JsonConstraint(processor, schema, thought_budget).logits_processor()


def tool_call_logits_processor(
    processor, tools: list, tool_choice: str = "required", thought_budget: int | None = None
) -> Callable[[mx.array, mx.array], mx.array]:
    """A fresh logits processor forcing one tool call (see ToolCallConstraint)."""
    return ToolCallConstraint(processor, tools, tool_choice, thought_budget).logits_processor()


# --- what stream_generate asks for -------------------------------------------------------------

TOOL_CHOICE_FORMS = (
    '"auto", "none", "required", a function name or '
    '{"type": "function", "function": {"name": NAME}}'
)


def tool_choice_name(tool_choice: str | dict) -> str:
    """ "auto", "none", "required" or the function name, from any of OpenAI's forms."""
    if isinstance(tool_choice, dict):
        function = tool_choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if tool_choice.get("type") == "function" and isinstance(name, str) and name:
            return name
    elif isinstance(tool_choice, str) and tool_choice:
        return tool_choice
    raise ConstraintError(f"tool_choice: expected {TOOL_CHOICE_FORMS}, got {tool_choice!r}")


def check_tool_choice(tools: list | None, tool_choice: str | dict, json_schema: Any = None) -> str:
    """The tool choice as "auto", "none", "required" or a function name, or one
    ConstraintError line for a choice that cannot be met; needs no tokenizer (so no model)."""
    choice = tool_choice_name(tool_choice)
    if choice == "auto":
        return choice
    if tools is None:
        raise ConstraintError(f"tool_choice={choice!r} needs tools; pass tools=[...]")
    if choice == "none":
        return choice
    if json_schema is not None:
        raise ConstraintError(
            f"json_schema and tool_choice={choice!r} both fix the answer's form; "
            'pass one of them (or tool_choice="auto")'
        )
    chosen_functions(tools, choice)
    return choice


def forbid_token(token: int) -> Callable[[mx.array, mx.array], mx.array]:
    """A logits processor that never lets `token` be sampled."""

    def processor(_tokens: mx.array, logits: mx.array) -> mx.array:
        return mx.where(mx.arange(logits.shape[-1]) == token, -mx.inf, logits)

    return processor


def output_logits_processor(
    processor,
    json_schema: dict | str | bool | None = None,
    tools: list | None = None,
    tool_choice: str | dict = "auto",
) -> Callable[[mx.array, mx.array], mx.array] | None:
    """A fresh logits processor for one generation's `json_schema` and `tool_choice`, or None
    when nothing is constrained. Every bad combination is one ConstraintError line, raised
    before any model work.

    tool_choice "auto": the model may call the tools or answer; "none": the tools are declared
    but the call opener `<|tool_call>` is never sampled; "required" or a function name (also
    as OpenAI's {"type": "function", "function": {"name": ...}}): exactly one call, to any
    tool or to that one. With `json_schema` the answer is JSON, so no call can be made."""
    choice = check_tool_choice(tools, tool_choice, json_schema)
    forced = choice not in ("auto", "none")
    if json_schema is not None:
        return JsonConstraint(processor, json_schema).logits_processor()
    if forced:
        return ToolCallConstraint(processor, tools, choice).logits_processor()
    if choice == "none":
        token = processor.token_id(TOOL_CALL_OPEN)
        return None if token is None else forbid_token(token)
    return None


__all__ = [
    "Constraint",
    "ConstrainedLogits",
    "JsonConstraint",
    "ToolCallConstraint",
    "json_logits_processor",
    "tool_call_logits_processor",
    "check_json_schema",
    "check_tool_choice",
    "load_schema",
    "output_logits_processor",
    "tool_choice_name",
]
