"""`gemma4 generate`: one answer to one prompt, streamed to stdout."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from . import options


def generate(
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The prompt; - reads stdin.")],
    model: options.Model = options.DEFAULT_MODEL,
    system: options.System = None,
    think: options.Think = False,
    raw: Annotated[
        bool, typer.Option("--raw", metavar="", help="Send the prompt as is, no chat template.")
    ] = False,
    max_tokens: options.MaxTokens = 512,
    temp: options.Temperature = 0.0,
    top_p: options.TopP = 0.0,
    top_k: options.TopK = 0,
    min_p: options.MinP = 0.0,
    repetition_penalty: options.RepetitionPenalty = None,
    seed: options.Seed = None,
    dtype: options.Dtype = None,
    stats: options.Stats = True,
    kv_bits: options.KVBits = None,
    kv_key_bits: options.KVKeyBits = None,
    kv_value_bits: options.KVValueBits = None,
) -> None:
    """Stream one answer to PROMPT (wrapped as a user turn unless --raw)."""
    from mlx_gemma4 import PromptCache, load, stream_generate

    kv_quantization = options.kv_quantization(kv_bits, kv_key_bits, kv_value_bits)
    text = sys.stdin.read() if prompt == "-" else prompt
    loaded_model, processor = load(model, dtype=dtype)
    if raw:
        request = text
    else:
        request = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": text}
        ]
    responses = stream_generate(
        loaded_model,
        processor,
        request,
        enable_thinking=think,
        **options.sampling(max_tokens, temp, top_p, top_k, min_p, repetition_penalty, seed),
        prompt_cache=PromptCache(loaded_model, kv_quantization),
    )
    options.print_answer(responses, stats)
