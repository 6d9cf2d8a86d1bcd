"""Image encoding and time to first token with a 280-token image: mlx-gemma4 against mlx-vlm.

    python benchmarks/vision.py [--rounds 3] [--bundled-blas]
    python benchmarks/vision.py --unified   # Gemma 4 12B's encoder-free embedder (unified.py)

One checkpoint (E2B's real vision tower: 768 wide, 16 layers; E2B-shaped text with 5 layers),
one 912 x 672 image preprocessed once (266 soft tokens of a 280 budget), float32, best of the
rounds (round-robin). Encoding is the vision tower plus the embedder; time to first token is the
whole prefill of a prompt holding the image, through each library's own generation loop.
"""

from __future__ import annotations

import time

import numpy as np
from common import arguments, e2b_shaped_checkpoint, load_mlx_vlm, load_ours, print_table

IMAGE_TOKEN, BOI, EOI = 258_880, 255_999, 258_882


def main() -> None:
    args, blas = arguments()
    if args.unified:  # Gemma 4 12B: no tower, the encoder-free embedders
        from unified import image_benchmark

        return image_benchmark(args, blas)
    import mlx.core as mx
    from mlx_vlm.generate.ar import generate_step as vlm_generate_step
    from PIL import Image

    from mlx_gemma4 import PromptCache
    from mlx_gemma4.generation import generate_step, prompt_inputs
    from mlx_gemma4.processing.images import process_images
    from mlx_gemma4.processing.processor import Media

    folder = e2b_shaped_checkpoint(args.layers, real_vision=True)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (672, 912, 3), dtype=np.uint8))
    batch = process_images([image], 280)
    pixels, positions = mx.array(batch.pixel_values), mx.array(batch.position_ids)
    text = rng.integers(1000, 200_000, 24).tolist()
    ids = [2, *text[:12], BOI, *[IMAGE_TOKEN] * batch.soft_tokens[0], EOI, *text[12:]]

    ours, vlm = load_ours(folder), load_mlx_vlm(folder)

    def encode_ours():
        return ours.embed_vision(ours.vision_tower(pixels, positions))

    def encode_vlm():
        return vlm.embed_vision(vlm.vision_tower(pixels, positions))

    def first_token_ours():
        cache = PromptCache(ours)
        inputs = prompt_inputs(ours, ids, Media(images=batch), cache)
        steps = generate_step(
            ours, ids, inputs, cache, lambda x: mx.argmax(x, -1), [], normalize=False
        )
        return next(steps)

    def first_token_vlm():
        steps = vlm_generate_step(
            mx.array([ids]),
            vlm,
            pixels,
            None,
            max_tokens=1,
            temperature=0.0,
            image_position_ids=positions,
        )
        return int(next(steps)[0])

    tasks = {
        ("mlx-gemma4", "encode"): lambda: mx.eval(encode_ours()),
        ("mlx-vlm", "encode"): lambda: mx.eval(encode_vlm()),
        ("mlx-gemma4", "ttft"): first_token_ours,
        ("mlx-vlm", "ttft"): first_token_vlm,
    }
    assert np.allclose(np.array(encode_ours()), np.array(encode_vlm()), atol=1e-3, rtol=1e-3)
    times = {key: [] for key in tasks}
    firsts = {}
    for _ in range(args.rounds):
        for key, task in tasks.items():
            start = time.perf_counter()
            result = task()
            times[key].append(time.perf_counter() - start)
            firsts[key] = result
    best = {key: min(value) for key, value in times.items()}
    rows = [
        [
            name,
            f"{best[(name, 'encode')]:.2f}",
            f"{best[(name, 'ttft')]:.2f}",
            f"{best[('mlx-vlm', 'encode')] / best[(name, 'encode')]:.2f}x",
            f"{best[('mlx-vlm', 'ttft')] / best[(name, 'ttft')]:.2f}x",
        ]
        for name in ("mlx-gemma4", "mlx-vlm")
    ]
    print_table(
        f"vision: E2B vision tower, {batch.soft_tokens[0]}-token image, {len(ids)}-token prompt, "
        f"float32, best of {args.rounds}; {mx.default_device()}, {blas}",
        ["engine", "encode s", "time to first token s", "encode vs mlx-vlm", "TTFT vs mlx-vlm"],
        rows,
    )
    same = firsts[("mlx-gemma4", "ttft")] == firsts[("mlx-vlm", "ttft")]
    print(f"same first token: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
