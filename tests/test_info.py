"""`gemma4 info`: parameters counted per part, context length shown."""

from __future__ import annotations

from mlx.utils import tree_flatten
from typer.testing import CliRunner

from mlx_gemma4 import load_model
from mlx_gemma4.cli.app import app
from mlx_gemma4.cli.info import describe


def count(*modules) -> int:
    return sum(p.size for m in modules for _, p in tree_flatten(m.parameters()))


def test_parameters_of_the_text_decoder_and_of_each_tower(tiny):
    model = load_model(tiny("multimodal")[0])
    text = count(model.language_model)
    vision = count(model.vision_tower, model.embed_vision)
    audio = count(model.audio_tower, model.embed_audio)
    assert describe(model)["parameters"] == (
        f"{text / 1e6:,.2f} M text decoder, {vision / 1e6:,.2f} M vision, "
        f"{audio / 1e6:,.2f} M audio"
    )
    assert describe(load_model(tiny("dense")[0]))["parameters"].endswith("M text decoder")


def test_context_length_is_shown(tiny):
    folder, reference = tiny("dense")
    result = CliRunner().invoke(app, ["info", str(folder)])
    assert result.exit_code == 0, result.output
    context = reference.config.max_position_embeddings
    assert f"context length        {context:,} tokens" in result.output
