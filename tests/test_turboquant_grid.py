"""TurboQuant on models it was not tuned on: an outlier grid, the per-layer form, the seams."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from checkpoints import VOCAB, outlier_text_model
from conftest import to_numpy

from mlx_gemma4 import load_model
from mlx_gemma4.cli.info import describe
from mlx_gemma4.models.layers import CodebookLinear
from mlx_gemma4.packing import AFFINE_BITS, pack_codes
from mlx_gemma4.quantize import lloyd_max_codebook, quantize_model, turboquant_model
from mlx_gemma4.quantize.turboquant import fit_affine, rotate_model, stored_bits
from mlx_gemma4.rotation import rotation_signs
from mlx_gemma4.saving import save_model


def mean_kl(reference_logits: mx.array, logits: mx.array) -> float:
    log_p = reference_logits - mx.logsumexp(reference_logits, axis=-1, keepdims=True)
    log_q = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return float((mx.exp(log_p) * (log_p - log_q)).sum(axis=-1).mean())


# (shape, outlier pattern, seed): every shape, pattern and seed differs from cell to cell; the
# 352-wide residual stream and 352-wide MLP rotate block-diagonally (320 + 32).
CELLS = [("64x128", "clustered", 11), ("96x352", "spikes", 12), ("352x192", "rows+cols", 13)]


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize(("shape", "pattern", "seed"), CELLS)
def test_turboquant_kl_is_at_most_three_quarters_of_affine(shape, pattern, seed, bits):
    ids = mx.array(np.random.default_rng(seed).integers(0, VOCAB, size=(16, 64)))
    reference = outlier_text_model(shape, pattern, seed)(ids)
    kl = {}
    for method, quantize in [("affine", quantize_model), ("turboquant", turboquant_model)]:
        model = outlier_text_model(shape, pattern, seed)
        quantize(model, bits=bits, group_size=32)
        kl[method] = mean_kl(reference, model(ids))
    assert kl["turboquant"] <= 0.75 * kl["affine"], kl


@pytest.mark.parametrize("bits", [3, 4])
def test_fitted_affine_groups_beat_mlx_on_gaussian_rows(bits):
    """Embeddings are not rotated: fitted groups in MLX's format are what turboquant gives them."""
    weight = np.random.default_rng(bits).standard_normal((256, 128)).astype(np.float32)
    packed = mx.quantize(mx.array(weight), group_size=32, bits=bits)
    mlx_mse = ((to_numpy(mx.dequantize(*packed, group_size=32, bits=bits)) - weight) ** 2).mean()
    q, scales, biases = fit_affine(weight, bits, 32)
    assert q.max() < 2**bits
    restored = (q.reshape(256, -1, 32) * scales[..., None] + biases[..., None]).reshape(256, -1)
    assert ((restored - weight) ** 2).mean() <= 0.8 * mlx_mse


def set_rotated_weight(model: nn.Module, probe: nn.Module, linear: str, rotation: str, rotated):
    """Give layer 0's `linear` (under `mlp`) the weight whose rotation is `rotated`; `probe` is a
    model `rotate_model` rotated with the same seed."""
    # rotation(I) is Rᵀ, so the weight whose rotation W·Rᵀ is `rotated` is rotated·R
    matrix = probe.language_model.layers[0].mlp[rotation](mx.eye(rotated.shape[-1]))
    module = model.language_model.layers[0].mlp[linear]
    module.weight = mx.array(rotated.astype(np.float32)) @ matrix.T


def grouped(levels: np.ndarray, rng, group_size: int) -> np.ndarray:
    rows, dims = levels.shape
    scales = rng.uniform(0.01, 0.03, (rows, dims // group_size, 1))
    return (levels.reshape(rows, -1, group_size) * scales).reshape(rows, dims)


def test_per_layer_choice_saves_loads_and_counts_its_bits(tmp_path):
    """A layer that is exactly codebook levels once rotated takes the codebook, one that is
    exactly an affine grid takes fitted groups; the checkpoint loads and says what it holds."""
    bits, group_size = 3, 32
    model = outlier_text_model("64x128", "clustered", 5)
    probe = outlier_text_model("64x128", "clustered", 5)
    rotate_model(probe, seed=0)
    rng = np.random.default_rng(0)
    codebook, _ = lloyd_max_codebook(bits)
    down = model.language_model.layers[0].mlp.down_proj.weight.shape
    levels = codebook[rng.integers(0, 2**bits, down)]
    set_rotated_weight(
        model, probe, "down_proj", "inner_rotation", grouped(levels, rng, group_size)
    )
    gate = model.language_model.layers[0].mlp.gate_proj.weight.shape
    grid = rng.integers(0, 2**bits, gate).astype(np.float64)
    grid[:, ::group_size], grid[:, 1::group_size] = 0, 2**bits - 1  # every group spans the grid
    set_rotated_weight(model, probe, "gate_proj", "input_rotation", grouped(grid - 3.3, rng, 32))

    ids = mx.array(np.random.default_rng(0).integers(0, VOCAB, size=(2, 16)))
    errors = {}
    entry = turboquant_model(model, bits=bits, group_size=group_size, codebook=True, errors=errors)
    mlp = model.language_model.layers[0].mlp
    assert isinstance(mlp.down_proj, CodebookLinear) and isinstance(
        mlp.gate_proj, nn.QuantizedLinear
    )
    assert errors["language_model.layers.0.mlp.down_proj"] < 1e-3
    assert errors["language_model.layers.0.mlp.gate_proj"] < 1e-3

    expected = to_numpy(model(ids))
    save_model(model, tmp_path / "mixed", quantization=entry)
    loaded = load_model(tmp_path / "mixed", dtype=mx.float32)
    np.testing.assert_allclose(to_numpy(loaded(ids)), expected, rtol=1e-5, atol=1e-5)
    summary = describe(loaded)["quantization"]
    assert "codebook 3-bit g32" in summary and "affine 3-bit g32" in summary
    # the codebook stores a scale per group, no bias, and 8 levels: 3 + 32/32 + 8·32/(64·128)
    # bits per weight, against the affine groups' 3 + 64/32 (float32 scales and biases)
    mlp = loaded.language_model.layers[0].mlp
    assert stored_bits(mlp.down_proj) == pytest.approx(4 + 8 * 32 / (64 * 128))
    assert stored_bits(mlp.gate_proj) == pytest.approx(5.0)


# ----------------------------------------------------------------------------- the seams


@pytest.mark.parametrize("dims", [32, 96, 352])
@pytest.mark.parametrize("seed", [0, 7])
def test_rotation_signs_are_the_old_streams(dims, seed):
    """Checkpoints rotate as before for a seed; prompt-cache files (which store only the seed)
    read back with the KV cache's old signs."""
    old_weights = np.random.default_rng([seed, 3]).choice(np.array([-1.0, 1.0]), size=dims)
    np.testing.assert_array_equal(to_numpy(rotation_signs(dims, seed, site=3)), old_weights)
    flips = mx.random.bernoulli(0.5, (dims,), key=mx.random.key(seed))
    np.testing.assert_array_equal(
        to_numpy(rotation_signs(dims, seed)), to_numpy(mx.where(flips, 1.0, -1.0))
    )


@pytest.mark.parametrize("bits", AFFINE_BITS)
def test_the_one_packer_packs_weights_as_the_old_numpy_packer(bits):
    codes = np.random.default_rng(bits).integers(0, 2**bits, (2, 3, 64)).astype(np.uint8)
    planes = (codes[..., None] >> np.arange(bits, dtype=np.uint8)) & 1
    stream = planes.reshape(*codes.shape[:-1], -1)
    old = np.packbits(stream, axis=-1, bitorder="little").view(np.uint32)
    np.testing.assert_array_equal(np.array(pack_codes(mx.array(codes), bits)), old)
