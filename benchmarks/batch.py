"""Batched decoding: total tokens/s at several concurrencies, mlx-gemma4's BatchGenerator beside
mlx-lm's, on one E2B-shaped checkpoint.

    python benchmarks/batch.py [--layers 5] [--prompt 32] [--decode 16] [--rounds 1]
        [--concurrency 1 4 8 16] [--precision float32|4-bit|both] [--bundled-blas]

Each engine gets the same `concurrency` token-id prompts at once and decodes greedily up to
`decode` tokens a sequence (mlx-lm's without stop tokens; ours stops at the checkpoint's, which
the random model rarely samples: the tokens counted are those produced). The figure is the
decode throughput after the first step (which prefills): tokens produced over the seconds
those steps took, best round.
"""

from __future__ import annotations

import time

from common import base_parser, e2b_shaped_checkpoint, load_mlx_lm, parse, print_table
from generate import quantize
from structured import checkpoint_with_tokenizer


def run_ours(model, processor, prompts: list[list[int]], decode: int) -> tuple[int, float]:
    from mlx_gemma4 import BatchGenerator

    generator = BatchGenerator(model, processor, prefill_step_size=4096)
    for prompt in prompts:
        generator.submit(prompt, max_tokens=decode)
    generator.step()  # prefill and the first token of every sequence
    tokens, start = 0, time.perf_counter()
    while not generator.done:
        tokens += len(generator.step())
    return tokens, time.perf_counter() - start


def run_mlx_lm(model, prompts: list[list[int]], decode: int) -> tuple[int, float]:
    from mlx_lm.generate import BatchGenerator

    generator = BatchGenerator(model, max_tokens=decode, stop_tokens=[], prefill_step_size=4096)
    generator.insert(prompts, max_tokens=[decode] * len(prompts))
    tokens, finished, start = 0, 0, None
    while finished < len(prompts):
        _, generated = generator.next()  # (prompt-processing responses, generated tokens)
        finished += sum(response.finish_reason is not None for response in generated)
        if generated and start is None:  # the first tokens follow the prefill: not counted
            start = time.perf_counter()
        elif generated:
            tokens += len(generated)
    generator.close()
    return tokens, time.perf_counter() - start


def main() -> None:
    parser = base_parser(rounds=1)
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    parser.add_argument("--decode", type=int, default=16, help="generated tokens a sequence")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--precision", choices=["float32", "4-bit", "both"], default="float32")
    args, blas = parse(parser)
    import mlx.core as mx
    import numpy as np

    from mlx_gemma4 import load

    e2b_shaped_checkpoint(args.layers)
    folder = checkpoint_with_tokenizer(args.layers)
    rng = np.random.default_rng(0)
    precisions = ("float32", "4-bit") if args.precision == "both" else (args.precision,)
    rows = []
    for precision in precisions:
        ours, processor = load(folder, dtype=mx.float32)
        theirs = load_mlx_lm(folder)
        if precision == "4-bit":
            quantize("mlx-gemma4", ours)
            quantize("mlx-lm", theirs)
        for n in args.concurrency:
            prompts = [[2, *rng.integers(1000, 60_000, args.prompt - 1).tolist()] for _ in range(n)]
            best = {"mlx-gemma4": 0.0, "mlx-lm": 0.0}
            for _ in range(args.rounds):
                for name in best:
                    if name == "mlx-gemma4":
                        tokens, seconds = run_ours(ours, processor, prompts, args.decode)
                    else:
                        tokens, seconds = run_mlx_lm(theirs, prompts, args.decode)
                    best[name] = max(best[name], tokens / seconds)
            ratio = best["mlx-gemma4"] / best["mlx-lm"]
            rows.append(
                [
                    precision,
                    n,
                    f"{best['mlx-gemma4']:.1f}",
                    f"{best['mlx-lm']:.1f}",
                    f"{ratio:.2f}x",
                ]
            )
            print(rows[-1], flush=True)
    print_table(
        f"Total decode tokens/s, {args.layers}-layer E2B-shaped checkpoint, prompts of "
        f"{args.prompt} tokens, {args.decode} generated each ({blas})",
        ["precision", "sequences", "mlx-gemma4", "mlx-lm", "ours / mlx-lm"],
        rows,
    )


if __name__ == "__main__":
    main()
