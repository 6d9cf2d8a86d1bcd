"""Checkpoint loading: shards, dtypes, pre-quantized checkpoints (ours and the community layout)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from checkpoints import WINDOW, build_text, make_hub_cache
from conftest import reference_logits, relative_error, run_python, to_numpy
from mlx.utils import tree_flatten

from mlx_gemma4 import load_model
from mlx_gemma4.models.moe import QuantizedExpertLinear
from mlx_gemma4.quantize import quantize_model
from mlx_gemma4.saving import save_model


def test_sharded_checkpoint(tmp_path, token_ids):
    reference = build_text("ple_kv_shared", tmp_path / "src", seed=3)
    sharded = tmp_path / "sharded"
    reference.save_pretrained(sharded, max_shard_size="40KB")
    assert len(list(sharded.glob("*.safetensors"))) > 2
    assert (sharded / "model.safetensors.index.json").is_file()
    ids = token_ids(1, 2 * WINDOW)
    logits = to_numpy(load_model(sharded)(mx.array(ids)))
    assert relative_error(logits, reference_logits(reference, ids)) < 1e-4


def test_default_dtype_is_float32_on_cpu(tiny):
    folder, _ = tiny("dense")
    model = load_model(folder)
    assert mx.default_device() == mx.cpu
    assert {p.dtype for _, p in tree_flatten(model.parameters())} == {mx.float32}


@pytest.mark.parametrize("variant", ["dense", "moe_k_eq_v"])
def test_bfloat16_runs_on_cpu_as_close_as_the_reference_does(tiny, token_ids, variant):
    """bf16 (MoE too: CPU gather_mm is float32-only) strays from float32 no more than torch does."""
    import torch

    folder, reference = tiny(variant)
    ids = token_ids(2, 2 * WINDOW)
    model = load_model(folder, dtype="bfloat16")
    assert {p.dtype for _, p in tree_flatten(model.parameters())} == {mx.bfloat16}
    logits = model(mx.array(ids))
    assert logits.dtype == mx.bfloat16
    exact = reference_logits(reference, ids)
    torch_bf16 = reference_logits(copy.deepcopy(reference).to(torch.bfloat16), ids)
    assert relative_error(to_numpy(logits), exact) < 1.5 * relative_error(torch_bf16, exact)


# --------------------------------------------------------------------------- quantized


def mixed_recipe(path: str, module: nn.Module):
    """Like community '4-bit' models: MLP and router at 8 bits, the rest at 4."""
    if ".mlp." in path or path.endswith("router.proj"):
        return {"bits": 8, "group_size": 32}
    return None


def dequantized(model: nn.Module) -> nn.Module:
    """The same model with every quantized module replaced by its float reconstruction."""

    def swap(_path, module):
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding, QuantizedExpertLinear)):
            weight = mx.dequantize(
                module.weight,
                module.scales,
                module.get("biases"),
                group_size=module.group_size,
                bits=module.bits,
                mode=module.mode,
            )
            if isinstance(module, nn.QuantizedEmbedding):
                float_module = nn.Embedding(*weight.shape)
            elif isinstance(module, nn.QuantizedLinear):
                float_module = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
            else:
                from mlx_gemma4.models.moe import ExpertLinear

                float_module = ExpertLinear(weight.shape[0], weight.shape[2], weight.shape[1])
            float_module.weight = weight
            return float_module
        return module

    from mlx.utils import tree_map_with_path

    leaves = tree_map_with_path(swap, model.leaf_modules(), is_leaf=nn.Module.is_module)
    model.update_modules(leaves)
    return model


def to_earlier_layout(folder: Path) -> None:
    """Rewrite a checkpoint in the layout this package wrote before it wrote mlx-community's:
    our own module paths (`language_model.*`, fused expert gate/up)."""
    model = load_model(folder)
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))


@pytest.mark.parametrize("layout", ["community", "earlier"])
@pytest.mark.parametrize("variant", ["ple_kv_shared", "moe_k_eq_v"])
def test_prequantized_checkpoint_matches_dequantized_model(
    tiny, tmp_path, token_ids, variant, layout
):
    folder, _ = tiny(variant)
    model = load_model(folder)
    entry = quantize_model(model, bits=4, group_size=32, override=mixed_recipe)
    target = save_model(model, tmp_path / "q", quantization=entry)
    if layout == "earlier":
        to_earlier_layout(target)
    else:
        assert "model.layers.0.mlp.gate_proj.scales" in mx.load(str(target / "model.safetensors"))

    quantized = load_model(target)
    modules = dict(quantized.named_modules())
    gate = modules["language_model.layers.0.mlp.gate_proj"]
    q_proj = modules["language_model.layers.0.self_attn.q_proj"]
    assert isinstance(gate, nn.QuantizedLinear) and gate.bits == 8
    assert isinstance(q_proj, nn.QuantizedLinear) and q_proj.bits == 4
    assert isinstance(modules["language_model.embed_tokens"], nn.QuantizedEmbedding)
    if variant == "moe_k_eq_v":
        experts = modules["language_model.layers.0.experts.gate_up_proj"]
        assert isinstance(experts, QuantizedExpertLinear) and experts.bits == 4
        assert modules["language_model.layers.0.router.proj"].bits == 8
    else:
        assert isinstance(modules["language_model.per_layer_model_projection"], nn.QuantizedLinear)
        assert isinstance(modules["language_model.embed_tokens_per_layer"], nn.QuantizedEmbedding)

    ids = mx.array(token_ids(2, 3 * WINDOW))
    expected = to_numpy(dequantized(load_model(target))(ids))
    assert relative_error(to_numpy(quantized(ids)), expected) < 1e-4
    # and the cached path agrees with the full forward
    cache = quantized.make_cache()
    steps = [quantized(ids[:, :10], cache=cache)] + [
        quantized(ids[:, t : t + 1], cache=cache) for t in range(10, ids.shape[1])
    ]
    assert relative_error(to_numpy(mx.concatenate(steps, axis=1)), expected) < 1e-4


def test_module_left_in_float_when_group_does_not_divide(tiny):
    folder, _ = tiny("dense")
    model = load_model(folder)
    entry = quantize_model(model, bits=4, group_size=64)  # MLP width 96 is no multiple of 64
    assert entry["language_model.layers.0.mlp.down_proj"] is False
    assert not isinstance(model.language_model.layers[0].mlp.down_proj, nn.QuantizedLinear)
    assert isinstance(model.language_model.layers[0].self_attn.q_proj, nn.QuantizedLinear)


# --------------------------------------------------------------------------- the Hub cache


def test_repo_id_from_the_hub_cache_offline(tiny, tmp_path):
    folder, _ = tiny("dense")
    make_hub_cache(tmp_path, "someone/gemma-4-tiny", folder)
    result = run_python(
        "from mlx_gemma4 import load_model; m = load_model('someone/gemma-4-tiny'); "
        "print(m.path, len(m.language_model.layers))",
        {"HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert "models--someone--gemma-4-tiny" in result.stdout
    assert result.stdout.strip().endswith(" 6")


def test_load_returns_model_and_processor(tiny, tmp_path):
    import shutil

    from checkpoints import VOCAB, save_tokenizer

    from mlx_gemma4 import load

    folder = shutil.copytree(tiny("ple_kv_shared")[0], tmp_path / "with-tokenizer")
    save_tokenizer(folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 106]}))
    model, processor = load(folder)
    ids = processor.encode("hi <turn|>")
    assert ids[0] == 2 and ids[-1] == 106
    assert processor.decode(ids) == "<bos>hi <turn|>"
    assert model(mx.array([ids])).shape == (1, len(ids), VOCAB)
    assert processor.stop_token_ids == {1, 106}
    assert not processor.has_own_template  # the built-in template stands in


def test_input_ids_must_be_two_dimensional(tiny):
    model = load_model(tiny("dense")[0])
    with pytest.raises(ValueError, match=r"\[batch, length\]"):
        model(mx.array([1, 2, 3]))
