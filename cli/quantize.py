"""`gemma4 quantize --model SRC --out DST`: write a quantized checkpoint that `load_model` reads."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from mlx_gemma4.errors import Gemma4Error, QuantizationError

if TYPE_CHECKING:
    from mlx_gemma4.quantize.summary import QuantizationSummary

METHODS = ("affine", "turboquant")

Source = Annotated[
    str, typer.Option("--model", "-m", help="Checkpoint to quantize: local folder or Hub repo id.")
]
Target = Annotated[Path, typer.Option("--out", "-o", help="Folder to write.")]
Method = Annotated[str, typer.Option("--method", help="affine or turboquant.")]
Bits = Annotated[int, typer.Option("--bits", "-b", help="Bits per weight: 2-6 or 8.")]
GroupSize = Annotated[
    int | None, typer.Option("--group-size", "-g", help="32, 64 or 128 (default: by mode).")
]
Mode = Annotated[str, typer.Option("--mode", help="affine, mxfp4, nvfp4 or mxfp8 grids.")]
Recipe = Annotated[
    str,
    typer.Option(
        "--recipe",
        help="uniform; mixed (router, PLE projection at 8 bits); mixed-embeddings (also "
        "embeddings and LM head).",
    ),
]
Codebook = Annotated[
    bool,
    typer.Option(
        "--codebook",
        help="turboquant: Lloyd-Max codebooks (no biases) per layer, unless affine groups "
        "measure better for their bits.",
    ),
]
Seed = Annotated[int, typer.Option("--seed", help="turboquant: rotation seed.")]
Force = Annotated[bool, typer.Option("--force", help="Replace an existing --out folder.")]


class _Ticking(dict):
    """Per-module errors that advance the progress bar as each module is quantized."""

    def __init__(self, progress: Progress, task):
        super().__init__()
        self.progress, self.task = progress, task

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        self.progress.update(self.task, advance=1, description=key)


def quantize(
    model: Source,
    out: Target,
    method: Method = "affine",
    bits: Bits = 4,
    group_size: GroupSize = None,
    mode: Mode = "affine",
    recipe: Recipe = "uniform",
    codebook: Codebook = False,
    seed: Seed = 0,
    force: Force = False,
) -> None:
    """Quantize a checkpoint's weights (affine groups or TurboQuant-style) into a new folder."""
    from mlx_gemma4.quantize.affine import check_scheme, default_group_size, recipe_override
    from mlx_gemma4.quantize.turboquant import check_turboquant
    from mlx_gemma4.saving import require_writable_folder

    if method not in METHODS:
        raise QuantizationError(f"method {method!r} is unknown; supported: {', '.join(METHODS)}")
    if codebook and method != "turboquant":
        raise QuantizationError("--codebook needs --method turboquant")
    group_size = group_size or default_group_size(mode)
    if method == "turboquant":
        check_turboquant(bits, group_size, mode, codebook)
    else:
        check_scheme(bits, group_size, mode)
    override = recipe_override(recipe, group_size)
    out = out.expanduser()
    if out.exists() and out.resolve() == Path(model).expanduser().resolve():
        raise Gemma4Error(f"--out {out} is the source checkpoint; write somewhere else")
    if out.exists() and not force:
        raise Gemma4Error(f"{out} already exists; pass --force to replace it")
    require_writable_folder(out)

    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        result = _run(
            Console(stderr=True),
            model,
            out,
            method,
            bits,
            group_size,
            mode,
            override,
            codebook,
            seed,
        )
    finally:
        signal.signal(signal.SIGTERM, previous)
    scheme = "codebook" if codebook else mode
    title = f"{method} {bits}-bit {scheme}, group {group_size}, recipe {recipe}"
    Console().print(summary_table(title, result))


def _interrupt(signum, _frame) -> None:
    """SIGTERM ends the run as Ctrl-C does, so the half-written folder is removed."""
    raise KeyboardInterrupt(f"signal {signum}")


def _run(console, source, out, method, bits, group_size, mode, override, codebook, seed):
    from mlx_gemma4 import load_model
    from mlx_gemma4.quantize import quantize_model, turboquant_model
    from mlx_gemma4.quantize.summary import summarize
    from mlx_gemma4.saving import save_model, stored_dtype

    columns = (
        TextColumn("{task.fields[stage]:<10}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("[dim]{task.description}"),
    )
    # a bar only where someone watches: off a terminal it would leave a stray blank line
    bar = Progress(*columns, console=console, transient=True, disable=not console.is_terminal)
    with bar as progress:
        task = progress.add_task("", total=None, stage="loading")
        loaded = load_model(source)
        total = sum(1 for _, m in loaded.named_modules() if hasattr(m, "to_quantized"))
        progress.update(task, total=total, stage="quantizing")
        errors = _Ticking(progress, task)
        common = dict(bits=bits, group_size=group_size, mode=mode, override=override)
        if method == "turboquant":
            entry = turboquant_model(loaded, seed=seed, codebook=codebook, errors=errors, **common)
        else:
            entry = quantize_model(loaded, errors=errors, **common)
        progress.update(task, total=None, stage="writing", description=str(out))
        save_model(loaded, out, quantization=entry)
    return summarize(loaded, entry, out, dict(errors), stored_dtype(loaded.config.raw))


def _short(path: str) -> str:
    return path.removeprefix("language_model.")


def summary_table(title: str, result: QuantizationSummary) -> Table:
    """Bits per weight, size on disk, the worst and mean relative weight errors, float layers."""
    table = Table(title=title, show_header=False)
    table.add_column("", no_wrap=True)
    table.add_column("", justify="right")
    if result.bits_per_quantized_weight is not None:
        table.add_row("bits / weight, quantized modules", f"{result.bits_per_quantized_weight:.2f}")
    table.add_row("bits / weight, whole checkpoint", f"{result.bits_per_weight:.2f}")
    table.add_row("size on disk", f"{result.bytes_on_disk / 2**20:.1f} MiB")
    if result.mean_error is not None:
        table.add_row("relative weight error, mean", f"{result.mean_error:.4f}")
        for path, error in result.worst:
            table.add_row(f"  worst: {_short(path)}", f"{error:.4f}")
    kept = result.kept_in_float
    if kept:
        table.add_row(f"kept in float ({len(kept)})", ", ".join(map(_short, kept[:3])))
        if len(kept) > 3:
            table.add_row("", f"and {len(kept) - 3} more")
    table.add_row("written to", str(result.folder))
    return table
