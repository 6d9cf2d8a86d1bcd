"""Detection by asking: Gemma answers `box_2d` boxes in 0-1000 coordinates; we parse and draw.

Model answers are free text: JSON in code fences, with trailing commas, with prose around it,
or only half well-formed. The parser takes every object that has a `box_2d` of four numbers.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

PROMPT = (
    "Detect {what} in the image. Answer with a JSON list only, one object per item found: "
    '{{"box_2d": [ymin, xmin, ymax, xmax], "label": "name"}}, coordinates normalized to 0-1000.'
)
SCALE = 1000
_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL)
_BOX = re.compile(r"\"box_2d\"\s*:\s*\[([^\]]*)\]")
_LABEL = re.compile(r"\"label\"\s*:\s*\"((?:[^\"\\]|\\.)*)\"")
_COLORS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6")


@dataclass
class Box:
    label: str
    ymin: float  # normalized 0-1000, as the model answers
    xmin: float
    ymax: float
    xmax: float

    def pixels(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) in pixels of an image of this size."""
        return (
            round(self.xmin * width / SCALE),
            round(self.ymin * height / SCALE),
            round(self.xmax * width / SCALE),
            round(self.ymax * height / SCALE),
        )

    def as_dict(self, width: int, height: int) -> dict:
        left, top, right, bottom = self.pixels(width, height)
        return {
            "label": self.label,
            "box_2d": [self.ymin, self.xmin, self.ymax, self.xmax],
            "pixels": {"left": left, "top": top, "right": right, "bottom": bottom},
        }


def _box_from(text: str) -> Box | None:
    coordinates = _BOX.search(text)
    if coordinates is None:
        return None
    try:
        numbers = [float(n) for n in coordinates[1].split(",") if n.strip()]
    except ValueError:
        return None
    if len(numbers) != 4:
        return None
    y0, x0, y1, x1 = (min(max(n, 0.0), SCALE) for n in numbers)
    ymin, ymax, xmin, xmax = min(y0, y1), max(y0, y1), min(x0, x1), max(x0, x1)
    if ymin == ymax or xmin == xmax:
        return None
    label = _LABEL.search(text)
    name = json.loads(f'"{label[1]}"') if label else "object"
    return Box(name, ymin, xmin, ymax, xmax)


def _objects(text: str) -> list[str]:
    """The innermost `{...}` spans that mention box_2d; braces inside strings do not count."""
    spans, opened, in_string, escaped = [], [], False, False
    for i, char in enumerate(text):
        if in_string:
            escaped = char == "\\" and not escaped
            in_string = not (char == '"' and not escaped)
        elif char == '"':
            in_string = True
        elif char == "{":
            opened.append(i)
        elif char == "}" and opened:
            start = opened.pop()
            inner = any(start <= span[0] for span in spans)
            if '"box_2d"' in text[start : i + 1] and not inner:  # keep the innermost
                spans.append((start, i + 1))
    return [text[start:end] for start, end in sorted(spans)]


def parse_boxes(answer: str) -> list[Box]:
    """Every well-formed `box_2d` object in a model's answer, in order; [] when there is none."""
    fenced = _FENCE.findall(answer)
    text = "\n".join(fenced) if fenced else answer
    boxes = [_box_from(span) for span in _objects(text)]
    return [box for box in boxes if box is not None]


def draw_boxes(image: Image.Image, boxes: list[Box]) -> Image.Image:
    """A copy of `image` with each box outlined and labelled."""
    canvas = image.convert("RGB")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    width = max(2, round(min(canvas.size) / 200))
    for i, box in enumerate(boxes):
        color = _COLORS[i % len(_COLORS)]
        left, top, right, bottom = box.pixels(*canvas.size)
        draw.rectangle((left, top, right, bottom), outline=color, width=width)
        text_box = draw.textbbox((left, top), box.label, font=font)
        label_top = max(0, top - (text_box[3] - text_box[1]) - 2)
        draw.rectangle(
            (left, label_top, text_box[2] + 4, label_top + text_box[3] - text_box[1] + 2),
            fill=color,
        )
        draw.text((left + 2, label_top), box.label, fill="white", font=font)
    return canvas
