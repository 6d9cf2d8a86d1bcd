"""Images, video and audio on quantized multimodal checkpoints: ours (affine, turboquant,
codebook; from Python and from `gemma4 quantize`) and mlx-vlm's converter's (mlx-community)."""

from __future__ import annotations

import mlx.core as mx
import pytest
from conftest import media_messages, random_image
from quantized_makers import BITS, CLOSE, FAR, GROUP, mean_relative_error, quantize_into
from typer.testing import CliRunner

from mlx_gemma4 import load, load_model
from mlx_gemma4.cli.app import app
from mlx_gemma4.quantize import quantize_model

MAKERS = ["affine", "turboquant", "codebook", "cli-affine", "mlx-vlm"]


@pytest.fixture(scope="module")
def checkpoints(chat_checkpoint, tmp_path_factory):
    """`checkpoints(maker)` -> (float model, quantized model, processor), built once each."""
    source = chat_checkpoint("multimodal")[0]
    reference = load(source)
    built = {}

    def get(maker: str):
        if maker not in built:
            target = tmp_path_factory.mktemp(f"mm-{maker}") / "q"
            quantize_into(maker, source, target)
            built[maker] = (reference[0], load_model(target), reference[1])
        return built[maker]

    return get


@pytest.mark.parametrize("modality", ["image", "video", "audio"])
@pytest.mark.parametrize("maker", MAKERS)
def test_media_on_quantized_checkpoints(checkpoints, maker, modality):
    reference, quantized, processor = checkpoints(maker)
    packed = quantized.language_model.layers[0].self_attn.q_proj
    assert packed.bits == BITS
    inputs = processor(media_messages(modality), max_soft_tokens=70)
    expected = reference(**inputs)
    assert mean_relative_error(quantized(**inputs), expected) < CLOSE
    # the media count: the same prompt without its soft tokens is far off
    assert mean_relative_error(quantized(inputs["input_ids"]), expected) > FAR


def test_ask_about_an_image_with_a_quantized_model(checkpoints, tmp_path):
    quantized = checkpoints("affine")[1]
    image = tmp_path / "img.png"
    random_image(80, 60, seed=3).save(image)
    args = ["ask", str(image), "what is this?", "--model", str(quantized.path)]
    result = CliRunner().invoke(app, [*args, "--max-tokens", "3"])
    assert result.exit_code == 0, result.output


def test_image_through_a_packed_patch_embedder(checkpoints):
    """Checkpoints written before the patch embedder was kept in float have it packed."""
    reference, _, processor = checkpoints("affine")
    model = load_model(reference.path)
    eight_bits = {"bits": BITS, "group_size": GROUP, "mode": "affine"}
    quantize_model(
        model,
        bits=BITS,
        group_size=GROUP,
        override=lambda path, _: dict(eight_bits) if path.endswith("input_proj") else None,
    )
    assert model.vision_tower.patch_embedder.input_proj.weight.dtype == mx.uint32
    inputs = processor(media_messages("image"), max_soft_tokens=70)
    assert mean_relative_error(model(**inputs), reference(**inputs)) < CLOSE
