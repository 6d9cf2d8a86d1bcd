"""Generation: chunked prefill, a one-token decode loop that queues the next step, responses."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from .errors import Gemma4Error
from .processing import Processor
from .prompt_cache import PromptCache
from .streaming import StopStrings, TextStream

LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


class PromptTooLongError(Gemma4Error):
    """The prompt plus the tokens to generate exceed the model's context."""


@dataclass
class GenerationResponse:
    text: str  # new answer text since the previous response
    thought: str  # new thinking text since the previous response
    token: int
    finish_reason: str | None  # "stop", "length" or None while generating
    prompt_tokens: int  # tokens in the prompt
    reused_tokens: int  # prompt tokens served from the prompt cache
    generation_tokens: int
    prompt_tps: float  # prompt tokens processed per second (reused ones excluded)
    generation_tps: float
    peak_memory: float  # GB


def generate_step(
    model,
    prompt: list[int],
    todo: list[int],
    prompt_cache: PromptCache,
    sampler: Callable[[mx.array], mx.array],
    logits_processors: list[LogitsProcessor],
    prefill_step_size: int = 2048,
    normalize: bool = True,
) -> Iterator[int]:
    """Yield sampled token ids; the step after each is already queued while it is consumed.

    `todo` is the tail of `prompt` the cache has not processed (`PromptCache.prepare`).
    `normalize=False` hands the sampler raw logits (enough for greedy decoding).
    """
    cache = prompt_cache.cache
    while len(todo) > 1:
        n = min(prefill_step_size, len(todo) - 1)
        model.language_model(mx.array(todo[:n])[None], cache)
        mx.eval([c.state for c in cache])
        prompt_cache.tokens.extend(todo[:n])
        todo = todo[n:]
        mx.clear_cache()

    history = mx.array(prompt)

    def step(ids: mx.array) -> mx.array:
        nonlocal history
        hidden = model.language_model(ids[None], cache)
        logits = model.logits(hidden[:, -1, :])  # the 262k-wide head for the last position only
        for processor in logits_processors:
            logits = processor(history, logits)
        if normalize:
            logits = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        token = sampler(logits)
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
    max_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 0.0,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: float | None = None,
    repetition_context_size: int = 20,
    seed: int | None = None,
    stop: list[str] | None = None,
    prompt_cache: PromptCache | None = None,
    enable_thinking: bool = False,
    logits_processors: list[LogitsProcessor] | None = None,
    prefill_step_size: int = 2048,
) -> Iterator[GenerationResponse]:
    """Generate from text, token ids or chat messages, one response per token.

    Greedy when `temperature` is 0. `prompt_cache` keeps the KV caches between calls: only
    the tokens after the longest common prefix with the previous call are processed.
    """
    prompt_ids = processor.prompt_ids(prompt, enable_thinking=enable_thinking)
    context = model.config.text_config.max_position_embeddings
    if len(prompt_ids) + max_tokens > context:
        raise PromptTooLongError(
            f"prompt of {len(prompt_ids)} tokens plus max_tokens={max_tokens} exceeds the "
            f"model's context of {context} tokens; shorten the prompt or lower max_tokens"
        )
    if seed is not None:
        mx.random.seed(seed)
    sampler = make_sampler(temperature, top_p=top_p, min_p=min_p, top_k=top_k)
    processors = list(logits_processors or []) + make_logits_processors(
        repetition_penalty=repetition_penalty, repetition_context_size=repetition_context_size
    )
    prompt_cache = prompt_cache or PromptCache(model)
    text, stops = TextStream(processor), StopStrings(stop or [])

    mx.reset_peak_memory()
    start = time.perf_counter()
    todo = prompt_cache.prepare(prompt_ids)
    reused = len(prompt_ids) - len(todo)
    tokens = generate_step(
        model,
        prompt_ids,
        todo,
        prompt_cache,
        sampler,
        processors,
        prefill_step_size,
        normalize=temperature > 0,
    )
    try:
        for n, token in enumerate(tokens, start=1):
            if n == 1:
                prompt_time = time.perf_counter() - start
                start = time.perf_counter()
            finish = "stop" if token in processor.stop_token_ids else None
            answer, thought = text.add(token)
            if finish is None and n == max_tokens:
                finish = "length"
                more_answer, more_thought = text.flush()
                answer, thought = answer + more_answer, thought + more_thought
            answer, hit_stop = stops.feed(answer)
            if hit_stop:
                finish = "stop"
            elif finish:
                answer += stops.drain()
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
            )
            if finish:
                break
    except BaseException as e:
        if not isinstance(e, GeneratorExit):
            prompt_cache.reset()  # interrupted mid-step: the caches may be half-updated
        raise


def generate(model, processor: Processor, prompt, **kwargs) -> str:
    """The whole answer (thoughts excluded) as one string; takes `stream_generate`'s options."""
    return "".join(
        response.text for response in stream_generate(model, processor, prompt, **kwargs)
    )
