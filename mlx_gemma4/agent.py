"""An agent loop: the model calls Python functions until it answers.

Each step generates from the history; the calls the model makes are run, and the turn goes back
into the history in the form Gemma's template renders (`tool_calls` and `tool_responses` on one
assistant message, which the template leaves open for the model to go on). The history then
renders as exactly the tokens the model produced, so a prompt cache carried across steps only
processes each step's new tokens. A step's thought is kept (as `reasoning_content`) only on its
tool-calling turn; the template drops it once a later user turn arrives, and answers keep none.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .tool_calls import ToolCall, split_tool_calls
from .tools import Tool, append_answer, normalize_tool_messages, tool_declarations

GenerateFn = Callable[..., Iterator[Any]]


@dataclass
class AgentStep:
    """One generation: what the model wrote, the calls it made and what they returned."""

    text: str
    thought: str
    calls: list[ToolCall]
    results: list[Any]
    finish_reason: str | None
    malformed: list[str] = field(default_factory=list)  # call text that could not be parsed
    prompt_tokens: int = 0  # the step's prompt, as the generator reports it
    reused_tokens: int = 0  # of which the prompt cache already held


@dataclass
class AgentResult:
    text: str  # the answer; empty when `max_steps` ran out first
    messages: list[dict[str, Any]]  # the history, answer included, in the template's form
    steps: list[AgentStep]
    finish_reason: str  # the last generation's ("stop", "length"), or "max_steps"


def _response_value(value: Any) -> Any:
    """A tool's return value as plain JSON data (other objects as their text)."""
    return json.loads(json.dumps(value, default=str))


def run_tool(
    call: ToolCall,
    functions: dict[str, Callable[..., Any]],
    confirm: Callable[[ToolCall], bool] | None = None,
) -> Any:
    """Run one call. Unknown names, declined calls and exceptions become `{"error": ...}`
    responses: the model reads them and can correct itself."""
    function = functions.get(call.name)
    if function is None:
        known = ", ".join(sorted(functions)) or "none"
        return {"error": f"no tool named {call.name!r} can be run (tools: {known})"}
    if confirm is not None and not confirm(call):
        return {"error": "the user declined to run this call"}
    try:
        return _response_value(function(**call.arguments))
    except Exception as error:  # the tool's own failure goes back to the model
        return {"error": f"{type(error).__name__}: {error}"}


def _collect(responses: Iterable[Any]) -> AgentStep:
    text, thought, calls, finish_reason, response = [], [], [], None, None
    for response in responses:
        text.append(response.text)
        thought.append(getattr(response, "thought", "") or "")
        calls.extend(getattr(response, "tool_calls", None) or [])
        finish_reason = response.finish_reason
    # calls a generator left in the text (one not yet separating them) are taken out here
    answer, more_calls, malformed = split_tool_calls("".join(text))
    return AgentStep(
        answer,
        "".join(thought),
        calls + more_calls,
        [],
        finish_reason,
        malformed,
        prompt_tokens=getattr(response, "prompt_tokens", 0),
        reused_tokens=getattr(response, "reused_tokens", 0),
    )


def run_agent(
    model,
    processor,
    messages: list[dict[str, Any]],
    tools: Iterable[Tool],
    *,
    max_steps: int = 8,
    generate_fn: GenerateFn | None = None,
    on_call: Callable[[ToolCall, Any], None] | None = None,
    confirm: Callable[[ToolCall], bool] | None = None,
    **generate_kwargs: Any,
) -> AgentResult:
    """Generate, run the requested functions, give their results back, until the model answers
    without calling (or `max_steps` generations). `tools` are Python functions (run when
    called) or OpenAI declarations (declared only: calling one is an error response).
    `generate_fn(model, processor, messages, tools=..., **generate_kwargs)` yields responses with
    `.text`, `.thought`, `.tool_calls` and `.finish_reason` (default: `stream_generate`, with a
    prompt cache shared by the steps unless one is given). `confirm(call)` may refuse a call;
    `on_call(call, result)` sees each one run."""
    tools = list(tools)
    declarations = tool_declarations(tools)
    functions = {tool.__name__: tool for tool in tools if callable(tool)}
    if generate_fn is None:
        from .generation import stream_generate
        from .prompt_cache import PromptCache

        generate_fn = stream_generate
        generate_kwargs.setdefault("prompt_cache", PromptCache(model))

    history = normalize_tool_messages(messages)
    steps: list[AgentStep] = []
    for _ in range(max_steps):
        step = _collect(
            generate_fn(model, processor, history, tools=declarations, **generate_kwargs)
        )
        steps.append(step)
        if not step.calls:
            append_answer(history, step.text)
            return AgentResult(step.text, history, steps, step.finish_reason or "stop")
        for call in step.calls:
            result = run_tool(call, functions, confirm)
            step.results.append(result)
            if on_call is not None:
                on_call(call, result)
        # text written beside the calls stays out: the template renders a turn's calls before
        # its text, and text after tool responses would close the turn the model goes on in
        turn: dict[str, Any] = {"role": "assistant"}
        if step.thought:
            turn["reasoning_content"] = step.thought
        turn["tool_calls"] = [call.to_message() for call in step.calls]
        turn["tool_responses"] = [
            {"name": call.name, "response": result}
            for call, result in zip(step.calls, step.results, strict=True)
        ]
        history.append(turn)
    return AgentResult("", history, steps, "max_steps")
