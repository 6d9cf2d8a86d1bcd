"""Float32 logits against transformers' Gemma 4 on tiny random checkpoints."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from checkpoints import WINDOW
from conftest import ALL_VARIANTS, reference_logits, relative_error, to_numpy

from mlx_gemma4 import load_model

TOLERANCE = 1e-4


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_full_forward_batch_of_two(tiny, token_ids, variant):
    folder, reference = tiny(variant)
    ids = token_ids(2, 3 * WINDOW + 1)
    model = load_model(folder, dtype="float32")
    logits = model(mx.array(ids))
    assert logits.shape == (2, ids.shape[1], reference.config.get_text_config().vocab_size)
    assert relative_error(to_numpy(logits), reference_logits(reference, ids)) < TOLERANCE


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_chunked_prefill_then_decode_past_the_window(tiny, token_ids, variant):
    folder, reference = tiny(variant)
    ids = token_ids(1, 5 * WINDOW, seed=1)
    model = load_model(folder, dtype="float32")
    cache = model.make_cache()
    chunks = [ids[:, :7], ids[:, 7:12]] + [ids[:, t : t + 1] for t in range(12, ids.shape[1])]
    logits = np.concatenate([to_numpy(model(mx.array(c), cache=cache)) for c in chunks], axis=1)
    assert relative_error(logits, reference_logits(reference, ids)) < TOLERANCE


@pytest.mark.parametrize("variant", ["dense", "k_eq_v"])
def test_transformers_per_layer_config_form(tiny, token_ids, variant):
    folder, reference = tiny(variant, hub_form=False)
    assert "per_layer_config" in (folder / "config.json").read_text()
    ids = token_ids(1, 2 * WINDOW)
    logits = to_numpy(load_model(folder, dtype="float32")(mx.array(ids)))
    assert relative_error(logits, reference_logits(reference, ids)) < TOLERANCE
