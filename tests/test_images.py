"""Image preprocessing against transformers' Gemma4ImageProcessorPil, conversions, bad input."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from checkpoints import MM_TOKENS
from conftest import random_image, relative_error, to_numpy
from PIL import Image

from mlx_gemma4 import load
from mlx_gemma4.processing import images as image_processing
from mlx_gemma4.processing.images import ImageError, process_images


def reference(images, budget):
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    out = Gemma4ImageProcessorPil(max_soft_tokens=budget)(images, return_tensors="np")
    return out["pixel_values"], out["image_position_ids"], list(out["num_soft_tokens_per_image"])


@pytest.mark.parametrize("budget", [70, 280, 1120])
def test_matches_transformers_on_odd_sizes(budget):
    images = [random_image(101, 37), random_image(640, 479, seed=1), random_image(33, 517, seed=2)]
    ours = process_images(images, budget)
    pixels, positions, counts = reference(images, budget)
    assert ours.soft_tokens == counts
    assert np.array_equal(ours.position_ids, positions)
    assert np.abs(ours.pixel_values - pixels).max() <= 2 / 255


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "LA", "CMYK"])
def test_other_modes_become_rgb_like_transformers(mode):
    image = random_image(90, 60, mode)
    ours = process_images([image], 70)
    pixels, _, _ = reference([image], 70)
    assert np.abs(ours.pixel_values - pixels).max() <= 2 / 255


def test_transparency_is_composited_onto_white():
    image = Image.new("RGBA", (48, 48), (255, 0, 0, 0))  # fully transparent red
    ours = process_images([image], 70)
    assert np.allclose(ours.pixel_values[0, :1], 1.0)


def test_exif_orientation_is_honoured(tmp_path):
    image = random_image(200, 100)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif)
    upright = process_images([image.transpose(Image.Transpose.ROTATE_270)], 70)
    ours = process_images([path], 70)
    assert np.array_equal(ours.position_ids, upright.position_ids)
    assert ours.position_ids[0, :, 1].max() > ours.position_ids[0, :, 0].max()  # taller than wide


def test_bad_images_get_one_clear_error(tmp_path, monkeypatch):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not an image")
    good = tmp_path / "good.png"
    random_image(64, 64).save(good)
    (tmp_path / "cut.png").write_bytes(good.read_bytes()[:100])
    cases = {
        tmp_path / "missing.png": "no such image file",
        tmp_path / "empty.png": "the file is empty",
        tmp_path / "notes.txt": "not a readable image",
        tmp_path / "cut.png": "not a readable image",
    }
    for path, message in cases.items():
        with pytest.raises(ImageError, match=message):
            process_images([path])
    with pytest.raises(ImageError, match="budget 300 is not one of 70, 140, 280, 560, 1120"):
        process_images([good], 300)
    monkeypatch.setattr(image_processing, "MAX_PIXELS", 1000)
    with pytest.raises(ImageError, match="exceeds the 1,000-pixel limit"):
        process_images([good])


def test_processor_expands_placeholders_and_feeds_the_model(chat_checkpoint):
    import torch

    folder, reference_model = chat_checkpoint("multimodal")
    model, processor = load(folder)
    images = [random_image(96, 96), random_image(150, 50, seed=3)]
    inputs = processor("look <|image|> and <|image|> now", images=images, max_soft_tokens=70)
    ids = np.array(inputs["input_ids"])
    counts = process_images(images, 70).soft_tokens
    assert (ids == MM_TOKENS["image_token_id"]).sum() == sum(counts)
    assert (ids == MM_TOKENS["boi_token_id"]).sum() == 2 == (ids == MM_TOKENS["eoi_token_id"]).sum()

    logits = model(
        inputs["input_ids"],
        pixel_values=inputs["pixel_values"],
        image_position_ids=inputs["image_position_ids"],
    )
    with torch.no_grad():
        expected = reference_model(
            input_ids=torch.tensor(ids),
            pixel_values=torch.tensor(np.array(inputs["pixel_values"])),
            image_position_ids=torch.tensor(np.array(inputs["image_position_ids"])),
        ).logits.numpy()
    assert relative_error(to_numpy(logits), expected) < 1e-4


def test_an_image_past_the_position_table_is_refused(chat_checkpoint):
    # the tiny tower's table has 64 positions a side; a 900 x 40 image is ~70 patches wide
    model, processor = load(chat_checkpoint("multimodal")[0])
    inputs = processor("<|image|>", images=[random_image(900, 40)], max_soft_tokens=280)
    assert int(np.array(inputs["image_position_ids"]).max()) >= 64
    with pytest.raises(ImageError, match="more than this checkpoint's position table \\(64\\)"):
        model(**inputs)


def test_chat_messages_carry_their_images(chat_checkpoint):
    _, processor = load(chat_checkpoint("multimodal")[0])
    image = random_image(60, 60)
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": image}, {"type": "text", "text": "hi"}],
        }
    ]
    inputs = processor(messages, max_soft_tokens=70)
    assert inputs["pixel_values"].shape == (1, 630, 768)
    expected = process_images([image], 70).soft_tokens[0]
    assert (np.array(inputs["input_ids"]) == MM_TOKENS["image_token_id"]).sum() == expected
    with pytest.raises(ImageError, match="1 <\\|image\\|> placeholders for 0 images"):
        processor("<|image|>", images=[])
    assert mx.array_equal(processor("hi")["input_ids"], mx.array([processor.encode("hi")]))
