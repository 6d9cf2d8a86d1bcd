"""`gemma4 ask MEDIA... QUESTION`: questions about images and videos, the answer streamed."""

from __future__ import annotations

from typing import Annotated

import typer

from mlx_gemma4.errors import Gemma4Error

from . import distributed as parallel
from . import options


@options.with_generation_flags(max_tokens=512)
@parallel.reports_lost_ranks
def ask(
    items: Annotated[
        list[str],
        typer.Argument(
            metavar="MEDIA... QUESTION",
            help="Images or videos (.mp4, .mov, .mkv, .webm, ...), then the question.",
        ),
    ],
    flags: options.GenerationFlags,
    model: options.Model = options.DEFAULT_MODEL,
    budget: options.Budget = 280,
    adapter: options.Adapter = None,
    distributed: parallel.Distributed = None,
    distributed_timeout: parallel.DistributedTimeout = parallel.DEFAULT_TIMEOUT,
) -> None:
    """Answer QUESTION about one or more images or videos (sampled frames, 70 tokens each).
    Under mlx.launch, --distributed splits the model across the ranks (each reads the media
    at the same paths; rank 0 encodes them and prints the answer)."""
    from mlx_gemma4 import MediaOptions, PromptCache, load, stream_generate
    from mlx_gemma4.processing.images import check_budget, open_image
    from mlx_gemma4.processing.video import is_video_file, load_video

    if len(items) < 2:
        raise Gemma4Error("give at least one image or video and then the question")
    *media, question = items
    check_budget(budget)
    content = []  # bad media fail here, before the model loads
    for item in media:
        if is_video_file(item):
            content.append({"type": "video", "video": load_video(item)})
        else:
            content.append({"type": "image", "image": open_image(item)})
    group = parallel.start(distributed)
    loaded_model, processor = load(
        model,
        dtype=flags.dtype,
        adapter_path=adapter,
        **parallel.load_options(group, distributed),
    )
    messages = [{"role": "user", "content": [*content, {"type": "text", "text": question}]}]
    responses = stream_generate(
        loaded_model,
        processor,
        messages,
        media_options=MediaOptions(max_soft_tokens=budget),
        enable_thinking=flags.think,
        sampling=flags.sampling,
        prompt_cache=PromptCache(loaded_model, flags.kv_quantization),
        **flags.draft_settings(loaded_model),
    )
    options.print_answer(parallel.watched(responses, group, distributed_timeout), flags.stats)
