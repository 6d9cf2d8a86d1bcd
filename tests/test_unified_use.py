"""Gemma 4 12B (gemma4_unified) through the rest of the package: loading forms, `gemma4 info`,
quantization (affine, turboquant, mlx-vlm's converter, KV), prompt-cache reuse with media, the
commands, and bad input."""

from __future__ import annotations

import json
import re
import shutil

import mlx.core as mx
import numpy as np
import pytest
import soundfile
from conftest import first_logits, media_messages, random_image, to_numpy, tones
from quantized_makers import BITS, CLOSE, FAR, mean_relative_error, quantize_into
from unified_checkpoints import merged_patches, tiny_unified

from mlx_gemma4 import PromptCache, load, load_model, stream_generate
from mlx_gemma4.cli.info import describe
from mlx_gemma4.config import ModelConfig
from mlx_gemma4.errors import AudioError, ImageError
from mlx_gemma4.generation import prompt_inputs


@pytest.fixture(scope="module")
def unified(tmp_path_factory):
    return tiny_unified(tmp_path_factory)


@pytest.fixture(scope="module")
def float_model(unified):
    return load(unified[0])


# ----------------------------------------------------------------------------- loading, info


def test_info_names_the_variant_and_its_modalities(unified, gemma4):
    folder, reference = unified
    facts = describe(load_model(folder))
    assert facts["variant"] == "unified (12B family)"
    assert facts["modalities"] == "text, vision, audio"
    assert "M vision" in facts["parameters"] and "M audio" in facts["parameters"]
    raw = json.loads((folder / "config.json").read_text())
    raw["text_config"]["hidden_size"] = 3840
    assert ModelConfig.from_dict(raw).text_config.variant == "12B"
    result = gemma4("info", folder)
    assert result.returncode == 0 and "unified (12B family)" in result.stdout


def test_sharded_checkpoint_and_mlx_vlm_layout(unified, float_model, tmp_path):
    """Shards in transformers' Hub form, and the key layout mlx-vlm writes (language_model.model.*,
    vision_embedder.*), give the same model."""
    from mlx.utils import tree_flatten

    folder, reference = unified
    sharded = tmp_path / "sharded"
    reference.save_pretrained(sharded, max_shard_size="100KB")
    shutil.copy2(folder / "config.json", sharded / "config.json")
    assert len(list(sharded.glob("*.safetensors"))) > 2
    expected = dict(tree_flatten(float_model[0].parameters()))
    for candidate in (load_model(sharded), _mlx_vlm_layout(float_model[0], tmp_path / "vlm")):
        loaded = dict(tree_flatten(candidate.parameters()))
        assert loaded.keys() == expected.keys()
        assert all(mx.array_equal(loaded[k], expected[k]).item() for k in expected)


def _mlx_vlm_layout(model, target):
    from mlx.utils import tree_flatten

    target.mkdir()
    shutil.copy2(model.path / "config.json", target / "config.json")
    weights = {
        k.replace("language_model.", "language_model.model.", 1): v
        for k, v in tree_flatten(model.parameters())
    }
    mx.save_safetensors(str(target / "model.safetensors"), weights)
    return load_model(target)


# ----------------------------------------------------------------------------- quantization

MAKERS = ["affine", "turboquant", "cli-affine", "mlx-vlm"]
# This tiny model amplifies soft-token noise (see test_unified_parity), so 8-bit weights move
# image and video logits further than on the other sizes: measured 0.19-0.32 mean relative
# error (audio 0.04-0.10), against 1.07-1.27 when the media's soft tokens are missing.
MEDIA_CLOSE = {"image": 0.45, "video": 0.45, "audio": CLOSE}


@pytest.fixture(scope="module")
def quantized(unified, tmp_path_factory):
    built = {}

    def get(maker: str):
        if maker not in built:
            target = tmp_path_factory.mktemp(f"unified-{maker}") / "q"
            quantize_into(maker, unified[0], target)
            built[maker] = load_model(target)
        return built[maker]

    return get


@pytest.mark.parametrize("modality", ["image", "video", "audio"])
@pytest.mark.parametrize("maker", MAKERS)
def test_media_on_quantized_checkpoints(float_model, quantized, maker, modality):
    reference, processor = float_model
    model = quantized(maker)
    assert model.language_model.layers[0].self_attn.q_proj.bits == BITS
    inputs = processor(media_messages(modality), max_soft_tokens=70, video_soft_tokens=70)
    expected = reference(**inputs)
    assert mean_relative_error(model(**inputs), expected) < MEDIA_CLOSE[modality]
    assert mean_relative_error(model(inputs["input_ids"]), expected) > FAR


def test_mlx_vlm_loads_what_gemma4_quantize_writes(float_model, quantized):
    from mlx_vlm.utils import load_model as load_mlx_vlm

    ours = quantized("cli-affine")
    peer = load_mlx_vlm(ours.path)
    inputs = float_model[1](media_messages("image"), max_soft_tokens=70)
    pixels, positions = inputs["pixel_values"], inputs["image_position_ids"]
    ids = inputs["input_ids"][:, :6]
    assert mx.allclose(ours(ids), peer(ids).logits, atol=1e-4).item()
    features = ours.vision_features(pixels, positions)
    assert mx.allclose(features, peer.get_image_features(pixels, positions), atol=1e-4).item()


@pytest.mark.parametrize("modality", ["image", "audio"])
def test_quantized_kv_cache_with_media(float_model, modality):
    model, processor = float_model
    messages = media_messages(modality)
    plain, _ = first_logits(model, processor, messages, max_soft_tokens=70)
    packed, _ = first_logits(model, processor, messages, max_soft_tokens=70, kv_bits=8)
    assert mean_relative_error(mx.array(packed), mx.array(plain)) < 0.05


# ----------------------------------------------------------------------------- prompt cache


@pytest.mark.parametrize("modality", ["image", "video", "audio"])
def test_prompt_cache_reuses_media_turns(float_model, modality):
    model, processor = float_model
    cache = PromptCache(model)
    turn1 = media_messages(modality)
    options = dict(max_soft_tokens=70, video_soft_tokens=70)
    answer = "".join(
        r.text
        for r in stream_generate(
            model, processor, turn1, max_tokens=4, prompt_cache=cache, **options
        )
    )
    turn2 = [*turn1, {"role": "assistant", "content": answer}, {"role": "user", "content": "so?"}]
    ids, media = processor.prepare(turn2, **options)
    inputs = prompt_inputs(model, ids, media, cache)
    assert inputs.embeddings is None  # the media are in the cached prefix: not embedded again
    assert len(inputs.todo) < len(ids) - 30
    reused, last = first_logits(model, processor, turn2, prompt_cache=cache, **options)
    fresh, _ = first_logits(model, processor, turn2, **options)
    assert last.reused_tokens > 30
    assert np.abs(reused - fresh).max() <= 1e-4 * np.abs(fresh).max()


def test_batch_with_media_equals_solo_runs(float_model):
    from conftest import solo

    from mlx_gemma4 import BatchGenerator

    model, processor = float_model
    prompts = [media_messages(kind) for kind in ("image", "audio", "video")]
    prompts.append([{"role": "user", "content": "hello"}])
    options = dict(max_tokens=6, max_soft_tokens=70, video_soft_tokens=70)
    generator = BatchGenerator(model, processor, prefill_step_size=7)
    ids = [generator.submit(prompt, **options) for prompt in prompts]
    tokens = {i: [] for i in ids}
    while not generator.done:
        for response in generator.step():
            tokens[response.request_id].append(response.token)
    for i, prompt in zip(ids, prompts, strict=True):
        assert tokens[i] == solo(model, processor, prompt, **options)


# ----------------------------------------------------------------------------- commands


def test_ask_transcribe_detect_and_chat(unified, gemma4, tmp_path):
    folder = unified[0]
    picture, clip = tmp_path / "in.png", tmp_path / "clip.wav"
    random_image(96, 64).save(picture)
    soundfile.write(clip, tones(2.0), 16_000)
    result = gemma4("ask", picture, "what is this?", "--model", folder, "--max-tokens", "3")
    assert result.returncode == 0, result.stderr
    result = gemma4("transcribe", clip, "-m", folder, "-o", tmp_path / "t.txt")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "t.txt").exists()
    result = gemma4(
        "detect", picture, "cats", "--out", tmp_path / "o.png", "-m", folder, "--budget", "70"
    )
    assert result.returncode == 0, result.stderr
    script = f"/image {picture}\nwhat is it?\nand now?\n"
    chat = gemma4("chat", "-m", folder, "-n", "3", "--temp", "0", stdin=script)
    assert chat.returncode == 0, chat.stderr
    assert f"attached {picture}" in chat.stdout
    stats = [line for line in chat.stderr.splitlines() if line.startswith("[")]
    assert len(stats) == 2
    assert int(re.search(r"\((\d+) cached\)", stats[1]).group(1)) > 60  # the image turn reused


# ----------------------------------------------------------------------------- bad input


def test_missing_embedders_are_one_line_errors(tmp_path_factory, gemma4, tmp_path):
    picture, clip = tmp_path / "in.png", tmp_path / "clip.wav"
    random_image(64, 64).save(picture)
    soundfile.write(clip, tones(1.0), 16_000)
    no_vision = tiny_unified(tmp_path_factory, vision=False)[0]
    no_audio = tiny_unified(tmp_path_factory, audio=False)[0]
    cases = [
        (("ask", picture, "what?", "-m", no_vision), "no image embedder; it cannot take images"),
        (("transcribe", clip, "-m", no_audio), "no audio embedder; it cannot take audio"),
    ]
    for args, message in cases:
        result = gemma4(*args)
        assert result.returncode == 1 and message in result.stderr
        assert result.stderr.strip().count("\n") == 0
    assert describe(load_model(no_audio))["modalities"] == "text, vision"


def test_a_text_and_vision_export_loads_without_its_audio_embedder(unified, tmp_path):
    folder = tmp_path / "no-audio-weights"
    shutil.copytree(unified[0], folder)
    weights = mx.load(str(folder / "model.safetensors"))
    kept = {k: v for k, v in weights.items() if "embed_audio" not in k}
    assert len(kept) < len(weights)
    mx.save_safetensors(str(folder / "model.safetensors"), kept)
    model, processor = load(folder)
    assert describe(model)["modalities"] == "text, vision"
    with pytest.raises(AudioError, match="no audio embedder"):
        next(stream_generate(model, processor, media_messages("audio"), max_tokens=2))


def test_bad_config_is_one_line(unified, gemma4, tmp_path):
    folder = tmp_path / "bad"
    shutil.copytree(unified[0], folder)
    raw = json.loads((folder / "config.json").read_text())
    raw["text_config"]["use_bidirectional_attention"] = "all"
    (folder / "config.json").write_text(json.dumps(raw))
    result = gemma4("info", folder)
    assert result.returncode == 1 and "use_bidirectional_attention 'all'" in result.stderr
    assert "config.json" in result.stderr and result.stderr.strip().count("\n") == 0


def test_media_in_the_wrong_layout_are_refused(float_model):
    model = float_model[0]
    ids = mx.array([[2, 5, 472, 472, 6]])
    sixteen_pixel = mx.zeros((1, 70, 768))  # the other sizes' 16 px patches
    with pytest.raises(ImageError, match=r"\[images, tokens, 6912\] merged 48-pixel patches"):
        model(ids, pixel_values=sixteen_pixel, image_position_ids=mx.zeros((1, 70, 2), mx.int64))
    pixels, positions = merged_patches([(2, 1)], 70)
    positions[0, 0] = (200, 0)  # past the 128-entry position table
    with pytest.raises(ImageError, match="exceeds the model's position table"):
        model(ids, pixel_values=mx.array(pixels), image_position_ids=mx.array(positions))
    mels = mx.zeros((1, 10, 128))  # the other sizes' log-mel features
    with pytest.raises(AudioError, match=r"\[clips, frames, 640\] raw waveform frames"):
        model(mx.array([[2, 476, 476]]), input_features=mels)
    assert to_numpy(model(ids[:, :2])).shape == (1, 2, 512)
