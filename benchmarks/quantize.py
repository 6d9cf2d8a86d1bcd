"""Weight quantization: affine against TurboQuant-style, on quality and decode speed.

    python benchmarks/quantize.py [--bits 3,4,8] [--prompt 128] [--decode 32] [--rounds 3]
                                  [--layers 5] [--grid-only] [--no-kv] [--bundled-blas]

First the robustness grid: tiny text models (3 layers, vocabulary 512) of three shapes, one of
them a 352-wide residual stream that rotates block-diagonally, times three outlier patterns
TurboQuant was not tuned on (tests/checkpoints.py: clustered outlier channels with Student-t
tails, log-normal row and column scales with one 30x channel, sparse 30x spikes in Laplace
entries), a different seed per cell. Each cell quantizes everything (group 32) at 3 and 4 bits
with affine, turboquant and turboquant --codebook, and prints the mean KL of the next-token
distributions against float32 over 16 x 64 tokens as a ratio to affine's, then the worst case.
--grid-only stops there.

Then, on an E2B-shaped checkpoint (real layer shapes, few layers) whose projections are made
LLM-like (heavy-tailed entries, outlier input channels; the rule tests/test_quantize.py uses),
each method quantizes every linear and embedding at each bit width (group 64). Quality is the
mean KL divergence of the next-token distributions against the float model and how often the
top token agrees, over one prompt. Decode speed goes through mlx-gemma4's own generation loop
(greedy); rounds go round-robin over the two methods and each figure is the best round. Bits
per weight count the packed weights with their scales, biases and codebooks. Then the KV-cache
benchmark (benchmarks/kv_cache.py) runs with its defaults, unless --no-kv.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common import base_parser, e2b_shaped_checkpoint, load_ours, parse, print_table
from generate import engine, timed_generation

METHODS = ("affine", "turboquant")
GROUP_SIZE = 64


def arguments() -> tuple[argparse.Namespace, str]:
    parser = base_parser()
    parser.add_argument("--bits", default="3,4,8", help="comma-separated bit widths")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens (KL, top-1)")
    parser.add_argument("--decode", type=int, default=32, help="generated tokens")
    parser.add_argument("--grid-only", action="store_true", help="only the robustness grid")
    parser.add_argument("--no-kv", action="store_true", help="skip the KV-cache benchmark")
    return parse(parser)


def llm_like_parameters(model, seed: int = 0) -> dict:
    """The model's tensors that `llm_like_tensor` changes, changed (kept to reapply)."""
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten

    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from test_quantize import llm_like_tensor

    rng = np.random.default_rng(seed)
    changed = {}
    for key, value in tree_flatten(model.language_model.parameters()):
        if "embed" in key:  # never changed; skip the 262k-row tables' numpy copies
            continue
        new = llm_like_tensor(key, np.array(value), rng)
        if new is not None:
            changed[f"language_model.{key}"] = mx.array(new)
    return changed


def quantized_model(folder: Path, llm: dict, method: str, bits: int):
    import mlx.core as mx
    from mlx.utils import tree_unflatten

    from mlx_gemma4.quantize import quantize_model, turboquant_model

    model = load_ours(folder)
    model.update(tree_unflatten(list(llm.items())))
    if method == "affine":
        quantize_model(model, bits=bits, group_size=GROUP_SIZE)
    elif method == "turboquant":
        turboquant_model(model, bits=bits, group_size=GROUP_SIZE)
    mx.eval(model.parameters())
    return model


def bits_per_weight(model) -> float:
    from mlx_gemma4.quantize.turboquant import stored_bits

    sizes = [
        (stored_bits(module), module.weight.size * 32 // module.bits)
        for _, module in model.named_modules()
        if hasattr(module, "bits") and hasattr(module, "scales")
    ]
    return sum(bits * weights for bits, weights in sizes) / sum(weights for _, weights in sizes)


def quality(logits, reference) -> tuple[float, float]:
    """(mean KL(float ‖ quantized), top-1 agreement) over the prompt's positions."""
    import mlx.core as mx

    log_p = reference - mx.logsumexp(reference, axis=-1, keepdims=True)
    log_q = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    kl = (mx.exp(log_p) * (log_p - log_q)).sum(axis=-1).mean()
    agree = (logits.argmax(axis=-1) == reference.argmax(axis=-1)).astype(mx.float32).mean()
    return kl.item(), agree.item()


# KL values this small are float32 rounding of identical distributions, not quantization error.
KL_NOISE = 1e-5


def _ratio(kl: float, affine_kl: float) -> str:
    if abs(affine_kl) < KL_NOISE:
        return "-"
    return f"< {KL_NOISE / affine_kl:.2f}x" if abs(kl) < KL_NOISE else f"{kl / affine_kl:.2f}x"


GRID_BITS = (3, 4)
GRID_METHODS = {
    "turboquant": {},
    "codebook": {"codebook": True},
}


def grid() -> dict[int, float]:
    """Print the robustness grid; return the worst turboquant/affine KL ratio per bit width."""
    import mlx.core as mx
    import numpy as np

    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from checkpoints import GRID_PATTERNS, GRID_SHAPES, VOCAB, outlier_text_model

    from mlx_gemma4.quantize import quantize_model, turboquant_model

    rows, worst = [], {(m, b): 0.0 for m in GRID_METHODS for b in GRID_BITS}
    for i, pattern in enumerate(GRID_PATTERNS):
        for j, shape in enumerate(GRID_SHAPES):
            seed = 3 * i + j
            ids = mx.array(np.random.default_rng(seed).integers(0, VOCAB, size=(16, 64)))
            reference = outlier_text_model(shape, pattern, seed)(ids).astype(mx.float32)
            row = [pattern, shape, str(seed)]
            for bits in GRID_BITS:
                model = outlier_text_model(shape, pattern, seed)
                quantize_model(model, bits=bits, group_size=32)
                affine_kl, _ = quality(model(ids).astype(mx.float32), reference)
                row += [f"{affine_kl:.3g} ({bits_per_weight(model):.2f})"]
                for method, options in GRID_METHODS.items():
                    model = outlier_text_model(shape, pattern, seed)
                    turboquant_model(model, bits=bits, group_size=32, **options)
                    kl, _ = quality(model(ids).astype(mx.float32), reference)
                    worst[method, bits] = max(worst[method, bits], kl / affine_kl)
                    row.append(f"{kl / affine_kl:.2f}x ({bits_per_weight(model):.2f})")
            rows.append(row)
    rows.append(
        ["worst case", "", ""]
        + [
            cell
            for bits in GRID_BITS
            for cell in ["", *(f"**{worst[m, bits]:.2f}x**" for m in GRID_METHODS)]
        ]
    )
    header = ["pattern", "shape", "seed"]
    for bits in GRID_BITS:
        header += [f"affine {bits}b KL (bits/w)", f"turboquant {bits}b", f"--codebook {bits}b"]
    print_table(
        "quantize grid: tiny 3-layer models, group 32, KL vs float32 over 16 x 64 tokens; "
        "turboquant columns: KL / affine KL (bits/weight, float32 scales)",
        header,
        rows,
    )
    return {bits: worst["turboquant", bits] for bits in GRID_BITS}


def main() -> None:
    args, blas = arguments()
    grid()
    if args.grid_only:
        return

    import mlx.core as mx
    from mlx.utils import tree_unflatten

    folder = e2b_shaped_checkpoint(args.layers)
    ids = [2, *mx.random.randint(5, 262_144, (args.prompt - 1,), key=mx.random.key(0)).tolist()]
    prompt = mx.array([ids])

    base = load_ours(folder)
    llm = llm_like_parameters(base)
    base.update(tree_unflatten(list(llm.items())))
    reference = base(prompt).astype(mx.float32)
    mx.eval(reference)
    float_run = engine("mlx-gemma4", base)
    timed_generation(float_run, ids[:16], 3)
    float_step = min(timed_generation(float_run, ids, args.decode)[1] for _ in range(args.rounds))
    del base, float_run
    mx.clear_cache()

    rows = [["float32", "-", "32.00", "0", "-", "1.000", f"{1 / float_step:.2f}", "-"]]
    for bits in (int(b) for b in args.bits.split(",")):
        models = {m: quantized_model(folder, llm, m, bits) for m in METHODS}
        runs = {m: engine("mlx-gemma4", model) for m, model in models.items()}
        for run in runs.values():
            timed_generation(run, ids[:16], 3)  # warm-up
        steps = {m: [] for m in METHODS}
        for _ in range(args.rounds):
            for method, run in runs.items():
                steps[method].append(timed_generation(run, ids, args.decode)[1])
        affine_step = min(steps["affine"])
        scores = {
            m: quality(model(prompt).astype(mx.float32), reference) for m, model in models.items()
        }
        for method, model in models.items():
            kl, agree = scores[method]
            step = min(steps[method])
            rows.append(
                [
                    method,
                    str(bits),
                    f"{bits_per_weight(model):.2f}",
                    f"{kl:.3g}",
                    _ratio(kl, scores["affine"][0]),
                    f"{agree:.3f}",
                    f"{1 / step:.2f}",
                    f"{affine_step / step:.2f}x",
                ]
            )
        del models, runs
        mx.clear_cache()

    print_table(
        f"quantize: E2B-shaped, {args.layers} layers, LLM-like projections, group {GROUP_SIZE}, "
        f"prompt {args.prompt}, {args.decode} tokens, best of {args.rounds}; "
        f"{mx.default_device()}, {blas}",
        [
            "method",
            "bits",
            "bits/weight",
            "KL vs float",
            "KL vs affine",
            "top-1 agree",
            "decode tok/s",
            "decode vs affine",
        ],
        rows,
    )

    if not args.no_kv and (Path(__file__).parent / "kv_cache.py").is_file():
        import kv_cache

        sys.argv = [sys.argv[0]] + (["--bundled-blas"] if args.bundled_blas else [])
        kv_cache.main()


if __name__ == "__main__":
    main()
