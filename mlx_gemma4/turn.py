"""One generation turn, shared by `stream_generate` and the batch engine: the prompt rendered with
its tools, its stops and logits processors (an output constraint, the caller's, a repetition
penalty), and the split of each new token's text into answer, thought and tool calls."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import mlx.core as mx
from mlx_lm.sample_utils import make_logits_processors

from .constrain import output_logits_processor
from .errors import PromptTooLongError
from .options import MediaOptions, SamplingOptions
from .processing import Processor
from .processing.processor import Media
from .streaming import StopStrings, TextStream
from .tool_calls import ToolCall, ToolCallStream
from .tools import Tool, tool_declarations

# After its calls the model opens the tool response and waits for it: the end of its turn.
TOOL_RESPONSE = "<|tool_response>"

LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


def sampling_options(sampling: SamplingOptions | None, **fields) -> SamplingOptions:
    """`sampling` when given, else one built from the keyword arguments of the same names
    (`stop` as any sequence of strings)."""
    if sampling is not None:
        return sampling
    fields["stop"] = tuple(fields.get("stop") or ())
    return SamplingOptions(**fields)


def refuse_media_without_tower(model, media: Media) -> None:
    """One clear error when the prompt carries media this checkpoint has no tower for."""
    for kind, given in (
        ("audio", media.audio),
        ("image", media.images),
        ("video", media.video_frames),
    ):
        if given is not None:
            model.require_tower(kind)


@dataclass
class Turn:
    """What one generation needs beside the model: its prompt and how its output ends."""

    prompt_ids: list[int]
    media: Media
    sampling: SamplingOptions
    stop_ids: set[int]
    stop_strings: list[str]
    # the constraint (json_schema, tool_choice) first, then the caller's, then the penalty
    logits_processors: list[LogitsProcessor]
    constraint: LogitsProcessor | None  # the first of them, when the output is constrained
    parse_calls: bool  # tool calls are cut out of the text and returned as ToolCall objects


def prepare_turn(
    model,
    processor: Processor,
    prompt: str | list[int] | list[dict],
    *,
    sampling: SamplingOptions,
    media_options: MediaOptions,
    images: list | None = None,
    videos: list | None = None,
    audio: list | None = None,
    enable_thinking: bool = False,
    tools: list[Tool] | None = None,
    tool_choice: str | dict = "auto",
    json_schema: dict | str | bool | None = None,
    logits_processors: list[LogitsProcessor] | None = None,
) -> Turn:
    """Render and check one request (see `stream_generate` for the options). Every bad input
    raises here, before any model work: a schema or tool choice the engine cannot enforce, media
    without a tower, a prompt that with `max_tokens` exceeds the context."""
    constraint = output_logits_processor(processor, json_schema, tools, tool_choice)
    template_kwargs = {}
    stop_ids, stop_strings = set(processor.stop_token_ids), list(sampling.stop)
    if tools is not None:
        template_kwargs["tools"] = tool_declarations(tools)
        stop_ids, stop_strings = _stop_at_tool_response(processor, stop_ids, stop_strings)
    prompt_ids, media = processor.prepare(
        prompt,
        images,
        media_options.max_soft_tokens,
        videos=videos,
        video_soft_tokens=media_options.video_soft_tokens,
        max_frames=media_options.max_frames,
        audio=audio,
        enable_thinking=enable_thinking,
        **template_kwargs,
    )
    refuse_media_without_tower(model, media)
    context = model.config.text_config.max_position_embeddings
    if len(prompt_ids) + sampling.max_tokens > context:
        raise PromptTooLongError(
            f"prompt of {len(prompt_ids)} tokens plus max_tokens={sampling.max_tokens} exceeds "
            f"the model's context of {context} tokens; shorten the prompt or lower max_tokens"
        )
    processors = [constraint] if constraint is not None else []
    processors += list(logits_processors or []) + make_logits_processors(
        repetition_penalty=sampling.repetition_penalty,
        repetition_context_size=sampling.repetition_context_size,
    )
    return Turn(
        prompt_ids=prompt_ids,
        media=media,
        sampling=sampling,
        stop_ids=stop_ids,
        stop_strings=stop_strings,
        logits_processors=processors,
        constraint=constraint,
        parse_calls=tools is not None and json_schema is None and tool_choice != "none",
    )


def _stop_at_tool_response(
    processor: Processor, stop_ids: set[int], stop_strings: list[str]
) -> tuple[set[int], list[str]]:
    """The stops with the tool-response opener added: as a token, or as text for a tokenizer
    that lacks the token."""
    token = processor.token_id(TOOL_RESPONSE)
    if token is not None:
        return stop_ids | {token}, stop_strings
    return stop_ids, [*stop_strings, TOOL_RESPONSE]


@dataclass
class TokenOutput:
    """What one generated token adds to the turn's output."""

    text: str  # new answer text (tool-call text left out)
    thought: str  # new thinking text
    finish_reason: str | None  # "stop", "length", "tool_calls" or None while generating
    tool_calls: list[ToolCall] = field(default_factory=list)  # calls completed by this token
    # True where `text` carries call text that did not parse, and on the final output of a
    # turn that had any
    malformed_tool_call: bool = False


class TurnOutput:
    """Turns a turn's tokens, one at a time, into answer and thought text, completed tool calls
    and the finish reason: a stop token, a stop string (cut from the text), `max_tokens`, or
    "tool_calls" for a turn that stopped after calls."""

    def __init__(self, processor: Processor, turn: Turn):
        self.stop_ids = turn.stop_ids
        self.max_tokens = turn.sampling.max_tokens
        self.text = TextStream(processor, turn.stop_ids)
        self.stops = StopStrings(turn.stop_strings)
        self.calls = ToolCallStream() if turn.parse_calls else None
        self.generated = 0

    def add(self, token: int) -> TokenOutput:
        self.generated += 1
        finish = "stop" if token in self.stop_ids else None
        answer, thought = self.text.add(token)
        if finish is None and self.generated == self.max_tokens:
            finish = "length"
            more_answer, more_thought = self.text.flush()
            answer, thought = answer + more_answer, thought + more_thought
        answer, hit_stop = self.stops.feed(answer)
        if hit_stop:
            finish = "stop"
        elif finish:
            answer += self.stops.drain()
        if self.calls is None:
            return TokenOutput(answer, thought, finish)
        answer, calls, malformed, finish = _separate_calls(self.calls, answer, finish)
        return TokenOutput(answer, thought, finish, calls, malformed)


def _separate_calls(
    calls: ToolCallStream, answer: str, finish: str | None
) -> tuple[str, list[ToolCall], bool, str | None]:
    """(the answer text without call text, the calls completed, whether malformed call text
    came out, the finish reason: "tool_calls" for a turn that stopped after calls)."""
    seen_malformed = len(calls.malformed)
    answer, new_calls = calls.feed(answer)
    if finish is None:
        return answer, new_calls, len(calls.malformed) > seen_malformed, None
    rest, last_calls, any_malformed = calls.finish()
    if finish == "stop" and calls.calls:
        finish = "tool_calls"
    return answer + rest, new_calls + last_calls, any_malformed, finish
