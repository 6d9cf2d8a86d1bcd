"""`gemma4 ask IMAGE... QUESTION`: questions about images, the answer streamed."""

from __future__ import annotations

from typing import Annotated

import typer

from mlx_gemma4.errors import Gemma4Error

from . import options


def ask(
    items: Annotated[
        list[str], typer.Argument(metavar="IMAGE... QUESTION", help="Images, then the question.")
    ],
    model: options.Model = options.DEFAULT_MODEL,
    budget: options.Budget = 280,
    think: options.Think = False,
    max_tokens: options.MaxTokens = 512,
    temp: options.Temperature = 0.0,
    top_p: options.TopP = 0.0,
    top_k: options.TopK = 0,
    min_p: options.MinP = 0.0,
    repetition_penalty: options.RepetitionPenalty = None,
    seed: options.Seed = None,
    dtype: options.Dtype = None,
    stats: options.Stats = True,
) -> None:
    """Answer QUESTION about one or more images."""
    from mlx_gemma4 import load, stream_generate
    from mlx_gemma4.processing.images import check_budget, open_image

    if len(items) < 2:
        raise Gemma4Error("give at least one image and then the question")
    *images, question = items
    check_budget(budget)
    for image in images:
        open_image(image)  # a bad image fails here, before the model loads
    loaded_model, processor = load(model, dtype=dtype)
    content = [{"type": "image", "image": image} for image in images]
    messages = [{"role": "user", "content": [*content, {"type": "text", "text": question}]}]
    responses = stream_generate(
        loaded_model,
        processor,
        messages,
        max_soft_tokens=budget,
        enable_thinking=think,
        **options.sampling(max_tokens, temp, top_p, top_k, min_p, repetition_penalty, seed),
    )
    options.print_answer(responses, stats)
