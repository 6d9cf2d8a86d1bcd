"""Gemma 4 12B (gemma4_unified)'s encoder-free embedders: time to first token with an image or a
30 s clip, mlx-gemma4 against mlx-vlm on the same checkpoint. Run through

    python benchmarks/vision.py --unified [--rounds 3] [--bundled-blas]
    python benchmarks/audio.py --unified [--rounds 3] [--bundled-blas]

One random checkpoint, built once: the 12B's real embedders (48 px patches = 6912 values ->
3840, a 1120 x 2 x 3840 position table; 640-sample audio frames -> 3840) over a 12B-wide text
model (hidden 3840, MLP 15360, 16 heads, 8 KV heads, head dims 256 / 512) with 2 layers (one
sliding, one full) and a 16k vocabulary (the 262k table alone would take 4 GB of this shared
machine's memory per library). float32, best of the rounds (round-robin). Encoding is the
embedders; time to first token the whole prefill through each library's generation loop.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from common import CACHE, load_mlx_vlm, load_ours, print_table

IMAGE, AUDIO, BOI, EOI, BOA, EOA = 258_880, 258_881, 255_999, 258_882, 256_000, 258_883
VOCAB = 16_384  # the soft-token ids are remapped into it (below)
TEXT_12B_WIDE = dict(
    hidden_size=3840,
    intermediate_size=15_360,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=256,
    global_head_dim=512,
    sliding_window=1024,
    final_logit_softcapping=30.0,
    layer_types=["sliding_attention", "full_attention"],
    num_hidden_layers=2,
    vocab_size=VOCAB,
)
# the multimodal token ids, inside the small vocabulary
TOKENS = dict(
    image_token_id=VOCAB - 6,
    boi_token_id=VOCAB - 5,
    eoi_token_id=VOCAB - 4,
    audio_token_id=VOCAB - 3,
    boa_token_id=VOCAB - 2,
    eoa_token_index=VOCAB - 1,
    video_token_id=VOCAB - 7,
)


def unified_checkpoint() -> Path:
    """Build (once, then reuse) the random 12B-wide checkpoint both libraries load."""
    folder = CACHE / "unified-12b-wide-2l"
    if (folder / "config.json").exists():
        return folder
    import sys

    import torch
    from transformers import (
        Gemma4UnifiedAudioConfig,
        Gemma4UnifiedConfig,
        Gemma4UnifiedForConditionalGeneration,
        Gemma4UnifiedTextConfig,
        Gemma4UnifiedVisionConfig,
    )

    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from checkpoints import save_reference

    print(f"building {folder} (once) ...", file=sys.stderr)
    config = Gemma4UnifiedConfig(
        text_config=Gemma4UnifiedTextConfig(**TEXT_12B_WIDE),
        vision_config=Gemma4UnifiedVisionConfig(),
        audio_config=Gemma4UnifiedAudioConfig(),
        **TOKENS,
    )
    torch.manual_seed(0)
    save_reference(Gemma4UnifiedForConditionalGeneration(config).eval(), folder)
    return folder


def _prompt(rng, soft: int, token: int, start: int, end: int) -> list[int]:
    text = rng.integers(1000, VOCAB - 100, 24).tolist()
    return [2, *text[:12], start, *[token] * soft, end, *text[12:]]


def _race(args, tasks: dict) -> tuple[dict, dict]:
    times, firsts = {key: [] for key in tasks}, {}
    for _ in range(args.rounds):
        for key, task in tasks.items():
            start = time.perf_counter()
            firsts[key] = task()
            times[key].append(time.perf_counter() - start)
    return {key: min(value) for key, value in times.items()}, firsts


def _report(title: str, best: dict, firsts: dict) -> None:
    rows = [
        [
            name,
            f"{best[(name, 'encode')]:.3f}",
            f"{best[(name, 'ttft')]:.2f}",
            f"{best[('mlx-vlm', 'encode')] / best[(name, 'encode')]:.2f}x",
            f"{best[('mlx-vlm', 'ttft')] / best[(name, 'ttft')]:.2f}x",
        ]
        for name in ("mlx-gemma4", "mlx-vlm")
    ]
    header = ["engine", "encode s", "time to first token s", "encode vs mlx-vlm", "TTFT vs mlx-vlm"]
    print_table(title, header, rows)
    same = firsts[("mlx-gemma4", "ttft")] == firsts[("mlx-vlm", "ttft")]
    print(f"same first token: {'yes' if same else 'NO'}")


def _first_token_ours(model, ids, media):
    import mlx.core as mx

    from mlx_gemma4 import PromptCache
    from mlx_gemma4.generation import generate_step, prompt_inputs

    cache = PromptCache(model)
    inputs = prompt_inputs(model, ids, media, cache)
    return next(generate_step(model, ids, inputs, cache, lambda x: mx.argmax(x, -1), []))


def _first_token_vlm(model, ids, pixels=None, **kwargs):
    import mlx.core as mx
    from mlx_vlm.generate.ar import generate_step

    steps = generate_step(
        mx.array([ids]), model, pixels, None, max_tokens=1, temperature=0.0, **kwargs
    )
    return int(next(steps)[0])


def image_benchmark(args, blas: str) -> None:
    import mlx.core as mx
    from PIL import Image

    from mlx_gemma4.processing.images import process_images
    from mlx_gemma4.processing.processor import Media

    folder = unified_checkpoint()
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (672, 912, 3), dtype=np.uint8))
    batch = process_images([image], 280, patch_size=48, pooling=1)  # the 12B's merged patches
    pixels, positions = mx.array(batch.pixel_values), mx.array(batch.position_ids)
    marks = (TOKENS["boi_token_id"], TOKENS["eoi_token_id"])
    ids = _prompt(rng, batch.soft_tokens[0], TOKENS["image_token_id"], *marks)
    ours, vlm = load_ours(folder), load_mlx_vlm(folder)
    tasks = {
        ("mlx-gemma4", "encode"): lambda: mx.eval(ours.vision_features(pixels, positions)),
        ("mlx-vlm", "encode"): lambda: mx.eval(vlm.get_image_features(pixels, positions)),
        ("mlx-gemma4", "ttft"): lambda: _first_token_ours(ours, ids, Media(images=batch)),
        ("mlx-vlm", "ttft"): lambda: _first_token_vlm(
            vlm, ids, pixels, image_position_ids=positions
        ),
    }
    expected = np.array(vlm.get_image_features(pixels, positions))
    assert np.allclose(np.array(ours.vision_features(pixels, positions)), expected, atol=1e-3)
    best, firsts = _race(args, tasks)
    _report(
        f"12B encoder-free vision: 2-layer 12B-wide text, {batch.soft_tokens[0]}-token image, "
        f"{len(ids)}-token prompt, float32, best of {args.rounds}; {mx.default_device()}, {blas}",
        best,
        firsts,
    )


def audio_benchmark(args, blas: str, seconds: float = 30.0) -> None:
    import mlx.core as mx

    from mlx_gemma4.processing.processor import Media
    from mlx_gemma4.processing.unified import waveform_frames

    folder = unified_checkpoint()
    rng = np.random.default_rng(0)
    wave = (0.1 * rng.standard_normal(int(seconds * 16_000))).astype(np.float32)
    frames = waveform_frames([wave])
    features, mask = frames.take()
    marks = (TOKENS["boa_token_id"], TOKENS["eoa_token_index"])
    ids = _prompt(rng, frames.soft_tokens[0], TOKENS["audio_token_id"], *marks)
    ours, vlm = load_ours(folder), load_mlx_vlm(folder)
    tasks = {
        ("mlx-gemma4", "encode"): lambda: mx.eval(ours.audio_features(features, mask)),
        ("mlx-vlm", "encode"): lambda: mx.eval(vlm.get_audio_features(features, mask)),
        ("mlx-gemma4", "ttft"): lambda: _first_token_ours(ours, ids, Media(audio=frames)),
        ("mlx-vlm", "ttft"): lambda: _first_token_vlm(
            vlm, ids, input_features=features, input_features_mask=mask
        ),
    }
    expected = np.array(vlm.get_audio_features(features, mask))
    assert np.allclose(np.array(ours.audio_features(features, mask)), expected, atol=1e-3)
    best, firsts = _race(args, tasks)
    _report(
        f"12B encoder-free audio: 2-layer 12B-wide text, {seconds:.0f} s clip = "
        f"{frames.soft_tokens[0]} tokens, {len(ids)}-token prompt, float32, best of "
        f"{args.rounds}; {mx.default_device()}, {blas}",
        best,
        firsts,
    )
