"""Parsing the boxes a model answers, drawing them, and `gemma4 detect`."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from mlx_gemma4.detection import Box, draw_boxes, parse_boxes

ANSWERS = {
    "fenced list": (
        'Here you go:\n```json\n[{"box_2d": [100, 200, 300, 400], "label": "cat"}]\n```',
        [("cat", 100, 200, 300, 400)],
    ),
    "trailing commas and prose": (
        'I found [{"box_2d": [10, 20, 30, 40], "label": "a",},'
        ' {"box_2d": [50,60,70,80], "label": "b"},]!',
        [("a", 10, 20, 30, 40), ("b", 50, 60, 70, 80)],
    ),
    "braces and quotes in labels": (
        '[{"label": "sign {\\"STOP\\"}", "box_2d": [1, 2, 3, 4]}]',
        [('sign {"STOP"}', 1, 2, 3, 4)],
    ),
    "nested under a key": (
        '{"objects": [{"box_2d": [5, 6, 7, 8], "label": "x-ray"}]}',
        [("x-ray", 5, 6, 7, 8)],
    ),
    "reversed and out of range": (
        '[{"box_2d": [900, 1200, 100, -5], "label": "big"}]',
        [("big", 100, 0, 900, 1000)],
    ),
    "no label": ('[{"box_2d": [1, 2, 3, 4]}]', [("object", 1, 2, 3, 4)]),
    "malformed entries skipped": (
        '[{"box_2d": [1, 2, 3]}, {"box_2d": [1, 1, 1, 1]},'
        ' {"box_2d": ["a", 2, 3, 4]}, {"box_2d": [0, 0, 9, 9]}]',
        [("object", 0, 0, 9, 9)],
    ),
    "nothing": ("I cannot see any cats here.", []),
}


@pytest.mark.parametrize("case", ANSWERS)
def test_parse_boxes(case):
    answer, expected = ANSWERS[case]
    boxes = parse_boxes(answer)
    assert [(b.label, b.ymin, b.xmin, b.ymax, b.xmax) for b in boxes] == expected


def test_pixels_and_drawing():
    box = Box("cat", ymin=250, xmin=100, ymax=750, xmax=500)
    assert box.pixels(200, 100) == (20, 25, 100, 75)
    image = Image.new("RGB", (200, 100), "white")
    drawn = draw_boxes(image, [box])
    assert drawn.size == image.size and image.getpixel((20, 50)) == (255, 255, 255)
    assert drawn.getpixel((20, 50)) != (255, 255, 255)  # the left edge
    assert drawn.getpixel((60, 60)) == (255, 255, 255)  # inside stays untouched
    assert box.as_dict(200, 100)["pixels"] == {"left": 20, "top": 25, "right": 100, "bottom": 75}


def test_detect_command_prints_json_and_writes_the_picture(gemma4, chat_checkpoint, tmp_path):
    from conftest import random_image

    folder, _ = chat_checkpoint("multimodal")
    picture = tmp_path / "in.png"
    random_image(96, 64).save(picture)
    out = tmp_path / "boxes.png"
    result = gemma4(
        "detect", picture, "cats", "--out", out, "--model", folder, "--budget", "70", "-n", "8"
    )
    assert result.returncode == 0, result.stderr
    assert isinstance(json.loads(result.stdout), list)  # a random model finds nothing parseable
    assert Image.open(out).size == (96, 64)
    bad = gemma4("detect", picture, "cats", "--out", tmp_path / "x.gif", "--model", folder)
    assert bad.returncode == 1 and "use a .png, .jpg or .webp" in bad.stderr
    assert bad.stderr.strip().count("\n") == 0
    assert not (tmp_path / "x.gif").exists()
