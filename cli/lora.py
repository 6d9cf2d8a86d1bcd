"""`gemma4 lora` trains a LoRA adapter on chat data; `gemma4 fuse` merges one into a checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mlx_gemma4.errors import Gemma4Error

from . import options

Data = Annotated[
    Path, typer.Option("--data", help="Folder with train.jsonl (and valid.jsonl) conversations.")
]
AdapterOut = Annotated[Path, typer.Option("--out", "-o", help="Adapter folder to write.")]
Rank = Annotated[int, typer.Option("--rank", "-r", min=1, help="LoRA rank.")]
Alpha = Annotated[float, typer.Option("--alpha", help="LoRA alpha (the update is alpha / rank).")]
Dropout = Annotated[float, typer.Option("--dropout", min=0.0, max=0.99, help="LoRA dropout.")]
Targets = Annotated[
    str,
    typer.Option(
        "--targets", help="Comma-separated: q,k,v,o,gate,up,down and experts (MoE stacks)."
    ),
]
Iters = Annotated[int, typer.Option("--iters", min=1, help="Training steps.")]
BatchSize = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Conversations a step.")]
LearningRate = Annotated[float, typer.Option("--learning-rate", "--lr", min=0.0, help="Step size.")]
Optimizer = Annotated[str, typer.Option("--optimizer", help="adam, adamw or sgd.")]
TrainVision = Annotated[
    bool,
    typer.Option(
        "--train-vision", metavar="", help="Adapt the vision tower too (audio stays frozen)."
    ),
]
GradCheckpoint = Annotated[
    bool,
    typer.Option(
        "--grad-checkpoint", metavar="", help="Recompute activations: less memory, slower."
    ),
]
ValEvery = Annotated[int, typer.Option("--val-every", min=0, help="Validate every N steps.")]
ValBatches = Annotated[
    int, typer.Option("--val-batches", min=0, help="Validation batches (0: all).")
]
SaveEvery = Annotated[int, typer.Option("--save-every", min=0, help="Checkpoint every N steps.")]
ReportEvery = Annotated[int, typer.Option("--report-every", min=1, help="Report every N steps.")]
Resume = Annotated[
    bool, typer.Option("--resume", metavar="", help="Continue the run checkpointed in --out.")
]
Force = Annotated[
    bool, typer.Option("--force", metavar="", help="Replace an adapter already in --out.")
]
MaxSeqLen = Annotated[int, typer.Option("--max-seq-len", min=2, help="Longest example (tokens).")]
Truncate = Annotated[
    bool,
    typer.Option(
        "--truncate/--refuse", metavar="", help="Cut over-long examples, or stop on the first one."
    ),
]
Seed = Annotated[int, typer.Option("--seed", help="Seed of the batch order and LoRA init.")]


def lora(
    data: Data,
    out: AdapterOut,
    model: options.Model = options.DEFAULT_MODEL,
    rank: Rank = 8,
    alpha: Alpha = 16.0,
    dropout: Dropout = 0.0,
    targets: Targets = "q,k,v,o,gate,up,down",
    iters: Iters = 1000,
    batch_size: BatchSize = 4,
    learning_rate: LearningRate = 1e-5,
    optimizer: Optimizer = "adam",
    train_vision: TrainVision = False,
    grad_checkpoint: GradCheckpoint = False,
    val_every: ValEvery = 100,
    val_batches: ValBatches = 25,
    save_every: SaveEvery = 100,
    report_every: ReportEvery = 10,
    resume: Resume = False,
    force: Force = False,
    max_seq_len: MaxSeqLen = 2048,
    truncate: Truncate = True,
    seed: Seed = 0,
    dtype: options.Dtype = None,
) -> None:
    """Train a LoRA adapter (QLoRA on a quantized model) on chat conversations."""
    import mlx.core as mx

    from mlx_gemma4 import load
    from mlx_gemma4.saving import require_writable_folder
    from mlx_gemma4.training import LoRASettings, TrainingOptions, load_dataset, train
    from mlx_gemma4.training.adapters import CONFIG_FILE
    from mlx_gemma4.training.data import require_data_folder

    names = tuple(t.strip() for t in targets.split(",") if t.strip())
    settings = LoRASettings(rank, alpha, dropout, names, train_vision)
    training = TrainingOptions(
        iters=iters,
        batch_size=batch_size,
        learning_rate=learning_rate,
        optimizer=optimizer,
        val_every=val_every,
        val_batches=val_batches,
        save_every=save_every,
        report_every=report_every,
        grad_checkpoint=grad_checkpoint,
        seed=seed,
    )
    out = require_writable_folder(out.expanduser())
    if (out / CONFIG_FILE).exists() and not (resume or force):
        raise Gemma4Error(
            f"{out} holds an adapter already; pass --resume to continue it, --force to replace it"
        )
    require_data_folder(data)  # before the model loads
    mx.random.seed(seed)
    loaded_model, processor = load(model, dtype=dtype)
    train_set, valid_set = load_dataset(
        processor, data, max_seq_len, "truncate" if truncate else "refuse"
    )
    pad = loaded_model.config.text_config.pad_token_id or 0
    result = train(
        loaded_model,
        train_set,
        valid_set,
        out,
        settings,
        training,
        resume=resume,
        pad_id=pad,
    )
    typer.echo(f"adapter written to {result.adapter.parent}", err=True)


def fuse(
    adapter: Annotated[Path, typer.Option("--adapter", "-a", help="Adapter folder.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Checkpoint folder to write.")],
    model: options.Model = options.DEFAULT_MODEL,
    bits: Annotated[
        int | None, typer.Option("--bits", help="Quantize the fused model to N bits (affine).")
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", metavar="", help="Replace an existing --out.")
    ] = False,
) -> None:
    """Merge a LoRA adapter into its model and write a checkpoint (re-quantized with --bits)."""
    from mlx_gemma4 import load_model
    from mlx_gemma4.quantize.affine import check_scheme
    from mlx_gemma4.saving import require_writable_folder
    from mlx_gemma4.training.adapters import read_adapter_config
    from mlx_gemma4.training.fuse import fuse as fuse_adapter

    if bits is not None:
        check_scheme(bits, 64)
    read_adapter_config(adapter)  # a bad adapter is refused before the model loads
    out = out.expanduser()
    if out.exists() and not force:
        raise Gemma4Error(f"{out} already exists; pass --force to replace it")
    require_writable_folder(out)
    folder = fuse_adapter(load_model(model), adapter, out, bits)
    typer.echo(f"fused model written to {folder}", err=True)
