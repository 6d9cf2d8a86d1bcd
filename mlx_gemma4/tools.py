"""Function calling, the tools side: tools declared to the model (OpenAI function dicts or
Python callables), tools files and modules, and OpenAI-style tool messages turned into the chat
template's form. Reading calls back from the model's output is `tool_calls`.
"""

from __future__ import annotations

import errno
import importlib.util
import inspect
import json
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .errors import ToolError
from .files import access_error

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
