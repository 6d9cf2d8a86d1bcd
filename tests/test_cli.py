"""The `gemma4` console script, run as a user runs it."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from conftest import gemma4_command, random_image, run_chat, run_gemma4

import mlx_gemma4


def test_version():
    result = run_gemma4("--version")  # the installed entry point (or python -m), not the app
    assert result.returncode == 0
    assert result.stdout.strip() == f"mlx-gemma4 {mlx_gemma4.__version__}"


def test_the_cli_starts_without_importing_mlx_lm():
    # mlx-lm imports transformers (seconds): `gemma4 --help` and bad flags must not wait for it
    code = "import sys, mlx_gemma4.cli.app; print('mlx_lm' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "False", result.stderr


def test_info_on_a_ple_checkpoint(gemma4, tiny):
    folder, _ = tiny("ple_kv_shared")
    result = gemma4("info", str(folder))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "PLE (E2B/E4B family)" in out
    assert "4 sliding (window 8), 2 full" in out
    assert "KV-shared layers      3" in out
    assert "float32" in out and "quantization          none" in out


def test_info_on_multimodal_moe_and_quantized(gemma4, tiny, tmp_path):
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
    result = run_gemma4("info", str(tmp_path / "missing"))
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no such folder" in lines[0]
    assert "Traceback" not in result.stderr


# --------------------------------------------------------------------------- chat and generate


def test_chat_over_a_pipe_answers_each_line_and_exits_zero(chat_checkpoint):
    folder, _ = chat_checkpoint()
    result = run_chat(folder, "hello there\n/help\n/bogus\nand again\n")
    assert result.returncode == 0, result.stderr
    assert result.stderr.count(" tok/s; prompt ") == 2  # one stats line per answer
    assert "/reset" in result.stdout and "/think" in result.stdout  # the help, twice
    assert result.stdout.count("commands:") == 2
    assert "unknown command /bogus" in result.stderr
    assert "Traceback" not in result.stderr


def test_second_turn_reuses_the_cache_and_no_stats_hides_them(chat_checkpoint):
    folder, _ = chat_checkpoint()
    result = run_chat(folder, "hello there\n/system be kind\nhi\n")
    second = result.stderr.strip().splitlines()[-1]
    assert "(0 cached)" not in second  # the new system turn still shares <bos>
    quiet = run_chat(folder, "hello\n", "--no-stats")
    assert quiet.returncode == 0 and "tok/s" not in quiet.stderr


def test_chat_save_then_load_in_another_process_reuses_the_kv_cache(chat_checkpoint, tmp_path):
    folder, _ = chat_checkpoint()
    saved = tmp_path / "talk.json"
    first = run_chat(folder, f"tell me a story\n/save {saved}\n")
    assert first.returncode == 0 and saved.is_file()
    assert (tmp_path / "talk.json.kv.safetensors").is_file()
    history = __import__("json").loads(saved.read_text())["messages"]
    assert [m["role"] for m in history] == ["user", "assistant"]

    second = run_chat(folder, f"/load {saved}\ncontinue\n")
    assert "loaded 2 messages" in second.stdout
    cached = int(second.stderr.split("tokens (")[1].split(" cached")[0])
    assert cached > 10


def test_generate_streams_one_answer(gemma4, chat_checkpoint):
    folder, _ = chat_checkpoint()
    result = gemma4(
        "generate", "--prompt", "hi", "-n", "4", "--no-stats", env={"GEMMA4_MODEL": str(folder)}
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("\n") and result.stderr == ""


def test_chat_with_an_unusable_model_is_one_line(tmp_path):
    result = run_chat(tmp_path / "nothing-here", "hi\n")
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "no such folder" in result.stderr


@pytest.fixture(scope="session")
def endless_checkpoint(chat_checkpoint, tmp_path_factory):
    """A chat checkpoint whose stop tokens never win greedy decoding (their logits are 0)."""
    import mlx.core as mx

    source, _ = chat_checkpoint()
    folder = shutil.copytree(source, tmp_path_factory.mktemp("endless"), dirs_exist_ok=True)
    weights = mx.load(str(folder / "model.safetensors"))
    table = weights["model.embed_tokens.weight"]
    rows = mx.arange(table.shape[0])[:, None]
    weights["model.embed_tokens.weight"] = mx.where((rows == 1) | (rows == 106), 0.0, table)
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    return folder


def test_chat_under_a_terminal_ctrl_c_stops_the_answer_not_the_chat(endless_checkpoint):
    import pexpect

    executable, *arguments = gemma4_command()
    child = pexpect.spawn(
        executable,
        [*arguments, "chat", "--model", str(endless_checkpoint), "-n", "300", "--temp", "0"],
        encoding="utf-8",
        timeout=120,
    )
    child.expect("/help for commands")
    child.expect_exact(">>> ")
    child.sendline("/think")
    child.expect("thinking on")
    child.expect_exact(">>> ")
    child.sendline("/nope")
    child.expect("unknown command /nope")
    child.expect_exact(">>> ")
    child.sendline("tell me everything")
    child.expect_exact("everything\r\n")
    child.expect(r"\S")  # the answer has started streaming
    child.sendintr()
    child.expect_exact("[stopped]")
    child.expect("tok/s")
    child.expect_exact(">>> ")
    child.sendline('"""')
    child.sendline("two lines")
    child.sendline('of text"""')
    child.expect("tok/s")
    child.expect_exact(">>> ")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_chat_ctrl_c_keeps_the_prompt_cache_for_the_next_turn(endless_checkpoint):
    import re

    import pexpect

    executable, *arguments = gemma4_command()
    child = pexpect.spawn(
        executable,
        # thinking on: with it off, the template ends each prompt with an empty thought
        # channel that the next turn's history does not repeat, so that tail is re-read
        [*arguments, "chat", "--model", str(endless_checkpoint), "-n", "300", "--temp", "0"]
        + ["--think"],
        encoding="utf-8",
        timeout=120,
    )
    child.expect_exact(f"loading {endless_checkpoint}")  # said at once, on stderr
    child.expect_exact(">>> ")
    child.sendline("tell me everything you know")
    child.expect_exact("know\r\n")
    child.expect(r"\S\S\S")  # the answer is streaming
    child.sendintr()
    child.expect_exact("[stopped]")
    child.expect(r"prompt (\d+) tokens \((\d+) cached\)")
    first_prompt = int(child.match.group(1))
    child.expect_exact(">>> ")
    child.sendline("go on")
    child.expect(r"prompt (\d+) tokens \((\d+) cached\)")
    cached = int(child.match.group(2))
    child.expect_exact(">>> ")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    # the first turn's prompt, at least, is served from the cache: only new tokens are read
    assert cached >= first_prompt, re.sub(r"\s+", " ", child.before or "")


def test_chat_says_when_a_message_outgrows_the_context_and_goes_on(chat_checkpoint):
    folder, _ = chat_checkpoint()
    result = run_chat(folder, "a " * 5000 + "\nshort one\n")
    assert result.returncode == 0
    assert "exceeds the model's context of 4096 tokens" in result.stderr
    assert result.stderr.count(" tok/s; prompt ") == 1  # the next message is still answered


# --------------------------------------------------------------------------- images


def test_ask_answers_about_images_and_rejects_bad_ones(gemma4, chat_checkpoint, tmp_path):
    folder, _ = chat_checkpoint("multimodal")
    picture = tmp_path / "picture.png"
    random_image(120, 80).save(picture)
    command = ["ask", picture, picture, "what differs?"]
    options = ["--model", folder, "-n", "4", "--budget", "70"]
    result = gemma4(*command, *options)
    assert result.returncode == 0, result.stderr
    prompt_tokens = int(result.stderr.split("prompt ")[1].split(" tokens")[0])
    assert prompt_tokens > 2 * 24  # two images of 24 soft tokens each at budget 70

    (tmp_path / "broken.png").write_bytes(b"\x89PNG broken")
    bad = gemma4("ask", tmp_path / "broken.png", "hi", *options)
    assert bad.returncode == 1 and "broken.png: not a readable image" in bad.stderr
    assert bad.stderr.strip().count("\n") == 0
    wrong_budget = gemma4(*command, "--model", folder, "--budget", "99")
    assert wrong_budget.returncode == 1 and "budget 99 is not one of" in wrong_budget.stderr


def test_chat_attaches_images(chat_checkpoint, tmp_path):
    folder, _ = chat_checkpoint("multimodal")
    picture = tmp_path / "p.png"
    random_image(96, 96).save(picture)
    result = run_chat(
        folder,
        f"/image {picture}\nwhat is this\n/image {tmp_path / 'nope.png'}\nok\n",
        "--budget",
        "70",
    )
    assert result.returncode == 0, result.stderr
    assert "attached" in result.stdout
    assert "nope.png: no such image file" in result.stderr
    first, second = [line for line in result.stderr.splitlines() if "tok/s; prompt" in line]
    assert int(first.split("prompt ")[1].split(" tokens")[0]) > 64  # 64 soft tokens
    assert "(0 cached)" not in second  # the image stays in the reused cache
