"""The audio tower and audio soft tokens against transformers, on tiny random checkpoints."""

from __future__ import annotations

import copy
import shutil

import mlx.core as mx
import numpy as np
import pytest
from checkpoints import MM_TOKENS, clips, save_reference
from conftest import relative_error, to_numpy

from mlx_gemma4 import load_model
from mlx_gemma4.errors import AudioError
from mlx_gemma4.models.audio import soft_token_count, soft_token_counts

AUDIO = MM_TOKENS["audio_token_id"]
BOA, EOA = MM_TOKENS["boa_token_id"], MM_TOKENS["eoa_token_index"]


def reference_audio_features(reference, features, mask) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = reference.model.get_audio_features(
            torch.tensor(features), torch.tensor(mask), return_dict=True
        )
        return out.pooler_output[out.attention_mask].numpy()


@pytest.fixture(scope="module")
def clipped(tiny, tmp_path_factory):
    """The multimodal checkpoint with audio clip bounds tight enough to bind (the shared one
    keeps them infinite): (folder, transformers model)."""
    import torch

    _, reference = tiny("multimodal")
    reference = copy.deepcopy(reference)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, buffer in reference.named_buffers():
            if "audio_tower" in name and name.endswith(("_min", "_max")):
                bound = 0.5 + torch.rand((), generator=generator).item()
                buffer.fill_(-bound if name.endswith("_min") else bound)
    folder = tmp_path_factory.mktemp("multimodal-audio-clipped")
    return save_reference(reference, folder), reference


def test_audio_tower_matches_reference(tiny, clipped):
    """Two clips of different lengths, padded: tower and embedder within 1e-4 of transformers,
    with binding clip bounds, and the soft token counts the processor must use."""
    folder, reference = clipped
    model = load_model(folder, dtype=mx.float32)
    assert "audio_tower" in model.towers
    features, mask = clips([203, 121])

    expected = reference_audio_features(reference, features, mask)
    ours = to_numpy(model.audio_features(mx.array(features), mx.array(mask)))
    assert ours.shape == expected.shape
    assert relative_error(ours, expected) < 1e-4
    assert soft_token_counts(mask) == [soft_token_count(203), soft_token_count(121)]
    assert sum(soft_token_counts(mask)) == expected.shape[0]

    # the bounds bind: without them transformers gives something else
    unclipped = reference_audio_features(tiny("multimodal")[1], features, mask)
    assert relative_error(unclipped, expected) > 1e-2


def test_any_mask_matches_reference(tiny):
    """A mask with holes (not only trailing padding) keeps the reference's tokens exactly."""
    folder, reference = tiny("multimodal")
    model = load_model(folder, dtype=mx.float32)
    features, _ = clips([97, 97], seed=3)
    mask = np.random.default_rng(3).random(features.shape[:2]) > 0.3

    expected = reference_audio_features(reference, features, mask)
    ours = to_numpy(model.audio_features(mx.array(features), mx.array(mask)))
    assert ours.shape == expected.shape == (sum(soft_token_counts(mask)), ours.shape[1])
    assert relative_error(ours, expected) < 1e-4


def test_soft_token_count_is_the_towers_output_length(tiny):
    model = load_model(tiny("multimodal")[0], dtype=mx.float32)
    for frames in [1, 2, 3, 4, 5, 8, 13, 25, 48]:
        features, mask = clips([frames], seed=frames)
        out = model.audio_features(mx.array(features), mx.array(mask))
        assert out.shape[0] == soft_token_count(frames) == -(-frames // 4)


def test_bad_audio_shapes_get_one_clear_error(tiny):
    model = load_model(tiny("multimodal")[0], dtype=mx.float32)
    features, mask = clips([20, 12])
    with pytest.raises(ValueError, match="128 mel bins"):
        model.audio_features(mx.array(features[..., :80]), mx.array(mask))
    with pytest.raises(ValueError, match="input_features_mask"):
        model.audio_features(mx.array(features), mx.array(mask[:, :10]))
    assert model.audio_features(mx.array(features), mx.zeros(mask.shape, mx.bool_)).shape[0] == 0


def prompt_with_audio(token_counts: list[int], seed: int = 0) -> np.ndarray:
    """One row per clip: text, `<boa>` + placeholders + `<eoa>`, text; rows padded with text."""
    rng = np.random.default_rng(seed)
    rows = []
    for count in token_counts:
        rows.append(
            [2, *rng.integers(5, 90, 5), BOA, *[AUDIO] * count, EOA, *rng.integers(5, 90, 3)]
        )
    width = max(len(row) for row in rows)
    return np.array([row + rng.integers(5, 90, width - len(row)).tolist() for row in rows])


def test_logits_with_audio_match_reference(tiny):
    """Full forward with audio soft tokens in two prompts of a batch (clip i in row i)."""
    import torch

    folder, reference = tiny("multimodal")
    model = load_model(folder, dtype=mx.float32)
    features, mask = clips([150, 90], seed=1)
    ids = prompt_with_audio(soft_token_counts(mask))

    with torch.no_grad():
        expected = reference(
            input_ids=torch.tensor(ids),
            input_features=torch.tensor(features),
            input_features_mask=torch.tensor(mask),
        ).logits.numpy()
    ours = model(
        mx.array(ids), input_features=mx.array(features), input_features_mask=mx.array(mask)
    )
    assert relative_error(to_numpy(ours), expected) < 1e-4

    # the audio matters: the same prompt without the soft tokens gives other logits
    with torch.no_grad():
        blank = reference(input_ids=torch.tensor(ids)).logits.numpy()
    assert relative_error(blank, expected) > 1e-3

    short = ids.copy()
    short[0, 7] = 7  # the first audio placeholder becomes text
    assert (short == AUDIO).sum() == (ids == AUDIO).sum() - 1
    with pytest.raises(ValueError, match="soft tokens"):
        model(
            mx.array(short), input_features=mx.array(features), input_features_mask=mx.array(mask)
        )


def test_model_without_audio_tower_refuses_audio(tiny):
    model = load_model(tiny("multimodal_bidirectional")[0], dtype=mx.float32)
    features, mask = clips([40])
    ids = prompt_with_audio(soft_token_counts(mask))
    with pytest.raises(AudioError, match="no audio tower; it cannot take audio"):
        model(mx.array(ids), input_features=mx.array(features), input_features_mask=mx.array(mask))


def test_checkpoint_without_audio_weights_builds_no_tower(tiny, tmp_path):
    """A text-and-vision export of an audio model (audio config kept, audio weights dropped)."""
    source = tiny("multimodal")[0]
    folder = shutil.copytree(source, tmp_path / "no-audio-weights")
    file = next(folder.glob("*.safetensors"))
    weights = mx.load(str(file))
    kept = {k: v for k, v in weights.items() if "audio" not in k}
    assert len(kept) < len(weights)
    mx.save_safetensors(str(file), kept, metadata={"format": "pt"})

    model = load_model(folder, dtype=mx.float32)
    assert "audio_tower" not in model and "audio_tower" not in model.towers
    assert "vision_tower" in model.towers
    features, mask = clips([40])
    with pytest.raises(AudioError, match="no audio tower; it cannot take audio"):
        model.audio_features(mx.array(features), mx.array(mask))


def test_fast_activations_are_float32_accurate():
    """The rational tanh behind the tower's SiLU and GLU, against float64 over a dense grid."""
    from mlx_gemma4.models.activations import fast_glu, fast_silu, fast_tanh

    x = np.linspace(-60, 60, 200_001, dtype=np.float32)
    exact = x.astype(np.float64)
    sigmoid = 1 / (1 + np.exp(-exact))
    assert np.abs(to_numpy(fast_tanh(mx.array(x))) - np.tanh(exact)).max() < 5e-7
    silu_error = np.abs(to_numpy(fast_silu(mx.array(x))) - exact * sigmoid)
    assert (silu_error / np.maximum(1, np.abs(exact))).max() < 5e-7
    ones_then_gates = np.concatenate([np.ones_like(x), x])[None]
    assert np.abs(to_numpy(fast_glu(mx.array(ones_then_gates)))[0] - sigmoid).max() < 5e-7
    half = mx.array(x).astype(mx.float16)
    assert fast_silu(half).dtype == mx.float16
