"""`gemma4 ask MEDIA... QUESTION`: questions about images and videos, the answer streamed."""

from __future__ import annotations

from typing import Annotated

import typer

from mlx_gemma4.errors import Gemma4Error

from . import options


def ask(
    items: Annotated[
        list[str],
        typer.Argument(
            metavar="MEDIA... QUESTION",
            help="Images or videos (.mp4, .mov, .mkv, .webm, ...), then the question.",
        ),
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
    kv_bits: options.KVBits = None,
    kv_key_bits: options.KVKeyBits = None,
    kv_value_bits: options.KVValueBits = None,
) -> None:
    """Answer QUESTION about one or more images or videos (sampled frames, 70 tokens each)."""
    from mlx_gemma4 import PromptCache, load, stream_generate
    from mlx_gemma4.processing.images import check_budget, open_image
    from mlx_gemma4.processing.video import is_video_file, load_video

    if len(items) < 2:
        raise Gemma4Error("give at least one image or video and then the question")
    *media, question = items
    check_budget(budget)
    kv_quantization = options.kv_quantization(kv_bits, kv_key_bits, kv_value_bits)
    content = []  # bad media fail here, before the model loads
    for item in media:
        if is_video_file(item):
            content.append({"type": "video", "video": load_video(item)})
        else:
            content.append({"type": "image", "image": open_image(item)})
    loaded_model, processor = load(model, dtype=dtype)
    messages = [{"role": "user", "content": [*content, {"type": "text", "text": question}]}]
    responses = stream_generate(
        loaded_model,
        processor,
        messages,
        max_soft_tokens=budget,
        enable_thinking=think,
        **options.sampling(max_tokens, temp, top_p, top_k, min_p, repetition_penalty, seed),
        prompt_cache=PromptCache(loaded_model, kv_quantization),
    )
    options.print_answer(responses, stats)
