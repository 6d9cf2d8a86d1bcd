"""Generation: chunked prefill, a one-token decode loop that queues the next step, responses."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.sample_utils import make_sampler

from .errors import PromptTooLongError  # noqa: F401  (importable from here, as it was)
from .kv_quant import KVQuantization
from .options import MediaOptions, SamplingOptions
from .processing import Processor
from .processing.images import DEFAULT_BUDGET
from .processing.processor import Media
from .processing.video import DEFAULT_VIDEO_BUDGET, MAX_FRAMES
from .prompt_cache import PromptCache
from .tool_calls import ToolCall
from .tools import Tool

# shared with the batch engine (`engine/batch.py`): one implementation of a turn's set-up and
# output; the names stay importable from here
from .turn import (  # noqa: F401
    TOOL_RESPONSE,
    LogitsProcessor,
    TurnOutput,
    prepare_turn,
    refuse_media_without_tower,
    sampling_options,
)


@dataclass
class GenerationResponse:
    text: str  # new answer text since the previous response (tool-call text left out)
    thought: str  # new thinking text since the previous response
    token: int
    finish_reason: str | None  # "stop", "length", "tool_calls" or None while generating
    prompt_tokens: int  # tokens in the prompt
    reused_tokens: int  # prompt tokens served from the prompt cache
    generation_tokens: int
    prompt_tps: float  # prompt tokens processed per second (reused ones excluded)
    generation_tps: float
    peak_memory: float  # GB
    tool_calls: list[ToolCall] = field(default_factory=list)  # calls completed by this token
    # True where `text` carries call text that did not parse (returned as text, not dropped),
    # and on the final response of a turn that had any
    malformed_tool_call: bool = False
    # speculative decoding (`draft_model`): tokens drafted and the target accepted so far
    drafted_tokens: int = 0
    accepted_tokens: int = 0


def soft_token_blocks(model, ids: list[int]) -> list[tuple[int, int]]:
    """[start, end) spans of consecutive soft tokens (one image, video frame or audio clip)."""
    is_soft = np.array(model.soft_token_slots(mx.array(ids)))
    edges = np.flatnonzero(np.diff(np.concatenate([[0], is_soft.astype(np.int8), [0]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))


def prefill_chunks(n: int, step: int, blocks: list[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    """Chunks of all but the last of `n` tokens, at most `step` long unless a block is longer;
    a chunk never cuts an image block (its tokens attend to each other both ways)."""
    start = 0
    while start < n - 1:
        end = min(start + step, n - 1)
        for block_start, block_end in blocks:
            if block_start < end < block_end:
                end = block_start if block_start > start else block_end
        yield start, end
        start = end


@dataclass
class PromptInputs:
    """The tokens a prompt cache has not seen, ready for the text model."""

    todo: list[int]
    text_ids: mx.array  # [1, len(todo)], image placeholders replaced by the pad id
    embeddings: mx.array | None = None  # [1, len(todo), hidden] when images are among them
    blocks: mx.array | None = None  # image block ids, for bidirectional image attention
    block_spans: tuple[tuple[int, int], ...] = ()


def media_encoders(model, media: Media) -> dict[int, tuple[Any, Callable[..., mx.array]]]:
    """Placeholder token id -> (the prompt's batch of that kind, the tower that encodes it)."""
    config = model.config
    return {
        config.image_token_id: (media.images, model.vision_features),
        config.video_token_id: (
            media.video_frames,
            lambda pixels, positions: model.vision_features(pixels, positions, kind="video"),
        ),
        config.audio_token_id: (media.audio, model.audio_features),
    }


def prompt_inputs(model, ids: list[int], media: Media, prompt_cache: PromptCache) -> PromptInputs:
    """Reuse the cache's prefix; run the towers only for media it has not seen."""
    spans = soft_token_blocks(model, ids)
    todo = prompt_cache.prepare(ids, spans)
    keep = len(ids) - len(todo)
    features = {}
    for token_id, (batch, encode) in media_encoders(model, media).items():
        starts = [start for start, _ in spans if ids[start] == token_id]
        pending = [i for i, start in enumerate(starts) if start >= keep]
        if pending and batch is not None:
            features[token_id] = encode(*batch.take(pending))
    text_ids, embeddings, blocks = model.text_model_inputs(mx.array([todo]), features)
    local = tuple((start - keep, end - keep) for start, end in spans if start >= keep)
    return PromptInputs(todo, text_ids, embeddings, blocks, local)


def prefill_chunk(
    model, prompt_cache: PromptCache, inputs: PromptInputs, start: int, end: int
) -> None:
    """Run prompt positions [start, end) of `inputs.todo` through the caches and record them."""

    def part(array: mx.array | None) -> mx.array | None:
        return None if array is None else array[:, start:end]

    cache = prompt_cache.cache
    model.language_model(
        inputs.text_ids[:, start:end], cache, part(inputs.embeddings), part(inputs.blocks)
    )
    mx.eval([c.state for c in cache])
    prompt_cache.tokens.extend(inputs.todo[start:end])


def generate_step(
    model,
    prompt: list[int],
    inputs: PromptInputs,
    prompt_cache: PromptCache,
    sampler: Callable[[mx.array], mx.array],
    logits_processors: list[LogitsProcessor],
    prefill_step_size: int = 2048,
    normalize: bool = True,
) -> Iterator[int]:
    """Yield sampled token ids; the step after each is already queued while it is consumed.

    `inputs` holds the tail of `prompt` the cache has not processed (see `prompt_inputs`).
    `normalize=False` hands the sampler raw logits (enough for greedy decoding).
    """
    cache, todo = prompt_cache.cache, inputs.todo
    for start, end in prefill_chunks(len(todo), prefill_step_size, inputs.block_spans):
        prefill_chunk(model, prompt_cache, inputs, start, end)
        mx.clear_cache()
    todo = todo[-1:]

    history = mx.array(prompt)

    def step(ids: mx.array) -> mx.array:
        nonlocal history
        hidden = model.language_model(model.text_ids(ids[None]), cache)
        logits = model.logits(hidden[:, -1, :])  # the 262k-wide head for the last position only
        if logits_processors:
            # The forward pass starts now: the processors' CPU work (a grammar's mask waits
            # for the previous token) overlaps it instead of delaying it.
            mx.async_eval(logits)
        for processor in logits_processors:
            logits = processor(history, logits)
        if normalize:
            logits = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        token = sampler(logits)
        if logits_processors:  # only they read the history
            history = mx.concatenate([history, token])
        return token

    token = step(mx.array(todo))
    prompt_cache.tokens.extend(todo)
    mx.async_eval(token)
    while True:
        upcoming = step(token)
        mx.async_eval(upcoming)
        value = token.item()  # waits for this token only; the next step is already queued
        prompt_cache.tokens.append(value)  # ... and it has been fed to the model
        yield value
        token = upcoming


def stream_generate(
    model,
    processor: Processor,
    prompt: str | list[int] | list[dict],
    *,
    images: list | None = None,
    max_soft_tokens: int = DEFAULT_BUDGET,
    videos: list | None = None,
    audio: list | None = None,
    video_soft_tokens: int = DEFAULT_VIDEO_BUDGET,
    max_frames: int = MAX_FRAMES,
    max_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 0.0,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: float | None = None,
    repetition_context_size: int = 20,
    seed: int | None = None,
    stop: list[str] | None = None,
    tools: list[Tool] | None = None,
    tool_choice: str | dict = "auto",
    json_schema: dict | str | bool | None = None,
    prompt_cache: PromptCache | None = None,
    enable_thinking: bool = False,
    logits_processors: list[LogitsProcessor] | None = None,
    prefill_step_size: int = 2048,
    kv_bits: int | None = None,
    kv_key_bits: int | None = None,
    kv_value_bits: int | None = None,
    sampling: SamplingOptions | None = None,
    media_options: MediaOptions | None = None,
    draft_model=None,
    num_draft_tokens: int = 4,
) -> Iterator[GenerationResponse]:
    """Generate from text, token ids or chat messages, one response per token.

    Images come in chat messages (`{"type": "image", "image": path or PIL image}` parts) or as
    `images` for a text prompt with `<|image|>` placeholders; `max_soft_tokens` is each image's
    budget (70, 140, 280, 560 or 1120). Videos likewise (`{"type": "video", "video": path}`
    or `videos` with `<|video|>` placeholders): at most `max_frames` frames of
    `video_soft_tokens` each. Audio too (`{"type": "audio", "audio": path or 16 kHz samples}`
    or `audio` with `<|audio|>` placeholders), up to 30 s a clip. Greedy when `temperature`
    is 0. `prompt_cache` keeps the KV caches between calls: only the tokens after the longest
    common prefix with the previous call are processed, and only media among them go through
    the towers.

    `kv_bits` (or `kv_key_bits` and `kv_value_bits` apart) stores the full-attention layers'
    keys and values rotated and quantized (2-6 or 8 bits). A `prompt_cache` made with another
    setting is rebuilt; with none of the three it keeps its own setting.

    `tools` (OpenAI function dicts or Python functions, see `tools.tool_declarations`) are
    declared to the model in chat prompts (a text prompt or token ids is taken as already
    rendered) and turn on call parsing: call text never appears in `text`, each completed call
    comes in `tool_calls`, and a turn that ended with calls has `finish_reason="tool_calls"`.
    Generation stops where the model waits for the tool responses. Call text that does not
    parse stays in `text`, with `malformed_tool_call` set. OpenAI `role: "tool"` messages are
    taken in chat prompts, with or without `tools`.

    `tool_choice`: "auto" (the model decides), "none" (tools declared, `<|tool_call>` never
    sampled, nothing parsed as a call), "required" (exactly one call to any of `tools`) or a
    function name, also as OpenAI's `{"type": "function", "function": {"name": NAME}}`
    (exactly one call to that function). A forced call comes in `tool_calls` with
    `finish_reason="tool_calls"`.

    `json_schema` (a dict, a JSON string, or True for any JSON object; needs llguidance) makes
    the answer compact JSON valid for it. With `enable_thinking` the thought is free and the
    answer after it constrained. A schema the engine cannot enforce raises `ConstraintError`
    before any model work. The constraint masks logits before `logits_processors` run.

    `sampling` (a `SamplingOptions`) and `media_options` (a `MediaOptions`), when given, stand
    for the keyword arguments of the same names, which are then ignored.

    `draft_model` (an assistant from `load_model`, or a smaller Gemma 4 with the same
    vocabulary) drafts up to `num_draft_tokens` tokens a step for the model to check in one
    pass (see `speculative`); the output is the same, greedy or sampled. Responses count the
    tokens drafted and accepted. With `json_schema`, a forced `tool_choice` or your own
    `logits_processors` nothing is drafted (they follow one token at a time).
    """
    kv_quantization = KVQuantization.from_bits(kv_bits, kv_key_bits, kv_value_bits)
    sampling = sampling_options(
        sampling,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        repetition_context_size=repetition_context_size,
        seed=seed,
        stop=stop,
    )
    if media_options is None:
        media_options = MediaOptions(
            max_soft_tokens=max_soft_tokens,
            video_soft_tokens=video_soft_tokens,
            max_frames=max_frames,
        )
    turn = prepare_turn(
        model,
        processor,
        prompt,
        sampling=sampling,
        media_options=media_options,
        images=images,
        videos=videos,
        audio=audio,
        enable_thinking=enable_thinking,
        tools=tools,
        tool_choice=tool_choice,
        json_schema=json_schema,
        logits_processors=logits_processors,
    )
    prompt_ids, media, processors = turn.prompt_ids, turn.media, turn.logits_processors
    if sampling.seed is not None:
        mx.random.seed(sampling.seed)
    sampler = make_sampler(
        sampling.temperature, top_p=sampling.top_p, min_p=sampling.min_p, top_k=sampling.top_k
    )
    if prompt_cache is None:
        prompt_cache = PromptCache(model, kv_quantization)
    elif kv_quantization is not None:
        prompt_cache.use_kv_quantization(kv_quantization)
    output = TurnOutput(processor, turn)

    mx.reset_peak_memory()
    start = time.perf_counter()
    inputs = prompt_inputs(model, prompt_ids, media, prompt_cache)
    reused = len(prompt_ids) - len(inputs.todo)
    if draft_model is None:
        stats = None
        tokens = generate_step(
            model,
            prompt_ids,
            inputs,
            prompt_cache,
            sampler,
            processors,
            prefill_step_size,
            normalize=sampling.temperature > 0,
        )
    else:
        from .speculative import DraftStats, speculative_generate_step

        stats = DraftStats()
        one_at_a_time = turn.constraint is not None or bool(logits_processors)
        tokens = speculative_generate_step(
            model,
            draft_model,
            prompt_ids,
            inputs,
            prompt_cache,
            sampling,
            processors,
            prefill_step_size,
            0 if one_at_a_time else num_draft_tokens,
            stats,
            media=media,
        )
    try:
        for n, token in enumerate(tokens, start=1):
            if n == 1:
                prompt_time = time.perf_counter() - start
                start = time.perf_counter()
            piece = output.add(token)
            answer, thought, finish = piece.text, piece.thought, piece.finish_reason
            new_calls, malformed = piece.tool_calls, piece.malformed_tool_call
            elapsed = max(time.perf_counter() - start, 1e-9)
            yield GenerationResponse(
                text=answer,
                thought=thought,
                token=token,
                finish_reason=finish,
                prompt_tokens=len(prompt_ids),
                reused_tokens=reused,
                generation_tokens=n,
                prompt_tps=(len(prompt_ids) - reused) / max(prompt_time, 1e-9),
                generation_tps=n / elapsed,
                peak_memory=mx.get_peak_memory() / 1e9,
                tool_calls=new_calls,
                malformed_tool_call=malformed,
                drafted_tokens=stats.drafted if stats else 0,
                accepted_tokens=stats.accepted if stats else 0,
            )
            if finish:
                break
    except BaseException:
        # interrupted (Ctrl-C, an error) or closed early: keep what the finished steps cached
        prompt_cache.roll_back_to_tokens()
        raise


def generate(model, processor: Processor, prompt, **kwargs) -> str:
    """The whole answer (thoughts excluded) as one string; takes `stream_generate`'s options.
    With `tools`, the calls the model made are in it as it wrote them (`parse_tool_calls`
    reads them back); with `json_schema`, it is the JSON text."""
    pieces = []
    for response in stream_generate(model, processor, prompt, **kwargs):
        pieces.append(response.text)
        pieces.extend(call.to_text() for call in response.tool_calls)
    return "".join(pieces)
