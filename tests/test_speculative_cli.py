"""`--draft-model` / `--draft-tokens` on `gemma4 generate` and `gemma4 chat`."""

from __future__ import annotations

from assistants import assistant, build_assistant  # noqa: F401  (a fixture)


def test_generate_with_a_drafter_writes_the_same_answer(chat_checkpoint, assistant, gemma4):  # noqa: F811
    folder, _ = chat_checkpoint("ple_kv_shared")
    drafter, _ = assistant("ple_kv_shared", True)
    common = ("generate", "--model", folder, "--prompt", "hello there", "-n", "12", "--temp", "0")
    plain = gemma4(*common)
    drafted = gemma4(*common, "--draft-model", drafter, "--draft-tokens", "3")
    assert plain.returncode == drafted.returncode == 0, drafted.stderr
    assert drafted.stdout == plain.stdout
    assert "drafted" in drafted.stderr and "drafted" not in plain.stderr


def test_chat_stats_show_the_acceptance_rate(chat_checkpoint, assistant, gemma4):  # noqa: F811
    folder, _ = chat_checkpoint("ple_kv_shared")
    drafter, _ = assistant("ple_kv_shared", True)
    result = gemma4(
        "chat", "--model", folder, "-n", "12", "--temp", "0", "--draft-model", drafter,
        stdin="hello\nand again\n",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if "tok/s; prompt" in line]
    assert len(lines) == 2
    assert all("drafted" in line and "accepted" in line and "%" in line for line in lines)


def test_a_drafter_for_another_target_is_one_line_and_exit_1(chat_checkpoint, gemma4, tmp_path):
    folder, _ = chat_checkpoint("dense")
    build_assistant("dense", tmp_path / "narrow", False, backbone=32)
    result = gemma4(
        "generate", "--model", folder, "--prompt", "hi", "--draft-model", tmp_path / "narrow"
    )
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0
    assert "hidden size 32" in result.stderr and "target's is 64" in result.stderr
    assert result.stdout == ""


def test_an_assistant_alone_is_refused_in_one_line(assistant, gemma4):  # noqa: F811
    drafter, _ = assistant("ple_kv_shared", True)
    for command in (("generate", "--prompt", "hi", "--model", drafter), ("info", drafter)):
        result = gemma4(*command)
        assert result.returncode == 1
        assert "--draft-model" in result.stderr and result.stderr.strip().count("\n") == 0
