"""What the CLI does when the file system says no: one line naming the path and the cause,
said before any model work, and the chat goes on."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import soundfile
from checkpoints import as_unprivileged
from PIL import Image

STATS = " tok/s; prompt "


def test_chat_save_into_a_missing_folder_is_one_line_and_the_chat_goes_on(
    gemma4, chat_checkpoint, tmp_path
):
    folder, _ = chat_checkpoint()
    target = tmp_path / "no-such-folder" / "talk.json"
    script = f"hello there\n/save {target}\nand again\n/save {tmp_path / 'talk.json'}\n"
    result = gemma4("chat", "-m", folder, "-n", "4", stdin=script)
    assert result.returncode == 0, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert str(target) in errors[0] and "does not exist" in errors[0]
    assert result.stderr.count(STATS) == 2  # the turn after the failed save is answered
    assert "saved 4 messages" in result.stdout  # ... and the whole conversation was kept
    assert not (tmp_path / "no-such-folder").exists()


def test_files_the_cli_writes_follow_the_umask(gemma4, chat_checkpoint, tmp_path):
    folder, _ = chat_checkpoint()
    saved = tmp_path / "talk.json"
    previous = os.umask(0o022)
    try:
        result = gemma4("chat", "-m", folder, "-n", "2", stdin=f"hi\n/save {saved}\n")
    finally:
        os.umask(previous)
    assert result.returncode == 0, result.stderr
    for file in (saved, tmp_path / "talk.json.kv.safetensors"):
        assert stat.S_IMODE(file.stat().st_mode) == 0o644, file


def test_detect_checks_out_before_the_model_loads(gemma4, tmp_path):
    picture = tmp_path / "p.png"
    Image.new("RGB", (32, 32), "white").save(picture)
    out = tmp_path / "missing" / "boxes.png"
    # the model does not exist either: the --out check must come first
    result = gemma4("detect", picture, "cats", "--out", out, "-m", tmp_path / "no-model")
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0
    assert str(out) in result.stderr and "does not exist" in result.stderr


@pytest.mark.parametrize("several", [False, True])
def test_transcribe_checks_out_before_any_work(gemma4, tmp_path, several):
    clip = tmp_path / "clip.wav"
    soundfile.write(clip, np.zeros(1600, np.float32), 16_000)  # silent: loading it would fail
    files = [clip, tmp_path / "other.wav"] if several else [clip]
    out = tmp_path / "a-file"
    out.write_text("")
    target = out / "t.txt" if not several else out
    result = gemma4("transcribe", *files, "-o", target, "-m", tmp_path / "no-model")
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and str(out) in result.stderr
    assert "silent" not in result.stderr and "no such" not in result.stderr


# ----------------------------------------------------------------------------- unreadable media

# The opener runs in a child without the capabilities that let root read past permission bits
# (`as_unprivileged`), so a mode-000 file is really refused by the kernel.
_OPEN = textwrap.dedent(
    """
    import sys
    from mlx_gemma4.errors import Gemma4Error
    from mlx_gemma4.processing import audio, images, video
    openers = {"image": images.open_image, "audio": audio.load_audio, "video": video.load_video}
    try:
        openers[sys.argv[1]](sys.argv[2])
    except Gemma4Error as e:
        print(f"{type(e).__name__}: {e}")
    """
)


@pytest.mark.parametrize(
    "kind, name, error",
    [
        ("image", "p.png", "ImageError"),
        ("audio", "a.wav", "AudioError"),
        ("video", "v.mp4", "VideoError"),
    ],
)
def test_unreadable_media_say_permission_denied_not_corrupt(tmp_path, kind, name, error):
    file = tmp_path / name
    file.write_bytes(b"some bytes that are never read")
    file.chmod(0o000)
    result = subprocess.run(
        as_unprivileged([sys.executable, "-c", _OPEN, kind, str(file)]),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{error}: cannot read {file}: permission denied"


# ----------------------------------------------------------------------------- usage and chat


@pytest.mark.parametrize(
    "args, says",
    [
        (["chat", "--temp", "-1"], "'--temp'"),
        (["generate", "-p", "hi", "--top-p", "2"], "'--top-p'"),
        (["chat", "--no-such-option"], "--no-such-option"),
        (["--no-such-option"], "--no-such-option"),
        (["info"], "'model'"),
    ],
)
def test_usage_errors_are_one_line_and_exit_1(args, says):
    from conftest import run_gemma4

    result = run_gemma4(*args)  # the real entry point, as a shell sees it
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: gemma4") and says in lines[0]
    assert "--help" in lines[0] and result.stdout == ""


def test_flags_show_no_value_in_help(gemma4):
    help_text = gemma4("chat", "--help").stdout
    think = next(line for line in help_text.splitlines() if "--think" in line)
    assert "<bool>" not in think and "--no-think" in think


def test_chat_reset_drops_a_pending_attachment(gemma4, chat_checkpoint, tmp_path):
    folder, _ = chat_checkpoint("multimodal")
    picture = tmp_path / "p.png"
    Image.new("RGB", (64, 64), "white").save(picture)

    def prompt_tokens(script: str) -> int:
        result = gemma4("chat", "-m", folder, "-n", "2", "--budget", "70", stdin=script)
        assert result.returncode == 0, result.stderr
        (stats,) = [line for line in result.stderr.splitlines() if STATS in line]
        return int(stats.split("prompt ")[1].split(" tokens")[0])

    # the same prompt as a chat that never saw the image: none of its soft tokens
    assert prompt_tokens(f"/image {picture}\n/reset\nhello\n") == prompt_tokens("hello\n")


def test_chat_suggests_reset_when_the_conversation_outgrows_the_context(gemma4, chat_checkpoint):
    folder, _ = chat_checkpoint()
    result = gemma4("chat", "-m", folder, "-n", "4", stdin="a " * 5000 + "\n")
    assert result.returncode == 0
    assert "exceeds the model's context" in result.stderr and "/reset" in result.stderr


def test_conversation_round_trip_and_bad_files(chat_checkpoint, tmp_path):
    from mlx_gemma4 import PromptCache, load
    from mlx_gemma4.conversation import Conversation, load_conversation, save_conversation
    from mlx_gemma4.errors import ConversationError, FileAccessError

    model, _ = load(chat_checkpoint()[0])
    conversation = Conversation("be brief", True, [{"role": "user", "content": "hi"}])
    cache = PromptCache(model)  # empty: nothing generated yet
    save_conversation(tmp_path / "c.json", conversation, cache)
    loaded, loaded_cache = load_conversation(tmp_path / "c.json", model)
    assert loaded == conversation and loaded_cache is not None

    (tmp_path / "junk.json").write_text("[1, 2]")
    with pytest.raises(ConversationError, match="junk.json: not a saved conversation"):
        load_conversation(tmp_path / "junk.json", model)
    with pytest.raises(FileAccessError, match="cannot read .*nowhere.json: no such file"):
        load_conversation(tmp_path / "nowhere.json", model)
    with pytest.raises(FileAccessError, match="does not exist"):
        save_conversation(tmp_path / "no" / "c.json", conversation, cache)


def test_a_bare_gemma4_prints_the_help_and_exits_0():
    from conftest import run_gemma4

    result = run_gemma4()
    assert result.returncode == 0 and "Usage: gemma4" in result.stdout
