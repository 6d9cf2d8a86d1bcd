"""`gemma4 generate --tools` and `gemma4 chat --tools`: calls printed, confirmed, run; bad tool
files are one line.

The tiny random model writes no calls by itself: `stream_generate` is given a logits processor
(`scripted_turns`) that forces the tokens of a scripted turn; the model, the app and the tools
run for real.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from checkpoints import add_tool_tokens, scripted_turns
from conftest import gemma4_command

Q = '<|"|>'
CALL = f"<|tool_call>call:get_weather{{city:{Q}Paris{Q}}}<tool_call|><|tool_response>"

TOOLS_MODULE = '''
def get_weather(city: str) -> dict:
    """Current weather.

    Args:
        city: The city.
    """
    with open(__file__ + ".log", "a") as log:
        log.write(city + "\\n")
    return {"city": city, "temp": 21}


def _helper():
    pass
'''

DECLARATIONS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "description": "The city."}},
                "required": ["city"],
            },
        },
    }
]


@pytest.fixture(scope="module")
def tool_folder(chat_checkpoint, tmp_path_factory) -> Path:
    source, _ = chat_checkpoint()
    folder = shutil.copytree(source, tmp_path_factory.mktemp("cli-tools"), dirs_exist_ok=True)
    add_tool_tokens(folder)
    return folder


def turn_tokens(folder: Path, texts: list[str]) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    return [tokenizer.encode(text, add_special_tokens=False) for text in texts]


@pytest.fixture
def script(monkeypatch, tool_folder):
    """`script(*turns)`: the model writes these turns, one per generation, in order."""
    from mlx_gemma4 import generation

    real = generation.stream_generate

    def install(*turns: str) -> None:
        processor = scripted_turns(turn_tokens(tool_folder, list(turns)))

        def forced(*args, **kwargs):
            return real(*args, **{**kwargs, "logits_processors": [processor]})

        monkeypatch.setattr(generation, "stream_generate", forced)

    return install


@pytest.fixture
def files(tmp_path):
    module = tmp_path / "tools.py"
    module.write_text(TOOLS_MODULE)
    declarations = tmp_path / "tools.json"
    declarations.write_text(json.dumps(DECLARATIONS))
    return module, declarations


def test_generate_prints_the_calls_as_json_lines(gemma4, tool_folder, script, files):
    module, declarations = files
    call = {"name": "get_weather", "arguments": {"city": "Paris"}}
    for tools, before in ((declarations, "Let me look. "), (module, "")):
        script(before + CALL)
        result = gemma4(
            "generate", "-m", tool_folder, "-p", "Weather in Paris?", "--tools", tools,
            "-n", "60", "--no-stats",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert lines == ([before] if before else []) + [json.dumps(call)]
        assert result.stderr == ""
    assert not Path(f"{module}.log").exists()  # generate declares the tools, runs none


def test_generate_warns_of_a_malformed_call(gemma4, tool_folder, script, files):
    bad = "<|tool_call>call:get_weather{city:Paris}<tool_call|>"
    script(bad)
    result = gemma4(
        "generate", "-m", tool_folder, "-p", "Weather?", "--tools", files[1], "-n", "60",
        "--no-stats",
    )  # fmt: skip
    assert result.returncode == 0
    assert result.stdout == bad + "\n"
    assert "tool-call text that does not parse" in result.stderr


def test_chat_asks_before_running_a_call(gemma4, tool_folder, script, files):
    module, _ = files
    script(CALL, "It is 21.", CALL, "I could not.")
    result = gemma4(
        "chat", "-m", tool_folder, "--tools", module, "-n", "60", "--no-stats",
        stdin="Weather in Paris?\ny\nAnd now?\nn\n",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    call = 'get_weather({"city": "Paris"})'
    lines = result.stdout.splitlines()
    assert lines == [
        f"run {call}? [y/N] y",
        f'[tool] {call} -> {{"city": "Paris", "temp": 21}}',
        "It is 21.",
        f"run {call}? [y/N] n",
        f'[tool] {call} -> {{"error": "the user declined to run this call"}}',
        "I could not.",
    ]
    assert Path(f"{module}.log").read_text() == "Paris\n"  # run once: the second was declined


def test_chat_yes_runs_calls_without_asking(gemma4, tool_folder, script, files, tmp_path):
    module, _ = files
    script(CALL, "It is 21.", "Hello.")
    saved = tmp_path / "chat.json"
    result = gemma4(
        "chat", "-m", tool_folder, "--tools", module, "--yes", "-n", "60", "--no-stats",
        stdin=f"Weather in Paris?\nhi\n/save {saved}\n",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[:3] == [
        '[tool] get_weather({"city": "Paris"}) -> {"city": "Paris", "temp": 21}',
        "It is 21.",
        "Hello.",
    ]
    assert Path(f"{module}.log").read_text() == "Paris\n"
    # the history keeps the tool turn, in the template's form
    turn = json.loads(saved.read_text())["messages"][1]
    assert turn["tool_calls"][0]["function"] == {
        "name": "get_weather",
        "arguments": {"city": "Paris"},
    }
    assert turn["tool_responses"] == [
        {"name": "get_weather", "response": {"city": "Paris", "temp": 21}}
    ]
    assert turn["content"] == "It is 21."


def test_chat_with_declared_only_tools_answers_calls_with_errors(
    gemma4, tool_folder, script, files
):
    script(CALL, "Sorry.")
    result = gemma4(
        "chat", "-m", tool_folder, "--tools", files[1], "--yes", "-n", "60", "--no-stats",
        stdin="Weather in Paris?\n",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "no tool named 'get_weather' can be run" in result.stdout
    assert result.stdout.splitlines()[-1] == "Sorry."


BAD_TOOLS = {
    "missing.json": (None, "missing.json"),
    "broken.json": ("[{", "not valid JSON (line 1"),
    "shape.json": ('{"tools": 3}', "expected a list of tools"),
    "params.json": (
        '[{"type": "function", "function": {"name": "f", "parameters": 1}}]',
        "'parameters' must be a JSON schema object",
    ),
    "untyped.py": ("def f(x):\n    '''No types.'''\n", "tool 'f': cannot describe it"),
    "crash.py": ("raise RuntimeError('boom')\n", "importing it failed: RuntimeError: boom"),
}


@pytest.mark.parametrize("command", ["generate", "chat"])
@pytest.mark.parametrize("name", list(BAD_TOOLS))
def test_bad_tools_are_one_line(gemma4, tool_folder, tmp_path, command, name):
    content, message = BAD_TOOLS[name]
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    args = ["-p", "hi"] if command == "generate" else []
    result = gemma4(command, "-m", tool_folder, *args, "--tools", path, stdin="hi\n")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


CHILD = """
import sys
from checkpoints import scripted_turns
from mlx_gemma4 import generation
from mlx_gemma4.cli.app import main

turns = {turns!r}
real, processor = generation.stream_generate, scripted_turns(turns)
generation.stream_generate = lambda *a, **k: real(*a, **{{**k, "logits_processors": [processor]}})
sys.argv = ["gemma4", *{args!r}]
main()
"""


def test_chat_under_a_terminal_asks_before_running(tool_folder, files):
    import pexpect

    module, _ = files
    turns = turn_tokens(tool_folder, [CALL, "It is 21."])
    args = ["chat", "-m", str(tool_folder), "--tools", str(module), "-n", "60", "--no-stats"]
    assert gemma4_command()  # the app the child runs is this one
    child = pexpect.spawn(
        sys.executable,
        ["-c", CHILD.format(turns=turns, args=args)],
        encoding="utf-8",
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)},
    )
    child.expect_exact(">>> ")
    child.sendline("Weather in Paris?")
    child.expect_exact('run get_weather({"city": "Paris"})? [y/N] ')
    child.sendline("y")
    child.expect_exact('-> {"city": "Paris", "temp": 21}')
    child.expect_exact("It is 21.")
    child.expect_exact(">>> ")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert Path(f"{module}.log").read_text() == "Paris\n"
