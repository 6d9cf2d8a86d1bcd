"""The agent loop, driven by a scripted generator.

The script replays canned model outputs through ToolCallStream, as a generator separating calls
would, and renders every prompt it is given with Google's template: the loop's execution, error
responses and history shape are real; only the model is replaced. The end-to-end runs with a
model, its prompt cache and images are in test_tools_generation.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from checkpoints import GEMMA4_TEMPLATE

from mlx_gemma4.agent import AgentResult, run_agent, run_tool
from mlx_gemma4.tool_calls import ToolCall, ToolCallStream

Q = '<|"|>'


@pytest.fixture(scope="module")
def render(tmp_path_factory):
    from checkpoints import chat_renderer

    return chat_renderer(tmp_path_factory.mktemp("tokenizer"))


@dataclass
class Response:
    text: str
    thought: str
    tool_calls: list[ToolCall]
    finish_reason: str | None


@dataclass
class Script:
    """A generate function that replays `outputs` (raw model text, one per step)."""

    render: object
    outputs: list[str]
    prompts: list[str] = field(default_factory=list)
    separate_calls: bool = True

    def __call__(self, model, processor, messages, *, tools, enable_thinking=False):
        self.prompts.append(self.render(messages, tools=tools, thinking=enable_thinking))
        output = self.outputs.pop(0)
        thought = ""
        if output.startswith("<|channel>thought\n"):
            thought, output = output.removeprefix("<|channel>thought\n").split("<channel|>", 1)
            yield Response("", thought, [], None)
        stream = ToolCallStream()
        calls = []
        for start in range(0, len(output), 3):  # pieces that cut tokens apart
            piece = output[start : start + 3]
            if self.separate_calls:
                text, new_calls = stream.feed(piece)
                calls += new_calls
                yield Response(text, "", new_calls, None)
            else:
                yield Response(piece, "", [], None)
        text, new_calls, _ = stream.finish()
        calls += new_calls
        yield Response(text, "", new_calls, "tool_calls" if calls else "stop")


def get_weather(city: str) -> dict:
    """Current weather.

    Args:
        city: The city.
    """
    return {"city": city, "temp": 21 if city == "Paris" else 25}


def divide(a: float, b: float) -> float:
    """Divide.

    Args:
        a: Dividend.
        b: Divisor.
    """
    return a / b


WEATHER_CALL = f"<|tool_call>call:get_weather{{city:{Q}Paris{Q}}}<tool_call|>"
QUESTION = [{"role": "user", "content": "Weather in Paris?"}]


def run(render, outputs, messages=QUESTION, tools=(get_weather, divide), **kwargs):
    script = Script(render, list(outputs), separate_calls=kwargs.pop("separate_calls", True))
    result = run_agent(None, None, messages, tools, generate_fn=script, **kwargs)
    return result, script


def test_call_then_answer(render):
    result, script = run(render, [WEATHER_CALL, "It is 21 degrees."])
    assert isinstance(result, AgentResult)
    assert result.text == "It is 21 degrees." and result.finish_reason == "stop"
    assert [s.calls for s in result.steps] == [[ToolCall("get_weather", {"city": "Paris"})], []]
    assert result.steps[0].results == [{"city": "Paris", "temp": 21}]
    expected = [
        *QUESTION,
        {
            "role": "assistant",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
            "tool_responses": [
                {"name": "get_weather", "response": {"city": "Paris", "temp": 21}},
            ],
            "content": "It is 21 degrees.",
        },
    ]
    assert render(result.messages, GEMMA4_TEMPLATE) == render(expected, GEMMA4_TEMPLATE)
    # the second prompt is the first, plus what the model wrote, plus the tool's answer
    assert script.prompts[1].startswith(
        script.prompts[0].removesuffix("<|channel>thought\n<channel|>") + WEATHER_CALL
    )
    assert script.prompts[1].endswith(
        f"{WEATHER_CALL}<|tool_response>response:get_weather{{city:{Q}Paris{Q},temp:21}}"
        "<tool_response|><|channel>thought\n<channel|>"
    )


def test_each_prompt_extends_the_previous_one_with_thinking_on(render):
    """What allows a prompt cache to carry across steps: nothing already processed changes."""
    outputs = [
        "<|channel>thought\nCheck Paris first.<channel|>" + WEATHER_CALL,
        f"<|channel>thought\nNow Rome.<channel|><|tool_call>call:get_weather{{city:{Q}Rome{Q}}}"
        "<tool_call|>",
        "<|channel>thought\nDone.<channel|>Paris 21, Rome 25.",
    ]
    result, script = run(render, list(outputs), enable_thinking=True)
    assert result.text == "Paris 21, Rome 25."
    for step, output in enumerate(outputs[:2]):
        assert script.prompts[step + 1].startswith(script.prompts[step] + output)
    assert [s.thought for s in result.steps] == ["Check Paris first.", "Now Rome.", "Done."]
    # thoughts stay only until the next user turn, answers keep none
    final = render(result.messages, GEMMA4_TEMPLATE, thinking=True, generation_prompt=False)
    assert "Check Paris first." in final and "Done." not in final
    later = render([*result.messages, {"role": "user", "content": "And Oslo?"}], thinking=True)
    assert "Check Paris first." not in later and "Now Rome." not in later
    assert "<|channel>" not in later.split("<|turn>user\nAnd Oslo?")[0]


def test_several_calls_unknown_tools_and_exceptions_go_back_as_errors(render):
    output = (
        "<|tool_call>call:divide{a:1,b:0}<tool_call|><|tool_call>call:mcp:nope{}<tool_call|>"
        "<|tool_call>call:divide{a:1}<tool_call|><|tool_call>call:divide{a:6,b:3}<tool_call|>"
    )
    result, script = run(render, [output, "Sorry."])
    errors = result.steps[0].results
    assert errors[0] == {"error": "ZeroDivisionError: division by zero"}
    assert "no tool named 'mcp:nope'" in errors[1]["error"] and "get_weather" in errors[1]["error"]
    assert errors[2]["error"].startswith("TypeError:") and errors[3] == 2.0
    assert f"<|tool_response>response:mcp:nope{{error:{Q}no tool named" in script.prompts[1]
    assert "<|tool_response>response:divide{value:2.0}<tool_response|>" in script.prompts[1]
    assert result.text == "Sorry."


def test_max_steps(render):
    result, script = run(render, [WEATHER_CALL] * 3, max_steps=3)
    assert result.finish_reason == "max_steps" and result.text == ""
    assert len(result.steps) == 3 and len(script.prompts) == 3
    assert script.prompts[2].count("<|tool_response>") == 2


def test_confirm_and_on_call(render):
    ran, seen = [], []

    def record(city: str) -> str:
        """Record.

        Args:
            city: A city.
        """
        ran.append(city)
        return "ok"

    output = "".join(f"<|tool_call>call:record{{city:{Q}{city}{Q}}}<tool_call|>" for city in "AB")
    result, _ = run(
        render,
        [output, "Done."],
        tools=[record],
        confirm=lambda call: call.arguments["city"] == "B",
        on_call=lambda call, value: seen.append((call.arguments["city"], value)),
    )
    assert ran == ["B"]
    assert seen == [("A", {"error": "the user declined to run this call"}), ("B", "ok")]


def test_declared_only_tools_are_error_responses(render):
    declared = {"type": "function", "function": {"name": "remote", "description": "Elsewhere."}}
    result, script = run(render, ["<|tool_call>call:remote{}<tool_call|>", "No."], tools=[declared])
    assert "<|tool>declaration:remote{description:" in script.prompts[0]
    assert result.steps[0].results[0]["error"].startswith("no tool named 'remote'")


def test_calls_left_in_the_text_by_the_generator_are_run(render):
    result, _ = run(render, ["Let me look. " + WEATHER_CALL, "21."], separate_calls=False)
    assert result.steps[0].calls == [ToolCall("get_weather", {"city": "Paris"})]
    assert result.steps[0].text == "Let me look. "


def test_malformed_call_is_the_answer_and_flagged(render):
    result, _ = run(render, ["<|tool_call>call:get_weather{city:Paris}<tool_call|>"])
    assert result.text == "<|tool_call>call:get_weather{city:Paris}<tool_call|>"
    assert result.steps[0].malformed == [result.text]


def test_openai_history_and_images(render):
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Weather here?"}]},
        {
            "role": "assistant",
            "tool_calls": [
                {"id": "1", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "1", "content": '{"temp": 21}'},
    ]
    result, script = run(render, ["21 degrees."], messages=messages)
    assert "\n\n<|image|>\n\n" in script.prompts[0]
    assert script.prompts[0].endswith(
        f"{WEATHER_CALL}<|tool_response>response:get_weather{{temp:21}}<tool_response|>"
        "<|channel>thought\n<channel|>"
    )
    assert result.messages[-1]["content"] == "21 degrees."
    assert len(result.messages) == 2


def test_run_tool_converts_results_to_plain_data():
    def many() -> tuple:
        return (1, {"a": {2}}, object)

    value = run_tool(ToolCall("many", {}), {"many": many})
    assert value == [1, {"a": "{2}"}, "<class 'object'>"]
