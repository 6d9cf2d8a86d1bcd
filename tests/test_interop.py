"""What we write reads in the peers: affine checkpoints load in mlx-lm (text) and mlx-vlm
(multimodal) with our logits; turboquant checkpoints are refused there by name."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from conftest import media_messages, relative_error, to_numpy

from mlx_gemma4 import load, load_model
from mlx_gemma4.config import TURBOQUANT_MODEL_TYPE
from mlx_gemma4.quantize import quantize_model, turboquant_model
from mlx_gemma4.saving import save_model

# measured: 0.5e-5 to 2e-5 (text, mlx-lm), 0.2e-5 to 1.2e-5 (text and media, mlx-vlm)
AGREE = 1e-4


def quantized(source, target, method: str = "affine"):
    model = load_model(source)
    if method == "affine":
        entry = quantize_model(model, bits=4, group_size=32)
    else:
        entry = turboquant_model(model, bits=4, group_size=32)
    return save_model(model, target, quantization=entry)


def peer_logits(output) -> np.ndarray:
    return to_numpy(getattr(output, "logits", output))


@pytest.mark.parametrize("variant", ["dense", "ple_kv_shared", "moe_k_eq_v"])
def test_text_checkpoint_loads_in_mlx_lm_with_our_logits(tiny, tmp_path, token_ids, variant):
    from mlx_lm.utils import load_model as mlx_lm_load

    target = quantized(tiny(variant)[0], tmp_path / "q")
    weights = mx.load(str(target / "model.safetensors"))
    assert all(key.startswith("model.") for key in weights)  # mlx-community's text layout
    peer, _ = mlx_lm_load(target)
    ids = mx.array(token_ids(1, 24))
    assert relative_error(peer_logits(peer(ids)), to_numpy(load_model(target)(ids))) < AGREE


@pytest.fixture(scope="module")
def multimodal(chat_checkpoint, tmp_path_factory):
    """(our quantized model, mlx-vlm's model of the same checkpoint, processor)."""
    pytest.importorskip("mlx_vlm")
    from mlx_vlm.utils import load_model as mlx_vlm_load

    source = chat_checkpoint("multimodal")[0]
    target = quantized(source, tmp_path_factory.mktemp("mm") / "q")
    ours, processor = load(target)
    return ours, mlx_vlm_load(target), processor


@pytest.mark.parametrize("modality", ["text", "image", "video", "audio"])
def test_multimodal_checkpoint_loads_in_mlx_vlm_with_our_logits(multimodal, modality):
    ours, peer, processor = multimodal
    inputs = processor(
        media_messages("image" if modality == "text" else modality), max_soft_tokens=70
    )
    if modality == "text":
        inputs = {"input_ids": inputs["input_ids"][:, :8]}
    expected = to_numpy(ours(**inputs))
    assert relative_error(peer_logits(peer(**inputs)), expected) < AGREE


def test_multimodal_checkpoint_text_loads_in_mlx_lm(multimodal, token_ids):
    from mlx_lm.utils import load_model as mlx_lm_load

    ours = multimodal[0]
    peer, _ = mlx_lm_load(ours.path)
    ids = mx.array(token_ids(1, 16))
    assert relative_error(peer_logits(peer(ids)), to_numpy(ours(ids))) < AGREE


def test_turboquant_checkpoint_is_refused_by_peers_by_name(tiny, chat_checkpoint, tmp_path):
    from mlx_lm.utils import load_model as mlx_lm_load

    text = quantized(tiny("dense")[0], tmp_path / "text", method="turboquant")
    config = json.loads((text / "config.json").read_text())
    assert config["model_type"] == TURBOQUANT_MODEL_TYPE and config["base_model_type"]
    assert config["quantization"]["method"] == "turboquant"
    with pytest.raises(ValueError, match=f"Model type {TURBOQUANT_MODEL_TYPE} not supported"):
        mlx_lm_load(text)
    assert load_model(text).config.model_type == "gemma4_text"

    pytest.importorskip("mlx_vlm")
    from mlx_vlm.utils import load_model as mlx_vlm_load

    both = quantized(chat_checkpoint("multimodal")[0], tmp_path / "mm", method="turboquant")
    with pytest.raises(ValueError, match=f"Model type {TURBOQUANT_MODEL_TYPE} not supported"):
        mlx_vlm_load(both)
    assert load_model(both).config.model_type == "gemma4"
