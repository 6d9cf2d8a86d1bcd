"""LoRA training speed and peak memory: mlx-gemma4's trainer against mlx-lm's (mlx_lm.tuner).

Same text-only E2B-shaped checkpoint (real layer shapes, few layers, 262k vocabulary), same
token sequences (single-turn chats encoded once by our processor, mlx-lm given the same ids
and the offset where the answer starts), LoRA rank 8 on q, k, v, o, gate, up, down of every
layer, Adam, float32, same batch size. Each library runs in its own process, so each peak
is its own. Tokens/s counts trained (answer) tokens, as mlx-lm's trainer counts them; the
first `--warmup` steps are left out.

    python benchmarks/lora.py --layers 4 --iters 8 --batch-size 2 --answer 96
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import CACHE, E2B_SHAPED, LAYER_TYPES, base_parser, parse, print_table  # noqa: E402

# mlx-lm names the LoRA targets by their paths inside a decoder layer
KEYS = tuple(f"self_attn.{t}_proj" for t in "qkvo") + tuple(
    f"mlp.{t}_proj" for t in ("gate", "up", "down")
)
RANK, ALPHA = 8, 16.0


def text_checkpoint(layers: int, vocab: int) -> Path:
    """A random text-only E2B-shaped checkpoint with the tests' tokenizer (built once);
    `vocab` below 262,144 shrinks the token and PLE tables where memory is short."""
    folder = CACHE / f"e2b-text-{layers}l-{vocab}v"
    if (folder / "tokenizer.json").exists():
        return folder
    import torch
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from checkpoints import save_reference, save_tokenizer

    print(f"building {folder} (once) ...", file=sys.stderr)
    config = Gemma4TextConfig(
        **{**E2B_SHAPED, "vocab_size": vocab, "vocab_size_per_layer_input": vocab},
        num_hidden_layers=layers,
        num_kv_shared_layers=2 if layers >= 5 else 0,  # sharing needs both kinds after it
        layer_types=(LAYER_TYPES * layers)[: layers - 1] + ["full_attention"],
    )
    torch.manual_seed(0)
    save_reference(Gemma4ForCausalLM(config).eval(), folder)
    save_tokenizer(folder)
    return folder


def conversations(n: int, answer_words: int) -> list[dict]:
    import numpy as np

    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "cloud", "green", "seven"]

    def text(k: int) -> str:
        return " ".join(rng.choice(words, k))

    return [
        {
            "messages": [
                {"role": "user", "content": text(answer_words // 2)},
                {"role": "assistant", "content": text(answer_words)},
            ]
        }
        for _ in range(n)
    ]


def run_ours(folder: Path, args) -> dict:
    import tempfile

    import mlx.core as mx

    from mlx_gemma4 import load
    from mlx_gemma4.training import LoRASettings, TrainingOptions, train
    from mlx_gemma4.training.data import TurnMarkers, encode_conversation

    model, processor = load(folder, dtype="float32")
    markers = TurnMarkers.of(processor)
    data = [
        encode_conversation(processor, c, markers)
        for c in conversations(args.examples, args.answer)
    ]
    mx.random.seed(0)
    mx.reset_peak_memory()
    with tempfile.TemporaryDirectory() as out:
        result = train(
            model,
            data,
            [],
            out,
            LoRASettings(rank=RANK, alpha=ALPHA),
            TrainingOptions(
                iters=args.iters,
                batch_size=args.batch_size,
                learning_rate=1e-5,
                save_every=0,
                report_every=1,
                grad_checkpoint=args.grad_checkpoint,
            ),
            progress=False,
        )
    timed = [r for r in result.reports if r.kind == "train"][args.warmup :]
    trained = sum(r.trained_tokens for r in timed)
    seconds = sum(r.trained_tokens / r.tokens_per_second for r in timed)
    return {
        "tokens_per_second": trained / seconds,
        "seconds_per_step": seconds / len(timed),
        "peak_gb": mx.get_peak_memory() / 1e9,
        "first_loss": result.losses[0],
    }


def run_mlx_lm(folder: Path, args) -> dict:
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx_lm.tuner.trainer import TrainingArgs, TrainingCallback, train
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model

    from mlx_gemma4 import load
    from mlx_gemma4.training.data import TurnMarkers, encode_conversation

    # the same token ids ours trains on; the answer starts at the first trained token
    _, processor = load(folder, dtype="float32")
    markers = TurnMarkers.of(processor)
    examples = [
        encode_conversation(processor, c, markers)
        for c in conversations(args.examples, args.answer)
    ]
    dataset = [(e.ids, e.trained.index(True) - 1) for e in examples]
    del processor

    model, _ = load_model(folder)
    model.set_dtype(mx.float32)
    model.freeze()
    mx.random.seed(0)
    config = {"rank": RANK, "scale": ALPHA / RANK, "dropout": 0.0, "keys": list(KEYS)}
    layers = len(model.layers) if hasattr(model, "layers") else len(model.model.layers)
    linear_to_lora_layers(model, layers, config)

    reports = []

    class Record(TrainingCallback):
        def on_train_loss_report(self, info):
            reports.append(info)

    mx.reset_peak_memory()
    train(
        model,
        optim.Adam(learning_rate=1e-5),
        dataset,
        None,
        TrainingArgs(
            batch_size=args.batch_size,
            iters=args.iters,
            steps_per_report=1,
            steps_per_save=10**9,
            max_seq_length=4096,
            adapter_file=str(Path("/tmp") / f"mlx-lm-bench-{time.time_ns()}.safetensors"),
            grad_checkpoint=args.grad_checkpoint,
        ),
        training_callback=Record(),
    )
    timed = reports[args.warmup :]  # one report a step
    seconds = sum(1 / r["iterations_per_second"] for r in timed)
    trained = sum(r["tokens_per_second"] / r["iterations_per_second"] for r in timed)
    return {
        "tokens_per_second": trained / seconds,
        "seconds_per_step": seconds / len(timed),
        "peak_gb": mx.get_peak_memory() / 1e9,
        "first_loss": reports[0]["train_loss"],
    }


def main() -> None:
    parser = base_parser(rounds=1)
    parser.add_argument("--iters", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the timing")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--examples", type=int, default=8)
    parser.add_argument("--answer", type=int, default=96, help="words in each answer")
    parser.add_argument("--grad-checkpoint", action="store_true")
    parser.add_argument("--vocab", type=int, default=262_144, help="vocabulary size")
    parser.add_argument("--only", choices=["ours", "mlx-lm"], help=argparse_hidden())
    args, blas = parse(parser)
    folder = text_checkpoint(args.layers, args.vocab)
    if args.only:
        run = run_ours if args.only == "ours" else run_mlx_lm
        print(json.dumps(run(folder, args)))
        return
    results = {}
    for name in ("ours", "mlx-lm"):
        command = [sys.executable, __file__, *sys.argv[1:], "--only", name]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode:
            sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
    ours, peer = results["ours"], results["mlx-lm"]
    rows = [
        [
            name,
            f"{r['tokens_per_second']:.1f}",
            f"{r['seconds_per_step']:.2f}",
            f"{r['peak_gb']:.2f}",
            f"{r['first_loss']:.3f}",
        ]
        for name, r in (("mlx-gemma4", ours), ("mlx-lm", peer))
    ]
    title = (
        f"LoRA training, E2B-shaped text checkpoint ({args.layers} layers, vocabulary "
        f"{args.vocab:,}), batch "
        f"{args.batch_size}, rank {RANK}, float32, {blas}; "
        f"speed {ours['tokens_per_second'] / peer['tokens_per_second']:.2f}x, "
        f"memory {ours['peak_gb'] / peer['peak_gb']:.2f}x"
    )
    print_table(title, ["trainer", "trained tok/s", "s / step", "peak GB", "first loss"], rows)


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
