"""One decode step of the MoE expert block at 26B-A4B shapes: fused kernels, twin, naive loop.

    python benchmarks/moe.py [--rounds 3] [--precision float32|4-bit|both] [--bundled-blas]

128 experts, top-8, hidden 2816, expert inner size 704; weights float (float32 on the CPU
backend, bfloat16 on Metal) or 4-bit affine with group size 64; 1 and 4 tokens. Each time is
the best over the rounds (round-robin) of the mean of REPEATS evaluated calls. The fused Metal
kernels run only on Metal; on other backends their column says so and nothing is claimed.

- kernel: `experts_metal`, the two fused Metal kernels (mlx_gemma4/models/moe_kernels.py)
- twin:   `experts_twin`, gather_mm / gather_qmm per projection (the path off Metal)
- naive:  a Python loop over each token's experts, one matmul (or quantized_matmul) each
"""

from __future__ import annotations

import time

import numpy as np
from common import arguments, print_table

EXPERTS, TOP_K, HIDDEN, INNER = 128, 8, 2816, 704
GROUP, BITS = 64, 4
TOKENS = (1, 4)
REPEATS = 5


def main() -> None:
    args, blas = arguments()
    import mlx.core as mx

    from mlx_gemma4.models.activations import geglu
    from mlx_gemma4.models.moe import ExpertLinear
    from mlx_gemma4.models.moe_kernels import experts_metal, experts_twin

    on_metal = mx.metal.is_available() and mx.default_device() == mx.gpu
    dtype = mx.bfloat16 if on_metal else mx.float32
    mx.random.seed(0)
    float_experts = (
        ExpertLinear(EXPERTS, HIDDEN, 2 * INNER),
        ExpertLinear(EXPERTS, INNER, HIDDEN),
    )
    for projection in float_experts:
        projection.set_dtype(dtype)
    mx.eval(float_experts[0].parameters(), float_experts[1].parameters())
    precisions = {}
    if args.precision in ("float32", "both"):
        precisions[str(dtype).removeprefix("mlx.core.")] = float_experts
    if args.precision in ("4-bit", "both"):
        quantized = tuple(p.to_quantized(GROUP, BITS) for p in float_experts)
        mx.eval(quantized[0].parameters(), quantized[1].parameters())
        precisions[f"{BITS}-bit g{GROUP}"] = quantized
    if args.precision == "4-bit":
        del float_experts  # 3 GB of float32 weights not timed

    def naive(x, indices, weights, gate_up, down):
        rows = []
        for t, chosen in enumerate(indices.tolist()):
            total = 0
            for j, e in enumerate(chosen):
                gate, up = mx.split(project(gate_up, e, x[t : t + 1]), 2, axis=-1)
                total = total + weights[t, j] * project(down, e, geglu(gate, up))
            rows.append(total)
        return mx.concatenate(rows)

    rng = np.random.default_rng(0)
    tasks, inputs = {}, {}
    for name, (gate_up, down) in precisions.items():
        for tokens in TOKENS:
            x = mx.random.normal((tokens, HIDDEN)).astype(dtype)
            chosen = np.stack([rng.permutation(EXPERTS)[:TOP_K] for _ in range(tokens)])
            indices = mx.array(chosen.astype(np.uint32))
            weights = mx.softmax(mx.random.normal((tokens, TOP_K)), axis=-1)
            call = (x, indices, weights, gate_up, down)
            inputs[(name, tokens)] = call
            tasks[(name, tokens, "naive")] = lambda c=call: naive(*c)
            tasks[(name, tokens, "twin")] = lambda c=call: experts_twin(*c)
            if on_metal:
                tasks[(name, tokens, "kernel")] = lambda c=call: experts_metal(*c)

    outputs = {key: task() for key, task in tasks.items()}  # warm-up, and agreement
    mx.eval(list(outputs.values()))
    errors = {}
    for (name, tokens, impl), out in outputs.items():
        reference = np.array(outputs[(name, tokens, "twin")].astype(mx.float32))
        ours = np.array(out.astype(mx.float32))
        errors[(name, tokens, impl)] = np.abs(ours - reference).max() / np.abs(reference).max()

    times = {key: [] for key in tasks}
    for _ in range(args.rounds):
        for key, task in tasks.items():
            start = time.perf_counter()
            for _ in range(REPEATS):
                mx.eval(task())
            times[key].append((time.perf_counter() - start) / REPEATS)
    best = {key: min(value) for key, value in times.items()}

    rows = []
    for name in precisions:
        for tokens in TOKENS:
            naive_s, twin_s = best[(name, tokens, "naive")], best[(name, tokens, "twin")]
            kernel_s = best.get((name, tokens, "kernel"))
            kernel_error = errors.get((name, tokens, "kernel"))
            rows.append(
                [
                    name,
                    str(tokens),
                    f"{naive_s * 1e3:.2f}",
                    f"{twin_s * 1e3:.2f}",
                    f"{kernel_s * 1e3:.2f}" if kernel_s else "n/a (no Metal)",
                    f"{naive_s / twin_s:.2f}x",
                    f"{twin_s / kernel_s:.2f}x" if kernel_s else "n/a",
                    f"{errors[(name, tokens, 'naive')]:.1e}"
                    + (f" / {kernel_error:.1e}" if kernel_error is not None else ""),
                ]
            )
    print_table(
        f"MoE decode step: {EXPERTS} experts, top-{TOP_K}, hidden {HIDDEN}, inner {INNER}; "
        f"best of {args.rounds} x mean of {REPEATS}; {mx.default_device()}, {blas}",
        [
            "weights",
            "tokens",
            "naive ms",
            "twin ms",
            "kernel ms",
            "twin vs naive",
            "kernel vs twin",
            "rel. diff vs twin (naive / kernel)",
        ],
        rows,
    )


def project(projection, expert: int, x):
    """One expert's projection of x: [1, in] -> [1, out], as a plain per-expert matmul."""
    import mlx.core as mx

    if "scales" not in projection:
        return x @ projection.weight[expert].T
    return mx.quantized_matmul(
        x,
        projection.weight[expert],
        projection.scales[expert],
        projection.biases[expert],
        transpose=True,
        group_size=projection.group_size,
        bits=projection.bits,
    )


if __name__ == "__main__":
    main()
