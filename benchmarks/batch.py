"""Batched decoding: total tokens/s at several concurrencies, mlx-gemma4's BatchGenerator beside
mlx-lm's, on one E2B-shaped checkpoint; and the time to first token of a request that arrives
while others decode.

    python benchmarks/batch.py [--layers 5] [--prompt 32] [--decode 8] [--rounds 2]
        [--concurrency 1 4 8 16 32] [--precision float32|4-bit|both] [--arrival 16]
        [--bundled-blas]
    python benchmarks/batch.py --matmul [--bundled-blas]

Each engine gets the same `concurrency` token-id prompts at once (mlx-lm's prefills them in one
batch) and decodes greedily, without stop tokens. The figure is steady-state decode throughput:
once every sequence has its first token, the tokens produced over the seconds the next `decode`
steps took, best of `rounds` (the engines take turns, each round draining the device first).
Total throughput at 16 sequences over 1 sequence is printed per engine and precision.

Time to first token: `arrival` sequences decode; a new prompt of `prompt` tokens is submitted and
timed until its first token comes out, both engines alike (mlx-lm's with room for one more).

`--matmul` instead times one E2B MLP weight (6144 x 1536) times 1-32 rows: a float32 GEMM, MLX's
4-bit `quantized_matmul`, `mx.dequantize` + GEMM, and the library's route for many rows
(`models/dequantize.py`: dequantized a slice of output rows at a time, then GEMM): how much a
decode step's cost grows with rows, and where dequantizing starts to pay (`layers.MATRIX_ROWS`).
Then the tied 262k-row LM head at 16 rows: both routes' time and the memory each needs beyond
its inputs.
"""

from __future__ import annotations

import gc
import time

from common import base_parser, e2b_shaped_checkpoint, load_mlx_lm, parse, print_table
from generate import quantize
from structured import checkpoint_with_tokenizer

LONG = 10_000  # max_tokens while measuring: no sequence ends inside the timed steps


class Ours:
    name = "mlx-gemma4"

    def __init__(self, model, processor, prompts: list[list[int]]):
        from mlx_gemma4 import BatchGenerator

        self.generator = BatchGenerator(model, processor, prefill_step_size=4096)
        self.started: set[int] = set()
        for prompt in prompts:
            self.generator.submit(prompt, max_tokens=LONG)
        self.rows = len(prompts)

    def step(self) -> list[int]:
        """One step; the ids of the requests that produced a token in it."""
        ids = [response.request_id for response in self.generator.step()]
        self.started.update(ids)
        return ids

    def add(self, prompt: list[int]) -> int:
        return self.generator.submit(prompt, max_tokens=LONG)

    def close(self) -> None:
        pass


class MlxLm:
    name = "mlx-lm"

    def __init__(self, model, prompts: list[list[int]], room: int = 0):
        from mlx_lm.generate import BatchGenerator

        self.generator = BatchGenerator(
            model,
            max_tokens=LONG,
            stop_tokens=[],
            prefill_step_size=4096,
            prefill_batch_size=len(prompts),
            completion_batch_size=len(prompts) + room,
        )
        self.started: set[int] = set()
        self.generator.insert(prompts, max_tokens=[LONG] * len(prompts))
        self.rows = len(prompts)

    def step(self) -> list[int]:
        _, generated = self.generator.next()
        ids = [response.uid for response in generated]
        self.started.update(ids)
        return ids

    def add(self, prompt: list[int]) -> int:
        return self.generator.insert([prompt], max_tokens=[LONG])[0]

    def close(self) -> None:
        self.generator.close()


def warm_up(engine) -> None:
    """Step until every sequence has produced a token (prefill done, decoding steadily)."""
    while len(engine.started) < engine.rows:
        engine.step()
    engine.step()


def decode_rate(engine, steps: int) -> float:
    import mlx.core as mx

    warm_up(engine)
    mx.synchronize()
    tokens, start = 0, time.perf_counter()
    for _ in range(steps):
        tokens += len(engine.step())
    seconds = time.perf_counter() - start
    engine.close()
    mx.clear_cache()
    return tokens / seconds


def first_token_seconds(engine, prompt: list[int]) -> float:
    import mlx.core as mx

    warm_up(engine)
    mx.synchronize()
    start = time.perf_counter()
    new = engine.add(prompt)
    while new not in engine.step():
        pass
    seconds = time.perf_counter() - start
    engine.close()
    mx.clear_cache()
    return seconds


def share_embedding_tables(ours, theirs) -> None:
    """Let mlx-lm's model read our copy of the two embedding tables (identical arrays, most of
    the checkpoint's bytes): two models fit the memory of a shared machine."""
    import mlx.core as mx

    mine, other = ours.language_model, theirs.language_model.model
    for name in ("embed_tokens", "embed_tokens_per_layer"):
        table, same = getattr(mine, name).weight, getattr(other, name).weight
        if table.shape == same.shape and mx.array_equal(table, same).item():
            getattr(other, name).weight = table


def engines(folder, precision: str) -> dict:
    """Engine name -> make(prompts, room=0): a fresh engine over one loaded model each."""
    import mlx.core as mx

    from mlx_gemma4 import load

    ours, processor = load(folder, dtype=mx.float32)
    theirs = load_mlx_lm(folder)
    share_embedding_tables(ours, theirs)
    if precision == "4-bit":
        quantize("mlx-gemma4", ours)
        quantize("mlx-lm", theirs)
    return {
        "mlx-gemma4": lambda prompts, room=0: Ours(ours, processor, prompts),
        "mlx-lm": lambda prompts, room=0: MlxLm(theirs, prompts, room),
    }


def best_ms(compute, rounds: int) -> float:
    import mlx.core as mx

    times = []
    for _ in range(max(rounds, 3)):
        start = time.perf_counter()
        mx.eval(compute())
        times.append(time.perf_counter() - start)
    return 1000 * min(times)


def matmul_scaling(rounds: int) -> None:
    import mlx.core as mx

    from mlx_gemma4.models.dequantize import dequantized_matmul

    weight = mx.random.normal((6144, 1536), key=mx.random.key(0)) * 0.02
    packed = mx.quantize(weight, group_size=64, bits=4)
    mx.eval(weight, packed)
    rows = []
    for n in (1, 2, 4, 8, 16, 32):
        x = mx.random.normal((n, 1536), key=mx.random.key(n))
        mx.eval(x)
        computes = [
            lambda x=x: x @ weight.T,
            lambda x=x: mx.quantized_matmul(x, *packed, group_size=64, bits=4),
            lambda x=x: x @ mx.dequantize(*packed, group_size=64, bits=4).T,
            lambda x=x: dequantized_matmul(x, *packed, group_size=64, bits=4),
        ]
        rows.append([n, *(f"{best_ms(compute, rounds):.1f}" for compute in computes)])
    print_table(
        "One 6144 x 1536 weight times n rows (ms, best of rounds)",
        [
            "rows",
            "float32 GEMM",
            "4-bit quantized_matmul",
            "mx.dequantize + GEMM",
            "dequantized_matmul (sliced)",
        ],
        rows,
    )


def lm_head(rows: int, rounds: int) -> None:
    """The tied 262k x 1536 4-bit head on `rows` rows: both routes' time and the memory each
    needs beyond its inputs (the float weight is made a slice at a time)."""
    import mlx.core as mx

    from mlx_gemma4.models.dequantize import dequantized_matmul

    packed = mx.quantize(
        mx.random.normal((262_144, 1536), key=mx.random.key(0)) * 0.02, group_size=64, bits=4
    )
    x = mx.random.normal((rows, 1536), key=mx.random.key(1))
    mx.eval(packed, x)
    mx.clear_cache()
    table = []
    for name, compute in (
        ("quantized_matmul", lambda: mx.quantized_matmul(x, *packed, group_size=64, bits=4)),
        ("dequantized_matmul", lambda: dequantized_matmul(x, *packed, group_size=64, bits=4)),
    ):
        ms = best_ms(compute, rounds)
        mx.clear_cache()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        mx.eval(compute())
        extra = (mx.get_peak_memory() - base) / 2**20
        table.append([name, f"{ms:.0f}", f"{extra:.0f}"])
    print_table(
        f"Tied 262,144 x 1536 4-bit LM head times {rows} rows",
        ["route", "ms (best of rounds)", "peak MiB beyond inputs"],
        table,
    )


def main() -> None:
    parser = base_parser(rounds=2)
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    parser.add_argument("--decode", type=int, default=8, help="timed decode steps")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    parser.add_argument("--precision", choices=["float32", "4-bit", "both"], default="both")
    parser.add_argument("--arrival", type=int, default=16, help="sequences decoding (0: skip)")
    parser.add_argument("--matmul", action="store_true", help="time matmuls by rows instead")
    args, blas = parse(parser)
    if args.matmul:
        print(blas)
        matmul_scaling(args.rounds)
        lm_head(16, args.rounds)
        return
    import numpy as np

    e2b_shaped_checkpoint(args.layers)
    folder = checkpoint_with_tokenizer(args.layers)
    rng = np.random.default_rng(0)

    def prompts(n: int) -> list[list[int]]:
        return [[2, *rng.integers(1000, 60_000, args.prompt - 1).tolist()] for _ in range(n)]

    precisions = ("float32", "4-bit") if args.precision == "both" else (args.precision,)
    rows, ttft_rows, scaling = [], [], []
    makers = {}
    for precision in precisions:
        makers.clear()  # the previous precision's models go before the next are loaded
        gc.collect()
        makers = engines(folder, precision)
        rates = {}
        for n in args.concurrency:
            batch = prompts(n)
            best = dict.fromkeys(makers, 0.0)
            for _ in range(args.rounds):
                for name, make in makers.items():
                    best[name] = max(best[name], decode_rate(make(batch), args.decode))
            rates[n] = best
            ratio = best["mlx-gemma4"] / best["mlx-lm"]
            row = [precision, n, f"{best['mlx-gemma4']:.2f}", f"{best['mlx-lm']:.2f}"]
            rows.append([*row, f"{ratio:.2f}x"])
            print(rows[-1], flush=True)
        if 1 in rates and 16 in rates:
            for name in makers:
                gain = rates[16][name] / rates[1][name]
                scaling.append([precision, name, f"{gain:.2f}x"])
                print(f"{precision} {name}: 16 sequences / 1 sequence = {gain:.2f}x", flush=True)
        if args.arrival:
            batch, late = prompts(args.arrival), prompts(1)[0]
            best = dict.fromkeys(makers, float("inf"))
            for _ in range(args.rounds):
                for name, make in makers.items():
                    seconds = first_token_seconds(make(batch, room=1), late)
                    best[name] = min(best[name], seconds)
            ratio = best["mlx-lm"] / best["mlx-gemma4"]
            ttft_rows.append(
                [precision, f"{best['mlx-gemma4']:.2f}", f"{best['mlx-lm']:.2f}", f"{ratio:.2f}x"]
            )
            print(ttft_rows[-1], flush=True)
    conditions = (
        f"{args.layers}-layer E2B-shaped checkpoint, prompts of {args.prompt} tokens, "
        f"{args.decode} timed steps, best of {args.rounds} ({blas})"
    )
    print_table(
        f"Total decode tokens/s, {conditions}",
        ["precision", "sequences", "mlx-gemma4", "mlx-lm", "ours / mlx-lm"],
        rows,
    )
    if scaling:
        print_table(
            "Total throughput, 16 sequences over 1", ["precision", "engine", "gain"], scaling
        )
    if ttft_rows:
        print_table(
            f"Time to first token (s) of a request arriving while {args.arrival} decode",
            ["precision", "mlx-gemma4", "mlx-lm", "mlx-lm / ours"],
            ttft_rows,
        )


if __name__ == "__main__":
    main()
