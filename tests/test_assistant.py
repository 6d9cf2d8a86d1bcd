"""The assistant drafter in MLX against transformers' Gemma4AssistantForCausalLM."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from assistants import assistant  # noqa: F401  (a fixture)
from checkpoints import VOCAB, WINDOW
from conftest import relative_error

from mlx_gemma4 import PromptCache, load_model
from mlx_gemma4.drafters import target_shared_kv
from mlx_gemma4.models.assistant import AssistantModel

# E2B-like (PLE, KV sharing), 31B-like (keys as values), 26B-A4B-like (MoE)
TARGETS = ["ple_kv_shared", "k_eq_v", "moe_k_eq_v"]
PROMPT = 20  # past the window: the sliding keys the drafter sees are cut


def reference_draft(target, drafter, ids: np.ndarray, newest: int):
    """transformers: the target's states after `ids`, then one assistant step on `newest`."""
    with torch.no_grad():
        out = target(torch.tensor(ids), output_hidden_states=True, return_shared_kv_states=True)
        hidden = out.hidden_states[-1][:, -1:]
        embedding = target.get_input_embeddings()(torch.tensor([[newest]]))
        draft = drafter(
            inputs_embeds=torch.cat([embedding, hidden], dim=-1),
            position_ids=torch.tensor([[ids.shape[1]]]),
            shared_kv_states=out.shared_kv_states,
        )
    return out, hidden, draft


@pytest.mark.parametrize("ordered", [False, True], ids=["dense_head", "centroid_head"])
@pytest.mark.parametrize("target", TARGETS)
def test_drafter_logits_match_transformers(tiny, assistant, token_ids, target, ordered):  # noqa: F811
    target_folder, target_reference = tiny(target)
    folder, reference = assistant(target, ordered)
    drafter = load_model(folder, dtype=mx.float32)
    assert isinstance(drafter, AssistantModel)
    ids, newest = token_ids(1, PROMPT, seed=3), 7
    states, hidden, theirs = reference_draft(target_reference, reference, ids, newest)

    # the same target states, handed over as transformers computed them
    shared = {
        kind: tuple(mx.array(t.numpy()) for t in kv) for kind, kv in states.shared_kv_states.items()
    }
    model = load_model(target_folder, dtype=mx.float32)
    embedding = model.language_model.embed(mx.array([[newest]]))
    logits, projected = drafter(embedding, mx.array(hidden.numpy()), PROMPT, shared)
    assert relative_error(logits, theirs.logits.numpy()) < 1e-4
    assert relative_error(projected, theirs.last_hidden_state.numpy()) < 1e-4
    if ordered:  # only the top clusters' tokens are scored, the rest share one floor value
        floor = theirs.logits.numpy().min()
        assert (np.asarray(logits) > floor + 0.5).sum() == (theirs.logits.numpy() > floor).sum()

    # and the states read from this package's own target caches
    prompt_cache = PromptCache(model)
    ours_hidden = model.language_model(mx.array(ids), prompt_cache.cache)[:, -1:]
    ours_shared = target_shared_kv(model, prompt_cache.cache)
    keys, _ = ours_shared["sliding_attention"]
    reference_keys = states.shared_kv_states["sliding_attention"][0].numpy()
    assert (
        relative_error(keys[..., -(WINDOW + 1) :, :], reference_keys[..., -(WINDOW + 1) :, :])
        < 1e-4
    )
    logits, _ = drafter(embedding, ours_hidden, PROMPT, ours_shared)
    assert relative_error(logits, theirs.logits.numpy()) < 1e-4


def test_transformers_form_config_loads_alike(assistant):  # noqa: F811
    hub, _ = assistant("k_eq_v", True)
    transformers_form, _ = assistant("k_eq_v", True, hub_form=False)
    a, b = load_model(hub), load_model(transformers_form)
    assert a.config.text_config.global_head_dim == b.config.text_config.global_head_dim == 32
    assert a.config.num_centroids == b.config.num_centroids
    assert a.vocab_size == VOCAB


def dequantized(quantized: AssistantModel, template: AssistantModel) -> AssistantModel:
    """`template` with every packed weight of `quantized` unpacked into it."""
    modules = dict(template.named_modules())
    for path, module in quantized.named_modules():
        if hasattr(module, "scales"):
            weight = mx.dequantize(
                module.weight,
                module.scales,
                module.biases,
                group_size=module.group_size,
                bits=module.bits,
            )
            modules[path].weight = weight
    return template


def test_quantize_command_packs_an_assistant(tiny, assistant, gemma4, tmp_path):  # noqa: F811
    folder, _ = assistant("ple_kv_shared", True)
    out = tmp_path / "assistant-4bit"
    result = gemma4("quantize", "--model", str(folder), "--out", str(out), "--group-size", "32")
    assert result.returncode == 0, result.stderr
    packed = load_model(out, dtype=mx.float32)
    assert isinstance(packed, AssistantModel)
    assert hasattr(packed.model.embed_tokens, "scales")
    assert hasattr(packed.masked_embedding.centroids, "scales")
    unpacked = dequantized(packed, load_model(folder, dtype=mx.float32))
    model = load_model(tiny("ple_kv_shared")[0], dtype=mx.float32)
    prompt_cache = PromptCache(model)
    hidden = model.language_model(mx.array([[2, *range(5, 25)]]), prompt_cache.cache)[:, -1:]
    embedding, shared = (
        model.language_model.embed(mx.array([[9]])),
        target_shared_kv(model, prompt_cache.cache),
    )
    ours, _ = packed(embedding, hidden, 21, shared)
    reference, _ = unpacked(embedding, hidden, 21, shared)
    assert relative_error(ours, reference) < 1e-4
