"""Audio encoding of a 30 s clip: mlx-gemma4 against mlx-vlm, as a real-time factor.

    python benchmarks/audio.py [--rounds 3] [--bundled-blas]
    python benchmarks/audio.py --unified   # Gemma 4 12B's encoder-free embedder (unified.py)

One checkpoint with E2B's real audio tower (transformers' default `Gemma4AudioConfig`: 1024
wide, 12 Conformer layers, output 1536; random weights) and a token text model, built once.
The input is 3000 frames of random log-mel features (30 s, all real), float32. Encoding is the
audio tower plus `embed_audio`; best of the rounds (round-robin). Real-time factor = encode
seconds / 30 s (lower is faster). Process CPU seconds are shown too: on a shared machine other
tenants stretch wall time but not them.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from common import (
    CACHE,
    TOKEN_VISION,
    arguments,
    build_checkpoint,
    load_mlx_vlm,
    load_ours,
    print_table,
)

FRAMES, MELS, SECONDS = 3000, 128, 30.0


def audio_checkpoint() -> Path:
    """Build (once, then reuse) a multimodal checkpoint with E2B's audio tower that both load.

    The text model is E2B-wide (hidden 1536, what `embed_audio` projects to) but one small layer
    over a small vocabulary: only the audio path is timed.
    """
    folder = CACHE / "e2b-audio-tower"
    if (folder / "config.json").exists():
        return folder
    from transformers import Gemma4AudioConfig, Gemma4Config, Gemma4TextConfig, Gemma4VisionConfig

    text = Gemma4TextConfig(
        vocab_size=1024,
        hidden_size=1536,
        intermediate_size=256,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        global_head_dim=64,
        hidden_size_per_layer_input=0,
        layer_types=["full_attention"],
    )
    vision = Gemma4VisionConfig(**TOKEN_VISION)
    config = Gemma4Config(text_config=text, vision_config=vision, audio_config=Gemma4AudioConfig())
    return build_checkpoint(config, folder, jittered=True)


def main() -> None:
    args, blas = arguments()
    if args.unified:  # Gemma 4 12B: no tower, the encoder-free embedders
        from unified import audio_benchmark

        return audio_benchmark(args, blas)
    import mlx.core as mx

    folder = audio_checkpoint()
    rng = np.random.default_rng(0)
    features = mx.array(rng.standard_normal((1, FRAMES, MELS)).astype(np.float32))
    mask = mx.ones((1, FRAMES), dtype=mx.bool_)

    ours, vlm = load_ours(folder), load_mlx_vlm(folder)

    def encode_ours():
        return ours.audio_features(features, mask)

    def encode_vlm():
        tokens, _ = vlm.audio_tower(features, ~mask)
        return vlm.embed_audio(tokens)[0]  # the clip is all real audio: every token is kept

    ours_out, vlm_out = np.array(encode_ours()), np.array(encode_vlm())
    assert ours_out.shape == vlm_out.shape, (ours_out.shape, vlm_out.shape)
    difference = np.abs(ours_out - vlm_out).max() / np.abs(vlm_out).max()
    assert difference < 1e-3, difference

    tasks = {"mlx-gemma4": encode_ours, "mlx-vlm": encode_vlm}
    times: dict[str, list[float]] = {name: [] for name in tasks}
    cpu: dict[str, list[float]] = {name: [] for name in tasks}  # other tenants do not add to it
    for _ in range(args.rounds):
        for name, task in tasks.items():
            start, cpu_start = time.perf_counter(), time.process_time()
            mx.eval(task())
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - cpu_start)
    best = {name: min(value) for name, value in times.items()}
    best_cpu = {name: min(value) for name, value in cpu.items()}
    rows = [
        [
            name,
            f"{best[name]:.2f}",
            f"{best[name] / SECONDS:.3f}",
            f"{best['mlx-vlm'] / best[name]:.2f}x",
            f"{best_cpu[name]:.2f}",
            f"{best_cpu['mlx-vlm'] / best_cpu[name]:.2f}x",
        ]
        for name in tasks
    ]
    print_table(
        f"audio: E2B audio tower + embed_audio, {SECONDS:.0f} s clip ({FRAMES} frames, "
        f"{ours_out.shape[0]} tokens), float32, best of {args.rounds}; "
        f"{mx.default_device()}, {blas}",
        ["engine", "encode s", "real-time factor", "vs mlx-vlm", "CPU s", "CPU vs mlx-vlm"],
        rows,
    )
    print(f"max difference between the two, relative: {difference:.1e}")


if __name__ == "__main__":
    main()
