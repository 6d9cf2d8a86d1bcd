"""bfloat16 fidelity: our bfloat16 output is at most 1.1x as far from our float32 output as
transformers' bfloat16 is from its float32, for every text variant and both towers.

Both errors are measured in the same run on the same checkpoint, averaged over 16 inputs (one
input alone moves the ratio by +-15% on these chaotic tiny models); 32 for the MoE model, whose
routing flips make it the noisiest (its ratio moves by +-0.04 between 16-input sets).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from checkpoints import TEXT_VARIANTS, bfloat16_errors

from mlx_gemma4.models.layers import RMSNorm, RMSNormNoScale

BAR = 1.1

CASES = [(variant, "text") for variant in TEXT_VARIANTS] + [
    ("multimodal", "vision"),
    ("multimodal_bidirectional", "vision"),
    ("multimodal", "audio"),
]


@pytest.mark.parametrize(("checkpoint", "part"), CASES)
def test_bfloat16_error_is_within_bar_of_transformers(tiny, checkpoint, part):
    folder, reference = tiny(checkpoint)
    samples = 32 if checkpoint.startswith("moe") else 16
    ours, theirs = bfloat16_errors(part, folder, reference, samples)
    assert 0 < theirs < 1.5  # bfloat16 does change the output, and not into noise
    assert ours <= BAR * theirs, f"{part} on {checkpoint}: {ours / theirs:.3f}x"


def _bfloat16_values(x: np.ndarray) -> np.ndarray:
    return np.array(mx.array(x.astype(np.float32)).astype(mx.bfloat16).astype(mx.float32))


def test_norms_round_once_in_bfloat16():
    """float32 arithmetic and one rounding at the end: the bfloat16 norm equals the exact norm
    rounded to bfloat16 (but for float32 near-ties), where MLX's fused norm, which rounds the
    normed value before the weight, misses on several percent of the elements."""
    rng = np.random.default_rng(0)
    x = mx.array(rng.standard_normal((64, 256))).astype(mx.bfloat16)
    weight = mx.array(1 + 0.2 * rng.standard_normal(256)).astype(mx.bfloat16)
    x64 = np.array(x.astype(mx.float32), dtype=np.float64)
    normed = x64 / np.sqrt((x64**2).mean(-1, keepdims=True) + 1e-6)
    exact = _bfloat16_values(normed * np.array(weight.astype(mx.float32), dtype=np.float64))

    def misses(out: mx.array) -> float:
        assert out.dtype == mx.bfloat16
        return float((np.array(out.astype(mx.float32)) != exact).mean())

    norm = RMSNorm(256, eps=1e-6)
    norm.weight = weight
    assert misses(norm(x)) < 0.002
    assert misses(mx.fast.rms_norm(x, weight, 1e-6)) > 0.02
    unscaled = np.array(RMSNormNoScale(1e-6)(x).astype(mx.float32))
    assert (unscaled != _bfloat16_values(normed)).mean() < 0.002


def test_casting_a_loaded_model_is_loading_in_bfloat16(tiny, token_ids):
    """`model.set_dtype(mx.bfloat16)` takes the same faithful path as `dtype="bfloat16"`."""
    from mlx_gemma4 import load_model

    folder, _ = tiny("moe_k_eq_v")
    ids = mx.array(token_ids(1, 12))
    cast = load_model(folder, dtype="float32")
    cast.set_dtype(mx.bfloat16)
    loaded = load_model(folder, dtype="bfloat16")
    assert cast(ids).dtype == loaded(ids).dtype == mx.bfloat16
    assert mx.array_equal(cast(ids), loaded(ids)).item()
