"""The batch generator: requests join and leave at any step, one forward decodes them all.

A request is prefilled alone, in chunks between decode steps (exactly the solo prefill), then
its caches join the batch as a new row. Each decode step feeds every running row its last token
in one forward over the batch caches, samples each row with its own settings and random key,
and retires the rows that finished, freeing their cache rows at once.

Decode steps are pipelined as in `generate_step`: a step queues the next forward, fed with the
tokens it sampled while they are still being computed, before it reads them, so the device
never waits for Python between steps. A row whose next token is its last by `max_tokens` is
left out of the next forward; a row that stops on a token leaves the batch when that token is
read, its place in the forward already queued discarded.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import mlx.core as mx

from ..errors import BatchRequestError
from ..generation import PromptInputs, prefill_chunk, prefill_chunks, prompt_inputs
from ..kv_quant import KVQuantization
from ..memory import format_bytes, kv_cache_bytes
from ..options import MediaOptions, SamplingOptions
from ..processing import Processor
from ..processing.images import DEFAULT_BUDGET
from ..processing.processor import Media
from ..processing.video import DEFAULT_VIDEO_BUDGET, MAX_FRAMES
from ..prompt_cache import PromptCache
from ..tool_calls import ToolCall
from ..tools import Tool
from ..turn import LogitsProcessor, TurnOutput, prepare_turn, sampling_options
from .batch_cache import BatchKVCache
from .prefix_pool import PrefixCachePool
from .sampling import RowSampler, sample_rows
from .speculative import BatchSpeculator, RowDrafting


@dataclass
class BatchResponse:
    """What one step did for one request: a new token, or the request's end."""

    request_id: int
    token: int
    text: str  # new answer text
    thought: str  # new thinking text
    finish_reason: str | None  # "stop", "length", "tool_calls" or None while generating
    prompt_tokens: int
    generation_tokens: int
    reused_tokens: int = 0  # prompt tokens served from the prefix pool
    tool_calls: list[ToolCall] = field(default_factory=list)  # calls completed by this token
    malformed_tool_call: bool = False  # as `GenerationResponse.malformed_tool_call`
    # speculative decoding (`draft_model`): the request's tokens drafted and accepted so far
    drafted_tokens: int = 0
    accepted_tokens: int = 0


@dataclass
class _Request:
    id: int
    prompt_ids: list[int]
    media: Media | None  # until its prefill is set up
    sampler: RowSampler
    output: TurnOutput
    # the constraint, the caller's processors and the repetition penalty, in that order; with
    # the history they read (prompt then generated tokens), kept only when there are any
    processors: list[LogitsProcessor]
    history: mx.array | None
    next_token: int
    kv_bytes: int  # the KV a row of this request's length may take (`BatchGenerator.row_kv_bytes`)
    # set when the request is admitted (holds a share of the KV budget) and starts its prefill
    prompt_cache: PromptCache | None = None
    inputs: PromptInputs | None = None
    chunks: Iterator[tuple[int, int]] | None = None
    reused_tokens: int = 0
    admitted: bool = False
    sampled: int = 0  # tokens sampled for it (read or still being computed)
    sampling: SamplingOptions | None = None
    drafting: RowDrafting | None = None  # its part in speculative decoding, once it runs
    # a constraint or the caller's processors follow one token at a time: nothing is drafted
    one_at_a_time: bool = False


class BatchGenerator:
    """Decodes many requests together; `submit` them, call `step` until `done`.

    `prefill_step_size` is the number of prompt tokens prefilled per step (one request's chunk
    at a time) before the step's decode forward. `kv_bits` (or `kv_key_bits` and
    `kv_value_bits` apart) quantizes the full-attention layers' keys and values, as
    `stream_generate` does. `prefix_cache_bytes` keeps up to that many bytes of prefilled
    prompt caches (`PrefixCachePool`): a prompt that extends a kept one prefills only its new
    tokens (a plain draft model keeps a pool of its own, of the same size).

    `kv_budget_bytes` bounds the KV caches of the admitted requests (those prefilling or
    running). A request needs the KV of its prompt plus `max_tokens` positions, from the memory
    model (`row_kv_bytes`). Rows are right-aligned, so every row is as wide as the longest: the
    admitted requests reserve `kv_reserved_bytes` = their count x the largest need among them.
    A request that does not fit in the budget beside the admitted ones waits, first come first
    served (a smaller later request does not pass a waiting larger one); one that does not fit
    even alone is refused at `submit`.

    `draft_model` (an assistant checkpoint's model, or a smaller Gemma 4 with the target's
    vocabulary) turns on speculative decoding (`engine.speculative`): every step each row
    drafts up to `num_draft_tokens` tokens and keeps those the target accepts; responses
    count each request's drafted and accepted tokens.
    """

    def __init__(
        self,
        model,
        processor: Processor,
        *,
        prefill_step_size: int = 512,
        kv_bits: int | None = None,
        kv_key_bits: int | None = None,
        kv_value_bits: int | None = None,
        prefix_cache_bytes: int = 0,
        kv_budget_bytes: int | None = None,
        draft_model=None,
        num_draft_tokens: int = 4,
    ):
        if kv_budget_bytes is not None and kv_budget_bytes < 1:
            raise BatchRequestError(
                f"kv_budget_bytes: {kv_budget_bytes} is not positive; give a byte count or None"
            )
        self.model = model
        self.kv_budget_bytes = kv_budget_bytes
        self.processor = processor
        self.prefill_step_size = prefill_step_size
        self.context = model.config.text_config.max_position_embeddings
        self._ids = itertools.count()
        self._pending: deque[_Request] = deque()
        self._running: list[_Request] = []
        self.kv_quantization = KVQuantization.from_bits(kv_bits, kv_key_bits, kv_value_bits)
        self.pool = PrefixCachePool(model, prefix_cache_bytes) if prefix_cache_bytes else None
        self._caches = [BatchKVCache.like(c) for c in model.make_cache(self.kv_quantization)]
        self.speculator = None
        if draft_model is not None:
            self.speculator = BatchSpeculator(
                model,
                draft_model,
                num_draft_tokens,
                self._caches,
                prefill_step_size,
                prefix_cache_bytes,
            )
        # the tokens the last queued forward samples, one per request in `_queued_rows`, not
        # yet read
        self._queued: mx.array | None = None
        self._queued_rows: list[_Request] = []

    @property
    def running(self) -> int:
        """How many requests are decoding (their rows are in the batch)."""
        return len(self._running)

    @property
    def kv_reserved_bytes(self) -> int:
        """The KV the admitted requests reserve: one row per request, as wide as the longest."""
        return self._footprint([r.kv_bytes for r in self._admitted()])

    @staticmethod
    def _footprint(row_bytes: list[int]) -> int:
        return len(row_bytes) * max(row_bytes, default=0)

    def _admitted(self) -> list[_Request]:
        return self._running + [r for r in self._pending if r.admitted]

    def row_kv_bytes(self, positions: int) -> int:
        """The most KV one batch row of up to `positions` positions takes: the memory model's
        per-sequence KV bytes with the batch cache's spare columns added (`BatchKVCache.step`,
        room a buffer keeps past its newest position; with a drafter also the drafts and the
        columns a row may lag behind the others, `BatchKVCache.max_lag`, and a draft model's
        own caches for the row)."""
        spare = BatchKVCache.step
        if self.speculator is not None:
            spare += self.speculator.most + 1 + BatchKVCache.max_lag
        need = kv_cache_bytes(
            self.model.config.text_config,
            positions + spare,
            dtype=self.model.language_model.norm.weight.dtype,
            kv_quantization=self.kv_quantization,
            prefill_step_size=self.prefill_step_size,
        )
        if self.speculator is not None:
            need += self.speculator.drafter.row_kv_bytes(positions + spare)
        return need

    @property
    def done(self) -> bool:
        """True when no request is waiting or running."""
        return not self._pending and not self._running

    def submit(
        self,
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
        enable_thinking: bool = False,
        logits_processors: list[LogitsProcessor] | None = None,
        sampling: SamplingOptions | None = None,
        media_options: MediaOptions | None = None,
    ) -> int:
        """Queue a request; return its id. It takes `stream_generate`'s prompt and options
        (text, token ids or chat messages; media; sampling; stop strings; `tools` and
        `tool_choice`, `json_schema`, `logits_processors`, `repetition_penalty`), and
        `sampling` / `media_options` stand for their fields as there. A request that cannot
        run raises here and leaves the others as they are."""
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
            media_options = MediaOptions(max_soft_tokens, video_soft_tokens, max_frames)
        if isinstance(prompt, (list, str)) and len(prompt) == 0:
            raise BatchRequestError("prompt: it is empty; give at least one token or character")
        if sampling.max_tokens < 1:
            raise BatchRequestError(
                f"max_tokens: {sampling.max_tokens} is not positive; give 1 or more"
            )
        turn = prepare_turn(
            self.model,
            self.processor,
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
        prompt_ids = turn.prompt_ids
        positions = len(prompt_ids) + sampling.max_tokens
        kv_bytes = self.row_kv_bytes(positions)
        if self.kv_budget_bytes is not None and kv_bytes > self.kv_budget_bytes:
            raise BatchRequestError(
                f"prompt of {len(prompt_ids)} tokens plus max_tokens={sampling.max_tokens} "
                f"needs {format_bytes(kv_bytes)} of KV cache, more than kv_budget_bytes="
                f"{self.kv_budget_bytes:,} ({format_bytes(self.kv_budget_bytes)}); shorten the "
                "prompt, lower max_tokens or raise the budget"
            )
        processors = turn.logits_processors
        request = _Request(
            id=next(self._ids),
            prompt_ids=prompt_ids,
            media=turn.media,
            sampler=RowSampler(sampling),
            output=TurnOutput(self.processor, turn),
            processors=processors,
            history=mx.array(prompt_ids) if processors else None,
            next_token=prompt_ids[-1],
            kv_bytes=kv_bytes,
            sampling=sampling,
            one_at_a_time=turn.constraint is not None or bool(logits_processors),
        )
        self._pending.append(request)
        return request.id

    def cancel(self, request_id: int) -> bool:
        """Drop a waiting or running request and free its cache rows; False if unknown."""
        for request in self._pending:
            if request.id == request_id:
                self._pending.remove(request)
                return True
        for request in self._running:
            if request.id == request_id:
                self._retire({request.id})
                return True
        return False

    def step(self) -> list[BatchResponse]:
        """Prefill up to `prefill_step_size` waiting prompt tokens, then decode one token for
        every running request; the responses of this step's tokens."""
        self._prefill()
        if not self._running:
            return []
        if self.speculator is not None:
            return self._decode_speculative()
        return self._decode()

    # ------------------------------------------------------------------------------ prefill
    def _prefill(self) -> None:
        budget = self.prefill_step_size
        while self._pending and (budget > 0 or not self._running):
            request = self._pending[0]
            if not request.admitted and not self._admit(request):
                return  # it waits until running requests finish and free their share
            chunk = next(request.chunks, None)
            if chunk is None:
                self._pending.popleft()
                self._join(request)
                continue
            budget -= self._prefill_chunk(request, *chunk)

    def _admit(self, request: _Request) -> bool:
        """Give the request its share of the KV budget if what is left holds it, and set up its
        prefill: only now does it take a cache (a pooled prefix, which a request that finished
        while it waited may have left) and run the media towers."""
        if self.kv_budget_bytes is not None:
            rows = [r.kv_bytes for r in self._admitted()] + [request.kv_bytes]
            if self._footprint(rows) > self.kv_budget_bytes:
                return False
        request.admitted = True
        if self.pool is None:
            request.prompt_cache = PromptCache(self.model, self.kv_quantization)
        else:
            request.prompt_cache = self.pool.take(request.prompt_ids, self.kv_quantization)
        inputs = prompt_inputs(self.model, request.prompt_ids, request.media, request.prompt_cache)
        request.inputs, request.media = inputs, None
        request.chunks = prefill_chunks(
            len(inputs.todo), self.prefill_step_size, inputs.block_spans
        )
        request.reused_tokens = len(request.prompt_ids) - len(inputs.todo)
        return True

    def _prefill_chunk(self, request: _Request, start: int, end: int) -> int:
        """Run one chunk of the request's prompt through its own (solo) caches."""
        prefill_chunk(self.model, request.prompt_cache, request.inputs, start, end)
        return end - start

    def _join(self, request: _Request) -> None:
        """Move a prefilled request's caches into the batch as a new row."""
        for solo, batch in zip(request.prompt_cache.cache, self._caches, strict=True):
            batch.add_row(solo)
        if self.pool is not None:
            self.pool.put(request.prompt_cache)
        request.prompt_cache = None  # its caches now live in the batch
        request.inputs = None
        self._running.append(request)
        if self.speculator is not None:
            request.drafting = self.speculator.join(request)

    # ------------------------------------------------------------------------------ decode
    def _decode(self) -> list[BatchResponse]:
        if self._queued is None:
            self._queue_forward()
        tokens, rows = self._queued, self._queued_rows
        self._queued, self._queued_rows = None, []
        # rows whose queued token is their last by max_tokens take no part in the next forward
        self._retire({r.id for r in self._running if r.sampled >= r.output.max_tokens})
        if self._running:
            self._queue_forward(tokens, rows)
        responses, finished = [], set()
        for request, token in zip(rows, tokens.tolist(), strict=True):
            response = self._advance(request, token)
            responses.append(response)
            if response.finish_reason is not None:
                finished.add(request.id)
        self._retire(finished)
        return responses

    def _decode_speculative(self) -> list[BatchResponse]:
        """A speculative step: each request's accepted drafts and next token, up to its end."""
        responses, finished = [], set()
        for request, tokens in zip(self._running, self.speculator.step(self._running), strict=True):
            for token in tokens:
                response = self._advance(request, token)
                responses.append(response)
                if response.finish_reason is not None:
                    finished.add(request.id)
                    break
        self._retire(finished)
        return responses

    def _queue_forward(self, previous: mx.array | None = None, rows: list[_Request] = ()) -> None:
        """Start the forward that samples every running row's next token. A row in `rows` is
        fed its token in `previous` (still being computed); one that just joined, the last
        token of its prompt."""
        index = {request.id: i for i, request in enumerate(rows)}
        carried = [index[r.id] for r in self._running if r.id in index]
        parts = []
        if carried and carried == list(range(len(rows))):
            parts.append(previous)
        elif carried:
            parts.append(previous[mx.array(carried)])
        joined = [r.next_token for r in self._running if r.id not in index]
        if joined:
            parts.append(mx.array(joined, dtype=mx.uint32))
        inputs = parts[0] if len(parts) == 1 else mx.concatenate(parts)
        model = self.model
        hidden = model.language_model(model.text_ids(inputs[:, None]), self._caches)
        logits = model.logits(hidden[:, -1, :])
        self._queued = self._sample(inputs, logits)
        self._queued_rows = list(self._running)
        for request in self._running:
            request.sampled += 1
        mx.async_eval(self._queued)

    def _sample(self, inputs: mx.array, logits: mx.array) -> mx.array:
        """One token per row: each row's logits processors on its own row (reading its own
        history: the prompt, then every token fed so far), then every row by its own sampler,
        rows alike together."""
        rows = [row for row, request in enumerate(self._running) if request.processors]
        for row in rows:
            request = self._running[row]
            if request.sampled:  # the token fed now was sampled by an earlier step
                request.history = mx.concatenate([request.history, inputs[row : row + 1]])
        if rows:
            processed = [self._process(self._running[row], logits[row : row + 1]) for row in rows]
            logits[mx.array(rows)] = mx.concatenate(processed)
        return sample_rows(logits, [request.sampler for request in self._running])

    @staticmethod
    def _process(request: _Request, logits: mx.array) -> mx.array:
        for processor in request.processors:
            logits = processor(request.history, logits)
        return logits

    def _advance(self, request: _Request, token: int) -> BatchResponse:
        """Record a request's new token: its text and calls, and whether it ends the request."""
        request.next_token = token
        piece = request.output.add(token)
        stats = request.drafting.stats if request.drafting is not None else None
        return BatchResponse(
            request.id,
            token,
            piece.text,
            piece.thought,
            piece.finish_reason,
            len(request.prompt_ids),
            request.output.generated,
            request.reused_tokens,
            piece.tool_calls,
            piece.malformed_tool_call,
            stats.drafted if stats else 0,
            stats.accepted if stats else 0,
        )

    def _retire(self, request_ids: set[int]) -> None:
        """Drop these requests' rows from the batch (freeing their caches) and from the queued
        forward's tokens."""
        keep = [row for row, r in enumerate(self._running) if r.id not in request_ids]
        if len(keep) < len(self._running):
            self._running = [self._running[row] for row in keep]
            for cache in self._caches:
                cache.keep_rows(keep)
            if self.speculator is not None:
                self.speculator.keep_rows(keep)
        queued = [i for i, r in enumerate(self._queued_rows) if r.id not in request_ids]
        if len(queued) < len(self._queued_rows):
            self._queued_rows = [self._queued_rows[i] for i in queued]
            self._queued = self._queued[mx.array(queued)] if queued else None
