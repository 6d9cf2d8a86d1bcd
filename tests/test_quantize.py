"""Weight quantization: Lloyd-Max codebooks, rotations, rotated vs affine error, the CLI."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from checkpoints import as_unprivileged
from conftest import relative_error, to_numpy

from mlx_gemma4 import load_model
from mlx_gemma4.errors import QuantizationError
from mlx_gemma4.models.layers import CodebookLinear, Rotation, hadamard_blocks, is_hadamard_size
from mlx_gemma4.models.moe import QuantizedExpertLinear
from mlx_gemma4.quantize import (
    lloyd_max_codebook,
    mixed_recipe,
    quantize_model,
    turboquant_model,
)
from mlx_gemma4.quantize.turboquant import fit_affine, fit_codebook, rotate_model, rotation_signs
from mlx_gemma4.saving import save_model

# ----------------------------------------------------------------------------- test data


_POST_NORMS = re.compile(r"\.post_(attention|feedforward|per_layer_input)_?\w*norm\.")


def llm_like_tensor(key: str, array: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
    """The tensor as a trained LLM's might look to a quantizer, or None to keep it.

    Every projection gets Student-t (3 degrees of freedom) entries and two input channels ten
    times larger than the rest, at the original RMS. Two gains get trained-model scales, so
    that quantization perturbs the output instead of scrambling it: q/k norms at 0.25 (random
    gains of ~1 with attention scale 1.0 make attention near-argmax, and any perturbation
    flips it) and the post-attention / post-MLP / post-per-layer-input norms at 0.2 (each
    block a small update of the residual stream rather than most of it).
    """
    if array.ndim >= 2 and "proj" in key and "embed" not in key:
        entries = rng.standard_t(3.0, size=array.shape)
        entries[..., rng.choice(array.shape[-1], 2, replace=False)] *= 10.0
        rms = np.sqrt((array.astype(np.float64) ** 2).mean())
        return (entries * rms / np.sqrt((entries**2).mean())).astype(array.dtype)
    if key.endswith(("q_norm.weight", "k_norm.weight")):
        return array * 0.25
    if _POST_NORMS.search(key):
        return array * 0.2
    return None


def llm_like(source: Path, folder: Path, seed: int = 0) -> Path:
    """A copy of a tiny checkpoint with `llm_like_tensor` weights."""
    shutil.copytree(source, folder, dirs_exist_ok=True)
    rng = np.random.default_rng(seed)
    file = folder / "model.safetensors"
    weights = {}
    for key, value in mx.load(str(file)).items():
        changed = llm_like_tensor(key, np.array(value), rng)
        weights[key] = value if changed is None else mx.array(changed)
    mx.save_safetensors(str(file), weights, metadata={"format": "pt"})
    return folder


def heavy_tailed(rng, shape) -> np.ndarray:
    return rng.standard_t(3.0, size=shape).astype(np.float32)


def outlier_channels(rng, shape) -> np.ndarray:
    weight = rng.standard_normal(shape).astype(np.float32)
    weight[:, rng.choice(shape[1], 8, replace=False)] *= 20.0
    return weight


def mean_kl(reference_logits: mx.array, logits: mx.array) -> float:
    """Mean KL(float ‖ quantized) of the next-token distributions."""
    log_p = reference_logits - mx.logsumexp(reference_logits, axis=-1, keepdims=True)
    log_q = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return float((mx.exp(log_p) * (log_p - log_q)).sum(axis=-1).mean())


def relative_mse(weight: np.ndarray, approximation: np.ndarray) -> float:
    return float(((weight - approximation) ** 2).sum() / (weight**2).sum())


@pytest.fixture(scope="module")
def llm_checkpoint(tiny, chat_checkpoint, tmp_path_factory):
    """`llm_checkpoint(variant)`: an LLM-like copy of a tiny checkpoint (with tokenizer files)."""
    built = {}

    def get(variant: str) -> Path:
        if variant not in built:
            source = chat_checkpoint(variant)[0] if variant == "ple_kv_shared" else tiny(variant)[0]
            built[variant] = llm_like(source, tmp_path_factory.mktemp(f"{variant}-llm"))
        return built[variant]

    return get


# ----------------------------------------------------------------------------- codebooks


@pytest.mark.parametrize(("bits", "target"), [(1, 0.3634), (2, 0.1175), (3, 0.0345), (4, 0.0095)])
def test_lloyd_max_codebook_mse(bits, target):
    codebook, mse = lloyd_max_codebook(bits)
    assert len(codebook) == 2**bits and np.all(np.diff(codebook) > 0)
    assert abs(mse - target) / target < 0.01
    # and quantizing Gaussian samples with it gives that MSE
    samples = np.random.default_rng(bits).standard_normal(400_000)
    nearest = codebook[np.abs(samples[:, None] - codebook[None, :]).argmin(axis=1)]
    assert abs(((samples - nearest) ** 2).mean() - target) / target < 0.02


# ----------------------------------------------------------------------------- rotations


@pytest.mark.parametrize("dims", [64, 96, 256, 2816, 5376, 44])
def test_rotation_is_orthogonal_and_exact(dims):
    blocks = hadamard_blocks(dims)
    assert sum(blocks) == dims and all(is_hadamard_size(b) for b in blocks)
    rotation = Rotation(dims, rotation_signs(dims, seed=0, site=0))
    rng = np.random.default_rng(dims)
    weight = mx.array(rng.standard_normal((5, dims)).astype(np.float32))
    x = mx.array(rng.standard_normal((3, dims)).astype(np.float32))
    # W·x == (W·Rᵀ)·(R·x), with W·Rᵀ the rotated rows of W
    exact = x @ weight.T
    assert relative_error(to_numpy(rotation(x) @ rotation(weight).T), to_numpy(exact)) < 1e-5
    # inner products (so norms) survive
    gram = to_numpy(rotation(x) @ rotation(x).T)
    assert relative_error(gram, to_numpy(x @ x.T)) < 1e-5
    if dims <= 96:  # the whole matrix is orthogonal
        matrix = to_numpy(rotation(mx.eye(dims)))
        np.testing.assert_allclose(matrix @ matrix.T, np.eye(dims), atol=1e-5)


def test_5376_and_2816_are_block_diagonal():
    assert hadamard_blocks(5376) == (5120, 256) and not is_hadamard_size(5376)
    assert hadamard_blocks(2816) == (2560, 256) and not is_hadamard_size(2816)


@pytest.mark.parametrize("variant", ["ple_kv_shared", "moe_k_eq_v"])
def test_rotated_float_model_computes_the_same(tiny, token_ids, variant):
    folder, _ = tiny(variant)
    ids = mx.array(token_ids(1, 12))
    expected = to_numpy(load_model(folder)(ids))
    model = load_model(folder)
    rotated = rotate_model(model, seed=3)
    layer = model.language_model.layers[0]
    assert "input_rotation" in layer.self_attn and "inner_rotation" in layer.mlp
    if variant == "moe_k_eq_v":
        assert "expert_rotation" in layer
        assert any(path.endswith("experts.gate_up_proj") for path, *_ in rotated)
    assert relative_error(to_numpy(model(ids)), expected) < 1e-4


# ----------------------------------------------------------------------------- weight error


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("matrix", [heavy_tailed, outlier_channels])
def test_rotated_quantization_halves_affine_error(matrix, bits):
    group = 64
    weight = matrix(np.random.default_rng(bits), (128, 1024))
    packed = mx.quantize(mx.array(weight), group_size=group, bits=bits)
    affine = relative_mse(weight, np.array(mx.dequantize(*packed, group_size=group, bits=bits)))

    rotated = np.array(Rotation(1024, rotation_signs(1024, 0, 0))(mx.array(weight)))
    q, scales, biases = fit_affine(rotated, bits, group)
    restored = (q.reshape(128, -1, group) * scales[..., None] + biases[..., None]).reshape(128, -1)
    indices, code_scales, codebook = fit_codebook(rotated, bits, group)
    coded = (codebook[indices].reshape(128, -1, group) * code_scales[..., None]).reshape(128, -1)

    assert relative_mse(rotated, restored) <= 0.5 * affine
    assert relative_mse(rotated, coded) <= 0.5 * affine


@pytest.mark.parametrize("bits", [3, 4])
def test_turboquant_kl_beats_affine_on_llm_like_weights(llm_checkpoint, token_ids, bits):
    folder = llm_checkpoint("dense")
    ids = mx.array(token_ids(4, 64, seed=1))
    reference = load_model(folder)(ids)
    kl = {}
    for method, quantize in [("affine", quantize_model), ("turboquant", turboquant_model)]:
        model = load_model(folder)
        quantize(model, bits=bits, group_size=32)
        kl[method] = mean_kl(reference, model(ids))
    assert kl["turboquant"] <= 0.8 * kl["affine"], kl


# ----------------------------------------------------------------------------- the command


@pytest.fixture
def quantize_cli(gemma4):
    """`gemma4 quantize ARGS` in this process (conftest's runner)."""
    return lambda *args: gemma4("quantize", *args)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize(
    ("method", "extra"),
    [("affine", []), ("turboquant", []), ("turboquant", ["--codebook"])],
)
def test_quantize_command_end_to_end(
    quantize_cli, llm_checkpoint, tmp_path, token_ids, method, extra, bits
):
    source = llm_checkpoint("ple_kv_shared")
    target = tmp_path / "q"
    args = ["--model", str(source), "--out", str(target), "--method", method, "--bits", str(bits)]
    result = quantize_cli(*args, "--group-size", "32", *extra)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "bits / weight" in (result.stdout + result.stderr) and "kept in float" in (
        result.stdout + result.stderr
    )

    config = json.loads((target / "config.json").read_text())["quantization"]
    assert config["method"] == method and config["bits"] == bits and config["group_size"] == 32
    # PLE projections (16 wide) do not fit a group of 32: float, and said so
    assert config["model.layers.0.per_layer_projection"] is False  # mlx-lm's module path
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (target / name).is_file()
    assert not [p for p in tmp_path.iterdir() if p.name != "q"]  # no staging folder left

    model = load_model(target)
    attention = model.language_model.layers[0].self_attn
    # --codebook: a codebook per layer unless fitted groups measure better (test_turboquant_grid)
    kind = (CodebookLinear, nn.QuantizedLinear) if extra else nn.QuantizedLinear
    assert isinstance(attention.q_proj, kind) and attention.q_proj.bits == bits
    assert ("input_rotation" in attention) == (method == "turboquant")
    if method == "turboquant":
        assert config["rotation_seed"] == 0 and config["codebook"] == bool(extra)

    # the checkpoint holds exactly what quantizing in memory gives
    ids = mx.array(token_ids(1, 20))
    in_memory = load_model(source)
    if method == "turboquant":
        turboquant_model(in_memory, bits=bits, group_size=32, codebook=bool(extra))
    else:
        quantize_model(in_memory, bits=bits, group_size=32)
    logits = model(ids)
    assert relative_error(to_numpy(logits), to_numpy(in_memory(ids))) < 1e-5
    # at 8 bits, close to the float model (measured: 2.6% affine, 3.4% turboquant, 3.0% codebook)
    if bits == 8:
        expected = to_numpy(load_model(source)(ids))
        assert relative_error(to_numpy(logits), expected) < 0.06
    cache = model.make_cache()
    steps = [model(ids[:, :12], cache=cache)] + [
        model(ids[:, t : t + 1], cache=cache) for t in range(12, ids.shape[1])
    ]
    assert relative_error(to_numpy(mx.concatenate(steps, axis=1)), to_numpy(logits)) < 1e-4


def test_existing_target_needs_force(quantize_cli, tiny, tmp_path):
    source, _ = tiny("dense")
    target = tmp_path / "q"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    result = quantize_cli("--model", str(source), "--out", str(target), "--bits", "4", "-g", "32")
    assert result.returncode == 1 and "--force" in result.stderr
    assert [p.name for p in target.iterdir()] == ["keep.txt"]

    args = ["--model", str(source), "--out", str(target), "-g", "32", "--force"]
    result = quantize_cli(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not (target / "keep.txt").exists() and (target / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["q"]


@pytest.mark.parametrize("existing", [False, True])
def test_interrupted_write_leaves_nothing_half_written(
    quantize_cli, tiny, tmp_path, monkeypatch, existing
):
    import mlx_gemma4.saving

    source, _ = tiny("dense")
    target = tmp_path / "q"
    if existing:
        target.mkdir()
        (target / "keep.txt").write_text("mine")

    def interrupted(folder, weights, config, source):
        (Path(folder) / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(mlx_gemma4.saving, "write_checkpoint", interrupted)
    args = ["--model", str(source), "--out", str(target), "-g", "32", "--force"]
    result = quantize_cli(*args)
    assert result.returncode != 0
    assert [p.name for p in tmp_path.iterdir()] == (["q"] if existing else [])
    if existing:
        assert [p.name for p in target.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bits", "7"], "bits"),
        (["--mode", "mxfp4", "--group-size", "64"], "mxfp4 needs 4 bits and group size 32"),
        (["--method", "gptq"], "method"),
        (["--codebook"], "--codebook needs --method turboquant"),
        (["--recipe", "fancy"], "recipe"),
        (["--out", "SOURCE", "--force"], "is the source checkpoint"),
    ],
)
def test_bad_options_are_one_clear_error(quantize_cli, tiny, tmp_path, args, message):
    source, _ = tiny("dense")
    args = [str(source) if arg == "SOURCE" else arg for arg in args]
    result = quantize_cli("--model", str(source), "--out", str(tmp_path / "q"), *args)
    assert result.returncode == 1 and message in result.stderr
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("quantize", [quantize_model, turboquant_model])
def test_mixed_recipe_keeps_router_and_ple_projection_at_8_bits(tiny, quantize):
    for variant, sensitive in [
        ("moe_k_eq_v", "language_model.layers.0.router.proj"),
        ("ple_kv_shared", "language_model.per_layer_model_projection"),
    ]:
        model = load_model(tiny(variant)[0])
        entry = quantize(model, bits=3, group_size=32, override=mixed_recipe(32))
        modules = dict(model.named_modules())
        assert modules[sensitive].bits == 8 and entry[sensitive]["bits"] == 8
        assert modules["language_model.layers.0.self_attn.q_proj"].bits == 3
        assert modules["language_model.embed_tokens"].bits == 3
        if variant == "moe_k_eq_v":
            experts = modules["language_model.layers.0.experts.gate_up_proj"]
            assert isinstance(experts, QuantizedExpertLinear) and experts.bits == 3


@pytest.mark.parametrize("method", ["affine", "turboquant"])
def test_quantizing_a_quantized_checkpoint_is_refused(quantize_cli, tiny, tmp_path, method):
    source, _ = tiny("dense")
    first = tmp_path / "q4"
    assert quantize_cli("--model", str(source), "--out", str(first), "-g", "32").returncode == 0
    again = tmp_path / "q8"
    args = ["--model", str(first), "--out", str(again), "-b", "8", "-g", "32", "--method", method]
    result = quantize_cli(*args)
    assert result.returncode == 1 and not again.exists()
    assert "quantized already" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    quantize = quantize_model if method == "affine" else turboquant_model
    with pytest.raises(QuantizationError, match="quantized already"):
        quantize(load_model(first), bits=8, group_size=32)


def test_python_api_writes_the_same_checkpoint_as_the_cli(quantize_cli, tiny, tmp_path):
    source, _ = tiny("ple_kv_shared")
    assert (
        quantize_cli("--model", str(source), "--out", str(tmp_path / "cli"), "-g", "32").returncode
        == 0
    )
    model = load_model(source)
    save_model(model, tmp_path / "api", quantization=quantize_model(model, group_size=32))
    for name in ("config.json",):
        assert (tmp_path / "api" / name).read_text() == (tmp_path / "cli" / name).read_text()
    cli = mx.load(str(tmp_path / "cli" / "model.safetensors"))
    api = mx.load(str(tmp_path / "api" / "model.safetensors"))
    assert cli.keys() == api.keys()
    assert all(cli[k].dtype == api[k].dtype and mx.array_equal(cli[k], api[k]) for k in cli)


def test_unwritable_out_is_one_line_before_any_work(quantize_cli, tiny, tmp_path):
    source, _ = tiny("dense")
    (tmp_path / "file").write_text("")
    result = quantize_cli("--model", str(source), "--out", str(tmp_path / "file" / "q"))
    assert result.returncode == 1
    assert "cannot write" in result.stderr and "not a folder" in result.stderr

    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    missing = tmp_path / "missing"  # reading it would fail: the target is checked first
    command = [sys.executable, "-m", "mlx_gemma4.cli", "quantize", "--model", str(missing)]
    run = subprocess.run(
        as_unprivileged([*command, "--out", str(locked / "q")]),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert f"cannot write {locked / 'q'}: permission denied" in run.stderr


SLOW_WRITE = """
import sys, time
import mlx_gemma4.saving as saving
write = saving.write_checkpoint
def slow(folder, *args):
    write(folder, *args)
    print("written", flush=True)
    time.sleep(60)
saving.write_checkpoint = slow
from mlx_gemma4.cli.app import main
sys.argv = ["gemma4", "quantize", "--model", sys.argv[1], "--out", sys.argv[2], "-g", "32"]
main()
"""


def test_sigterm_during_quantize_removes_the_partial_folder(tiny, tmp_path):
    source, _ = tiny("dense")
    target = tmp_path / "out" / "q"
    target.parent.mkdir()
    process = subprocess.Popen(
        [sys.executable, "-c", SLOW_WRITE, str(source), str(target)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout.readline().strip() == "written"  # the write is under way
        assert [p.suffix for p in target.parent.iterdir()] == [".partial"]
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    finally:
        process.kill()
    assert process.returncode != 0
    assert list(target.parent.iterdir()) == []
