"""`gemma4 serve --distributed tensor|pipeline`: two real ranks started by `mlx.launch -n 2
--backend ring` over loopback, one launch per mode, driven by the official `openai` client.
Every answer equals the library's own (`stream_generate`, one process, whole model)."""

from __future__ import annotations

import base64
import io
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
pytestmark = pytest.mark.skipif(
    not Path("/proc/self/environ").exists(), reason="finds the ranks' processes in /proc"
)

from conftest import free_port, random_image  # noqa: E402

from mlx_gemma4 import load, stream_generate  # noqa: E402

# `mlx.launch` itself, run by this interpreter (its console script may not be on PATH)
LAUNCH = [sys.executable, "-c", "from mlx._distributed_utils.launch import main; main()"]
HELLO = [{"role": "user", "content": "hello there"}]
START_SECONDS = 240  # two ranks load on a shared machine
STOP_SECONDS = 120


@dataclass
class Launch:
    """A running `mlx.launch ... -- gemma4 serve --distributed MODE`."""

    process: subprocess.Popen
    url: str
    client: openai.OpenAI
    stderr: Path
    keep_stdin_open: int  # the write end of its stdin: at end of input mlx.launch spins

    def ranks(self) -> dict[int, int]:
        """{rank: pid} of the ranks `mlx.launch` started (its children)."""
        found = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                environ = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if parent == self.process.pid:
                for item in environ:
                    if item.startswith(b"MLX_RANK="):
                        found[int(item[9:])] = int(entry.name)
        return found

    def wait(self) -> str:
        """Wait until `mlx.launch` and every rank ended; what they wrote to stderr."""
        ranks = list(self.ranks().values())
        self.process.wait(STOP_SECONDS)
        deadline = time.monotonic() + STOP_SECONDS
        while any(Path(f"/proc/{pid}").exists() for pid in ranks):
            assert time.monotonic() < deadline, "a rank is left running"
            time.sleep(0.1)
        return self.stderr.read_text()

    def end(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        os.close(self.keep_stdin_open)


def launch_serve(folder: Path, mode: str, log: Path, *options: str) -> Launch:
    port = free_port()
    ring = f"-n 2 --backend ring --starting-port {random.randrange(20_000, 60_000, 8)}".split()
    serve = ["-m", "mlx_gemma4.cli", "serve", "--model", str(folder), "--port", str(port)]
    command = [*LAUNCH, *ring, "--", sys.executable, *serve, "--distributed", mode, *options]
    read_end, write_end = os.pipe()
    with open(log, "w") as errors:
        process = subprocess.Popen(
            command,
            stdin=read_end,
            stdout=subprocess.DEVNULL,
            stderr=errors,
            cwd=Path(__file__).parent,
            start_new_session=True,  # a failed test kills every rank with the group
        )
    os.close(read_end)
    url = f"http://127.0.0.1:{port}"
    launched = Launch(
        process,
        url,
        openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=120),
        log,
        write_end,
    )
    deadline = time.monotonic() + START_SECONDS
    while True:
        if process.poll() is not None or time.monotonic() > deadline:
            launched.end()
            raise AssertionError(f"the distributed server did not start:\n{log.read_text()}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return launched
        except httpx.HTTPError:
            time.sleep(0.3)


@pytest.fixture(scope="module")
def checkpoint(chat_checkpoint):
    folder, _ = chat_checkpoint("multimodal")
    return folder


@pytest.fixture(scope="module")
def library(checkpoint):
    """The whole model in this process: what every served answer must equal."""
    model, processor = load(checkpoint)

    def answer(messages, **options) -> str:
        options.setdefault("temperature", 0.0)
        pieces = stream_generate(model, processor, messages, **options)
        return "".join(piece.text for piece in pieces)

    return answer


def served(checkpoint, mode: str, tmp_path_factory):
    launched = launch_serve(checkpoint, mode, tmp_path_factory.mktemp(mode) / "stderr.txt")
    yield launched
    launched.end()


@pytest.fixture(scope="module")
def tensor(checkpoint, tmp_path_factory):
    yield from served(checkpoint, "tensor", tmp_path_factory)


@pytest.fixture(scope="module")
def pipeline(checkpoint, tmp_path_factory):
    yield from served(checkpoint, "pipeline", tmp_path_factory)


def chat(launched: Launch, messages, **options) -> str:
    options.setdefault("temperature", 0)
    answer = launched.client.chat.completions.create(model="tiny", messages=messages, **options)
    return answer.choices[0].message.content


def streamed(launched: Launch, messages, **options) -> str:
    chunks = launched.client.chat.completions.create(
        model="tiny", messages=messages, temperature=0, stream=True, **options
    )
    return "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)


def concurrently(launched: Launch, requests: list[tuple[list, int]]) -> list[str]:
    """The answers to requests sent at once, each from its own thread."""
    answers: list = [None] * len(requests)

    def ask(i: int) -> None:
        messages, max_tokens = requests[i]
        answers[i] = chat(launched, messages, max_tokens=max_tokens)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return answers


def png_data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


TWO = [
    (HELLO, 10),
    ([{"role": "user", "content": "how are you today"}], 7),
]


# --------------------------------------------------------------------------- tensor


def test_tensor_answers_equal_the_library(tensor, library):
    expected = library(HELLO, max_tokens=8)
    assert chat(tensor, HELLO, max_tokens=8) == expected
    assert streamed(tensor, HELLO, max_tokens=8) == expected
    # sampled: every rank draws the same tokens (a follower that drew others would feed the
    # split embedding other rows, and rank 0's answer would differ from the library's)
    sampled = dict(max_tokens=8, temperature=1.5, seed=5)
    assert chat(tensor, HELLO, **sampled) == library(HELLO, **sampled)


def test_tensor_serves_two_requests_at_once(tensor, library):
    expected = [library(messages, max_tokens=n) for messages, n in TWO]
    assert expected[0] != expected[1]
    assert concurrently(tensor, TWO) == expected


def test_tensor_takes_images(tensor, library):
    image = random_image(96, 64, seed=1)
    question = {"type": "text", "text": "what is this?"}
    ours = [{"role": "user", "content": [{"type": "image", "image": image}, question]}]
    parts = [{"type": "image_url", "image_url": {"url": png_data_url(image)}}, question]
    answer = chat(tensor, [{"role": "user", "content": parts}], max_tokens=6)
    assert answer == library(ours, max_tokens=6)


def test_sigterm_on_rank_0_stops_every_rank_cleanly(tensor):
    ranks = tensor.ranks()
    assert sorted(ranks) == [0, 1]
    os.kill(ranks[0], signal.SIGTERM)
    said = tensor.wait()
    # mlx.launch names every rank that did not exit with status 0
    assert "exited with code" not in said and "was killed" not in said, said
    assert "Traceback" not in said


# --------------------------------------------------------------------------- pipeline


def test_pipeline_answers_equal_the_library(pipeline, library):
    expected = library(HELLO, max_tokens=8)
    assert chat(pipeline, HELLO, max_tokens=8) == expected
    assert streamed(pipeline, HELLO, max_tokens=8) == expected
    assert concurrently(pipeline, TWO) == [library(m, max_tokens=n) for m, n in TWO]


def test_pipeline_media_are_answered_as_by_one_process(pipeline, library):
    image = random_image(32, 32)
    question = {"type": "text", "text": "what is this?"}
    ours = [{"role": "user", "content": [{"type": "image", "image": image}, question]}]
    parts = [{"type": "image_url", "image_url": {"url": png_data_url(image)}}, question]
    answer = chat(pipeline, [{"role": "user", "content": parts}], max_tokens=4)
    assert answer == library(ours, max_tokens=4)
    assert chat(pipeline, HELLO, max_tokens=8) == library(HELLO, max_tokens=8)  # still in step


def test_a_lost_follower_ends_requests_and_rank_0_with_one_clear_error(pipeline):
    ranks = pipeline.ranks()
    body = {"model": "tiny", "messages": HELLO, "max_tokens": 400, "temperature": 0, "stream": True}
    events = []
    with httpx.stream("POST", pipeline.url + "/v1/chat/completions", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            events.append(line[6:])
            if len(events) == 2:  # generating: the follower goes
                os.kill(ranks[1], signal.SIGKILL)
    error = json.loads(events[-1])["error"]
    assert error["message"].startswith("another rank stopped or became unreachable"), events[-1]
    said = pipeline.wait()
    lines = [line for line in said.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "another rank stopped or became unreachable" in lines[0], said
    assert "Traceback" not in said


def test_a_stopped_follower_ends_rank_0_after_the_timeout(checkpoint, tmp_path):
    """A follower that stops without closing its connection (SIGSTOP) stalls rank 0's next
    message, idle or not: after --distributed-timeout rank 0 ends with one line, and once the
    follower runs again, mlx.launch ends it too."""
    launched = launch_serve(
        checkpoint, "tensor", tmp_path / "stderr.txt", "--distributed-timeout", "3"
    )
    try:
        ranks = launched.ranks()
        os.kill(ranks[1], signal.SIGSTOP)
        try:
            deadline = time.monotonic() + STOP_SECONDS
            while Path(f"/proc/{ranks[0]}").exists() and time.monotonic() < deadline:
                time.sleep(0.2)
        finally:
            os.kill(ranks[1], signal.SIGCONT)
        said = launched.wait()
        lines = [line for line in said.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and "no progress from the other ranks for 3 s" in lines[0], said
        assert "Traceback" not in said
    finally:
        launched.end()


# --------------------------------------------------------------------------- in process


def test_the_prefix_pool_keeps_a_prompt_or_not_whatever_a_rank_holds(checkpoint):
    """The ranks hold different shares of one prompt's cache (a pipeline rank only its
    layers'): the pool must keep or drop it alike on all of them, or their prefills (and
    collectives) part."""
    from mlx_gemma4.prompt_cache import PromptCache
    from mlx_gemma4.server import ServerSettings
    from mlx_gemma4.server.distributed import group_generator

    model, processor = load(checkpoint)
    held = PromptCache(model)
    list(stream_generate(model, processor, "hello there", max_tokens=1, prompt_cache=held))
    bare = PromptCache(model)  # a rank that holds none of these layers
    bare.tokens = list(held.tokens)
    assert held.tokens and sum(c.nbytes for c in held.cache) > 1
    for budget in (1, 2**30):
        settings = ServerSettings(prefix_cache_bytes=budget)
        pools = [group_generator(model, processor, settings).pool for _ in range(2)]
        pools[0].put(held)
        pools[1].put(bare)
        assert len(pools[0]) == len(pools[1]) == (budget > 1), budget
