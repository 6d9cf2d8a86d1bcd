"""Quantized copies of test checkpoints, made the ways users make them: ours (affine,
turboquant, codebook; from Python and from `gemma4 quantize`) and mlx-vlm's converter's."""

from __future__ import annotations

import shutil
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from conftest import to_numpy
from typer.testing import CliRunner

from mlx_gemma4 import load_model
from mlx_gemma4.cli.app import app
from mlx_gemma4.quantize import quantize_model, turboquant_model
from mlx_gemma4.saving import save_model

# 8 bits keeps a tiny random model within a few percent of its float logits (4 bits moves
# them by tens of percent), so a broken media path stands out against quantization noise.
BITS, GROUP = 8, 32
# Mean |difference| / mean |logit| against the float model: measured 0.06-0.07 at 8 bits with
# media (0.04-0.05 on text alone); over 1.0 when the media's soft tokens are missing or garbage.
CLOSE, FAR = 0.12, 0.5


def mean_relative_error(ours: mx.array, reference: mx.array) -> float:
    ours, reference = to_numpy(ours), to_numpy(reference)
    return float(np.abs(ours - reference).mean() / np.abs(reference).mean())


def quantize_into(maker: str, source, target) -> None:
    if maker == "mlx-vlm":
        pytest.importorskip("mlx_vlm")
        args = ["--hf-path", str(source), "--mlx-path", str(target), "-q"]
        args += ["--q-bits", str(BITS), "--q-group-size", str(GROUP)]
        run = subprocess.run(
            [sys.executable, "-m", "mlx_vlm", "convert", *args], capture_output=True, text=True
        )
        assert run.returncode == 0, run.stderr[-2000:]
        for name in ("tokenizer.json", "tokenizer_config.json"):  # as the Hub repos ship them
            if not (target / name).exists():
                shutil.copy2(source / name, target / name)
        return
    if maker == "cli-affine":
        args = ["--model", str(source), "--out", str(target), "-b", str(BITS), "-g", str(GROUP)]
        result = CliRunner().invoke(app, ["quantize", *args])
        assert result.exit_code == 0, result.output
        return
    model = load_model(source)
    if maker == "affine":
        entry = quantize_model(model, bits=BITS, group_size=GROUP)
    else:
        entry = turboquant_model(model, bits=BITS, group_size=GROUP, codebook=maker == "codebook")
    save_model(model, target, quantization=entry)
