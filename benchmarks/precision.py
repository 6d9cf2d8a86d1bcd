"""bfloat16 fidelity against transformers, and what the float32 islands cost.

    python benchmarks/precision.py [--samples 16] [--rounds 3] [--part fidelity|cost|both]
                                   [--bundled-blas]

Fidelity: on the tests' tiny jittered checkpoints (tests/checkpoints.py), each implementation's
bfloat16 output against its own float32 output, as relative L2 error averaged over `--samples`
inputs (text: 24-token prompts -> logits; vision: two images -> the tower's soft tokens; audio:
two clips -> tower + embedder). The ratio is ours over transformers'; the bar is 1.1.
The error includes the rounding of the weights to bfloat16, the same for both; the
"arithmetic" columns remove it by comparing against float32 runs of the bfloat16-rounded
weights, which isolates the precision of the computation itself.

Cost: a bfloat16 decoder (hidden 512, MLP 2048, 8 heads, 4 layers, 8K vocabulary), prefill of
128 tokens and 16 one-token decode steps, with the float32 islands on (the shipped policy) and
off (the norms as MLX's fused `rms_norm` in bfloat16, which rounds twice). Best of the rounds,
islands on and off alternating; and one norm call alone ([1, 512] and [128, 512], best of 5 x
200 calls). On the CPU backend bfloat16 matmuls dominate, so the cost is near noise there; a
Mac's Metal backend is where it would show, and none was available.
"""

from __future__ import annotations

import contextlib
import copy
import sys
import tempfile
import time
from pathlib import Path

from common import base_parser, parse, print_table

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))

TEXT_VARIANTS = ("dense", "ple_kv_shared", "k_eq_v", "moe_k_eq_v")
# (row label, checkpoint, part compared)
TOWERS = (
    ("vision (E2B-like)", "multimodal", "vision"),
    ("vision (31B-like: standardize, clipped)", "multimodal_bidirectional", "vision"),
    ("audio (tower + embedder)", "multimodal", "audio"),
)
COST_SHAPE = dict(
    vocab_size=8192,
    hidden_size=512,
    intermediate_size=2048,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=1,
    head_dim=64,
    global_head_dim=128,
    sliding_window=512,
    layer_types=["sliding_attention"] * 3 + ["full_attention"],
    final_logit_softcapping=30.0,
)
PREFILL, DECODE = 128, 16


def arithmetic_errors(part: str, folder: Path, reference, samples: int) -> tuple[float, float]:
    """Like `bfloat16_errors`, against float32 runs of the bfloat16-rounded weights."""
    import mlx.core as mx
    import numpy as np
    import torch
    from checkpoints import _ours, _theirs, precision_inputs, relative_l2

    from mlx_gemma4 import load_model

    ours16 = load_model(folder, dtype="bfloat16")
    ours_rounded = load_model(folder, dtype="bfloat16")
    ours_rounded.set_dtype(mx.float32)
    theirs16 = copy.deepcopy(reference).to(torch.bfloat16)
    theirs_rounded = copy.deepcopy(theirs16).to(torch.float32)
    ours, theirs = [], []
    for inputs in precision_inputs(part, samples):
        exact = _ours(part, ours_rounded, inputs)
        ours.append(relative_l2(_ours(part, ours16, inputs), exact))
        exact = _theirs(part, theirs_rounded, inputs)
        theirs.append(relative_l2(_theirs(part, theirs16, inputs), exact))
    return float(np.mean(ours)), float(np.mean(theirs))


def fidelity_rows(samples: int) -> list[list[str]]:
    from checkpoints import bfloat16_errors, build_multimodal, build_text

    jobs = [(v, v, "text") for v in TEXT_VARIANTS] + list(TOWERS)
    built, rows = {}, []
    with tempfile.TemporaryDirectory() as scratch:
        for label, checkpoint, part in jobs:
            if checkpoint not in built:
                folder = Path(scratch) / checkpoint
                if checkpoint.startswith("multimodal"):
                    bidirectional = checkpoint.endswith("bidirectional")
                    reference = build_multimodal(folder, bidirectional=bidirectional)
                else:
                    reference = build_text(checkpoint, folder)
                built[checkpoint] = folder, reference
            folder, reference = built[checkpoint]
            ours, theirs = bfloat16_errors(part, folder, reference, samples)
            ours_a, theirs_a = arithmetic_errors(part, folder, reference, samples)
            rows.append(
                [
                    label,
                    f"{ours:.4f}",
                    f"{theirs:.4f}",
                    f"**{ours / theirs:.2f}x**",
                    f"{ours_a:.4f}",
                    f"{theirs_a:.4f}",
                    f"{ours_a / theirs_a:.2f}x",
                ]
            )
            print(f"  {label}: {ours / theirs:.3f}x", file=sys.stderr, flush=True)
    return rows


@contextlib.contextmanager
def islands_off():
    """The norms as MLX's fused `rms_norm` in the input dtype (the policy before)."""
    import mlx.core as mx

    from mlx_gemma4.models import layers

    saved = layers.RMSNorm.__call__, layers.RMSNormNoScale.__call__
    layers.RMSNorm.__call__ = lambda self, x: mx.fast.rms_norm(x, self.weight, self.eps)
    layers.RMSNormNoScale.__call__ = lambda self, x: mx.fast.rms_norm(x, None, self.eps)
    try:
        yield
    finally:
        layers.RMSNorm.__call__, layers.RMSNormNoScale.__call__ = saved


def time_forward(model) -> tuple[float, float]:
    """(prefill seconds, median decode step seconds) of one greedy run."""
    import mlx.core as mx
    import numpy as np

    ids = mx.array(np.random.default_rng(0).integers(0, COST_SHAPE["vocab_size"], (1, PREFILL)))
    cache = model.make_cache()
    start = time.perf_counter()
    logits = model(ids, cache=cache)
    mx.eval(logits)
    prefill = time.perf_counter() - start
    token = logits[:, -1:].argmax(axis=-1)
    steps = []
    for _ in range(DECODE):
        start = time.perf_counter()
        logits = model(token, cache=cache)
        token = logits.argmax(axis=-1)
        mx.eval(token)
        steps.append(time.perf_counter() - start)
    return prefill, float(np.median(steps))


def cost_rows(rounds: int) -> list[list[str]]:
    import torch
    from checkpoints import save_reference
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    from mlx_gemma4 import load_model

    with tempfile.TemporaryDirectory() as scratch:
        torch.manual_seed(0)
        folder = save_reference(
            Gemma4ForCausalLM(Gemma4TextConfig(**COST_SHAPE)).eval(), Path(scratch)
        )
        model = load_model(folder, dtype="bfloat16")
    time_forward(model)  # warm-up: compiled kernels
    best = {"on": [float("inf")] * 2, "off": [float("inf")] * 2}
    for _ in range(rounds):
        for setting in ("on", "off"):
            with islands_off() if setting == "off" else contextlib.nullcontext():
                times = time_forward(model)
            best[setting] = [min(a, b) for a, b in zip(best[setting], times, strict=True)]
    rows = []
    for setting, (prefill, step) in best.items():
        rows.append(
            [
                f"float32 islands {setting}",
                f"{PREFILL / prefill:.1f}",
                f"{1 / step:.2f}",
                f"{best['on'][0] / prefill:.3f}x",
                f"{best['on'][1] / step:.3f}x",
            ]
        )
    return rows


def norm_rows() -> list[list[str]]:
    """Microseconds per bfloat16 RMSNorm call, the policy's norm against MLX's fused one."""
    import mlx.core as mx

    from mlx_gemma4.models.layers import RMSNorm

    norm = RMSNorm(512)
    norm.set_dtype(mx.bfloat16)
    rows = []
    for n in (1, 128):
        x = mx.random.normal((n, 512)).astype(mx.bfloat16)
        runs = {
            "float32, one rounding": lambda x=x: norm(x),
            "fused, in bfloat16": lambda x=x: mx.fast.rms_norm(x, norm.weight, norm.eps),
        }
        for name, run in runs.items():
            best = float("inf")
            for _ in range(5):
                start = time.perf_counter()
                for _ in range(200):
                    mx.eval(run())
                best = min(best, (time.perf_counter() - start) / 200)
            rows.append([f"[{n}, 512]", name, f"{best * 1e6:.1f}"])
    return rows


def main() -> None:
    parser = base_parser()
    parser.add_argument("--samples", type=int, default=16, help="inputs averaged per row")
    parser.add_argument("--part", choices=["fidelity", "cost", "both"], default="both")
    args, blas = parse(parser)
    import mlx.core as mx

    print(f"MLX {mx.__version__}, {mx.default_device()}, {blas}", file=sys.stderr)
    if args.part != "cost":
        print_table(
            f"bfloat16 error against float32, relative L2, mean of {args.samples} inputs",
            [
                "variant",
                "ours",
                "transformers",
                "ratio",
                "ours, arithmetic",
                "transformers, arithmetic",
                "ratio, arithmetic",
            ],
            fidelity_rows(args.samples),
        )
    if args.part != "fidelity":
        print_table(
            f"bfloat16 decoder, prefill {PREFILL} then {DECODE} decode steps "
            f"(best of {args.rounds})",
            [
                "policy",
                "prefill tok/s",
                "decode tok/s",
                "prefill speed vs on",
                "decode speed vs on",
            ],
            cost_rows(args.rounds),
        )
        print_table(
            "one bfloat16 RMSNorm call, microseconds (best of 5 x 200)",
            ["input", "norm", "us per call"],
            norm_rows(),
        )


if __name__ == "__main__":
    main()
