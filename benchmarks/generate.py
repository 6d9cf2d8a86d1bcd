"""Generation engines side by side: mlx-gemma4, mlx-lm and mlx-vlm on one E2B-shaped checkpoint.

    python benchmarks/generate.py [--prompt 512] [--decode 64] [--rounds 3] [--bundled-blas]

Each engine's own generation loop (greedy, prefill step 2048) runs on the same prompt ids, in
float32 and with every linear and embedding quantized to 4-bit affine (group 64). Rounds go
round-robin over the engines; each figure is the engine's best round. The last columns put a
decode step beside its matmuls: every matmul of a step (the LM head included) on a one-token
input, run back to back in one evaluation. Both are medians (of the step intervals, and of
repeated runs of the matmuls), so that the machine's noise weighs alike on each. Peak memory
is the engine's weights plus the most its generation allocated on top.
"""

from __future__ import annotations

import statistics
import time

from common import IMPLEMENTATIONS, arguments, e2b_shaped_checkpoint, print_table


def engine(name: str, model):
    """A function (prompt ids, n) -> iterator of token ids, for each library's own loop."""
    import mlx.core as mx

    if name == "mlx-gemma4":
        from mlx_gemma4 import PromptCache
        from mlx_gemma4.generation import generate_step, prompt_inputs
        from mlx_gemma4.processing.processor import Media

        def run(ids, n):
            cache = PromptCache(model)
            inputs = prompt_inputs(model, ids, Media(), cache)
            greedy = lambda x: mx.argmax(x, -1)  # noqa: E731
            steps = generate_step(model, ids, inputs, cache, greedy, [], normalize=False)
            return (token for token, _ in zip(steps, range(n), strict=False))

    elif name == "mlx-lm":
        from mlx_lm.generate import generate_step

        def run(ids, n):
            return (int(t) for t, _ in generate_step(mx.array(ids), model, max_tokens=n))

    else:
        from mlx_vlm.generate.ar import generate_step

        def run(ids, n):
            steps = generate_step(mx.array([ids]), model, None, None, max_tokens=n, temperature=0.0)
            return (int(t) for t, _ in steps)

    return run


def timed_generation(run, ids, n):
    """(seconds to the first token, mean and median seconds per later token, tokens)."""
    start = time.perf_counter()
    tokens, stamps = [], []
    for token in run(ids, n):
        tokens.append(token)
        stamps.append(time.perf_counter())
    intervals = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    mean = (stamps[-1] - stamps[0]) / len(intervals)
    return stamps[0] - start, mean, statistics.median(intervals), tokens


def language_part(name: str, model):
    language = model.language_model
    embedding = language.embed_tokens if name == "mlx-gemma4" else language.model.embed_tokens
    return language, embedding


def matmul_time(name: str, model, repeats: int = 15) -> float:
    """Median seconds of every matmul of one decode step (the LM head included), run back to
    back in one evaluation."""
    import mlx.core as mx
    import mlx.nn as nn

    language, embedding = language_part(name, model)
    linears = [
        m for _, m in language.named_modules() if isinstance(m, nn.Linear | nn.QuantizedLinear)
    ]
    calls = []
    for module in [*linears, embedding]:
        dims = module.weight.shape[-1] * (32 // module.bits if hasattr(module, "bits") else 1)
        x = mx.random.normal((1, 1, dims)).astype(mx.float32)
        calls.append((module.as_linear if module is embedding else module, x))

    def run():
        mx.eval([call(x) for call, x in calls])

    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def weight_bytes(model) -> int:
    from mlx.utils import tree_flatten

    return sum(p.nbytes for _, p in tree_flatten(model.parameters()))


def quantize(name: str, model) -> None:
    import mlx.nn as nn

    from mlx_gemma4.quantize import quantize_model

    if name == "mlx-gemma4":
        quantize_model(model, bits=4, group_size=64)
    else:
        nn.quantize(
            model,
            group_size=64,
            bits=4,
            class_predicate=lambda _, m: (
                hasattr(m, "to_quantized") and m.weight.shape[-1] % 64 == 0
            ),
        )


def main() -> None:
    args, blas = arguments()

    import mlx.core as mx

    folder = e2b_shaped_checkpoint(args.layers)
    ids = [2, *mx.random.randint(5, 262_144, (args.prompt - 1,), key=mx.random.key(0)).tolist()]
    precisions = ("float32", "4-bit") if args.precision == "both" else (args.precision,)
    for precision in precisions:
        models = {}
        for name, loader in IMPLEMENTATIONS.items():
            model = loader(folder)
            if precision == "4-bit":
                quantize(name, model)
            mx.eval(model.parameters())
            models[name] = model
        runs = {name: engine(name, model) for name, model in models.items()}
        for run in runs.values():
            timed_generation(run, ids[:32], 3)  # warm-up
        results = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name, run in runs.items():
                mx.clear_cache()
                resident = mx.get_active_memory()
                mx.reset_peak_memory()
                first, per_token, median_step, tokens = timed_generation(run, ids, args.decode)
                working = mx.get_peak_memory() - resident
                results[name].append(
                    (first, per_token, tokens, weight_bytes(models[name]) + working, median_step)
                )
        report(precision, args, blas, models, results)
        del models, runs
        mx.clear_cache()


def report(precision, args, blas, models, results) -> None:
    import mlx.core as mx

    best = {
        name: (
            min(r[0] for r in runs),
            min(r[1] for r in runs),
            runs[0][2],
            max(r[3] for r in runs),
            min(r[4] for r in runs),
        )
        for name, runs in results.items()
    }
    peers = [v for k, v in best.items() if k != "mlx-gemma4"]
    best_first, best_step = min(p[0] for p in peers), min(p[1] for p in peers)
    rows = []
    for name, (first, step, tokens, peak, median_step) in best.items():
        matmuls = matmul_time(name, models[name])
        rows.append(
            [
                name,
                f"{args.prompt / first:.1f}",
                f"{1 / step:.2f}",
                f"{peak / 2**30:.2f}",
                f"{best_first / first:.2f}x",
                f"{best_step / step:.2f}x",
                f"{median_step * 1000:.0f}",
                f"{matmuls * 1000:.0f}",
                f"{median_step / matmuls:.3f}",
                "yes" if tokens == best["mlx-gemma4"][2] else "NO",
            ]
        )
    print_table(
        f"generate: E2B-shaped, {args.layers} layers, {precision}, prompt {args.prompt}, "
        f"{args.decode} tokens, best of {args.rounds}; {mx.default_device()}, {blas}",
        [
            "engine",
            "prefill tok/s",
            "decode tok/s",
            "peak GiB",
            "prefill vs best peer",
            "decode vs best peer",
            "median step ms",
            "its matmuls ms",
            "step / matmuls",
            "same tokens",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
