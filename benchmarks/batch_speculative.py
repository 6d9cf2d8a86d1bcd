"""Speculative decoding in the batch engine: decode tokens/s of a batch with and without
drafting, on the E2B-shaped checkpoint.

    python benchmarks/batch_speculative.py [--rows 1 4] [--prompt 32] [--decode 16] [--k 4]
        [--rates 0.8,1.0] [--rounds 1] [--bundled-blas]

Greedy float32, every row a different random prompt. Drafters:
- an oracle that proposes each row's own greedy continuation, each token right with
  probability p, at no cost: the engine's own cost (the wider verify forward, the per-row
  rollback) at a controlled acceptance rate;
- the E2B-shaped assistant of benchmarks/speculative.py (random weights: it proposes almost
  nothing the target accepts): the cost of drafting that does not pay.
The draft length adapts (`DraftLength`, as for one sequence); "fixed K" rows draft K every
step (`DraftLength.adaptive = False`). Every drafted run must reproduce the plain run's
tokens. The figure: tokens generated over the seconds from the step after every row has its
first token to the last; each drafted run follows a plain run and its speed-up is the ratio
within that pair (median over rounds).
"""

from __future__ import annotations

import random
import statistics
import time

from common import base_parser, parse, print_table
from speculative import VOCAB, e2b_shaped_assistant
from structured import checkpoint_with_tokenizer


class OracleRows:
    """A row drafter proposing each row's greedy continuation (`truth`, by prompt), each
    token right with probability `rate`."""

    needs_hidden = False

    def __init__(self, truth: dict[tuple, list[int]], rate: float):
        self.truth, self.rate, self.random = truth, rate, random.Random(0)
        self.rows: list[list] = []  # [the row's continuation, tokens generated so far]

    def join(self, prompt):
        self.rows.append([self.truth[tuple(prompt)], 0])

    def keep_rows(self, rows):
        self.rows = [self.rows[i] for i in rows]

    def propose(self, tokens, hidden, k, sample):
        import mlx.core as mx

        drafts = []
        for truth, generated in self.rows:
            row = []
            for i in range(k):
                right = truth[min(generated + i, len(truth) - 1)]
                row.append(right if self.random.random() < self.rate else (right + 1) % VOCAB)
            drafts.append(row)
        return mx.array(drafts), [[None] * k for _ in self.rows]

    def commit(self, kept):
        for row, new in zip(self.rows, kept, strict=True):
            row[1] += len(new)


def run(model, processor, prompts, decode, drafter=None, k=0):
    """(each prompt's tokens, decode tokens/s, drafted, accepted) of one greedy batch."""
    from mlx_gemma4 import BatchGenerator

    engine = BatchGenerator(model, processor, draft_model=drafter, num_draft_tokens=k)
    ids = [engine.submit(p, max_tokens=decode) for p in prompts]
    tokens = {i: [] for i in ids}
    start, counted, last = None, 0, {}
    while not engine.done:
        responses = engine.step()
        if start is not None:
            counted += len(responses)
        for r in responses:
            tokens[r.request_id].append(r.token)
            last[r.request_id] = r
        if start is None and all(tokens.values()):
            start = time.perf_counter()
    seconds = time.perf_counter() - start
    drafted = sum(r.drafted_tokens for r in last.values())
    accepted = sum(r.accepted_tokens for r in last.values())
    return [tokens[i] for i in ids], counted / seconds, drafted, accepted


def main() -> None:
    parser = base_parser(rounds=1)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4], help="batch sizes")
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    parser.add_argument("--decode", type=int, default=16, help="tokens generated per row")
    parser.add_argument("--k", type=int, default=4, help="tokens drafted per row and step")
    parser.add_argument("--rates", default="0.8,1.0", help="the oracle's acceptance rates")
    args, blas = parse(parser)

    import mlx.core as mx

    from mlx_gemma4 import load, load_model
    from mlx_gemma4.speculative import DraftLength

    model, processor = load(checkpoint_with_tokenizer(args.layers))
    assistant = load_model(e2b_shaped_assistant(), dtype=mx.float32)
    mx.eval(model.parameters(), assistant.parameters())
    rates = [float(p) for p in args.rates.split(",")]
    table = []
    for n in args.rows:
        keys = mx.random.split(mx.random.key(n), n)
        prompts = [
            [2, *mx.random.randint(5, VOCAB, (args.prompt - 1,), key=key).tolist()] for key in keys
        ]
        truth_tokens = run(model, processor, prompts, args.decode + args.k + 1)[0]
        truth = {tuple(p): t for p, t in zip(prompts, truth_tokens, strict=True)}
        expected = [t[: args.decode] for t in truth_tokens]
        drafters = [
            *((p, f"oracle p={p}", True) for p in rates),
            ("assistant", "random assistant", True),
            (rates[0], f"oracle p={rates[0]}, fixed K", False),
            ("assistant", "random assistant, fixed K", False),
        ]
        for drafter, name, adaptive in drafters:
            DraftLength.adaptive = adaptive
            ratios, speeds, plain_speeds = [], [], []
            for _ in range(args.rounds):
                _, plain, _, _ = run(model, processor, prompts, args.decode)
                chosen = assistant if drafter == "assistant" else OracleRows(truth, drafter)
                tokens, speed, drafted, accepted = run(
                    model, processor, prompts, args.decode, chosen, args.k
                )
                if tokens != expected:
                    raise SystemExit(f"{n} rows, {name}: output differs from the plain batch")
                ratios.append(speed / plain)
                speeds.append(speed)
                plain_speeds.append(plain)
            rate = f"{accepted / drafted:.2f} of {drafted}" if drafted else "0 drafted"
            table.append(
                [
                    str(n),
                    name,
                    rate,
                    f"{statistics.median(plain_speeds):.2f}",
                    f"{statistics.median(speeds):.2f}",
                    f"{statistics.median(ratios):.2f}x",
                ]
            )
            print(" | ".join(table[-1]), flush=True)
    print_table(
        f"Batch speculative decoding, E2B-shaped checkpoint ({args.layers} layers, 262k "
        f"vocabulary), prompt {args.prompt}, {args.decode} tokens a row, K={args.k}, greedy "
        f"float32, CPU, {blas}; median of {args.rounds} pair(s)",
        ["rows", "drafter", "accepted", "plain tok/s", "drafted tok/s", "speed-up"],
        table,
    )


if __name__ == "__main__":
    main()
