"""Function calling through generation with a real (tiny, random) model: tools rendered into the
prompt, calls separated from the streamed text, the agent loop with its prompt cache, images.

A random model writes no calls by itself: `scripted_turns` forces the tokens it emits, while its
forward pass, the detokenizer, the stops and the parser all run for real.
"""

from __future__ import annotations

import shutil

import pytest
from checkpoints import TOOL_TOKENS, add_tool_tokens, scripted_turns
from conftest import random_image

from mlx_gemma4 import ToolCall, generate, load, parse_tool_calls, run_agent, stream_generate
from mlx_gemma4.errors import ToolError
from mlx_gemma4.prompt_cache import common_prefix
from mlx_gemma4.tools import tool_declarations

Q = '<|"|>'
CALL = f"<|tool_call>call:get_weather{{city:{Q}Paris{Q}}}<tool_call|>"
QUESTION = [{"role": "user", "content": "Weather in Paris?"}]


def get_weather(city: str) -> dict:
    """Current weather.

    Args:
        city: The city.
    """
    return {"city": city, "temp": 21}


@pytest.fixture(scope="module")
def tool_checkpoint(chat_checkpoint, tmp_path_factory):
    """`tool_checkpoint(variant)` -> (model, processor) whose tokenizer has Gemma's tool tokens."""
    loaded = {}

    def get(variant: str = "ple_kv_shared"):
        if variant not in loaded:
            source, _ = chat_checkpoint(variant)
            folder = tmp_path_factory.mktemp(f"{variant}-tools")
            shutil.copytree(source, folder, dirs_exist_ok=True)
            add_tool_tokens(folder)
            loaded[variant] = load(folder)
        return loaded[variant]

    return get


def tokens(processor, text: str) -> list[int]:
    return processor.encode(text)[1:]  # without the BOS


def test_the_tool_tokens_are_single_tokens(tool_checkpoint):
    _, processor = tool_checkpoint()
    for token_id, text in TOOL_TOKENS.items():
        assert tokens(processor, text) == [token_id]


def test_calls_are_separated_from_the_streamed_text(tool_checkpoint):
    model, processor = tool_checkpoint()
    script = scripted_turns([tokens(processor, "Let me check. " + CALL + "<|tool_response>")])
    responses = list(
        stream_generate(
            model, processor, QUESTION, tools=[get_weather], max_tokens=80,
            logits_processors=[script],
        )
    )  # fmt: skip
    assert "".join(r.text for r in responses) == "Let me check. "
    assert all("<|" not in r.text and "|>" not in r.text for r in responses)
    with_calls = [r for r in responses if r.tool_calls]
    assert len(with_calls) == 1 and with_calls[0].tool_calls == [
        ToolCall("get_weather", {"city": "Paris"})
    ]
    assert with_calls[0].token == TOOL_TOKENS_BY_TEXT["<tool_call|>"]  # out as soon as it closes
    last = responses[-1]
    assert (
        last.finish_reason == "tool_calls" and last.token == TOOL_TOKENS_BY_TEXT["<|tool_response>"]
    )
    assert not any(r.malformed_tool_call for r in responses)
    assert [r.finish_reason for r in responses[:-1]] == [None] * (len(responses) - 1)


TOOL_TOKENS_BY_TEXT = {text: token_id for token_id, text in TOOL_TOKENS.items()}


def test_without_tools_call_text_is_text_and_the_tool_response_does_not_stop(tool_checkpoint):
    """The control tokens reach the text (the detokenizer does not skip them)."""
    model, processor = tool_checkpoint()
    script = scripted_turns([tokens(processor, CALL + "<|tool_response>ok")])
    responses = list(
        stream_generate(model, processor, QUESTION, max_tokens=80, logits_processors=[script])
    )
    assert "".join(r.text for r in responses) == CALL + "<|tool_response>ok"
    assert responses[-1].finish_reason == "stop" and not any(r.tool_calls for r in responses)


def test_a_tokenizer_without_tool_tokens_stops_at_the_tool_response_text(chat_checkpoint):
    model, processor = load(chat_checkpoint()[0])
    assert processor.token_id("<|tool_response>") is None  # spelled in bytes here
    script = scripted_turns([tokens(processor, CALL + "<|tool_response>more")])
    responses = list(
        stream_generate(
            model, processor, QUESTION, tools=[get_weather], max_tokens=120,
            logits_processors=[script],
        )
    )  # fmt: skip
    assert "".join(r.text for r in responses) == ""
    assert [c for r in responses for c in r.tool_calls] == [
        ToolCall("get_weather", {"city": "Paris"})
    ]
    assert responses[-1].finish_reason == "tool_calls"


def test_a_turn_without_calls_finishes_with_stop(tool_checkpoint):
    model, processor = tool_checkpoint()
    script = scripted_turns([tokens(processor, "It is sunny.")])
    responses = list(
        stream_generate(
            model, processor, QUESTION, tools=[get_weather], max_tokens=40,
            logits_processors=[script],
        )
    )  # fmt: skip
    assert "".join(r.text for r in responses) == "It is sunny."
    assert responses[-1].finish_reason == "stop"
    assert not any(r.tool_calls or r.malformed_tool_call for r in responses)


def test_a_malformed_call_is_text_and_flagged(tool_checkpoint):
    model, processor = tool_checkpoint()
    bad = "<|tool_call>call:get_weather{city:Paris}<tool_call|>"
    script = scripted_turns([tokens(processor, "Hm. " + bad)])
    responses = list(
        stream_generate(
            model, processor, QUESTION, tools=[get_weather], max_tokens=60,
            logits_processors=[script],
        )
    )  # fmt: skip
    assert "".join(r.text for r in responses) == "Hm. " + bad
    flagged = [r for r in responses if r.malformed_tool_call]
    assert bad in "".join(r.text for r in flagged) and flagged[-1] is responses[-1]
    assert responses[-1].finish_reason == "stop" and not any(r.tool_calls for r in responses)


def test_a_call_cut_by_max_tokens_is_malformed_text(tool_checkpoint):
    model, processor = tool_checkpoint()
    script = scripted_turns([tokens(processor, CALL)])
    responses = list(
        stream_generate(
            model, processor, QUESTION, tools=[get_weather], max_tokens=8,
            logits_processors=[script],
        )
    )  # fmt: skip
    text = "".join(r.text for r in responses)
    assert text and CALL.startswith(text)
    assert responses[-1].finish_reason == "length" and responses[-1].malformed_tool_call


def test_generate_returns_the_calls_as_the_model_wrote_them(tool_checkpoint):
    model, processor = tool_checkpoint()
    script = scripted_turns([tokens(processor, "Checking. " + CALL + "<|tool_response>")])
    text = generate(
        model, processor, QUESTION, tools=[get_weather], max_tokens=80, logits_processors=[script]
    )
    assert text == "Checking. " + CALL
    assert parse_tool_calls(text) == [ToolCall("get_weather", {"city": "Paris"})]


def test_the_prompt_declares_the_tools(tool_checkpoint):
    model, processor = tool_checkpoint()
    declared = tool_declarations([get_weather])
    rendered = processor.apply_chat_template(
        QUESTION, tools=[get_weather], add_generation_prompt=True, enable_thinking=False
    )
    assert isinstance(rendered, str)
    assert rendered == processor.apply_chat_template(QUESTION, tools=declared)
    assert f"<|tool>declaration:get_weather{{description:{Q}Current weather.{Q}" in rendered
    assert rendered.endswith("<|turn>model\n<|channel>thought\n<channel|>")
    *_, last = stream_generate(model, processor, QUESTION, tools=[get_weather], max_tokens=1)
    assert last.prompt_tokens == len(processor.encode(rendered))
    *_, plain = stream_generate(model, processor, QUESTION, max_tokens=1)
    assert plain.prompt_tokens < last.prompt_tokens


def test_openai_tool_messages_render_as_tool_responses(tool_checkpoint):
    _, processor = tool_checkpoint()
    history = [
        *QUESTION,
        {
            "role": "assistant",
            "tool_calls": [
                {"id": "c1", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 21}'},
    ]
    rendered = processor.apply_chat_template(history, tools=[get_weather])
    assert rendered.endswith(
        f"{CALL}<|tool_response>response:get_weather{{temp:21}}<tool_response|>"
        "<|channel>thought\n<channel|>"
    )


def test_an_undescribable_tool_is_one_error_before_generation(tool_checkpoint):
    model, processor = tool_checkpoint()

    def untyped(x):
        """No types."""

    with pytest.raises(ToolError, match="untyped"):
        next(stream_generate(model, processor, QUESTION, tools=[untyped], max_tokens=1))


def test_an_image_and_tools(tool_checkpoint):
    """Multimodal function calling: the image's soft tokens and the declarations in one prompt,
    the call parsed from the answer."""
    model, processor = tool_checkpoint("multimodal")
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": random_image(96, 64, seed=3)},
                {"type": "text", "text": "What is the weather where this photo was taken?"},
            ],
        }
    ]
    ids, media = processor.prepare(messages, tools=tool_declarations([get_weather]))
    image_token = model.config.image_token_id
    assert media.images is not None and ids.count(image_token) == media.images.soft_tokens[0]
    prompt_text = processor.decode(ids)
    assert "<|tool>declaration:get_weather" in prompt_text
    assert prompt_text.index("<tool|>") < prompt_text.index("<|image>")

    script = scripted_turns([tokens(processor, CALL + "<|tool_response>")])
    responses = list(
        stream_generate(
            model, processor, messages, tools=[get_weather], max_tokens=80,
            logits_processors=[script],
        )
    )  # fmt: skip
    assert responses[-1].prompt_tokens == len(ids)
    assert [c for r in responses for c in r.tool_calls] == [
        ToolCall("get_weather", {"city": "Paris"})
    ]
    assert responses[-1].finish_reason == "tool_calls"
    assert "".join(r.text for r in responses) == ""


# --------------------------------------------------------------------------- the agent loop


@pytest.mark.parametrize("thinking", [False, True])
def test_agent_loop_reuses_the_prompt_cache_across_steps(tool_checkpoint, thinking):
    model, processor = tool_checkpoint()
    thought = "<|channel>thought\nLook it up.<channel|>" if thinking else ""
    step_one = thought + CALL + "<|tool_response>"
    step_two = ("<|channel>thought\nGot it.<channel|>" if thinking else "") + "It is 21."
    script = scripted_turns([tokens(processor, step_one), tokens(processor, step_two)])
    seen = []
    result = run_agent(
        model,
        processor,
        QUESTION,
        [get_weather],
        on_call=lambda call, value: seen.append((call, value)),
        logits_processors=[script],
        max_tokens=80,
        enable_thinking=thinking,
    )
    assert result.text == "It is 21." and result.finish_reason == "stop"
    assert seen == [(ToolCall("get_weather", {"city": "Paris"}), {"city": "Paris", "temp": 21})]
    first, second = result.steps
    assert first.finish_reason == "tool_calls" and second.calls == []
    assert first.reused_tokens == 0

    # the second prompt is the history after the first step, rendered
    declarations = tool_declarations([get_weather])
    prompt_one = processor.prepare(QUESTION, tools=declarations, enable_thinking=thinking)[0]
    after_call = [*QUESTION, {k: v for k, v in result.messages[-1].items() if k != "content"}]
    prompt_two = processor.prepare(after_call, tools=declarations, enable_thinking=thinking)[0]
    assert (first.prompt_tokens, second.prompt_tokens) == (len(prompt_one), len(prompt_two))
    cached = prompt_one + tokens(processor, step_one)  # what the cache held after step one
    assert second.reused_tokens == common_prefix(cached, prompt_two)
    if thinking:  # the history renders exactly what the model wrote: nothing is re-read
        assert second.reused_tokens == len(cached)
    else:  # the empty thought channel of the generation prompt is not kept in the history
        assert second.reused_tokens == len(prompt_one) - len(
            tokens(processor, "<|channel>thought\n<channel|>")
        )


def test_agent_unknown_tools_and_exceptions_go_back_as_errors(tool_checkpoint):
    model, processor = tool_checkpoint()

    def divide(a: float, b: float) -> float:
        """Divide.

        Args:
            a: Dividend.
            b: Divisor.
        """
        return a / b

    calls = "<|tool_call>call:divide{a:1,b:0}<tool_call|><|tool_call>call:mcp:nope{}<tool_call|>"
    script = scripted_turns(
        [tokens(processor, calls + "<|tool_response>"), tokens(processor, "No.")]
    )
    result = run_agent(
        model, processor, QUESTION, [divide], logits_processors=[script], max_tokens=80
    )
    errors = result.steps[0].results
    assert errors[0] == {"error": "ZeroDivisionError: division by zero"}
    assert errors[1]["error"].startswith("no tool named 'mcp:nope'")
    assert result.text == "No."
    rendered = processor.apply_chat_template(result.messages, add_generation_prompt=False)
    assert f"<|tool_response>response:mcp:nope{{error:{Q}no tool named" in rendered


def test_a_call_written_as_text_parses_back():
    call = ToolCall(
        "mcp:maps.find-place",
        {"q": 'a {b}, "c": d\n', "n": [1, 2.5, None, True], "o": {"k k": {}, "x:y": -3}},
    )
    text = call.to_text()
    assert text.startswith("<|tool_call>call:mcp:maps.find-place{") and text.endswith(
        "<tool_call|>"
    )
    assert parse_tool_calls(text) == [call]


def test_agent_with_an_image_encodes_it_once(tool_checkpoint):
    """The README's example: read a place off a photo, call a tool, answer. The second step's
    prompt holds the image too; it comes from the prompt cache, not the vision tower."""
    model, processor = tool_checkpoint("multimodal")
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": random_image(96, 64, seed=4)},
                {"type": "text", "text": "What is the weather where this photo was taken?"},
            ],
        }
    ]
    encoded = []
    vision_features = model.vision_features
    model.vision_features = lambda *a: encoded.append(1) or vision_features(*a)
    try:
        script = scripted_turns(
            [tokens(processor, CALL + "<|tool_response>"), tokens(processor, "21 degrees.")]
        )
        result = run_agent(
            model, processor, messages, [get_weather], logits_processors=[script], max_tokens=80
        )
    finally:
        del model.vision_features
    assert result.text == "21 degrees."
    assert result.steps[0].calls == [ToolCall("get_weather", {"city": "Paris"})]
    ids, _ = processor.prepare(messages, tools=tool_declarations([get_weather]))
    empty_thought = tokens(processor, "<|channel>thought\n<channel|>")  # not kept in history
    assert result.steps[1].reused_tokens == len(ids) - len(empty_thought)
    assert encoded == [1]


def test_calls_given_back_as_openai_messages(tool_checkpoint):
    """The README's step-by-step loop: calls out, `to_openai()` and `role: "tool"` messages in."""
    import json

    from mlx_gemma4 import PromptCache

    model, processor = tool_checkpoint()
    script = scripted_turns(
        [tokens(processor, CALL + "<|tool_response>"), tokens(processor, "It is 21.")]
    )
    cache, messages, calls = PromptCache(model), list(QUESTION), []
    options = dict(tools=[get_weather], max_tokens=80, logits_processors=[script])
    for response in stream_generate(model, processor, messages, prompt_cache=cache, **options):
        calls += response.tool_calls
    messages.append({"role": "assistant", "tool_calls": [c.to_openai() for c in calls]})
    for call in calls:
        content = json.dumps(get_weather(**call.arguments))
        messages.append({"role": "tool", "tool_call_id": call.id, "content": content})
    responses = list(stream_generate(model, processor, messages, prompt_cache=cache, **options))
    assert "".join(r.text for r in responses) == "It is 21."
    rendered = processor.apply_chat_template(messages, tools=[get_weather])
    assert rendered.endswith(
        f"{CALL}<|tool_response>response:get_weather{{city:{Q}Paris{Q},temp:21}}"
        "<tool_response|><|channel>thought\n<channel|>"
    )
    assert responses[-1].prompt_tokens == len(processor.encode(rendered))
    assert responses[-1].reused_tokens > len(processor.encode(rendered)) // 2
