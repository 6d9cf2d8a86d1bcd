"""Speculative decoding on the E2B-shaped checkpoint: decode tokens/s with and without drafting.

    python benchmarks/speculative.py [--decode 32] [--prompt 64] [--ks 2,4,6] [--bundled-blas]
        [--precision float32|4-bit|both] [--acceptance 0,0.5,0.8,1] [--drafters assistant,fixed]

Greedy decoding, float32 and 4-bit (every linear and embedding, group 64). Drafters:
- an E2B-shaped assistant (random weights: it proposes almost nothing the target accepts), with
  the sparse centroid head; its cost and the adaptive draft length are what it measures;
- an oracle that proposes the target's own greedy token with probability p (0, 0.5, 0.8, 1),
  a wrong one otherwise, at no cost: the engine's own cost at a controlled acceptance rate.
Every drafted run must reproduce the plain run's tokens. Decode tokens/s is measured from the
first token to the last; each drafted run follows a plain run of the same precision and its
speed-up is the ratio within that pair (median over rounds), so machine load weighs alike on
both. "CPU-time ratio" is the plain run's process CPU time over the drafted run's (whole runs,
prompt included): the work each did, which other jobs on a loaded machine disturb far less.
"fixed K" rows draft K every step (`DraftLength.adaptive = False`): the raw engine.
"""

from __future__ import annotations

import random
import statistics
import time

from common import CACHE, base_parser, e2b_shaped_checkpoint, load_ours, parse, print_table

VOCAB = 262_144


def e2b_shaped_assistant():
    """A random assistant in the E2B assistant's family: 4 narrow layers reading the target's
    K/V, 2048-centroid head, the target's vocabulary (built once, then reused)."""
    folder = CACHE / "e2b-shaped-assistant"
    if (folder / "config.json").exists():
        return folder
    import sys
    from pathlib import Path

    import torch
    from transformers import (
        Gemma4AssistantConfig,
        Gemma4AssistantForCausalLM,
        Gemma4TextConfig,
    )

    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from checkpoints import save_reference

    text = Gemma4TextConfig(
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=2048,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        global_head_dim=512,
        layer_types=["sliding_attention"] * 3 + ["full_attention"],
        sliding_window=512,
        hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=0,
    )
    config = Gemma4AssistantConfig(
        text_config=text, backbone_hidden_size=1536, use_ordered_embeddings=True
    )
    torch.manual_seed(0)
    model = Gemma4AssistantForCausalLM(config).eval()
    model.masked_embedding.token_ordering.copy_(torch.randperm(VOCAB))
    return save_reference(model, folder)


class OracleDrafter:
    """Proposes the target's greedy continuation, each token right with probability `rate`."""

    needs_hidden = False

    def __init__(self, truth: list[int], prompt: list[int], prompt_cache, rate: float):
        self.truth, self.prompt, self.prompt_cache = truth, prompt, prompt_cache
        self.rate, self.random = rate, random.Random(0)

    def begin(self, prompt):
        pass

    def propose(self, token, hidden, k, sample):
        import mlx.core as mx

        done = len(self.prompt_cache.tokens) - len(self.prompt) + 1  # `token` included
        out = []
        for i in range(k):
            right = self.truth[min(done + i, len(self.truth) - 1)]
            out.append(right if self.random.random() < self.rate else (right + 1) % VOCAB)
        return [mx.array([t]) for t in out], [None] * k

    def commit(self, kept):
        pass


def decode(model, ids, n, drafter=None, k=0):
    """(tokens, decode tokens/s, drafted, accepted) of one greedy run."""
    import mlx.core as mx

    from mlx_gemma4 import PromptCache
    from mlx_gemma4.generation import generate_step, prompt_inputs
    from mlx_gemma4.options import SamplingOptions
    from mlx_gemma4.processing.processor import Media
    from mlx_gemma4.speculative import DraftStats, speculative_generate_step

    cache = PromptCache(model)
    inputs = prompt_inputs(model, ids, Media(), cache)
    stats = DraftStats()
    if drafter is None:
        greedy = lambda x: mx.argmax(x, -1)  # noqa: E731
        steps = generate_step(model, ids, inputs, cache, greedy, [], normalize=False)
    else:
        if isinstance(drafter, float):
            drafter = OracleDrafter(TRUTH[id(model)], ids, cache, drafter)
        steps = speculative_generate_step(
            model, drafter, ids, inputs, cache, SamplingOptions(), [], 2048, k, stats
        )
    tokens, stamps = [], []
    for token in steps:
        tokens.append(token)
        stamps.append(time.perf_counter())
        if len(tokens) == n:
            break
    return tokens, (n - 1) / (stamps[-1] - stamps[0]), stats.drafted, stats.accepted


TRUTH: dict = {}  # model -> its greedy continuation (for the oracle)


def main() -> None:
    parser = base_parser(rounds=1)
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    parser.add_argument("--decode", type=int, default=32, help="generated tokens")
    parser.add_argument("--ks", "--draft-tokens", default="2,4,6", help="draft lengths")
    parser.add_argument(
        "--acceptance", default="0,0.5,0.8,1", help="the oracle's rates p ('' for none)"
    )
    parser.add_argument(
        "--drafters", default="assistant,fixed", help="also: 'assistant', 'fixed' (p=0.8, fixed K)"
    )
    parser.add_argument("--precision", choices=["float32", "4-bit", "both"], default="both")
    args, blas = parse(parser)

    import mlx.core as mx

    from mlx_gemma4 import load_model
    from mlx_gemma4.quantize import quantize_model
    from mlx_gemma4.speculative import DraftLength

    folder = e2b_shaped_checkpoint(args.layers)
    assistant_folder = e2b_shaped_assistant()
    ids = [2, *mx.random.randint(5, VOCAB, (args.prompt - 1,), key=mx.random.key(0)).tolist()]
    ks = [int(k) for k in args.ks.split(",")]
    rates = [float(p) for p in args.acceptance.split(",") if p]
    extra = args.drafters.split(",")
    precisions = ("float32", "4-bit") if args.precision == "both" else (args.precision,)
    rows = []
    for precision in precisions:
        model, assistant = load_ours(folder), load_model(assistant_folder, dtype=mx.float32)
        if precision == "4-bit":
            quantize_model(model, bits=4, group_size=64)
            quantize_model(assistant, bits=4, group_size=64)
        mx.eval(model.parameters(), assistant.parameters())
        TRUTH[id(model)] = decode(model, ids, args.decode + max(ks) + 1)[0]
        truth = TRUTH[id(model)][: args.decode]
        drafters = [(p, f"oracle p={p}", True) for p in rates]
        if "assistant" in extra:
            drafters.append((assistant, "assistant", True))
        if "fixed" in extra:
            drafters.append((0.8, "oracle p=0.8, fixed K", False))
        for k in ks:
            for drafter, name, adaptive in drafters:
                DraftLength.adaptive = adaptive
                # each drafted run right after a plain one: the pair sees the same load
                ratios, speeds, plain_speeds, cpu_ratios = [], [], [], []
                for _ in range(args.rounds):
                    cpu = time.process_time()
                    _, plain, _, _ = decode(model, ids, args.decode)
                    plain_cpu, cpu = time.process_time() - cpu, time.process_time()
                    tokens, speed, drafted, accepted = decode(model, ids, args.decode, drafter, k)
                    cpu_ratios.append(plain_cpu / (time.process_time() - cpu))
                    if tokens != truth:
                        raise SystemExit(f"{precision} {name} K={k}: output differs from plain")
                    ratios.append(speed / plain)
                    speeds.append(speed)
                    plain_speeds.append(plain)
                rate = f"{accepted / drafted:.2f} of {drafted}" if drafted else "0 drafted"
                rows.append(
                    [
                        precision,
                        name,
                        str(k),
                        rate,
                        f"{statistics.median(plain_speeds):.2f}",
                        f"{statistics.median(speeds):.2f}",
                        f"{statistics.median(ratios):.2f}x",
                        f"{statistics.median(cpu_ratios):.2f}x",
                    ]
                )
                print(" | ".join(rows[-1]), flush=True)
        DraftLength.adaptive = True
        del model, assistant
        mx.clear_cache()
    print_table(
        f"Speculative decoding, E2B-shaped checkpoint ({args.layers} layers, 262k vocabulary), "
        f"prompt {args.prompt}, {args.decode} tokens, greedy, CPU, {blas}; median of "
        f"{args.rounds} pair(s)",
        [
            "weights",
            "drafter",
            "K",
            "accepted",
            "plain tok/s",
            "drafted tok/s",
            "speed-up",
            "CPU-time ratio",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
