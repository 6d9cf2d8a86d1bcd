from __future__ import annotations

import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from checkpoints import TEXT_VARIANTS, build_multimodal, build_text  # noqa: E402

ALL_VARIANTS = [*TEXT_VARIANTS, "multimodal"]


def relative_error(ours, reference) -> float:
    ours, reference = np.asarray(ours, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


def reference_logits(model, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """`tiny(variant, hub_form=True)` -> (checkpoint folder, transformers model), built once."""
    built = {}

    def get(variant: str, hub_form: bool = True):
        key = (variant, hub_form)
        if key not in built:
            folder = tmp_path_factory.mktemp(f"{variant}-{'hub' if hub_form else 'hf'}")
            if variant.startswith("multimodal"):
                model = build_multimodal(
                    folder, bidirectional=variant == "multimodal_bidirectional"
                )
            else:
                model = build_text(variant, folder, hub_form=hub_form)
            built[key] = (folder, model)
        return built[key]

    return get


@pytest.fixture(scope="session")
def chat_checkpoint(tiny, tmp_path_factory):
    """`chat_checkpoint(variant)` -> (folder with tokenizer files, transformers model)."""
    import shutil

    from checkpoints import save_tokenizer

    built = {}

    def get(variant: str = "ple_kv_shared", chat_template: str | None = None):
        key = (variant, chat_template)
        if key not in built:
            source, reference = tiny(variant)
            folder = shutil.copytree(
                source, tmp_path_factory.mktemp(f"{variant}-chat"), dirs_exist_ok=True
            )
            save_tokenizer(folder, chat_template)
            built[key] = (folder, reference)
        return built[key]

    return get


@pytest.fixture
def token_ids():
    def make(batch: int, length: int, seed: int = 0) -> np.ndarray:
        from checkpoints import VOCAB

        return np.random.default_rng(seed).integers(0, VOCAB, size=(batch, length))

    return make


def to_numpy(x: mx.array) -> np.ndarray:
    return np.array(x.astype(mx.float32))


def first_logits(model, processor, prompt, prompt_cache=None, **kwargs):
    """The logits the first generated token is sampled from, and the last response."""
    from mlx_gemma4 import stream_generate

    seen = []

    def record(_history, logits):
        seen.append(to_numpy(logits))
        return logits

    *_, last = stream_generate(
        model,
        processor,
        prompt,
        max_tokens=1,
        prompt_cache=prompt_cache,
        logits_processors=[record],
        **kwargs,
    )
    return seen[0], last
