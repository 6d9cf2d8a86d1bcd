"""Prefill and decode through each implementation's model forward, on one E2B-shaped checkpoint.

    python benchmarks/forward.py [--prompt 512] [--decode 64] [--layers 5] [--bundled-blas]

Every implementation runs the same protocol in one process, float32, greedy: the prompt but
its last token fills the caches (only the cache states are evaluated, as generation loops do),
the last token gives the first logits, then one-token decode steps. Tokens must agree.
"""

from __future__ import annotations

import argparse
import sys

from common import IMPLEMENTATIONS, e2b_shaped_checkpoint, print_table, timed, use_openblas


def run(forward, make_cache, prompt, n_decode: int):
    import mlx.core as mx

    cache = make_cache()

    def prefill():
        forward(prompt[:, :-1], cache)
        mx.eval([c.state for c in cache])
        token = mx.argmax(forward(prompt[:, -1:], cache)[:, -1], axis=-1)
        mx.eval(token)
        return token

    token, prefill_s = timed(prefill)
    tokens = [token.item()]

    def decode():
        nonlocal token
        for _ in range(n_decode):
            token = mx.argmax(forward(token[:, None], cache)[:, -1], axis=-1)
            mx.eval(token)
            tokens.append(token.item())

    _, decode_s = timed(decode)
    return prefill_s, decode_s, tokens


def main() -> None:
    blas = use_openblas(sys.argv)
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--decode", type=int, default=64)
    parser.add_argument("--layers", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bundled-blas", action="store_true")
    args = parser.parse_args()

    import mlx.core as mx

    folder = e2b_shaped_checkpoint(args.layers)
    prompt = mx.random.randint(0, 262_144, (1, args.prompt), key=mx.random.key(0))
    loaded = {}
    for name, loader in IMPLEMENTATIONS.items():
        loaded[name] = loader(folder)
        run(*loaded[name], prompt[:, :16], 2)  # warm-up

    # repetitions interleave the implementations, so drift on a shared machine hits all alike
    samples = {name: [] for name in loaded}
    for _ in range(args.repeats):
        for name, (forward, make_cache) in loaded.items():
            mx.clear_cache()
            resident = mx.get_active_memory()
            mx.reset_peak_memory()
            prefill_s, decode_s, tokens = run(forward, make_cache, prompt, args.decode)
            samples[name].append((prefill_s, decode_s, tokens, mx.get_peak_memory() - resident))

    medians = {name: median_of(runs) for name, runs in samples.items()}
    ours = medians["mlx-gemma4"]
    peers = [v for k, v in medians.items() if k != "mlx-gemma4"]
    best_prefill = min(p[0] for p in peers)
    best_decode = min(p[1] for p in peers)
    rows = [
        [
            name,
            f"{args.prompt / prefill_s:.1f}",
            f"{args.decode / decode_s:.2f}",
            f"{working / 2**20:.0f}",
            f"{best_prefill / prefill_s:.2f}x",
            f"{best_decode / decode_s:.2f}x",
            "yes" if tokens == ours[2] else "NO",
        ]
        for name, (prefill_s, decode_s, tokens, working) in medians.items()
    ]
    print_table(
        f"forward: E2B-shaped, {args.layers} layers, float32, prompt {args.prompt}, "
        f"{args.decode} decode steps, median of {args.repeats}; {mx.default_device()}, {blas}",
        [
            "implementation",
            "prefill tok/s",
            "decode tok/s",
            "working MiB",
            "prefill vs best peer",
            "decode vs best peer",
            "same tokens",
        ],
        rows,
    )
    print("working MiB: peak memory above the loaded weights during the run")


def median_of(runs):
    prefill = sorted(r[0] for r in runs)[len(runs) // 2]
    decode = sorted(r[1] for r in runs)[len(runs) // 2]
    return prefill, decode, runs[0][2], max(r[3] for r in runs)


if __name__ == "__main__":
    main()
