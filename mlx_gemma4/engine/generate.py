"""`batch_generate`: many prompts through one `BatchGenerator`, one result per prompt."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import mlx.core as mx

from ..errors import BatchRequestError
from ..processing import Processor
from ..tool_calls import ToolCall
from .batch import BatchGenerator


@dataclass
class BatchResult:
    """One prompt's whole generation (`batch_generate`)."""

    text: str
    thought: str
    tokens: list[int]
    finish_reason: str | None
    prompt_tokens: int
    generation_tokens: int
    tool_calls: list[ToolCall] = field(default_factory=list)  # the calls, call text left out
    malformed_tool_call: bool = False
    # speculative decoding (`draft_model`): tokens drafted for this prompt, and accepted
    drafted_tokens: int = 0
    accepted_tokens: int = 0


def batch_generate(
    model,
    processor: Processor,
    prompts: list[str | list[int] | list[dict]],
    *,
    prefill_step_size: int = 512,
    kv_bits: int | None = None,
    kv_key_bits: int | None = None,
    kv_value_bits: int | None = None,
    kv_budget_bytes: int | None = None,
    prefix_cache_bytes: int = 0,
    draft_model=None,
    num_draft_tokens: int = 4,
    progress: bool = False,
    verbose: bool = False,
    **options,
) -> list[BatchResult]:
    """Generate for every prompt (text, token ids or chat messages) together; the results in
    prompt order. A `draft_model` drafts up to `num_draft_tokens` tokens per prompt and step
    (speculative decoding, `BatchGenerator`); each result counts its drafted and accepted ones.

    `options` are `BatchGenerator.submit`'s (`max_tokens`, `temperature`, `seed`, `stop`,
    `tools`, `json_schema`, `sampling`, ...), the same for every prompt; a `seed` seeds each
    prompt's sampler alike. The rest are `BatchGenerator`'s. `progress` shows a bar of finished
    prompts; `verbose` also prints the prompt and generation throughput and the peak memory.
    """
    if not prompts:
        raise BatchRequestError("prompts: the list is empty; give at least one prompt")
    generator = BatchGenerator(
        model,
        processor,
        prefill_step_size=prefill_step_size,
        kv_bits=kv_bits,
        kv_key_bits=kv_key_bits,
        kv_value_bits=kv_value_bits,
        prefix_cache_bytes=prefix_cache_bytes,
        kv_budget_bytes=kv_budget_bytes,
        draft_model=draft_model,
        num_draft_tokens=num_draft_tokens,
    )
    ids = [generator.submit(prompt, **options) for prompt in prompts]
    results = {i: BatchResult("", "", [], None, 0, 0) for i in ids}
    with _Progress(len(prompts), progress or verbose, verbose) as shown:
        while not generator.done:
            for response in generator.step():
                result = results[response.request_id]
                result.text += response.text
                result.thought += response.thought
                result.tokens.append(response.token)
                result.tool_calls += response.tool_calls
                result.malformed_tool_call |= response.malformed_tool_call
                result.prompt_tokens = response.prompt_tokens
                result.generation_tokens = response.generation_tokens
                result.drafted_tokens = response.drafted_tokens
                result.accepted_tokens = response.accepted_tokens
                shown.generated += 1
                if response.finish_reason is not None:
                    result.finish_reason = response.finish_reason
                    shown.finished()
    return [results[i] for i in ids]


class _Progress:
    """`batch_generate`'s progress bar (finished prompts) and closing summary."""

    def __init__(self, total: int, bar: bool, summary: bool):
        self.total, self.summary = total, summary
        self.bar = None
        if bar:
            from rich.progress import Progress

            self.bar = Progress(*Progress.get_default_columns(), transient=False)
            self.task = self.bar.add_task("batch_generate", total=total)
        self.generated = 0
        self.start = time.perf_counter()

    def __enter__(self) -> _Progress:
        if self.bar is not None:
            self.bar.start()
        mx.reset_peak_memory()
        self.start = time.perf_counter()
        return self

    def finished(self) -> None:
        if self.bar is not None:
            self.bar.advance(self.task)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()
        if self.summary and exc[0] is None:
            seconds = max(time.perf_counter() - self.start, 1e-9)
            print(
                f"{self.total} prompts, {self.generated} tokens generated in {seconds:.2f} s: "
                f"{self.generated / seconds:.2f} tokens/s in total, peak memory "
                f"{mx.get_peak_memory() / 1e9:.3f} GB"
            )
