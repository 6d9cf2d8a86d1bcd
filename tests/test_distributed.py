"""Tensor and pipeline parallelism: two real ranks on MLX's ring backend over loopback.

One `mlx.launch -n 2 --backend ring` run (tests/distributed_worker.py) checks every variant in
both modes; its results are read back and asserted here, one test per property.
"""

from __future__ import annotations

import json
import os
import random
import select
import signal
import subprocess
import sys
import time
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


def cli_entries(chat_checkpoint, picture: Path, odd_heads: Path) -> list[dict]:
    """The `gemma4` commands the launch runs, each on every rank: {name, args, stdin}."""
    moe, _ = chat_checkpoint("moe_k_eq_v")
    ple, _ = chat_checkpoint("ple_kv_shared")
    multimodal, _ = chat_checkpoint("multimodal")
    chat = ["chat", "--max-tokens", "6", "--temp", "0", "--no-stats"]
    return [
        {
            "name": "generate-tensor",
            "args": ["generate", "--model", str(moe), *GENERATE, "--distributed", "tensor"],
        },
        {
            "name": "chat-pipeline",
            "args": [*chat, "--model", str(ple), "--distributed", "pipeline"],
            "stdin": CHAT_TURNS,
        },
        {
            "name": "chat-image-pipeline",
            "args": [*chat, *IMAGE_CHAT, "--model", str(multimodal), "--distributed", "pipeline"],
            "stdin": image_turns(picture),
        },
        {
            "name": "ask-pipeline",
            "args": [
                "ask",
                str(picture),
                *ASK,
                "--model",
                str(multimodal),
                "--distributed",
                "pipeline",
            ],
        },
        {
            "name": "odd-heads",
            "args": ["generate", "--model", str(odd_heads), "-p", "hi", "--distributed", "tensor"],
        },
    ]


GENERATE = ["-p", "hello there", "-n", "8", "--no-stats"]
CHAT_TURNS = "hello\nhow are you\n/exit\n"
IMAGE_CHAT = ["--budget", "70"]
ASK = ["what is this", "-n", "6", "--budget", "70", "--no-stats"]


def image_turns(picture: Path) -> str:
    return f"/image {picture}\nwhat is this\nand the colours?\n/exit\n"


@pytest.fixture(scope="module")
def picture(tmp_path_factory) -> Path:
    from conftest import random_image

    path = tmp_path_factory.mktemp("picture") / "picture.png"
    random_image(96, 64).save(path)
    return path


@pytest.fixture(scope="module")
def ranks(tiny, chat_checkpoint, picture, tmp_path_factory):
    """What each of the two ranks saw: {rank: results}. One launch runs every case (model
    checks, refusals, `gemma4` commands, a lost rank): starting two ranks costs more than
    all the checks they run."""
    from unified_checkpoints import tiny_unified

    root = tmp_path_factory.mktemp("distributed")
    cases = [
        {"name": f"{variant}-{mode}", "path": str(tiny(variant)[0]), "mode": mode}
        for variant in VARIANTS
        for mode in MODES
    ]
    multimodal = str(tiny("multimodal")[0])
    unified = str(tiny_unified(tmp_path_factory)[0])
    cases += [
        {"name": f"{name}-{mode}", "path": path, "mode": mode, "media": list(MEDIA)}
        for name, path in (("multimodal", multimodal), ("unified", unified))
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
    odd_heads = build_with(root / "three-heads", "dense", num_attention_heads=3)
    bad = [{"name": "odd-heads", "path": str(odd_heads), "mode": "tensor"}]
    # the MLP's 96 inputs are 3 groups of 32: they cannot split in two, so the MLP stays whole
    dense_4bit = build_quantized(tiny("dense")[0], root / "dense-4bit", 32)
    cases.append({"name": "4bit-whole-mlp", "path": str(dense_4bit), "mode": "tensor"})
    out = root / "out"
    out.mkdir()
    spec = root / "spec.json"
    spec.write_text(
        json.dumps(
            {
                "cases": cases,
                "bad": bad,
                "cli": cli_entries(chat_checkpoint, picture, odd_heads),
                "out": str(out),
                "lose_rank_1": True,
            }
        )
    )
    worker = Path(__file__).with_name("distributed_worker.py")
    run = run_launch(launch_command(str(worker), str(spec)), cwd=Path(__file__).parent)
    results = {}
    for rank in (0, 1):
        file = out / f"rank{rank}.json"
        assert file.is_file(), f"rank {rank} wrote nothing:\n{run.stdout}\n{run.stderr}"
        results[rank] = json.loads(file.read_text())
    return results


MEDIA = ("image", "video", "audio")
CASES = [f"{variant}-{mode}" for variant in VARIANTS for mode in MODES] + [
    "4bit-tensor",
    "4bit-pipeline",
    "experts-across",
    "4bit-whole-mlp",
    *(f"{name}-{mode}" for name in ("multimodal", "unified") for mode in MODES),
]
MEDIA_CASES = [
    f"{name}-{mode}-{kind}"
    for name in ("multimodal", "unified")
    for mode in MODES
    for kind in MEDIA
]


@pytest.mark.parametrize("case", CASES)
def test_sharded_logits_equal_whole_model(ranks, case):
    for rank in (0, 1):
        assert ranks[rank]["size"] == 2
        assert ranks[rank]["cases"][case]["text"]["max_error"] < 1e-4, (rank, case)


@pytest.mark.parametrize("case", CASES)
def test_greedy_generation_equal(ranks, case):
    for rank in (0, 1):
        seen = ranks[rank]["cases"][case]["text"]
        assert seen["tokens"] == seen["reference_tokens"], (rank, case)


@pytest.mark.parametrize("case", MEDIA_CASES)
def test_media_prompts_equal_the_whole_model(ranks, case):
    """An image, video or audio prompt, in both modes: in a pipeline rank 0 alone holds the
    towers (or 12B's embedders) and sends the soft tokens."""
    name, kind = case.rsplit("-", 1)
    for rank in (0, 1):
        seen = ranks[rank]["cases"][name][kind]
        assert seen["max_error"] < 1e-4, (rank, case, seen["max_error"])
        assert seen["tokens"] == seen["reference_tokens"], (rank, case)


@pytest.mark.parametrize("case", ["multimodal-pipeline", "unified-pipeline"])
def test_media_rank_0_refuses_are_refused_on_every_rank(ranks, case):
    first, follower = (ranks[rank]["cases"][case]["refused"] for rank in (0, 1))
    assert first and not first.startswith("DistributedError"), first  # the tower's own error
    assert follower == "DistributedError: rank 0 could not encode the media input; see its error"
    if case.startswith("unified"):
        assert first.startswith("ImageError: pixel values of shape (1, 2, 5)"), first


@pytest.mark.parametrize("case", CASES)
def test_each_rank_holds_about_half_the_weights(ranks, case):
    shares = []
    for rank in (0, 1):
        seen = ranks[rank]["cases"][case]
        share = seen["weight_bytes"] / seen["whole_bytes"]
        # what MLX holds after loading is what the weights take: no whole tensor stays behind
        assert seen["resident_bytes"] <= seen["weight_bytes"] * 1.05 + 64 * 1024, (rank, case)
        shares.append(share)
    if case in ("4bit-whole-mlp", "multimodal-tensor", "unified-tensor"):
        # an MLP that stays whole, or the towers (12B's embedders), replicated on both ranks
        assert all(0.6 < share < 0.9 for share in shares), shares
    elif case.endswith("tensor") or case == "experts-across":
        # norms, routers and single KV heads are replicated
        assert all(0.45 < share < 0.6 for share in shares), shares
    else:
        # a pipeline splits whole layers; the KV-shared block stays on one rank
        assert 0.95 < sum(shares) < 1.05 and max(shares) < 0.85, shares
    if case.startswith(("multimodal", "unified")):
        media = [ranks[rank]["cases"][case]["media_bytes"] for rank in (0, 1)]
        # the towers: whole on rank 0 in a pipeline, replicated in tensor mode
        assert media[0] > 0 and media[1] == (media[0] if case.endswith("tensor") else 0), media


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


def launched(ranks, name: str) -> dict:
    """Rank 0's result of the `gemma4` command `name`; the followers printed nothing."""
    for rank in (0, 1):
        seen = ranks[rank]["cli"][name]
        assert "exception" not in seen, (rank, seen)
    follower = ranks[1]["cli"][name]
    assert follower["stdout"] == follower["stderr"] == "", follower
    return ranks[0]["cli"][name]


def test_generate_distributed_prints_the_single_process_answer_once(ranks, chat_checkpoint, gemma4):
    folder, _ = chat_checkpoint("moe_k_eq_v")
    alone = gemma4("generate", "--model", folder, *GENERATE)
    assert alone.returncode == 0, alone.stderr
    run = launched(ranks, "generate-tensor")
    assert (run["exit_code"], run["stdout"]) == (0, alone.stdout), run["stderr"]


def test_chat_distributed_follows_rank_0(ranks, chat_checkpoint, gemma4):
    folder, _ = chat_checkpoint("ple_kv_shared")
    args = ["chat", "--model", folder, "--max-tokens", "6", "--temp", "0", "--no-stats"]
    alone = gemma4(*args, stdin=CHAT_TURNS)
    assert alone.returncode == 0, alone.stderr
    run = launched(ranks, "chat-pipeline")
    assert (run["exit_code"], run["stdout"]) == (0, alone.stdout), run["stderr"]


def test_chat_with_an_image_in_a_pipeline_gives_the_single_process_answer(
    ranks, chat_checkpoint, gemma4, picture
):
    """Rank 0 holds the vision tower; each rank reads the image path it is sent."""
    folder, _ = chat_checkpoint("multimodal")
    args = ["chat", "--model", folder, "--max-tokens", "6", "--temp", "0", "--no-stats"]
    alone = gemma4(*args, *IMAGE_CHAT, stdin=image_turns(picture))
    assert alone.returncode == 0 and alone.stdout.strip(), alone.stderr
    run = launched(ranks, "chat-image-pipeline")
    assert (run["exit_code"], run["stdout"]) == (0, alone.stdout), run["stderr"]


def test_ask_in_a_pipeline_gives_the_single_process_answer(ranks, chat_checkpoint, gemma4, picture):
    folder, _ = chat_checkpoint("multimodal")
    alone = gemma4("ask", picture, *ASK, "--model", folder)
    assert alone.returncode == 0 and alone.stdout.strip(), alone.stderr
    run = launched(ranks, "ask-pipeline")
    assert (run["exit_code"], run["stdout"]) == (0, alone.stdout), run["stderr"]


def test_group_size_that_does_not_divide_is_one_line_from_rank_0(ranks):
    run = launched(ranks, "odd-heads")
    assert run["exit_code"] == 1
    assert run["stderr"].splitlines() == [
        "error: 3 attention heads cannot be split across 2 ranks; use a group size that "
        "divides them, or --distributed pipeline"
    ], run["stderr"]


def ranks_of_session(session: int) -> dict[int, int]:
    """{rank: pid} of the processes `mlx.launch` (leader of `session`) started."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getsid(int(entry.name)) != session:
                continue
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, ProcessLookupError):
            continue
        for item in environ:
            if item.startswith(b"MLX_RANK="):
                found[int(item.split(b"=")[1])] = int(entry.name)
    return found


def read_until(stream, text: str, seconds: float) -> str:
    """What `stream` (a pipe) gives until `text` appears, at most `seconds` long."""
    seen, end = "", time.monotonic() + seconds
    while text not in seen and time.monotonic() < end:
        ready, _, _ = select.select([stream], [], [], 1.0)
        if ready:
            chunk = os.read(stream.fileno(), 4096).decode()
            if not chunk:
                break
            seen += chunk
    return seen


def gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return True
    return state == "Z"  # ended, not yet reaped


def test_a_stopped_rank_ends_every_rank_after_the_timeout(chat_checkpoint):
    """A rank that stops (SIGSTOP) keeps its connections open: rank 0 gives up after
    --distributed-timeout with one line and exit status 1, and mlx.launch then ends the
    others (a stopped rank as soon as it is continued: only SIGKILL reaches it before)."""
    folder, _ = chat_checkpoint("dense")
    args = ["chat", "--model", folder, "--max-tokens", "4", "--temp", "0", "--no-stats"]
    command = launch_command(
        "-m", "mlx_gemma4.cli", *map(str, args), "--distributed", "pipeline",
        "--distributed-timeout", "3",
    )  # fmt: skip
    launch = subprocess.Popen(
        command,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        launch.stdin.write(b"hello\n")
        launch.stdin.flush()
        first = read_until(launch.stdout, "\n", TIMEOUT)
        assert first.strip(), "the first turn gave no answer"
        pids = ranks_of_session(launch.pid)
        assert sorted(pids) == [0, 1], pids
        os.kill(pids[1], signal.SIGSTOP)
        stopped_at = time.monotonic()
        launch.stdin.write(b"and again\n")  # rank 0 sends it, and waits for rank 1
        launch.stdin.flush()
        while not gone(pids[0]) and time.monotonic() - stopped_at < 120:
            time.sleep(0.2)
        waited = time.monotonic() - stopped_at
        assert gone(pids[0]), "rank 0 still waits for the stopped rank"
        os.kill(pids[1], signal.SIGCONT)  # the launcher's SIGTERM, pending, now ends it
        _, stderr = launch.communicate(timeout=60)
    finally:
        if launch.poll() is None:
            os.killpg(launch.pid, signal.SIGKILL)
            launch.communicate()
    errors = [line for line in stderr.decode().splitlines() if line.startswith("error:")]
    assert errors == [
        "error: no progress from the other ranks for 3 s (--distributed-timeout): a rank is "
        "stopped or stuck without closing its connection; ending this rank"
    ], stderr.decode()
    assert "Traceback" not in stderr.decode()
    assert 3 <= waited < 60, waited
    # mlx.launch itself exits 0 whatever its ranks do: it reports a failed one on stderr
    assert "Node with rank 0 exited with code 1" in stderr.decode()
    assert gone(pids[1]) and not ranks_of_session(launch.pid)


WATCHED = """
import sys, time
from mlx_gemma4.collectives import Watchdog, watched

def slow(n):
    for i in range(n):
        time.sleep(0.4)
        yield i

assert list(watched(slow(5), 1.0)) == list(range(5))  # 2 s in all, a beat every 0.4 s
with Watchdog(0):
    time.sleep(1.5)  # 0: no watchdog
print("beats kept it alive", flush=True)
with Watchdog(1.0):
    time.sleep(30)  # no beat: ended after about a second
print("not reached", flush=True)
"""


def test_the_watchdog_ends_the_process_only_without_progress():
    started = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-c", WATCHED], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 1, run.stderr
    assert run.stdout == "beats kept it alive\n"
    assert run.stderr.splitlines() == [
        "error: no progress from the other ranks for 1 s (--distributed-timeout): a rank is "
        "stopped or stuck without closing its connection; ending this rank"
    ]
    assert time.monotonic() - started < 25


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
