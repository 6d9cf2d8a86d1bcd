"""`gemma4 serve` as a user runs it: a real child process on loopback, stopped by SIGTERM or
Ctrl-C (SIGINT) while a stream is running (the stream ends with an error event, the process
exits 0, nothing hangs)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time

import pytest
from conftest import free_port, gemma4_command, random_image, start_serve

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from mlx_gemma4.cli.serve import _is_loopback  # noqa: E402


class Stream(threading.Thread):
    """A long streamed answer read in the background: its `data:` events as they come."""

    def __init__(self, url: str, headers: dict):
        super().__init__()
        self.url, self.headers = url, headers
        self.events: list[str] = []
        self.started = threading.Event()

    def run(self) -> None:
        body = {
            "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 4000,
            "temperature": 0,
            "stream": True,
        }
        with httpx.stream(
            "POST", self.url + "/v1/chat/completions", headers=self.headers, json=body, timeout=60
        ) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    self.events.append(line[len("data: ") :])
                    if len(self.events) >= 3:
                        self.started.set()


def stopped(process: subprocess.Popen, stream: Stream, sig: int) -> str:
    """Send `sig` while `stream` runs; the server's stderr once it has exited."""
    assert stream.started.wait(60), "the stream did not start"
    process.send_signal(sig)
    stream.join(30)
    assert not stream.is_alive(), "the stream did not end"
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
    assert json.loads(stream.events[-1])["error"]["code"] == "server_shutting_down"
    assert "[DONE]" not in stream.events
    assert "Traceback" not in stderr
    return stderr


def test_sigterm_ends_streams_with_an_error_and_exits_cleanly(chat_checkpoint, tmp_path):
    folder, _ = chat_checkpoint("dense")
    flags = ["--api-key", "k", "--no-allow-local-paths", "--max-concurrency", "1"]
    process, url = start_serve(folder, *flags, "--kv-bits", "4")
    headers = {"Authorization": "Bearer k"}
    try:
        assert httpx.get(url + "/v1/models").status_code == 401
        image = tmp_path / "a.png"
        random_image(8, 8).save(image)
        parts = [{"type": "image_url", "image_url": {"url": str(image)}}]
        refused = httpx.post(
            url + "/v1/chat/completions",
            headers=headers,
            json={"messages": [{"role": "user", "content": parts}]},
        )
        assert refused.status_code == 400
        assert "local file paths are not allowed" in refused.json()["error"]["message"]

        waiting: list[httpx.Response] = []

        def wait_behind() -> None:  # --max-concurrency 1: it waits for the stream's slot
            body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
            waiting.append(
                httpx.post(url + "/v1/chat/completions", headers=headers, json=body, timeout=60)
            )

        stream = Stream(url, headers)
        stream.start()
        assert stream.started.wait(60), "the stream did not start"
        queued = threading.Thread(target=wait_behind)
        queued.start()
        deadline = time.monotonic() + 30
        while httpx.get(url + "/health").json()["waiting"] == 0:
            assert time.monotonic() < deadline, "the second request did not wait"
            time.sleep(0.05)
        stderr = stopped(process, stream, signal.SIGTERM)
        queued.join(30)
        assert not queued.is_alive(), "the waiting request did not end"
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert waiting[0].status_code == 503
    assert waiting[0].json()["error"]["code"] == "server_shutting_down"
    # one line per request, the stream's included
    assert stderr.count("POST /v1/chat/completions 200") == 1
    assert stderr.count("POST /v1/chat/completions 400") == 1
    assert stderr.count("POST /v1/chat/completions 503") == 1
    assert stderr.count("GET /v1/models 401") == 1


def test_ctrl_c_stops_it_the_same_way(chat_checkpoint):
    process, url = start_serve(chat_checkpoint("dense")[0])
    try:
        stream = Stream(url, {})
        stream.start()
        stopped(process, stream, signal.SIGINT)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def test_an_address_in_use_is_one_line_before_the_model_loads(gemma4, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = gemma4("serve", "--model", tmp_path / "nothing-here", "--port", port)
    assert result.returncode == 1
    assert "cannot listen on 127.0.0.1" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_only_loopback_addresses_allow_local_paths_by_default():
    assert _is_loopback("127.0.0.1") and _is_loopback("::1") and _is_loopback("localhost")
    assert not _is_loopback("0.0.0.0") and not _is_loopback("192.168.1.4")


@pytest.mark.parametrize(
    "flags, says",
    [(["--kv-bits", "1"], "bits"), (["--log-level", "loud"], "--log-level: 'loud'")],
)
def test_bad_flags_are_one_line_before_the_model_loads(gemma4, tmp_path, flags, says):
    result = gemma4("serve", "--model", tmp_path / "nothing-here", "--port", free_port(), *flags)
    assert result.returncode == 1
    assert says in result.stderr and "nothing-here" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_without_the_serve_extra_it_says_what_to_install(tmp_path):
    blocked = tmp_path / "blocked" / "fastapi"
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text("raise ImportError('blocked', name='fastapi')\n")
    result = subprocess.run(
        [*gemma4_command(), "serve", "--model", str(tmp_path), "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(blocked.parent)},
    )
    assert result.returncode == 1
    assert "pip install 'mlx-gemma4[serve]'" in result.stderr
    assert "Traceback" not in result.stderr
