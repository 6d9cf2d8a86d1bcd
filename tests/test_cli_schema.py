"""`gemma4 generate --json-schema` and `--tool-choice`: a random tiny model answers in valid JSON
or with one forced call; bad schemas and choices are one line, exit 1, before the model loads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from checkpoints import add_tool_tokens  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "n": {"type": "integer", "minimum": 0, "maximum": 9},
    },
    "required": ["name", "n"],
}
DECLARATIONS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 8}},
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "parameters": {
                "type": "object",
                "properties": {"utc": {"type": "boolean"}},
                "required": ["utc"],
            },
        },
    },
]
SAMPLED = ("-n", "200", "--temp", "1", "--no-stats")


@pytest.fixture(scope="module")
def folder(chat_checkpoint, tmp_path_factory) -> Path:
    source, _ = chat_checkpoint()
    target = shutil.copytree(source, tmp_path_factory.mktemp("cli-schema"), dirs_exist_ok=True)
    add_tool_tokens(target)
    return target


@pytest.fixture
def schema_file(tmp_path) -> Path:
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(SCHEMA))
    return path


@pytest.mark.parametrize("inline", [False, True], ids=["file", "inline"])
def test_json_schema_answer_is_printed_valid(gemma4, folder, schema_file, inline):
    given = json.dumps(SCHEMA) if inline else schema_file
    result = gemma4(
        "generate", "-m", folder, "-p", "Reply in JSON.", "--json-schema", given, "--seed", "0",
        *SAMPLED,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    jsonschema.validate(json.loads(lines[0]), SCHEMA)


@pytest.mark.parametrize(
    "choice, names", [("required", {"get_weather", "get_time"}), ("get_time", {"get_time"})]
)
def test_tool_choice_forces_one_call(gemma4, folder, tmp_path, choice, names):
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps(DECLARATIONS))
    result = gemma4(
        "generate", "-m", folder, "-p", "Call a tool.", "--tools", tools, "--tool-choice",
        choice, "--seed", "1", *SAMPLED,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (line,) = result.stdout.splitlines()
    call = json.loads(line)
    assert call["name"] in names
    tool = next(t for t in DECLARATIONS if t["function"]["name"] == call["name"])
    jsonschema.validate(call["arguments"], tool["function"]["parameters"])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--json-schema", "missing.json"], "cannot read the JSON schema missing.json"),
        (["--json-schema", '{"type": '], "--json-schema: json_schema: not valid JSON"),
        (["--json-schema", "BAD"], "JSON schema file "),
        (["--json-schema", '{"type": "objekt"}'], "not a valid JSON Schema"),
        (["--json-schema", '{"if": {"type": "string"}}'], "Unimplemented keys"),
        (["--tool-choice", "required"], "needs tools"),
        (["--tools", "TOOLS", "--tool-choice", "get_date"], "none of the tools"),
        (["--tools", "TOOLS", "--tool-choice", "required", "--json-schema", "true"], "pass one"),
    ],
)
def test_bad_schema_or_choice_is_one_line(gemma4, tmp_path, monkeypatch, args, message):
    """Before anything loads: the model folder does not even exist."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "BAD").write_text("[1, 2")
    (tmp_path / "TOOLS").write_text(json.dumps(DECLARATIONS))
    result = gemma4("generate", "-m", tmp_path / "no-model", "-p", "hi", *args)
    assert result.returncode == 1
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert result.stdout == ""
