"""Chat and text completions: a request's engine options, and its tokens as OpenAI's response
objects, streamed as server-sent events or collected into one body."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.sse import format_sse_event

from ..options import MediaOptions, SamplingOptions
from ..processing.images import DEFAULT_BUDGET
from .driver import EngineDriver, EngineFailure, Job, ServerStopping
from .http import APIError, log
from .schemas import ChatCompletionRequest, ImagePart, SamplingFields

# OpenAI's defaults where a request says nothing
DEFAULT_TEMPERATURE = 1.0
DISCONNECT_CHECK_SECONDS = 0.5


def sampling_options(body: SamplingFields, max_tokens: int) -> SamplingOptions:
    """A request's sampling (`max_tokens`: its limit or the server's default)."""
    return SamplingOptions(
        max_tokens=max_tokens,
        temperature=DEFAULT_TEMPERATURE if body.temperature is None else body.temperature,
        top_p=body.top_p or 0.0,
        top_k=body.top_k or 0,
        min_p=body.min_p or 0.0,
        repetition_penalty=body.repetition_penalty,
        seed=body.seed,
        stop=body.stop_strings(),
    )


def chat_options(body: ChatCompletionRequest, max_tokens: int) -> dict[str, Any]:
    """Everything `BatchGenerator.submit` takes for a chat request besides its messages."""
    options: dict[str, Any] = {
        "sampling": sampling_options(body, max_tokens),
        "enable_thinking": body.thinking(),
    }
    if body.tools:
        options["tools"] = [tool.model_dump(exclude_none=True) for tool in body.tools]
        choice = body.tool_choice
        if choice is not None:
            options["tool_choice"] = choice if isinstance(choice, str) else choice.model_dump()
    elif body.tool_choice not in (None, "none", "auto"):
        raise APIError(
            400, "tool_choice: it asks for a tool call but no tools are given", param="tool_choice"
        )
    schema = json_schema(body)
    if schema is not None:
        options["json_schema"] = schema
    budget = image_budget(body)
    if budget is not None:
        options["media_options"] = MediaOptions(max_soft_tokens=budget)
    return options


# An image's `detail` as its soft-token budget; "auto" (or none) keeps the default, 280.
DETAIL_BUDGETS = {"low": 70, "high": 1120}


def image_budget(body: ChatCompletionRequest) -> int | None:
    """The soft tokens per image the request's `detail`s ask for (one budget per request:
    the largest asked for), or None for the default."""
    asked = [
        DETAIL_BUDGETS.get(part.image_url.detail or "auto", DEFAULT_BUDGET)
        for message in body.messages
        if isinstance(message.content, list)
        for part in message.content
        if isinstance(part, ImagePart)
    ]
    return max(asked) if asked and max(asked) != DEFAULT_BUDGET else None


def json_schema(body: ChatCompletionRequest) -> dict | bool | None:
    """`response_format` as the engine's `json_schema` (True: any JSON object)."""
    fmt = body.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return True
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise APIError(
            400,
            "response_format.json_schema.schema: missing; give the JSON schema the answer follows",
            param="response_format.json_schema.schema",
        )
    return fmt.json_schema.schema_


# ---------------------------------------------------------------------------- results


@dataclass
class Outcome:
    """A request's whole generation, gathered from its responses."""

    text: str = ""
    thought: str = ""
    tool_calls: list[dict] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    generation_tokens: int = 0
    cached_tokens: int = 0
    drafted_tokens: int = 0  # speculative decoding: tokens drafted for the request
    accepted_tokens: int = 0  # and those the model accepted

    def add(self, response) -> dict[str, Any]:
        """Take one engine response; return its chat delta (new text, thought, calls)."""
        self.text += response.text
        self.thought += response.thought
        self.prompt_tokens = response.prompt_tokens
        self.generation_tokens = response.generation_tokens
        self.cached_tokens = response.reused_tokens
        self.drafted_tokens = response.drafted_tokens
        self.accepted_tokens = response.accepted_tokens
        delta: dict[str, Any] = {}
        if response.thought:
            delta["reasoning_content"] = response.thought
        if response.text:
            delta["content"] = response.text
        if response.tool_calls:
            first = len(self.tool_calls)
            new = [call.to_openai() for call in response.tool_calls]
            self.tool_calls += new
            delta["tool_calls"] = [{"index": first + i, **c} for i, c in enumerate(new)]
        if response.finish_reason is not None:
            self.finish_reason = response.finish_reason
        return delta

    def usage(self) -> dict[str, Any]:
        usage = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.generation_tokens,
            "total_tokens": self.prompt_tokens + self.generation_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }
        if self.drafted_tokens:
            # OpenAI's fields for predicted tokens: here the drafts of speculative decoding
            usage["completion_tokens_details"] = {
                "accepted_prediction_tokens": self.accepted_tokens,
                "rejected_prediction_tokens": self.drafted_tokens - self.accepted_tokens,
            }
        return usage

    def chat_message(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": self.text or None}
        if self.thought:
            message["reasoning_content"] = self.thought
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
        elif message["content"] is None:
            message["content"] = ""
        return message


@dataclass
class Reply:
    """What every response object of one request shares."""

    kind: str  # "chat.completion" or "text_completion"
    model: str
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self):
        prefix = "chatcmpl" if self.kind == "chat.completion" else "cmpl"
        self.id = f"{prefix}-{uuid.uuid4().hex[:24]}"

    def envelope(self, object: str, **fields: Any) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            **fields,
        }

    def whole(self, outcome: Outcome) -> dict[str, Any]:
        if self.kind == "chat.completion":
            choice = {"index": 0, "message": outcome.chat_message()}
        else:
            choice = {"index": 0, "text": outcome.text, "logprobs": None}
        choice["finish_reason"] = outcome.finish_reason
        return self.envelope(self.kind, choices=[choice], usage=outcome.usage())

    def chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        if self.kind == "chat.completion":
            choice = {"index": 0, "delta": delta}
            object = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": delta.get("content", ""), "logprobs": None}
            object = "text_completion"
        choice["finish_reason"] = finish_reason
        return self.envelope(object, choices=[choice])

    def usage_chunk(self, outcome: Outcome) -> dict[str, Any]:
        object = "chat.completion.chunk" if self.kind == "chat.completion" else "text_completion"
        return self.envelope(object, choices=[], usage=outcome.usage())


# ---------------------------------------------------------------------------- running a job


def job_error(error: BaseException) -> APIError:
    if isinstance(error, ServerStopping):
        return APIError(503, str(error), "server_error", code="server_shutting_down")
    if isinstance(error, EngineFailure):
        return APIError(500, "the engine failed (see the server's log)", "server_error")
    return APIError(500, "internal server error (see the server's log)", "server_error")


async def accepted(driver: EngineDriver, job: Job, request: Request) -> None:
    """Wait until the engine took the job (it may wait for a free slot); its refusal (a library
    error) raises here, as a 400 before any response starts, and so does the server stopping
    (503). A client that leaves meanwhile (checked twice a second) cancels the job."""
    taken = asyncio.wrap_future(driver.submit(job))
    try:
        while not (await asyncio.wait({taken}, timeout=DISCONNECT_CHECK_SECONDS))[0]:
            if await request.is_disconnected():
                driver.cancel(job)
                raise APIError(499, "the client disconnected")
        taken.result()
    except (ServerStopping, EngineFailure) as error:
        raise job_error(error) from None
    except asyncio.CancelledError:
        driver.cancel(job)
        raise


async def collect(driver: EngineDriver, job: Job, request: Request) -> Outcome:
    """The whole outcome of an accepted job; a client that leaves cancels it (checked twice a
    second, whether tokens are flowing or not)."""
    outcome = Outcome()
    finished = False
    loop = asyncio.get_running_loop()
    check_at = loop.time() + DISCONNECT_CHECK_SECONDS
    try:
        while True:
            if loop.time() >= check_at:
                if await request.is_disconnected():
                    raise APIError(499, "the client disconnected")
                check_at = loop.time() + DISCONNECT_CHECK_SECONDS
            try:
                item = await asyncio.wait_for(job.tokens.get(), DISCONNECT_CHECK_SECONDS)
            except asyncio.TimeoutError:
                continue
            if item is None:
                finished = True
                return outcome
            if isinstance(item, BaseException):
                finished = True
                raise job_error(item)
            outcome.add(item)
    finally:
        if not finished:
            driver.cancel(job)


def sse(data: dict[str, Any] | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return format_sse_event(data_str=text)


async def stream(
    driver: EngineDriver, job: Job, reply: Reply, include_usage: bool
) -> AsyncIterator[bytes]:
    """The job's tokens as server-sent events, ending with `[DONE]`; an engine failure or the
    server stopping ends the stream with an error event. A client that leaves (the response
    task is cancelled) cancels the job."""
    outcome = Outcome()
    finished = False
    try:
        if reply.kind == "chat.completion":
            yield sse(reply.chunk({"role": "assistant", "content": ""}))
        while True:
            item = await job.tokens.get()
            if item is None:
                break
            if isinstance(item, BaseException):
                finished = True
                yield sse(job_error(item).body())
                return
            delta = outcome.add(item)
            if delta and (reply.kind == "chat.completion" or delta.get("content")):
                yield sse(reply.chunk(delta))
            if item.finish_reason is not None:
                yield sse(reply.chunk({}, item.finish_reason))
        finished = True
        if include_usage:
            yield sse(reply.usage_chunk(outcome))
        yield sse("[DONE]")
    finally:
        if not finished:
            log.info("request %s: the client left; its sequence is cancelled", reply.id)
            driver.cancel(job)
