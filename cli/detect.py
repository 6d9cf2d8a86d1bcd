"""`gemma4 detect IMAGE WHAT [--out boxes.png]`: find things, print their boxes, draw them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from mlx_gemma4.errors import Gemma4Error

from . import options

_IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def detect(
    image: Annotated[str, typer.Argument(help="The image to look at.")],
    what: Annotated[str, typer.Argument(help='What to find, e.g. "every cat".')],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write the image with boxes drawn.")
    ] = None,
    model: options.Model = options.DEFAULT_MODEL,
    budget: options.Budget = 560,
    max_tokens: options.MaxTokens = 1024,
    dtype: options.Dtype = None,
    adapter: options.Adapter = None,
) -> None:
    """Ask for bounding boxes of WHAT in IMAGE; print them as JSON (pixels and 0-1000)."""
    from mlx_gemma4 import MediaOptions, SamplingOptions, generate, load
    from mlx_gemma4.detection import PROMPT, draw_boxes, parse_boxes
    from mlx_gemma4.files import atomic_file, require_writable_target
    from mlx_gemma4.processing.images import check_budget, open_image

    picture = open_image(image)
    check_budget(budget)
    if out is not None and out.suffix.lower() not in _IMAGE_FORMATS:
        raise Gemma4Error(f"{out}: use a .png, .jpg or .webp file name for --out")
    if out is not None:
        require_writable_target(out)  # before the model runs, not after
    loaded_model, processor = load(model, dtype=dtype, adapter_path=adapter)
    question = PROMPT.format(what=what)
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": picture}, {"type": "text", "text": question}],
        }
    ]
    answer = generate(
        loaded_model,
        processor,
        messages,
        sampling=SamplingOptions(max_tokens=max_tokens),
        media_options=MediaOptions(max_soft_tokens=budget),
    )
    boxes = parse_boxes(answer)
    found = [box.as_dict(*picture.size) for box in boxes]
    typer.echo(json.dumps(found, indent=2, ensure_ascii=False))
    if not boxes:
        typer.echo(f"no boxes found in the answer: {answer.strip()[:200]!r}", err=True)
    if out is not None:
        with atomic_file(out) as temporary:
            draw_boxes(picture, boxes).save(temporary, format=_IMAGE_FORMATS[out.suffix.lower()])
        typer.echo(f"wrote {out}", err=True)
