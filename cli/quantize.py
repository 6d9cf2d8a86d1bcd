"""`gemma4 quantize --model SRC --out DST`: write a quantized checkpoint that `load_model` reads."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from mlx_gemma4.errors import Gemma4Error, QuantizationError

METHODS = ("affine", "turboquant")
WORST_SHOWN = 5

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

    loaded, entry, errors, n_weights = _run(
        Console(stderr=True), model, out, method, bits, group_size, mode, override, codebook, seed
    )
    scheme = "codebook" if codebook else mode
    title = f"{method} {bits}-bit {scheme}, group {group_size}, recipe {recipe}"
    Console().print(summary(title, loaded, entry, errors, n_weights, out))


def _run(console, source, out, method, bits, group_size, mode, override, codebook, seed):
    from mlx.utils import tree_flatten

    from mlx_gemma4 import load_model
    from mlx_gemma4.quantize import quantize_model, turboquant_model

    columns = (
        TextColumn("{task.fields[stage]:<10}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("[dim]{task.description}"),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("", total=None, stage="loading")
        loaded = load_model(source)
        n_weights = sum(p.size for _, p in tree_flatten(loaded.parameters()))
        stored_dtype = _stored_dtype(loaded.config.raw)
        total = sum(1 for _, m in loaded.named_modules() if hasattr(m, "to_quantized"))
        progress.update(task, total=total, stage="quantizing")
        errors = _Ticking(progress, task)
        common = dict(bits=bits, group_size=group_size, mode=mode, override=override)
        if method == "turboquant":
            entry = turboquant_model(loaded, seed=seed, codebook=codebook, errors=errors, **common)
        else:
            entry = quantize_model(loaded, errors=errors, **common)
        progress.update(task, total=None, stage="writing", description=str(out))
        if stored_dtype is not None:
            _cast_floats(loaded, stored_dtype)
        write_atomically(loaded, out, entry)
    return loaded, entry, dict(errors), n_weights


def _stored_dtype(raw: dict):
    """The dtype the source checkpoint was saved in (scales are written in it), if it says."""
    import mlx.core as mx

    text = raw.get("text_config", raw)
    name = raw.get("dtype") or raw.get("torch_dtype") or text.get("dtype")
    return {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}.get(name)


def _cast_floats(model, dtype) -> None:
    import mlx.core as mx
    from mlx.utils import tree_map

    model.update(
        tree_map(
            lambda p: p.astype(dtype) if mx.issubdtype(p.dtype, mx.floating) else p,
            model.parameters(),
        )
    )


def write_atomically(model, out: Path, entry: dict) -> None:
    """Save into a temporary folder beside `out`, then move it into place: an interrupted run
    leaves `out` as it was (absent, or the old checkpoint), never half-written."""
    from mlx_gemma4.saving import save_model

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    staging.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the result should not be
    old = None
    try:
        save_model(model, staging, quantization=entry)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / out.name)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if old is not None and not out.exists():
            os.replace(old / out.name, out)  # put the previous checkpoint back
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _short(path: str) -> str:
    return path.removeprefix("language_model.")


def _is_packed(module) -> bool:
    return hasattr(module, "bits") and hasattr(module, "scales")


def summary(title, model, entry, errors, n_weights, folder: Path) -> Table:
    """Bits per weight, size on disk, the worst and mean relative weight errors, float layers."""
    from mlx.utils import tree_flatten

    packed_bits = packed_weights = 0
    for _, module in model.named_modules():
        if _is_packed(module):
            params = dict(tree_flatten(module.parameters()))
            packed_bits += sum(p.nbytes * 8 for k, p in params.items() if k != "bias")
            packed_weights += module.weight.size * 32 // module.bits
    on_disk = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    kept = [path for path, value in entry.items() if value is False]

    table = Table(title=title, show_header=False)
    table.add_column("", no_wrap=True)
    table.add_column("", justify="right")
    if packed_weights:
        table.add_row("bits / weight, quantized modules", f"{packed_bits / packed_weights:.2f}")
    table.add_row("bits / weight, whole checkpoint", f"{on_disk * 8 / n_weights:.2f}")
    table.add_row("size on disk", f"{on_disk / 2**20:.1f} MiB")
    if errors:
        table.add_row("relative weight error, mean", f"{sum(errors.values()) / len(errors):.4f}")
        worst = sorted(errors.items(), key=lambda item: -item[1])[:WORST_SHOWN]
        for path, error in worst:
            table.add_row(f"  worst: {_short(path)}", f"{error:.4f}")
    if kept:
        table.add_row(f"kept in float ({len(kept)})", ", ".join(map(_short, kept[:3])))
        if len(kept) > 3:
            table.add_row("", f"and {len(kept) - 3} more")
    table.add_row("written to", str(folder))
    return table
