"""The `gemma4` console script, run as a user runs it."""

from __future__ import annotations

import shutil
import subprocess
import sys

import mlx_gemma4


def gemma4(*args: str) -> subprocess.CompletedProcess:
    executable = shutil.which("gemma4")
    command = [executable] if executable else [sys.executable, "-m", "mlx_gemma4.cli"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=120)


def test_version():
    result = gemma4("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"mlx-gemma4 {mlx_gemma4.__version__}"


def test_info_on_a_ple_checkpoint(tiny):
    folder, _ = tiny("ple_kv_shared")
    result = gemma4("info", str(folder))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "PLE (E2B/E4B family)" in out
    assert "4 sliding (window 8), 2 full" in out
    assert "KV-shared layers      3" in out
    assert "float32" in out and "quantization          none" in out


def test_info_on_multimodal_moe_and_quantized(tiny, tmp_path):
    from mlx_gemma4 import load_model
    from mlx_gemma4.quantize import quantize_model
    from mlx_gemma4.saving import save_model

    folder, _ = tiny("multimodal")
    assert "modalities            text, vision, audio" in gemma4("info", str(folder)).stdout

    model = load_model(tiny("moe_k_eq_v")[0])
    save_model(model, tmp_path / "q", quantization=quantize_model(model, bits=4, group_size=32))
    out = gemma4("info", str(tmp_path / "q")).stdout
    assert "MoE (26B-A4B family)" in out and "experts               8, top 2" in out
    assert "affine 4-bit g32" in out


def test_bad_model_is_one_line_on_stderr(tmp_path):
    result = gemma4("info", str(tmp_path / "missing"))
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no such folder" in lines[0]
    assert "Traceback" not in result.stderr
