"""The 12B's drafter (`gemma4_unified_assistant`) against transformers'
Gemma4UnifiedAssistantForCausalLM, drafting for a tiny gemma4_unified target."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from assistants import (  # noqa: F401  (assistant: a fixture)
    CENTROIDS,
    TOP_CLUSTERS,
    assistant,
    assisted_greedy,
    finish_assistant,
)
from checkpoints import _TEXT_BASE, MM_TOKENS, VOCAB, WINDOW
from conftest import id_prompts, media_messages, relative_error, solo
from unified_checkpoints import tiny_unified, token_types

from mlx_gemma4 import PromptCache, load, load_model, stream_generate
from mlx_gemma4.drafters import target_shared_kv
from mlx_gemma4.errors import ConfigError, DraftModelError
from mlx_gemma4.models.assistant import AssistantModel
from mlx_gemma4.speculative import DraftLength

PROMPT = 20  # past the window: the sliding keys the drafter sees are cut
K = 3
MEDIA_IDS = {kind: MM_TOKENS[f"{kind}_token_id"] for kind in ("image", "video", "audio")}


def build_unified_assistant(folder, ordered: bool, seed: int = 0, hub_form: bool = True):
    """A jittered random two-layer `Gemma4UnifiedAssistantForCausalLM` for the tiny 12B."""
    from transformers import (
        Gemma4UnifiedAssistantConfig,
        Gemma4UnifiedAssistantForCausalLM,
        Gemma4UnifiedTextConfig,
    )

    text = Gemma4UnifiedTextConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=_TEXT_BASE["num_key_value_heads"],
        head_dim=_TEXT_BASE["head_dim"],
        global_head_dim=_TEXT_BASE["global_head_dim"],
        sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention"],
        final_logit_softcapping=30.0,
        max_position_embeddings=4096,
    )
    config = Gemma4UnifiedAssistantConfig(
        text_config=text,
        backbone_hidden_size=_TEXT_BASE["hidden_size"],
        use_ordered_embeddings=ordered,
        num_centroids=CENTROIDS,
        centroid_intermediate_top_k=TOP_CLUSTERS,
    )
    torch.manual_seed(seed)
    model = Gemma4UnifiedAssistantForCausalLM(config).eval()
    return finish_assistant(model, folder, ordered, seed, hub_form)


@pytest.fixture(scope="module")
def unified(tmp_path_factory):
    return tiny_unified(tmp_path_factory)


@pytest.fixture(scope="module")
def unified_assistant(tmp_path_factory):
    """`unified_assistant(ordered, hub_form=True)` -> (folder, transformers drafter)."""
    built = {}

    def get(ordered: bool, hub_form: bool = True):
        if (ordered, hub_form) not in built:
            folder = tmp_path_factory.mktemp(f"unified-assistant-{int(ordered)}")
            model = build_unified_assistant(folder, ordered, hub_form=hub_form)
            built[ordered, hub_form] = (folder, model)
        return built[ordered, hub_form]

    return get


@pytest.mark.parametrize("ordered", [False, True], ids=["dense_head", "centroid_head"])
def test_drafter_logits_match_transformers(unified, unified_assistant, ordered):
    target_folder, target = unified
    folder, reference = unified_assistant(ordered)
    drafter = load_model(folder, dtype=mx.float32)
    assert isinstance(drafter, AssistantModel)
    assert drafter.config.model_type == "gemma4_unified_assistant"
    ids, newest = np.array(id_prompts([PROMPT], seed=3)), 7
    with torch.no_grad():
        states = target(torch.tensor(ids), output_hidden_states=True, return_shared_kv_states=True)
        hidden = states.hidden_states[-1][:, -1:]
        embedding = target.get_input_embeddings()(torch.tensor([[newest]]))
        theirs = reference(
            inputs_embeds=torch.cat([embedding, hidden], dim=-1),
            position_ids=torch.tensor([[PROMPT]]),
            shared_kv_states=states.shared_kv_states,
        )
    shared = {
        kind: tuple(mx.array(t.numpy()) for t in kv) for kind, kv in states.shared_kv_states.items()
    }
    model = load_model(target_folder, dtype=mx.float32)
    ours_embedding = model.language_model.embed(mx.array([[newest]]))
    logits, projected = drafter(ours_embedding, mx.array(hidden.numpy()), PROMPT, shared)
    logit_error = relative_error(logits, theirs.logits.numpy())
    hidden_error = relative_error(projected, theirs.last_hidden_state.numpy())
    print(f"max relative error: logits {logit_error:.2e}, projected hidden {hidden_error:.2e}")
    assert logit_error < 1e-4 and hidden_error < 1e-4
    if ordered:  # only the top clusters' tokens are scored, the rest share one floor value
        floor = theirs.logits.numpy().min()
        assert (np.asarray(logits) > floor + 0.5).sum() == (theirs.logits.numpy() > floor).sum()

    # and the states read from this package's own 12B caches
    prompt_cache = PromptCache(model)
    ours_hidden = model.language_model(mx.array(ids), prompt_cache.cache)[:, -1:]
    logits, _ = drafter(
        ours_embedding, ours_hidden, PROMPT, target_shared_kv(model, prompt_cache.cache)
    )
    assert relative_error(logits, theirs.logits.numpy()) < 1e-4


def test_transformers_form_config_loads_alike(unified_assistant, tmp_path):
    hub, _ = unified_assistant(True)
    transformers_form, _ = unified_assistant(True, hub_form=False)
    a, b = load_model(hub), load_model(transformers_form)
    assert a.config.text_config.global_head_dim == b.config.text_config.global_head_dim == 32
    assert a.config.num_centroids == b.config.num_centroids == CENTROIDS
    # the 12B's text defaults fill what a saved config leaves out
    raw = json.loads((hub / "config.json").read_text())
    for key in ("sliding_window", "hidden_size_per_layer_input"):
        raw["text_config"].pop(key, None)
    raw.pop("backbone_hidden_size")
    (tmp_path / "config.json").write_text(json.dumps(raw))
    from mlx_gemma4.config import AssistantConfig

    defaults = AssistantConfig.from_dict(raw)
    assert defaults.text_config.sliding_window == 1024
    assert defaults.backbone_hidden_size == 3840


@pytest.fixture
def every_round_drafts(monkeypatch):
    monkeypatch.setattr(DraftLength, "adaptive", False)


def speculative(model, processor, prompt, drafter, **kwargs):
    responses = list(
        stream_generate(model, processor, prompt, draft_model=drafter, num_draft_tokens=K, **kwargs)
    )
    return [r.token for r in responses], responses[-1]


@pytest.mark.usefixtures("every_round_drafts")
def test_greedy_text_output_is_the_targets(unified, unified_assistant):
    folder, reference = unified
    assistant_folder, reference_assistant = unified_assistant(True)
    model, processor = load(folder)
    prompt = id_prompts([30], seed=1)[0]
    plain = solo(model, processor, prompt, max_tokens=20)
    assert len(plain) == 20
    tokens, last = speculative(
        model, processor, prompt, load_model(assistant_folder), max_tokens=20
    )
    assert tokens == plain
    assert last.drafted_tokens >= K * 4  # every round drafted

    theirs = assisted_greedy(
        reference, reference_assistant, [prompt], K, 20, processor.stop_token_ids
    )
    assert theirs == plain


@pytest.mark.usefixtures("every_round_drafts")
def test_greedy_image_output_is_the_targets(unified, unified_assistant):
    folder, reference = unified
    assistant_folder, reference_assistant = unified_assistant(False)
    model, processor = load(folder)
    messages = media_messages("image")
    plain = solo(model, processor, messages, max_tokens=10, max_soft_tokens=70)
    drafter = load_model(assistant_folder)
    tokens, last = speculative(
        model, processor, messages, drafter, max_tokens=10, max_soft_tokens=70
    )
    assert tokens == plain and last.drafted_tokens > 0

    inputs = processor(messages, max_soft_tokens=70)
    ids = np.array(inputs["input_ids"])
    theirs = assisted_greedy(
        reference,
        reference_assistant,
        ids,
        K,
        10,
        processor.stop_token_ids,
        pixel_values=torch.tensor(np.array(inputs["pixel_values"])),
        image_position_ids=torch.tensor(np.array(inputs["image_position_ids"])),
        mm_token_type_ids=torch.tensor(token_types(ids, **MEDIA_IDS)),
    )
    assert theirs == plain


def test_mismatched_pairings_are_one_clear_error(
    unified,
    unified_assistant,
    chat_checkpoint,
    assistant,  # noqa: F811
):
    other, other_processor = load(chat_checkpoint("dense")[0])  # same vocabulary and width
    drafter = load_model(unified_assistant(False)[0])
    with pytest.raises(DraftModelError, match=r"gemma4_unified_assistant drafter, made for .*12B"):
        next(stream_generate(other, other_processor, [2, 5, 6], draft_model=drafter))
    model, processor = load(unified[0])
    small_drafter = load_model(assistant("k_eq_v", False)[0])
    with pytest.raises(DraftModelError, match=r"target is gemma4_unified; use the assistant"):
        next(stream_generate(model, processor, [2, 5, 6], draft_model=small_drafter))


def test_it_does_not_generate_on_its_own(unified_assistant):
    with pytest.raises(ConfigError, match=r"\(gemma4_unified_assistant\) does not generate"):
        load(unified_assistant(False)[0])


def test_commands_take_it_as_draft_model_only(unified, unified_assistant, chat_checkpoint, gemma4):
    drafter = unified_assistant(True)[0]
    common = ("generate", "--prompt", "hello there", "-n", "8", "--temp", "0")
    plain = gemma4(*common, "--model", unified[0])
    drafted = gemma4(*common, "--model", unified[0], "--draft-model", drafter)
    assert plain.returncode == drafted.returncode == 0, drafted.stderr
    assert drafted.stdout == plain.stdout and "drafted" in drafted.stderr
    for args in (
        ("info", drafter),
        (*common, "--model", chat_checkpoint("dense")[0], "--draft-model", drafter),
    ):
        result = gemma4(*args)
        assert result.returncode == 1
        assert result.stderr.strip().count("\n") == 0, result.stderr
        assert "gemma4_unified_assistant" in result.stderr


def test_quantize_command_packs_it(unified_assistant, gemma4, tmp_path):
    folder, _ = unified_assistant(True)
    out = tmp_path / "unified-assistant-4bit"
    result = gemma4("quantize", "--model", str(folder), "--out", str(out), "--group-size", "32")
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "config.json").read_text())["model_type"] == "gemma4_unified_assistant"
    packed = load_model(out, dtype=mx.float32)
    assert isinstance(packed, AssistantModel)
    assert packed.config.model_type == "gemma4_unified_assistant"
    assert hasattr(packed.model.embed_tokens, "scales")
    assert hasattr(packed.masked_embedding.centroids, "scales")
