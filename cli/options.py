"""Options shared by the commands that generate text, and how they print an answer."""

from __future__ import annotations

import functools
import inspect
import json
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from mlx_gemma4.options import SamplingOptions

if TYPE_CHECKING:
    from mlx_gemma4.kv_quant import KVQuantization  # imports mlx-lm: seconds, so lazily

DEFAULT_MODEL = "google/gemma-4-e2b-it"
# Flags carry metavar="": without it the help shows them as taking a <bool> value.

Model = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        envvar="GEMMA4_MODEL",
        help="Local folder or Hub repo id.",
        show_default=True,
    ),
]
System = Annotated[str | None, typer.Option("--system", "-s", help="System instructions.")]
Think = Annotated[
    bool,
    typer.Option("--think/--no-think", metavar="", help="Let the model think before answering."),
]
MaxTokens = Annotated[int, typer.Option("--max-tokens", "-n", min=1, help="Tokens per answer.")]
Temperature = Annotated[float, typer.Option("--temp", min=0.0, help="0 is greedy.")]
TopP = Annotated[float, typer.Option("--top-p", min=0.0, max=1.0, help="Nucleus mass (0: off).")]
TopK = Annotated[int, typer.Option("--top-k", min=0, help="Keep the k likeliest (0: off).")]
MinP = Annotated[float, typer.Option("--min-p", min=0.0, max=1.0, help="Min relative prob.")]
RepetitionPenalty = Annotated[
    float | None, typer.Option("--repetition-penalty", min=0.0, help="e.g. 1.1")
]
Seed = Annotated[int | None, typer.Option("--seed", help="Seed for reproducible sampling.")]
Dtype = Annotated[
    str | None, typer.Option("--dtype", help="float32, bfloat16 or float16 (default: by device).")
]
Budget = Annotated[
    int, typer.Option("--budget", help="Soft tokens per image: 70, 140, 280, 560 or 1120.")
]
Stats = Annotated[
    bool,
    typer.Option("--stats/--no-stats", metavar="", help="Print tokens/s after answers."),
]
Tools = Annotated[
    Path | None,
    typer.Option(
        "--tools",
        help="Tools for the model: a .py file (its public functions) or a JSON list of "
        "OpenAI function declarations.",
    ),
]
KVBits = Annotated[
    int | None,
    typer.Option("--kv-bits", help="Quantize full-attention KV caches: 2-6 or 8 bits (rotated)."),
]
KVKeyBits = Annotated[
    int | None, typer.Option("--kv-key-bits", help="Bits for cached keys (overrides --kv-bits).")
]
KVValueBits = Annotated[
    int | None,
    typer.Option("--kv-value-bits", help="Bits for cached values (overrides --kv-bits)."),
]
DraftModel = Annotated[
    str | None,
    typer.Option(
        "--draft-model",
        help="Speculative decoding: this model's assistant checkpoint (or a smaller Gemma 4 "
        "with the same vocabulary) drafts tokens the model checks in one pass.",
    ),
]
DraftTokens = Annotated[
    int,
    typer.Option("--draft-tokens", min=1, help="With --draft-model: most tokens drafted a step."),
]

Adapter = Annotated[
    Path | None,
    typer.Option("--adapter", help="A LoRA adapter folder (gemma4 lora) to apply to the model."),
]


@dataclass(frozen=True)
class GenerationFlags:
    """The flags `chat`, `generate` and `ask` share, checked and grouped."""

    sampling: SamplingOptions
    think: bool
    dtype: str | None
    stats: bool
    kv_quantization: KVQuantization | None  # None: float KV caches
    draft_model: str | None = None  # speculative decoding's drafter (folder or Hub repo id)
    draft_tokens: int = 4

    def draft_settings(self, model) -> dict:
        """`stream_generate`'s speculative-decoding arguments: the drafter loaded and checked
        against `model` (one clear error when it cannot draft for it), or none."""
        if self.draft_model is None:
            return {}
        from mlx_gemma4.drafters import load_draft_model

        drafter = load_draft_model(self.draft_model, model, dtype=self.dtype)
        return {"draft_model": drafter, "num_draft_tokens": self.draft_tokens}


def _generation_flags(
    think: Think = False,
    max_tokens: MaxTokens = 512,
    temp: Temperature = 0.0,
    top_p: TopP = 0.0,
    top_k: TopK = 0,
    min_p: MinP = 0.0,
    repetition_penalty: RepetitionPenalty = None,
    seed: Seed = None,
    dtype: Dtype = None,
    stats: Stats = True,
    kv_bits: KVBits = None,
    kv_key_bits: KVKeyBits = None,
    kv_value_bits: KVValueBits = None,
    draft_model: DraftModel = None,
    draft_tokens: DraftTokens = 4,
) -> GenerationFlags:
    from mlx_gemma4.kv_quant import KVQuantization

    sampling = SamplingOptions(
        max_tokens=max_tokens,
        temperature=temp,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
    )
    kv_quantization = KVQuantization.from_bits(kv_bits, kv_key_bits, kv_value_bits)
    return GenerationFlags(
        sampling, think, dtype, stats, kv_quantization, draft_model, draft_tokens
    )


_SHARED = inspect.signature(_generation_flags, eval_str=True).parameters


def with_generation_flags(max_tokens: int) -> Callable:
    """Give a command the flags of `_generation_flags` (`max_tokens` as its default); the
    command declares `flags: GenerationFlags` and receives them checked (before any loading)."""

    def decorate(command: Callable) -> Callable:
        own = inspect.signature(command, eval_str=True)
        params = [p for p in own.parameters.values() if p.name != "flags"]
        shared = [
            p.replace(default=max_tokens) if p.name == "max_tokens" else p for p in _SHARED.values()
        ]

        @functools.wraps(command)
        def run(**values):
            flags = _generation_flags(**{name: values.pop(name) for name in _SHARED})
            return command(**values, flags=flags)

        run.__signature__ = own.replace(parameters=[*params, *shared])  # what Typer reads
        run.__annotations__ = {p.name: p.annotation for p in (*params, *shared)}
        return run

    return decorate


def stats_line(response) -> str:
    return (
        f"[{response.generation_tokens} tokens, {response.generation_tps:.1f} tok/s; prompt "
        f"{response.prompt_tokens} tokens ({response.reused_tokens} cached), "
        f"{response.prompt_tps:.1f} tok/s; peak {response.peak_memory:.2f} GB"
        + _draft_stats(response)
        + "]"
    )


def _draft_stats(response) -> str:
    drafted = getattr(response, "drafted_tokens", 0)
    if not drafted:
        return ""
    accepted = response.accepted_tokens
    return f"; drafted {drafted}, accepted {accepted} ({100 * accepted / drafted:.0f}%)"


def call_line(call) -> str:
    """A tool call as one JSON line: {"name": ..., "arguments": {...}}."""
    return json.dumps({"name": call.name, "arguments": call.arguments}, ensure_ascii=False)


def print_answer(responses: Iterable, stats: bool) -> None:
    """Stream the answer to stdout (thoughts to stderr), then the tool calls it made, one JSON
    line each (no empty answer line before them), then the stats line to stderr. Call text
    that did not parse stays in the answer, with a warning on stderr."""
    last, calls, wrote = None, [], False
    for last in responses:
        if last.thought:
            sys.stderr.write(last.thought)
        sys.stdout.write(last.text)
        sys.stdout.flush()
        calls.extend(last.tool_calls)
        wrote = wrote or bool(last.text)
    if wrote or not calls:
        sys.stdout.write("\n")
    for call in calls:
        sys.stdout.write(call_line(call) + "\n")
    sys.stdout.flush()
    if last is not None and last.malformed_tool_call:
        typer.echo("warning: the answer holds tool-call text that does not parse", err=True)
    if stats and last is not None:
        typer.echo(stats_line(last), err=True)
