"""`gemma4 info`: parameters counted per part, context length shown."""

from __future__ import annotations

import shutil

import pytest
from checkpoints import make_hub_cache
from conftest import run_gemma4
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


def table(output: str) -> dict[str, str]:
    """`gemma4 info`'s table as label -> value."""
    facts = {}
    for line in output.splitlines():
        label, _, value = line.partition("  ")
        if value.strip():
            facts[label.strip()] = value.strip()
    return facts


def info_facts(*args: str) -> dict[str, str]:
    """`gemma4 info ARGS` run in-process."""
    result = CliRunner().invoke(app, ["info", *args])
    assert result.exit_code == 0, result.output
    return table(result.output)


def config_only(folder, tmp_path):
    only = tmp_path / "config-only"
    only.mkdir()
    shutil.copy(folder / "config.json", only / "config.json")
    return only


@pytest.mark.parametrize("variant", ["ple_kv_shared", "multimodal"])
def test_a_folder_with_only_config_json_is_estimated_like_the_checkpoint(tiny, tmp_path, variant):
    folder = tiny(variant)[0]
    only = config_only(folder, tmp_path)
    options = ["--context", "3000", "--batch", "3", "--kv-bits", "4"]
    full, estimated = info_facts(str(folder), *options), info_facts(str(only), *options)
    assert full["weights"] == "read from the checkpoint"
    assert estimated["weights"].startswith("not read: sizes from config.json")
    memory = [label for label in full if label.startswith("memory:")]
    assert len(memory) == 12 and "memory: predicted peak" in memory
    # every size from the config alone equals the loaded checkpoint's: weights, KV, transients
    for label in memory + ["parameters", "layers", "layer types", "dtype", "modalities"]:
        assert estimated[label] == full[label], label


def test_a_quantized_config_is_estimated_like_the_quantized_checkpoint(tiny, tmp_path):
    from mlx_gemma4.quantize import quantize_model
    from mlx_gemma4.saving import save_model

    model = load_model(tiny("dense")[0])
    quantized = tmp_path / "q4"
    save_model(model, quantized, quantization=quantize_model(model, bits=4, group_size=32))
    only = config_only(quantized, tmp_path)
    full = info_facts(str(quantized), "--context", "500")
    estimated = info_facts(str(only), "--context", "500")
    assert "4-bit" in full["quantization"]
    for label in ("quantization", "memory: weights", "memory: predicted peak"):
        assert estimated[label] == full[label], label


def test_a_hub_repo_id_needs_only_its_config_json(tiny, tmp_path):
    only = config_only(tiny("dense")[0], tmp_path)
    home = tmp_path / "hf"
    make_hub_cache(home, "someone/gemma-4-config", only)  # the Hub cache holds config.json alone
    # read when huggingface_hub is imported: a child process; wide, so the path is whole
    env = {"HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "COLUMNS": "400"}
    result = run_gemma4("info", "someone/gemma-4-config", "--context", "100", env=env)
    assert result.returncode == 0, result.stderr
    facts = table(result.stdout)
    assert facts["weights"].startswith("not read")
    assert "models--someone--gemma-4-config" in facts["path"]


def test_a_folder_without_config_json_is_one_line(tmp_path):
    result = CliRunner().invoke(app, ["info", str(tmp_path), "--context", "10"])
    assert result.exit_code == 1
    assert "config.json: missing" in result.output
    assert "Traceback" not in result.output
