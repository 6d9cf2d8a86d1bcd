"""One rank against two: per-rank memory, tokens/s and time in collectives.

    python benchmarks/distributed.py [--prompt 64] [--decode 16] [--bundled-blas]

Two random checkpoints built once with transformers (float32 on the CPU): a dense one with
31B-like proportions at reduced width (hidden 2048, 16 query heads of 128, 8 KV heads on
sliding layers, one 256-wide KV head with K = V on full ones, MLP 8192, 4 layers, 32k
vocabulary) and a MoE one (32 experts of width 512, top 4, beside a dense MLP of 2048).
Each runs on 1 rank, then on 2 ranks (`mlx.launch -n 2 --backend ring`, loopback) in tensor
and pipeline mode, and the MoE one with experts split inside each expert and across ranks.

Per rank: weight bytes and peak memory after loading. Rank 0: prefill and decode tokens/s
(best of --rounds). Collectives: how many one decode step issues and their bytes (counted as
the step's graph is built), and the seconds those same collectives take alone on this link
(timed in a loop, without the step's compute), per step.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import CACHE, parse, print_table

VOCAB = 32_768
DENSE = dict(
    vocab_size=VOCAB,
    hidden_size=2048,
    intermediate_size=8192,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    global_head_dim=256,
    num_global_key_value_heads=1,
    attention_k_eq_v=True,
    num_hidden_layers=4,
    layer_types=["sliding_attention"] * 3 + ["full_attention"],
    sliding_window=512,
    hidden_size_per_layer_input=0,
    final_logit_softcapping=30.0,
)
MOE = dict(
    DENSE,
    intermediate_size=2048,
    enable_moe_block=True,
    num_experts=32,
    top_k_experts=4,
    moe_intermediate_size=512,
)
CHECKPOINTS = {"dense": DENSE, "moe": MOE}
# (label, checkpoint, ranks, extra worker arguments)
RUNS = [
    ("dense, 1 rank", "dense", 1, []),
    ("dense, tensor x2", "dense", 2, ["--mode", "tensor"]),
    ("dense, pipeline x2", "dense", 2, ["--mode", "pipeline"]),
    ("moe, 1 rank", "moe", 1, []),
    ("moe, tensor x2, experts inside", "moe", 2, ["--mode", "tensor"]),
    ("moe, tensor x2, experts across", "moe", 2, ["--mode", "tensor", "--experts", "across"]),
    ("moe, pipeline x2", "moe", 2, ["--mode", "pipeline"]),
]


def checkpoint(name: str) -> Path:
    folder = CACHE / f"distributed-{name}"
    if (folder / "config.json").exists():
        return folder
    import torch
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from checkpoints import save_reference

    print(f"building {folder} (once) ...", file=sys.stderr)
    torch.manual_seed(0)
    model = Gemma4ForCausalLM(Gemma4TextConfig(**CHECKPOINTS[name])).eval()
    save_reference(model, folder)
    return folder


# ----------------------------------------------------------------------------- one rank


class CollectiveLog:
    """Counts the collectives issued while a graph is built (MLX calls are lazy), by shape."""

    def __init__(self):
        import mlx.core as mx

        self.calls: list[tuple[str, tuple, object]] = []
        self.originals = {name: getattr(mx.distributed, name) for name in ("all_sum", "all_gather")}

    def __enter__(self):
        import mlx.core as mx

        for name, original in self.originals.items():

            def logged(x, *args, _name=name, _original=original, **kwargs):
                self.calls.append((_name, tuple(x.shape), x.dtype))
                return _original(x, *args, **kwargs)

            setattr(mx.distributed, name, logged)
        return self

    def __exit__(self, *exc):
        import mlx.core as mx

        for name, original in self.originals.items():
            setattr(mx.distributed, name, original)

    def nbytes(self) -> int:
        import math

        return sum(math.prod(shape) * dtype.size for _, shape, dtype in self.calls)

    def replay_seconds(self, group, rounds: int = 20) -> float:
        """Seconds the logged collectives take alone, per replay (best of `rounds`)."""
        import mlx.core as mx

        inputs = [(name, mx.ones(shape, dtype=dtype)) for name, shape, dtype in self.calls]
        mx.eval([x for _, x in inputs])
        best = float("inf")
        for _ in range(rounds):
            start = time.perf_counter()
            outs = [getattr(mx.distributed, name)(x, group=group) for name, x in inputs]
            mx.eval(outs)
            best = min(best, time.perf_counter() - start)
        return best


def worker(args: argparse.Namespace) -> None:
    import mlx.core as mx

    from mlx_gemma4 import load_model
    from mlx_gemma4.collectives import init
    from mlx_gemma4.models.sharding import weight_bytes

    group = init()
    mx.reset_peak_memory()
    if group.size() == 1:
        model = load_model(args.checkpoint)
    elif args.experts == "inside":
        model = load_model(args.checkpoint, group=group, mode=args.mode)
    else:
        model = load_model(args.checkpoint).shard(group, experts=args.experts)
    loaded_peak = mx.get_peak_memory()
    prompt = mx.random.randint(0, VOCAB, (1, args.prompt), key=mx.random.key(0))
    best_prefill, best_decode, log = float("inf"), float("inf"), None
    for _ in range(args.rounds):
        cache = model.make_cache()
        start = time.perf_counter()
        token = mx.argmax(model(prompt, cache=cache)[:, -1], axis=-1)
        mx.eval(token)
        best_prefill = min(best_prefill, time.perf_counter() - start)
        start = time.perf_counter()
        for step in range(args.decode):
            if step == 1 and log is None:
                with CollectiveLog() as log:
                    logits = model(token[:, None], cache=cache)
            else:
                logits = model(token[:, None], cache=cache)
            token = mx.argmax(logits[:, -1], axis=-1)
            mx.eval(token)
        best_decode = min(best_decode, time.perf_counter() - start)
    result = {
        "rank": group.rank(),
        "weight_bytes": weight_bytes(model),
        "load_peak": loaded_peak,
        "prefill_tps": args.prompt / best_prefill,
        "decode_tps": args.decode / best_decode,
        "collectives": len(log.calls) if group.size() > 1 else 0,
        "collective_bytes": log.nbytes() if group.size() > 1 else 0,
        "collective_seconds": log.replay_seconds(group) if group.size() > 1 else 0.0,
    }
    Path(args.out, f"rank{group.rank()}.json").write_text(json.dumps(result))


# ----------------------------------------------------------------------------- driver


LAUNCHER = "from mlx._distributed_utils.launch import main; main()"  # mlx.launch


def run(label: str, folder: Path, ranks: int, extra: list[str], args) -> list[dict]:
    """Each rank's results for one run: a plain process for 1 rank, mlx.launch for more."""
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, __file__, "--worker", "--checkpoint", str(folder)]
        command += ["--out", out, f"--prompt={args.prompt}", f"--decode={args.decode}"]
        command += [f"--rounds={args.rounds}", *extra]
        if ranks > 1:
            port = str(random.randrange(20_000, 60_000, 8))  # clear of other ring jobs' ports
            ring = ["-n", str(ranks), "--backend", "ring", "--starting-port", port, "--"]
            command = [sys.executable, "-c", LAUNCHER, *ring, *command]
        print(f"running {label} ...", file=sys.stderr)
        # a pipe held open: at end-of-input mlx.launch spins on its stdin, taking a core
        read_end, write_end = os.pipe()
        try:
            subprocess.run(command, check=True, stdin=read_end, timeout=1800)
        finally:
            os.close(read_end)
            os.close(write_end)
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(ranks)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--decode", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--bundled-blas", action="store_true")
    parser.add_argument("--only", help="run only the runs whose label contains this")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="tensor", help=argparse.SUPPRESS)
    parser.add_argument("--experts", default="inside", help=argparse.SUPPRESS)
    if "--worker" in sys.argv:
        worker(parser.parse_args())
        return
    args, blas = parse(parser)  # re-executes with OpenBLAS preloaded; the ranks inherit it
    rows = []
    for label, name, ranks, extra in RUNS:
        if args.only and args.only not in label:
            continue
        results = run(label, checkpoint(name), ranks, extra, args)
        first = results[0]
        rows.append(
            [
                label,
                " / ".join(f"{r['weight_bytes'] / 2**20:.0f}" for r in results),
                " / ".join(f"{r['load_peak'] / 2**20:.0f}" for r in results),
                f"{first['prefill_tps']:.1f}",
                f"{first['decode_tps']:.2f}",
                f"{first['collectives']} ({first['collective_bytes'] / 1024:.0f} KiB)",
                f"{first['collective_seconds'] * 1000:.1f}",
            ]
        )
    print_table(
        f"distributed, float32, prompt {args.prompt}, decode {args.decode}, {blas}",
        [
            "run",
            "weights per rank (MiB)",
            "peak at load (MiB)",
            "prefill tok/s",
            "decode tok/s",
            "collectives per decode step",
            "their time alone (ms/step)",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
