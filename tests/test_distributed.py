"""Tensor and pipeline parallelism: two real ranks on MLX's ring backend over loopback.

One `mlx.launch -n 2 --backend ring` run (tests/distributed_worker.py) checks every variant in
both modes; its results are read back and asserted here, one test per property.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

# `mlx.launch` itself, run by this interpreter (its console script may not be on PATH)
LAUNCH = [sys.executable, "-c", "from mlx._distributed_utils.launch import main; main()"]
VARIANTS = ("dense", "ple_kv_shared", "moe_k_eq_v")
MODES = ("tensor", "pipeline")
TIMEOUT = 600  # generous: a shared machine can stretch a launch several times over


def run_launch(command: list[str], stdin: str = "", cwd=None) -> subprocess.CompletedProcess:
    """Run `mlx.launch` in a session of its own, so a timeout kills every rank it started.

    Its stdin is a pipe kept open until it ends: at end-of-input `mlx.launch` spins on it,
    taking a core from the ranks."""
    read_end, write_end = os.pipe()
    os.write(write_end, stdin.encode())  # a few lines: they fit in the pipe's buffer
    process = subprocess.Popen(
        command,
        stdin=read_end,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
        start_new_session=True,
    )
    os.close(read_end)
    try:
        stdout, stderr = process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    finally:
        os.close(write_end)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def launch_command(*args: str) -> list[str]:
    """`mlx.launch -n 2 --backend ring` running this interpreter, on ports of its own: two ring
    jobs on one machine that share ports wait for each other forever at start-up."""
    port = str(random.randrange(20_000, 60_000, 8))
    ring = ["-n", "2", "--backend", "ring", "--starting-port", port]
    return [*LAUNCH, *ring, "--", sys.executable, *args]


def build_quantized(source: Path, folder: Path, group_size: int) -> Path:
    from mlx_gemma4 import load_model
    from mlx_gemma4.saving import save_model
    from quantize.affine import quantize_model

    model = load_model(source)
    save_model(model, folder, quantization=quantize_model(model, group_size=group_size))
    return folder


def build_with(folder: Path, variant: str, **overrides) -> Path:
    """A tiny checkpoint of `variant` with some sizes changed."""
    import torch
    from checkpoints import jitter, save_reference, text_config
    from transformers import Gemma4ForCausalLM

    config = text_config(variant)
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model = Gemma4ForCausalLM(config).eval()
    jitter(model, 0)
    save_reference(model, folder)
    return folder


@pytest.fixture(scope="module")
def ranks(tiny, tmp_path_factory):
    """What each of the two ranks saw: {rank: results}."""
    root = tmp_path_factory.mktemp("distributed")
    cases = [
        {"name": f"{variant}-{mode}", "path": str(tiny(variant)[0]), "mode": mode}
        for variant in VARIANTS
        for mode in MODES
    ]
    multimodal = str(tiny("multimodal")[0])
    cases += [
        {"name": f"multimodal-{mode}", "path": multimodal, "mode": mode, "image": True}
        for mode in MODES
    ]
    # 4-bit, with inner widths whose quantization groups split in two
    wide_moe = build_with(
        root / "wide-moe", "moe_k_eq_v", intermediate_size=128, moe_intermediate_size=64
    )
    quantized = build_quantized(wide_moe, root / "moe-4bit", group_size=32)
    cases += [{"name": f"4bit-{mode}", "path": str(quantized), "mode": mode} for mode in MODES]
    cases.append(
        {"name": "experts-across", "path": str(tiny("moe_k_eq_v")[0]), "experts": "across"}
    )
    bad = [
        {
            "name": "odd-heads",
            "path": str(build_with(root / "three-heads", "dense", num_attention_heads=3)),
            "mode": "tensor",
        },
    ]
    # the MLP's 96 inputs are 3 groups of 32: they cannot split in two, so the MLP stays whole
    dense_4bit = build_quantized(tiny("dense")[0], root / "dense-4bit", 32)
    cases.append({"name": "4bit-whole-mlp", "path": str(dense_4bit), "mode": "tensor"})
    out = root / "out"
    out.mkdir()
    spec = root / "spec.json"
    spec.write_text(json.dumps({"cases": cases, "bad": bad, "out": str(out), "lose_rank_1": True}))
    worker = Path(__file__).with_name("distributed_worker.py")
    run = run_launch(launch_command(str(worker), str(spec)), cwd=Path(__file__).parent)
    results = {}
    for rank in (0, 1):
        file = out / f"rank{rank}.json"
        assert file.is_file(), f"rank {rank} wrote nothing:\n{run.stdout}\n{run.stderr}"
        results[rank] = json.loads(file.read_text())
    return results


CASES = [f"{variant}-{mode}" for variant in VARIANTS for mode in MODES] + [
    "4bit-tensor",
    "4bit-pipeline",
    "experts-across",
    "4bit-whole-mlp",
    "multimodal-tensor",
    "multimodal-pipeline",
]


@pytest.mark.parametrize("case", CASES)
def test_sharded_logits_equal_whole_model(ranks, case):
    for rank in (0, 1):
        assert ranks[rank]["size"] == 2
        assert ranks[rank]["cases"][case]["max_error"] < 1e-4, (rank, case)


@pytest.mark.parametrize("case", CASES)
def test_greedy_generation_equal(ranks, case):
    for rank in (0, 1):
        seen = ranks[rank]["cases"][case]
        assert seen["tokens"] == seen["reference_tokens"], (rank, case)


@pytest.mark.parametrize("case", CASES)
def test_each_rank_holds_about_half_the_weights(ranks, case):
    shares = []
    for rank in (0, 1):
        seen = ranks[rank]["cases"][case]
        share = seen["weight_bytes"] / seen["whole_bytes"]
        # what MLX holds after loading is what the weights take: no whole tensor stays behind
        assert seen["resident_bytes"] <= seen["weight_bytes"] * 1.05 + 64 * 1024, (rank, case)
        shares.append(share)
    if case in ("4bit-whole-mlp", "multimodal-tensor"):
        # an MLP that stays whole, or the towers, replicated on both ranks
        assert all(0.6 < share < 0.9 for share in shares), shares
    elif case.endswith("tensor") or case == "experts-across":
        # norms, routers and single KV heads are replicated
        assert all(0.45 < share < 0.6 for share in shares), shares
    else:
        # a pipeline splits whole layers; the KV-shared block stays on one rank
        assert 0.95 < sum(shares) < 1.05 and max(shares) < 0.85, shares


def test_images_in_tensor_mode_equal_the_whole_model(ranks):
    for rank in (0, 1):
        assert ranks[rank]["cases"]["multimodal-tensor"]["image_error"] < 1e-4


def test_pipeline_refuses_media_on_every_rank_alike(ranks):
    for rank in (0, 1):
        refused = ranks[rank]["cases"]["multimodal-pipeline"]["image_refused"]
        assert refused == "media input is not supported with --distributed pipeline yet; use tensor"


def test_sizes_that_do_not_divide_give_one_clear_error(ranks):
    for rank in (0, 1):
        bad = ranks[rank]["bad"]
        assert bad["odd-heads"] == (
            "3 attention heads cannot be split across 2 ranks; use a group size that divides "
            "them, or --distributed pipeline"
        )


def test_a_lost_rank_is_one_clear_error(ranks):
    assert ranks[0]["lost"].startswith("another rank stopped or became unreachable")


# --------------------------------------------------------------------------- the command line


def launch_gemma4(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    """`mlx.launch -n 2 --backend ring -- gemma4 ARGS`."""
    return run_launch(launch_command("-m", "mlx_gemma4.cli", *map(str, args)), stdin)


def test_generate_distributed_prints_the_single_process_answer_once(chat_checkpoint, gemma4):
    folder, _ = chat_checkpoint("moe_k_eq_v")
    args = ["generate", "--model", folder, "-p", "hello there", "-n", "8", "--no-stats"]
    alone = gemma4(*args)
    assert alone.returncode == 0, alone.stderr
    run = launch_gemma4(*args, "--distributed", "tensor")
    assert run.stdout == alone.stdout, run.stderr  # rank 0 only: the answer appears once


def test_chat_distributed_follows_rank_0(chat_checkpoint):
    from conftest import run_chat

    folder, _ = chat_checkpoint("ple_kv_shared")
    turns = "hello\nhow are you\n/exit\n"  # mlx.launch never closes the ranks' stdin
    alone = run_chat(folder, turns, "--no-stats")
    assert alone.returncode == 0, alone.stderr
    args = ["chat", "--model", folder, "--max-tokens", "6", "--temp", "0", "--no-stats"]
    run = launch_gemma4(*args, "--distributed", "pipeline", stdin=turns)
    assert run.stdout == alone.stdout, run.stderr


def test_group_size_that_does_not_divide_is_one_line_from_rank_0(tmp_path):
    folder = build_with(tmp_path / "three-heads", "dense", num_attention_heads=3)
    run = launch_gemma4("generate", "--model", folder, "-p", "hi", "--distributed", "tensor")
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: 3 attention heads cannot be split across 2 ranks; use a group size that "
        "divides them, or --distributed pipeline"
    ], run.stderr
    assert "Traceback" not in run.stderr


def test_a_hostfile_that_does_not_parse_is_one_line(chat_checkpoint, gemma4, tmp_path):
    folder, _ = chat_checkpoint("dense")
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text('{"hosts": [')
    env = {"MLX_RANK": "0", "MLX_HOSTFILE": str(hostfile)}
    result = gemma4("generate", "--model", folder, "-p", "hi", "--distributed", "tensor", env=env)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: hostfile {hostfile} (MLX_HOSTFILE)")


def test_unknown_distributed_mode_is_refused(chat_checkpoint, gemma4):
    folder, _ = chat_checkpoint("dense")
    result = gemma4("generate", "--model", folder, "-p", "hi", "--distributed", "data")
    assert result.returncode == 1
    assert "--distributed data: use one of tensor, pipeline" in result.stderr


# --------------------------------------------------------------------------- plans, in process


def real_shaped_config(**sizes):
    """Our TextConfig of a released model's layer layout (sizes from the reference table)."""
    from checkpoints import to_hub_form
    from transformers import Gemma4TextConfig

    from mlx_gemma4.config import TextConfig

    return TextConfig.from_dict(to_hub_form(Gemma4TextConfig(**sizes).to_dict()))


E2B_LAYOUT = dict(
    num_hidden_layers=35,
    num_kv_shared_layers=20,
    layer_types=(["sliding_attention"] * 4 + ["full_attention"]) * 7,
)


def test_pipeline_keeps_kv_sharing_on_one_rank():
    from mlx_gemma4.models.sharding import layer_spans

    config = real_shaped_config(**E2B_LAYOUT)
    spans = layer_spans(config, 2)
    assert spans == [range(0, 13), range(13, 35)]  # 13 and 14 are the shared block's sources
    readers = range(config.first_kv_shared_layer, 35)
    assert all(config.kv_source(i) in spans[1] for i in readers)
    assert layer_spans(config, 4) == [range(0, 5), range(5, 9), range(9, 13), range(13, 35)]
    dense = real_shaped_config(num_hidden_layers=6, layer_types=["sliding_attention"] * 6)
    assert layer_spans(dense, 2) == [range(0, 3), range(3, 6)]
    assert layer_spans(dense, 2, split=[1, 5]) == [range(0, 1), range(1, 6)]


def test_pipeline_refuses_splits_it_cannot_honour():
    from mlx_gemma4.errors import DistributedError
    from mlx_gemma4.models.sharding import layer_spans

    kinds = ["sliding_attention"] * 2 + ["full_attention"] + ["sliding_attention"] * 4
    config = real_shaped_config(
        num_hidden_layers=8, num_kv_shared_layers=5, layer_types=[*kinds, "full_attention"]
    )  # layers 3-7 read layers 1 and 2
    with pytest.raises(DistributedError, match="3 ranks cannot split the 1 layers"):
        layer_spans(config, 3)
    with pytest.raises(DistributedError, match="layer split \\[2, 2\\] must give each of 2"):
        layer_spans(config, 2, split=[2, 2])
    with pytest.raises(DistributedError, match="separates the KV-shared layers 1-7"):
        layer_spans(config, 2, split=[3, 5])
    assert layer_spans(config, 2) == [range(0, 1), range(1, 8)]


@pytest.mark.parametrize(
    ("heads", "kv_heads", "size", "expected"),
    [
        (32, 16, 2, [(0, 8), (8, 8)]),  # 31B sliding layers: KV heads split
        (32, 4, 8, [(r // 2, 1) for r in range(8)]),  # 31B full layers on 8 ranks: shared
        (8, 1, 4, [(0, 1)] * 4),  # E2B: the one KV head on every rank
        (16, 2, 2, [(0, 1), (1, 1)]),  # 26B-A4B full layers
    ],
)
def test_kv_heads_follow_the_query_heads(heads, kv_heads, size, expected):
    from mlx_gemma4.models.sharding import kv_heads_of_rank

    assert [kv_heads_of_rank(r, size, heads, kv_heads) for r in range(size)] == expected


def test_kv_heads_that_neither_split_nor_share_are_refused():
    from mlx_gemma4.errors import DistributedError
    from mlx_gemma4.models.sharding import kv_heads_of_rank

    with pytest.raises(DistributedError, match="6 KV heads can be neither split across nor"):
        kv_heads_of_rank(0, 4, 12, 6)


def test_an_adapter_on_a_split_model_is_refused_before_loading(tmp_path):
    import mlx.core as mx

    from mlx_gemma4 import load_model
    from mlx_gemma4.errors import DistributedError

    group = mx.distributed.init()  # a group of one: enough to ask for a split load
    with pytest.raises(DistributedError, match="merge it first \\(gemma4 fuse\\)"):
        load_model(tmp_path / "no-model", adapter_path=tmp_path / "adapter", group=group)
