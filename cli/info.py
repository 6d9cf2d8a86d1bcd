"""`gemma4 info MODEL`: what a checkpoint is, without running it."""

from __future__ import annotations

from collections import Counter

import mlx.nn as nn
import typer
from mlx.utils import tree_flatten
from rich.console import Console
from rich.table import Table

from mlx_gemma4.config import FULL, SLIDING


def _quantization_summary(model: nn.Module) -> str:
    schemes = Counter(
        f"{m.mode} {m.bits}-bit g{m.group_size}"
        for _, m in model.named_modules()
        if hasattr(m, "bits") and hasattr(m, "group_size")
    )
    if not schemes:
        return "none"
    return ", ".join(f"{scheme} ({count} modules)" for scheme, count in schemes.most_common())


def _heads(text) -> str:
    heads = f"{text.num_attention_heads} query, {text.num_key_value_heads} KV"
    if text.num_global_key_value_heads:
        heads += f" ({text.num_global_key_value_heads} on full layers)"
    return heads


def _parameters(model: nn.Module) -> str:
    """Millions of weights (packed ones counted unpacked): the text decoder, then each tower."""
    from mlx_lm.utils import get_total_parameters

    parts = {"text decoder": [model.language_model]}
    if "lm_head" in model:
        parts["text decoder"].append(model.lm_head)
    for name in ("vision", "audio"):
        if f"{name}_tower" in model:
            parts[name] = [model[f"{name}_tower"], model[f"embed_{name}"]]
    # gemma4_unified: encoder-free embedders instead of towers
    if "vision_embedder" in model:
        parts["vision"] = [model.vision_embedder, model.embed_vision]
    if "audio_tower" not in model and "embed_audio" in model:
        parts["audio"] = [model.embed_audio]
    counts = {name: sum(map(get_total_parameters, modules)) for name, modules in parts.items()}
    return ", ".join(f"{count / 1e6:,.2f} M {name}" for name, count in counts.items())


def describe(model: nn.Module) -> dict[str, str]:
    """The facts `gemma4 info` prints, as label -> text."""
    text = model.config.text_config
    kinds = Counter(text.layer_types)
    params = tree_flatten(model.parameters())
    dtypes = Counter(str(p.dtype).removeprefix("mlx.core.") for _, p in params)
    towers = {
        "vision": ("vision_tower", "vision_embedder"),
        "audio": ("audio_tower", "embed_audio"),
    }
    modalities = ["text"] + [name for name, kinds in towers.items() if model.towers & set(kinds)]
    return {
        "variant": text.variant,
        "parameters": _parameters(model),
        "context length": f"{text.max_position_embeddings:,} tokens",
        "layers": str(text.num_hidden_layers),
        "layer types": f"{kinds[SLIDING]} sliding (window {text.sliding_window}), "
        f"{kinds[FULL]} full",
        "hidden size": str(text.hidden_size),
        "heads": _heads(text),
        "KV-shared layers": str(text.num_kv_shared_layers),
        "per-layer embeddings": str(text.hidden_size_per_layer_input or "no"),
        "experts": f"{text.num_experts}, top {text.top_k_experts}"
        if text.enable_moe_block
        else "no",
        "dtype": ", ".join(dtypes),
        "quantization": _quantization_summary(model),
        "modalities": ", ".join(modalities),
        "path": str(model.path),
    }


def info(
    model: str = typer.Argument(..., help="Local folder or Hub repo id."),
    context: int | None = typer.Option(
        None, "--context", min=1, help="Also print the memory this many tokens need."
    ),
    batch: int = typer.Option(1, "--batch", min=1, help="Sequences decoded together."),
    kv_bits: int | None = typer.Option(
        None, "--kv-bits", help="Quantized KV cache bits for full-attention layers (2-6, 8)."
    ),
) -> None:
    """Show a checkpoint's variant, size, layers, dtype, quantization and modalities; with
    --context, what that context needs in memory (weights, KV cache, prefill peak).

    A folder holding only config.json, or a Hub repo id (only its config.json is downloaded),
    is described from the config alone: no weights are read."""
    from mlx_gemma4.kv_quant import KVQuantization
    from mlx_gemma4.loading import require_target_model
    from mlx_gemma4.memory import estimate_memory, model_for_estimate

    kv_quantization = KVQuantization.from_bits(kv_bits)  # refuse bad bits before loading
    described, weights_read = model_for_estimate(model)
    require_target_model(described)
    facts = describe(described)
    facts["weights"] = (
        "read from the checkpoint"
        if weights_read
        else "not read: sizes from config.json (in the dtype loading would use)"
    )
    if context is not None:
        estimate = estimate_memory(described, context, batch=batch, kv_quantization=kv_quantization)
        facts.update({f"memory: {k}": v for k, v in estimate.breakdown().items()})
    table = Table(show_header=False, box=None)
    for label, value in facts.items():
        table.add_row(f"[bold]{label}[/]", value)
    Console().print(table)
