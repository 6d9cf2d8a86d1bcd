"""`gemma4 generate`: one answer to one prompt, streamed to stdout."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from . import options


@options.with_generation_flags(max_tokens=512)
def generate(
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The prompt; - reads stdin.")],
    flags: options.GenerationFlags,
    model: options.Model = options.DEFAULT_MODEL,
    system: options.System = None,
    raw: Annotated[
        bool, typer.Option("--raw", metavar="", help="Send the prompt as is, no chat template.")
    ] = False,
    tools: options.Tools = None,
) -> None:
    """Stream one answer to PROMPT (wrapped as a user turn unless --raw). With --tools, the
    calls the model makes follow the answer on stdout, one JSON line each
    ({"name": ..., "arguments": {...}}); they are not run."""
    from mlx_gemma4 import PromptCache, load, stream_generate
    from mlx_gemma4.tools import load_tools

    tool_list = load_tools(tools) if tools is not None else None  # bad input before loading
    text = sys.stdin.read() if prompt == "-" else prompt
    loaded_model, processor = load(model, dtype=flags.dtype)
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
        enable_thinking=flags.think,
        tools=tool_list,
        sampling=flags.sampling,
        prompt_cache=PromptCache(loaded_model, flags.kv_quantization),
    )
    options.print_answer(responses, flags.stats)
