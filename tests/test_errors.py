"""Bad input gets one clear error of the package's own type, naming the file and the problem."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import mlx.core as mx
import pytest
from checkpoints import as_unprivileged, make_hub_cache
from conftest import run_python

from mlx_gemma4 import load_model
from mlx_gemma4.errors import (
    ConfigError,
    Gemma4Error,
    ModelNotFoundError,
    QuantizationError,
    UnsupportedDtypeError,
    WeightsError,
)


@pytest.fixture
def checkpoint(tiny, tmp_path):
    """A private copy of the dense checkpoint to break."""
    folder, _ = tiny("dense")
    return shutil.copytree(folder, tmp_path / "ckpt")


def edit_config(folder, **changes):
    file = folder / "config.json"
    config = json.loads(file.read_text())
    config.update(changes)
    file.write_text(json.dumps(config))


def edit_weights(folder, edit):
    file = folder / "model.safetensors"
    weights = mx.load(str(file))
    edit(weights)
    mx.save_safetensors(str(file), weights)


def test_errors_share_one_base_type():
    for error in (ConfigError, ModelNotFoundError, QuantizationError, WeightsError):
        assert issubclass(error, Gemma4Error)


def test_missing_folder(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such folder"):
        load_model(tmp_path / "nowhere")


def test_missing_config(checkpoint):
    (checkpoint / "config.json").unlink()
    with pytest.raises(ConfigError, match=r"config\.json: missing"):
        load_model(checkpoint)


def test_config_not_json(checkpoint):
    (checkpoint / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"config\.json: not valid JSON"):
        load_model(checkpoint)


def test_wrong_model_type(checkpoint):
    edit_config(checkpoint, model_type="llama")
    with pytest.raises(ConfigError, match=r"config\.json: model_type 'llama' is not a Gemma 4"):
        load_model(checkpoint)


def test_inconsistent_layer_types(checkpoint):
    edit_config(checkpoint, num_hidden_layers=5)
    with pytest.raises(ConfigError, match="layer_types has 6 entries"):
        load_model(checkpoint)


def test_no_weight_files(checkpoint):
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match="no .safetensors files"):
        load_model(checkpoint)


def test_missing_tensor(checkpoint):
    edit_weights(checkpoint, lambda w: w.pop("model.layers.2.mlp.up_proj.weight"))
    with pytest.raises(WeightsError, match=r"missing 1 tensors: language_model\.layers\.2\.mlp"):
        load_model(checkpoint)


def test_misshaped_tensor(checkpoint):
    def shrink(weights):
        weights["model.layers.1.self_attn.o_proj.weight"] = mx.zeros((64, 8))

    edit_weights(checkpoint, shrink)
    with pytest.raises(
        WeightsError, match=r"model\.safetensors: .*o_proj\.weight has shape \(64, 8\)"
    ):
        load_model(checkpoint)


def test_unexpected_tensor(checkpoint):
    edit_weights(checkpoint, lambda w: w.update({"model.layers.0.mystery.weight": mx.zeros(3)}))
    with pytest.raises(WeightsError, match="unexpected tensor language_model.layers.0.mystery"):
        load_model(checkpoint)


def test_truncated_safetensors(checkpoint):
    file = checkpoint / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=r"model\.safetensors: truncated"):
        load_model(checkpoint)


def test_garbage_safetensors(checkpoint):
    (checkpoint / "model.safetensors").write_bytes(
        b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!"
    )
    with pytest.raises(WeightsError, match="corrupt safetensors header"):
        load_model(checkpoint)


def test_missing_shard(checkpoint):
    index = {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(WeightsError, match="missing: model-00002-of-00002.safetensors"):
        load_model(checkpoint)


def test_unknown_quantization_mode(checkpoint):
    edit_config(checkpoint, quantization={"group_size": 64, "bits": 4, "mode": "gptq"})
    with pytest.raises(QuantizationError, match="mode 'gptq'"):
        load_model(checkpoint)


def test_quantized_weights_without_quantization_entry(checkpoint):
    def pack(weights):
        w, s, b = mx.quantize(weights["model.layers.0.mlp.up_proj.weight"], group_size=32, bits=4)
        weights["model.layers.0.mlp.up_proj.weight"] = w
        weights["model.layers.0.mlp.up_proj.scales"] = s
        weights["model.layers.0.mlp.up_proj.biases"] = b

    edit_weights(checkpoint, pack)
    with pytest.raises(QuantizationError, match="no 'quantization' entry"):
        load_model(checkpoint)


def test_unknown_dtype(checkpoint):
    with pytest.raises(UnsupportedDtypeError, match="dtype 'int8'"):
        load_model(checkpoint, dtype="int8")
    with pytest.raises(UnsupportedDtypeError, match="float64"):
        load_model(checkpoint, dtype=mx.float64)
    result = cli("generate", "-p", "hi", "--model", str(checkpoint), "--dtype", "float64")
    assert result.returncode == 1 and one_line(result) == (
        "error: dtype 'float64' is not one of float32, bfloat16, float16"
    )


def test_uncached_repo_offline_says_how_to_pass_a_local_path(tmp_path):
    result = run_python(
        "from mlx_gemma4 import load_model\nload_model('google/gemma-4-e2b-it')",
        {"HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"},
    )
    last_line = result.stderr.strip().splitlines()[-1]
    assert "ModelNotFoundError" in last_line
    assert "not in the Hugging Face cache and HF_HUB_OFFLINE is set" in last_line
    assert "pass a local folder (--model PATH in the CLI)" in last_line


def test_cached_repo_offline_with_unknown_revision(tiny, tmp_path):
    folder, _ = tiny("dense")
    make_hub_cache(tmp_path, "someone/tiny", folder)
    result = run_python(
        "from mlx_gemma4 import load_model\nload_model('someone/tiny', revision='v9')",
        {"HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"},
    )
    assert "ModelNotFoundError" in result.stderr


# ----------------------------------------------------------------------------- from the CLI


def cli(*args: str, unprivileged: bool = False) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "mlx_gemma4.cli", *args]
    return subprocess.run(
        as_unprivileged(command) if unprivileged else command,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=120,
    )


def one_line(result: subprocess.CompletedProcess) -> str:
    """The CLI's whole complaint, which must be a single line and no traceback."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize("name", ["./missing-folder", "../x", "a/b/c", "some/folder/", "~/nope"])
def test_a_path_that_does_not_exist_is_a_missing_folder(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError, match=f"^{name}: no such folder$"):
        load_model(name)
    if name == "../x":
        result = cli("info", name)
        assert result.returncode == 1 and one_line(result) == "error: ../x: no such folder"


@pytest.fixture
def readable(chat_checkpoint, tmp_path):
    """A copy of a checkpoint with its tokenizer, to make parts of unreadable."""
    return shutil.copytree(chat_checkpoint("dense")[0], tmp_path / "ckpt")


@pytest.mark.parametrize(
    "part", ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "."]
)
def test_unreadable_files_are_one_line(readable, part):
    path = (readable / part).resolve()
    path.chmod(0)
    code = (
        "import sys\nfrom mlx_gemma4 import load\nfrom mlx_gemma4.errors import Gemma4Error\n"
        "try:\n    load(sys.argv[1])\nexcept Gemma4Error as e:\n    sys.exit(f'error: {e}')\n"
    )
    try:
        run = subprocess.run(
            as_unprivileged([sys.executable, "-c", code, str(readable)]),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert (
            run.returncode == 1 and one_line(run) == f"error: cannot read {path}: permission denied"
        )
        if part == "config.json":  # and the CLI says the same
            result = cli("info", str(readable), unprivileged=True)
            assert result.returncode == 1 and one_line(result) == one_line(run)
    finally:
        path.chmod(0o755 if path.is_dir() else 0o644)
