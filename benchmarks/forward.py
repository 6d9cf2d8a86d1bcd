"""Prefill and decode through each implementation's model forward, on one E2B-shaped checkpoint.

    python benchmarks/forward.py [--prompt 512] [--decode 64] [--layers 5] [--bundled-blas]

All implementations run in one process, float32, greedy, on the same checkpoint and prompt. The
prompt but its last token fills the caches (only the cache states are evaluated, as generation
loops do); the last token gives the first logits; then one-token decode steps. To keep a shared
machine's drift out of the ratios, prefills alternate between implementations (best of
`--rounds`), and so does every single decode step (median step time). Tokens must agree.
"""

from __future__ import annotations

import statistics
import time

from common import (
    IMPLEMENTATIONS,
    arguments,
    e2b_shaped_checkpoint,
    forward_of,
    print_table,
)


class Runner:
    """One implementation's model, cache and last token, advanced a step at a time."""

    def __init__(self, forward, make_cache):
        self.forward, self.make_cache = forward, make_cache
        self.prefill_times: list[float] = []
        self.prefill_cpu: list[float] = []  # process CPU seconds: other tenants do not add to it
        self.step_times: list[float] = []
        self.tokens: list[int] = []

    def prefill(self, prompt) -> None:
        import mlx.core as mx

        start, cpu_start = time.perf_counter(), time.process_time()
        self.cache = self.make_cache()
        self.forward(prompt[:, :-1], self.cache)
        mx.eval([c.state for c in self.cache])
        self.token = mx.argmax(self.forward(prompt[:, -1:], self.cache)[:, -1], axis=-1)
        mx.eval(self.token)
        self.prefill_times.append(time.perf_counter() - start)
        self.prefill_cpu.append(time.process_time() - cpu_start)
        self.tokens = [self.token.item()]

    def step(self) -> None:
        import mlx.core as mx

        start = time.perf_counter()
        logits = self.forward(self.token[:, None], self.cache)
        self.token = mx.argmax(logits[:, -1], axis=-1)
        mx.eval(self.token)
        self.step_times.append(time.perf_counter() - start)
        self.tokens.append(self.token.item())


def main() -> None:
    args, blas = arguments()

    import mlx.core as mx

    folder = e2b_shaped_checkpoint(args.layers)
    prompt = mx.random.randint(0, 262_144, (1, args.prompt), key=mx.random.key(0))
    runners = {
        name: Runner(*forward_of(name, loader(folder))) for name, loader in IMPLEMENTATIONS.items()
    }
    for runner in runners.values():  # warm-up
        runner.prefill(prompt[:, :16])
        runner.step()
        runner.prefill_times.clear()
        runner.prefill_cpu.clear()
        runner.step_times.clear()

    working = dict.fromkeys(runners, 0)
    for _ in range(args.rounds):
        for name, runner in runners.items():
            mx.clear_cache()
            resident = mx.get_active_memory()
            mx.reset_peak_memory()
            runner.prefill(prompt)
            working[name] = max(working[name], mx.get_peak_memory() - resident)
    for _ in range(args.decode):
        for runner in runners.values():
            runner.step()

    ours = runners["mlx-gemma4"]
    peers = [r for name, r in runners.items() if name != "mlx-gemma4"]
    best_prefill = min(min(r.prefill_times) for r in peers)
    best_cpu = min(min(r.prefill_cpu) for r in peers)
    best_step = min(statistics.median(r.step_times) for r in peers)
    rows = []
    for name, r in runners.items():
        prefill_s, step_s = min(r.prefill_times), statistics.median(r.step_times)
        rows.append(
            [
                name,
                f"{args.prompt / prefill_s:.1f}",
                f"{1 / step_s:.2f}",
                f"{working[name] / 2**20:.0f}",
                f"{best_prefill / prefill_s:.2f}x",
                f"{best_cpu / min(r.prefill_cpu):.2f}x",
                f"{best_step / step_s:.2f}x",
                "yes" if r.tokens == ours.tokens else "NO",
            ]
        )
    print_table(
        f"forward: E2B-shaped, {args.layers} layers, float32, prompt {args.prompt}, "
        f"{args.decode} decode steps; {mx.default_device()}, {blas}",
        [
            "implementation",
            "prefill tok/s",
            "decode tok/s",
            "working MiB",
            "prefill vs best peer",
            "prefill CPU time vs best peer",
            "decode vs best peer",
            "same tokens",
        ],
        rows,
    )
    print("prefill: best of the rounds; decode: median step; working MiB: peak above the weights")


if __name__ == "__main__":
    main()
