"""One rank's expert work when tensor parallelism splits a MoE block in two: experts cut
"inside" (every expert's inner width halved) against "across" (each rank holds half the
experts whole), beside the whole block on one rank.

    python benchmarks/expert_split.py [--rounds 5] [--bundled-blas]

The collectives are left out on purpose: on this machine two ranks share two cores, so their
polling and scheduling swamp the compute (benchmarks/distributed.py), while what the split
decides is how much each rank computes. Each rank's share is built with the package's own
modules as `model.shard` leaves them on rank 0 (`Experts` of the cut shape; `ExpertSlice`'s
remapping, whose choices of the other rank's experts get weight zero), and its output is
summed with nothing. Shapes: 26B-A4B's (128 experts of width 704, top 8, hidden 2816) and
the distributed benchmark's (32 of width 512, top 4, hidden 2048); float32; routing drawn at
random; 1 token (a decode step) and 64 (a prefill chunk). Each time is the best over the
rounds of the mean of REPEATS evaluated calls.
"""

from __future__ import annotations

import argparse

from common import parse, print_table

SHAPES = {  # name: (experts, top k, hidden, inner)
    "26B-A4B": (128, 8, 2816, 704),
    "bench moe": (32, 4, 2048, 512),
}
TOKENS = (1, 64)
REPEATS = 5


class NoLink:
    """Stands for the group's all_sum: each rank's share is timed alone."""

    @staticmethod
    def all_sum(x):
        return x


def shares(experts: int, hidden: int, inner: int) -> dict:
    """The whole block and rank 0's share of it under each split, as callables."""
    from mlx_gemma4.config import TextConfig
    from mlx_gemma4.models.moe import Experts
    from mlx_gemma4.models.sharding import ExpertSlice

    def block(count: int, width: int) -> Experts:
        config = TextConfig(num_experts=count, hidden_size=hidden, moe_intermediate_size=width)
        return Experts(config)

    return {
        "whole (1 rank)": block(experts, inner),
        "inside (rank 0 of 2)": block(experts, inner // 2),
        "across (rank 0 of 2)": ExpertSlice(block(experts // 2, inner), 0, experts // 2, NoLink),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--bundled-blas", action="store_true", help="do not preload OpenBLAS")
    args, blas = parse(parser)
    import time

    import mlx.core as mx

    mx.random.seed(0)
    rows = []
    for shape, (experts, top_k, hidden, inner) in SHAPES.items():
        modules = shares(experts, hidden, inner)
        for module in modules.values():
            mx.eval(module.parameters())
        for tokens in TOKENS:
            x = mx.random.normal((tokens, hidden))
            scores = mx.random.normal((tokens, experts))
            indices = mx.argpartition(-scores, kth=top_k - 1, axis=-1)[:, :top_k]
            weights = mx.softmax(mx.take_along_axis(scores, indices, axis=-1), axis=-1)
            mx.eval(x, indices, weights)
            best = {name: float("inf") for name in modules}
            for _ in range(args.rounds):
                for name, module in modules.items():
                    mx.eval(module(x, indices, weights))  # warm
                    start = time.perf_counter()
                    for _ in range(REPEATS):
                        mx.eval(module(x, indices, weights))
                    best[name] = min(best[name], (time.perf_counter() - start) / REPEATS)
            whole = best["whole (1 rank)"]
            for name, seconds in best.items():
                rows.append([shape, tokens, name, f"{seconds * 1e3:.2f}", f"{seconds / whole:.2f}"])
    print_table(
        f"one rank's expert work, float32, best of {args.rounds} rounds, {blas}",
        ["shape", "tokens", "split", "ms per call", "of the whole"],
        rows,
    )


if __name__ == "__main__":
    main()
