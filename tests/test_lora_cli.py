"""`gemma4 lora`, `gemma4 fuse` and `--adapter` end to end, and their bad inputs."""

from __future__ import annotations

import json

import pytest
from conftest import start_serve

CONVERSATIONS = [
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    {"messages": [{"role": "user", "content": "bye"}, {"role": "assistant", "content": "ciao"}]},
]


def write_data(folder, lines, valid=True):
    folder.mkdir(parents=True, exist_ok=True)
    text = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines)
    (folder / "train.jsonl").write_text(text)
    if valid:
        (folder / "valid.jsonl").write_text(json.dumps(CONVERSATIONS[0]))
    return folder


def one_error_line(result) -> str:
    assert result.returncode == 1, result.stdout + result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def trained(chat_checkpoint, tmp_path_factory):
    from typer.testing import CliRunner

    from mlx_gemma4.cli.app import app

    folder, _ = chat_checkpoint("ple_kv_shared")
    root = tmp_path_factory.mktemp("lora-cli")
    data = write_data(root / "data", CONVERSATIONS)
    args = ["lora", "--model", folder, "--data", data, "--out", root / "adapter"]
    args += ["--iters", "4", "--batch-size", "2", "--learning-rate", "1e-3"]
    args += ["--save-every", "2", "--val-every", "2", "--rank", "4", "--targets", "q,v"]
    result = CliRunner().invoke(app, list(map(str, args)))
    return folder, root, result


def test_lora_fuse_and_adapter_end_to_end(trained, gemma4):
    folder, root, result = trained
    assert result.exit_code == 0, result.stderr
    assert "validation loss" in result.stderr and "tok/s" in result.stderr
    adapter = root / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["lora_parameters"]["rank"] == 4 and config["training"]["step"] == 4
    assert (adapter / "0000002_adapters.safetensors").is_file()
    answer = gemma4("generate", "--model", folder, "--adapter", adapter, "-p", "hi", "-n", "3")
    assert answer.returncode == 0, answer.stderr
    fused = gemma4("fuse", "--model", folder, "--adapter", adapter, "--out", root / "fused")
    assert fused.returncode == 0, fused.stderr
    from mlx_gemma4 import load_model

    assert load_model(root / "fused").config.text_config.hidden_size == 64
    again = gemma4("fuse", "--model", folder, "--adapter", adapter, "--out", root / "fused")
    assert "already exists" in one_error_line(again)


def test_resume_from_the_cli(trained, gemma4):
    folder, root, _ = trained
    adapter = root / "adapter"
    args = ["lora", "--model", folder, "--data", root / "data", "--out", adapter]
    refused = gemma4(*args, "--iters", "6")
    assert "--resume" in one_error_line(refused)
    resumed = gemma4(*args, "--iters", "6", "--resume", "--rank", "4", "--targets", "q,v")
    assert resumed.returncode == 0, resumed.stderr
    assert "step 6" in resumed.stderr and "step 2:" not in resumed.stderr


def test_malformed_line_is_reported_with_its_number(chat_checkpoint, gemma4, tmp_path):
    folder, _ = chat_checkpoint("ple_kv_shared")
    data = write_data(tmp_path / "data", [CONVERSATIONS[0], '{"messages": [oops'])
    out = tmp_path / "adapter"
    line = one_error_line(gemma4("lora", "--model", folder, "--data", data, "--out", out))
    assert "train.jsonl:2" in line and "not valid JSON" in line
    assert not out.exists()


def test_bad_inputs_one_line_each(chat_checkpoint, tiny, gemma4, tmp_path):
    folder, _ = chat_checkpoint("ple_kv_shared")
    out = tmp_path / "adapter"

    def lora(data, *extra):
        return gemma4("lora", "--model", folder, "--data", data, "--out", out, *extra)

    # no train.jsonl
    (tmp_path / "empty").mkdir()
    assert "no train.jsonl" in one_error_line(lora(tmp_path / "empty"))
    # an image that does not load
    (tmp_path / "broken.png").write_bytes(b"not an image")
    image_turn = {
        "messages": [
            {"role": "user", "content": [{"type": "image", "image": "../broken.png"}]},
            {"role": "assistant", "content": "a cat"},
        ]
    }
    line = one_error_line(lora(write_data(tmp_path / "images", [image_turn])))
    assert "train.jsonl:1" in line and "broken.png" in line
    # an over-long example, refused
    long = {"messages": [{"role": "user", "content": "x " * 40}, CONVERSATIONS[0]["messages"][1]]}
    data = write_data(tmp_path / "long", [long])
    assert "max-seq-len" in one_error_line(lora(data, "--max-seq-len", "16", "--refuse"))
    assert not out.exists()
    # an adapter made for another model
    adapter = tmp_path / "good"
    ok = gemma4(
        "lora",
        "--model",
        folder,
        "--data",
        write_data(tmp_path / "ok", CONVERSATIONS),
        "--out",
        adapter,
        "--iters",
        "1",
        "--targets",
        "q",
    )
    assert ok.returncode == 0, ok.stderr
    other, _ = chat_checkpoint("dense")
    line = one_error_line(gemma4("generate", "--model", other, "--adapter", adapter, "-p", "hi"))
    assert "made for another model" in line
    fused = tmp_path / "fused"
    line = one_error_line(gemma4("fuse", "--model", other, "--adapter", adapter, "--out", fused))
    assert "made for another model" in line and not fused.exists()
    line = one_error_line(gemma4("serve", "--model", other, "--adapter", adapter))
    assert "made for another model" in line


def test_serve_answers_with_the_adapter(trained):
    import httpx

    from mlx_gemma4 import generate, load

    folder, root, _ = trained
    messages = [{"role": "user", "content": "hi"}]
    adapted = generate(*load(folder, adapter_path=root / "adapter"), messages, max_tokens=6)
    assert adapted != generate(*load(folder), messages, max_tokens=6)  # the adapter matters
    process, url = start_serve(folder, "--adapter", str(root / "adapter"))
    try:
        body = {"messages": messages, "max_tokens": 6, "temperature": 0}
        answer = httpx.post(url + "/v1/chat/completions", json=body, timeout=60).json()
    finally:
        process.terminate()
        process.communicate(timeout=30)
    assert answer["choices"][0]["message"]["content"] == adapted
