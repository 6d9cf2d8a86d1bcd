"""Shared benchmark plumbing: an E2B-shaped checkpoint, the peers' loaders, BLAS choice, tables."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

OPENBLAS = Path("/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0")
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mlx-gemma4-bench"

# E2B's real layer shapes (hidden 1536, MLP 6144, 8 heads, 1 KV head, head dims 256 / 512,
# PLE 256, 262k vocabulary) with few layers; the last two share K/V, as E2B's later layers do.
E2B_SHAPED = dict(
    vocab_size=262_144,
    hidden_size=1536,
    intermediate_size=6144,
    num_attention_heads=8,
    num_key_value_heads=1,
    head_dim=256,
    global_head_dim=512,
    hidden_size_per_layer_input=256,
    vocab_size_per_layer_input=262_144,
    use_double_wide_mlp=True,
    sliding_window=512,
    final_logit_softcapping=30.0,
)
LAYER_TYPES = ["sliding_attention", "sliding_attention", "full_attention"]
# A token vision tower, for checkpoints whose vision is not what they time.
TOKEN_VISION = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=32,
)


def base_parser(rounds: int = 3) -> argparse.ArgumentParser:
    """The options every benchmark takes: checkpoint depth, rounds, which BLAS."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=5, help="decoder layers in the checkpoint")
    parser.add_argument("--rounds", type=int, default=rounds, help="round-robin repetitions")
    parser.add_argument("--bundled-blas", action="store_true", help="do not preload OpenBLAS")
    return parser


def parse(parser: argparse.ArgumentParser) -> tuple[argparse.Namespace, str]:
    """The parsed command line, and which BLAS this run uses (re-executing to preload it)."""
    blas = use_openblas(sys.argv)
    return parser.parse_args(), blas


def arguments() -> tuple[argparse.Namespace, str]:
    """The command line of the engine comparisons (forward, generate, vision, audio, moe)."""
    parser = base_parser()
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens")
    parser.add_argument("--decode", type=int, default=64, help="generated tokens")
    parser.add_argument("--precision", choices=["float32", "4-bit", "both"], default="both")
    parser.add_argument(
        "--unified", action="store_true", help="Gemma 4 12B's encoder-free embedders (unified.py)"
    )
    return parse(parser)


def use_openblas(argv: list[str]) -> str:
    """Re-exec with OpenBLAS preloaded when it is installed (all implementations gain alike)."""
    if "--bundled-blas" in argv or sys.platform == "darwin":
        return "MLX's bundled BLAS"
    if not OPENBLAS.exists():
        return "MLX's bundled BLAS (install libopenblas0-pthread for ~10x faster float32 GEMM)"
    if str(OPENBLAS) not in os.environ.get("LD_PRELOAD", ""):
        os.environ["LD_PRELOAD"] = str(OPENBLAS)
        os.execv(sys.executable, [sys.executable, *sys.argv])
    return f"OpenBLAS ({OPENBLAS})"


def e2b_shaped_checkpoint(layers: int = 5, shared: int = 2, real_vision: bool = False) -> Path:
    """Build (once, then reuse) a random multimodal E2B-shaped checkpoint all three can load.

    The vision tower is a token one unless `real_vision` asks for E2B's (768 wide, 16 layers).
    """
    # the layers before the shared ones must hold both attention kinds for the shared to read
    shared = max(0, min(shared, layers - len(LAYER_TYPES)))
    folder = CACHE / f"e2b-shaped-{layers}l-{shared}s{'-vision' if real_vision else ''}"
    if (folder / "config.json").exists():
        return folder
    from transformers import Gemma4Config, Gemma4TextConfig, Gemma4VisionConfig

    text = Gemma4TextConfig(
        **E2B_SHAPED,
        num_hidden_layers=layers,
        num_kv_shared_layers=shared,
        layer_types=(LAYER_TYPES * layers)[: layers - 1] + ["full_attention"],
    )
    vision = Gemma4VisionConfig(**({} if real_vision else TOKEN_VISION))
    return build_checkpoint(Gemma4Config(text_config=text, vision_config=vision), folder)


def build_checkpoint(config, folder: Path, jittered: bool = False) -> Path:
    """A random transformers Gemma 4 model of `config` (seed 0), saved to `folder`."""
    import torch
    from transformers import Gemma4ForConditionalGeneration

    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from checkpoints import jitter, save_reference

    print(f"building {folder} (once) ...", file=sys.stderr)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = Gemma4ForConditionalGeneration(config)
    if jittered:
        jitter(model, 0)
    save_reference(model.eval(), folder)
    return folder


def load_ours(folder: Path):
    import mlx.core as mx

    from mlx_gemma4 import load_model

    return load_model(folder, dtype=mx.float32)


def load_mlx_lm(folder: Path):
    import mlx.core as mx
    from mlx_lm.utils import load_model

    model, _ = load_model(folder)
    model.set_dtype(mx.float32)
    return model


def load_mlx_vlm(folder: Path):
    import mlx.core as mx
    from mlx_vlm.utils import load_model

    model = load_model(folder)
    model.set_dtype(mx.float32)
    return model


IMPLEMENTATIONS = {"mlx-gemma4": load_ours, "mlx-lm": load_mlx_lm, "mlx-vlm": load_mlx_vlm}


def forward_of(name: str, model):
    """(forward(ids, cache) -> logits, make_cache) through each library's text model."""
    if name == "mlx-vlm":
        language = model.language_model
        return (lambda ids, cache: language(ids, cache=cache).logits), language.make_cache
    return model, model.make_cache


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print(f"\n{title}")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
