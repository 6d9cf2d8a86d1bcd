"""Tiny random assistant drafters built by transformers, paired with the tiny targets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from checkpoints import _TEXT_BASE, TEXT_VARIANTS, VOCAB, WINDOW, jitter, save_reference

# (centroids, top-k clusters) of the sparse head: 64 clusters of 8 tokens, 6 scored
CENTROIDS, TOP_CLUSTERS = 64, 6


def assistant_config(variant: str, ordered: bool, backbone: int | None = None):
    """A two-layer drafter (sliding then full) for the tiny target `variant`."""
    from transformers import Gemma4AssistantConfig, Gemma4TextConfig

    target = {**_TEXT_BASE, **TEXT_VARIANTS[variant]}
    # the reference repeats the target's K/V heads by the drafter's own head counts
    kv_heads = {
        key: target[key]
        for key in ("num_key_value_heads", "attention_k_eq_v", "num_global_key_value_heads")
        if key in target
    }
    text = Gemma4TextConfig(
        **kv_heads,
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        head_dim=_TEXT_BASE["head_dim"],  # the targets' head sizes: queries meet their keys
        global_head_dim=_TEXT_BASE["global_head_dim"],
        sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention"],
        hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=0,
        final_logit_softcapping=30.0,
        max_position_embeddings=4096,
    )
    return Gemma4AssistantConfig(
        text_config=text,
        backbone_hidden_size=backbone or target["hidden_size"],
        use_ordered_embeddings=ordered,
        num_centroids=CENTROIDS,
        centroid_intermediate_top_k=TOP_CLUSTERS,
    )


def build_assistant(
    variant: str,
    folder: Path,
    ordered: bool,
    seed: int = 0,
    hub_form: bool = True,
    backbone: int | None = None,
):
    """A jittered random `Gemma4AssistantForCausalLM` saved to `folder`; returns the model.
    `backbone` gives it another target width than `variant`'s (a mismatched drafter)."""
    from transformers import Gemma4AssistantForCausalLM

    torch.manual_seed(seed)
    model = Gemma4AssistantForCausalLM(assistant_config(variant, ordered, backbone)).eval()
    return finish_assistant(model, folder, ordered, seed, hub_form)


@pytest.fixture(scope="session")
def assistant(tmp_path_factory):
    """`assistant(target, ordered, hub_form)` -> (folder, transformers assistant)."""
    built = {}

    def get(target: str, ordered: bool, hub_form: bool = True):
        key = (target, ordered, hub_form)
        if key not in built:
            folder = tmp_path_factory.mktemp(f"assistant-{target}-{int(ordered)}")
            built[key] = (folder, build_assistant(target, folder, ordered, hub_form=hub_form))
        return built[key]

    return get


def finish_assistant(model, folder: Path, ordered: bool, seed: int, hub_form: bool):
    """Jitter a fresh transformers assistant, shuffle its centroid head's token order when it
    has one, save it to `folder` and return it."""
    jitter(model, seed + 1)
    if ordered:
        generator = torch.Generator().manual_seed(seed)
        model.masked_embedding.token_ordering.copy_(torch.randperm(VOCAB, generator=generator))
    save_reference(model, folder, hub_form)
    return model


def assisted_greedy(
    reference, reference_assistant, ids, draft_tokens: int, max_new_tokens: int, stop_ids, **inputs
) -> list[int]:
    """transformers' greedy `generate(..., assistant_model=...)` from the [1, n] prompt `ids`
    (media in `inputs`): the new token ids."""
    ids = torch.tensor(ids)
    reference_assistant.generation_config.num_assistant_tokens = draft_tokens
    with torch.no_grad():
        out = reference.generate(
            ids,
            assistant_model=reference_assistant,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=sorted(stop_ids),
            **inputs,
        )
    return out[0, ids.shape[1] :].tolist()


@pytest.fixture(scope="session")
def close_drafter(chat_checkpoint):
    """`close_drafter(variant)`: the tiny target itself at 8 bits, a plain draft model the
    target agrees with often but not always."""
    from mlx_gemma4 import load_model
    from mlx_gemma4.quantize import quantize_model

    built = {}

    def get(variant: str):
        if variant not in built:
            drafter = load_model(chat_checkpoint(variant)[0])
            quantize_model(drafter, bits=8, group_size=32)
            built[variant] = drafter
        return built[variant]

    return get
