from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))

from checkpoints import TEXT_VARIANTS, build_multimodal, build_text  # noqa: E402

ALL_VARIANTS = [*TEXT_VARIANTS, "multimodal"]


def relative_error(ours, reference) -> float:
    ours, reference = np.asarray(ours, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


def reference_logits(model, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """`tiny(variant, hub_form=True)` -> (checkpoint folder, transformers model), built once."""
    built = {}

    def get(variant: str, hub_form: bool = True):
        key = (variant, hub_form)
        if key not in built:
            folder = tmp_path_factory.mktemp(f"{variant}-{'hub' if hub_form else 'hf'}")
            if variant.startswith("multimodal"):
                model = build_multimodal(
                    folder, bidirectional=variant == "multimodal_bidirectional"
                )
            else:
                model = build_text(variant, folder, hub_form=hub_form)
            built[key] = (folder, model)
        return built[key]

    return get


@pytest.fixture(scope="session")
def chat_checkpoint(tiny, tmp_path_factory):
    """`chat_checkpoint(variant)` -> (folder with tokenizer files, transformers model)."""
    import shutil

    from checkpoints import save_tokenizer

    built = {}

    def get(variant: str = "ple_kv_shared", chat_template: str | None = None):
        key = (variant, chat_template)
        if key not in built:
            source, reference = tiny(variant)
            folder = shutil.copytree(
                source, tmp_path_factory.mktemp(f"{variant}-chat"), dirs_exist_ok=True
            )
            save_tokenizer(folder, chat_template)
            built[key] = (folder, reference)
        return built[key]

    return get


@pytest.fixture
def token_ids():
    def make(batch: int, length: int, seed: int = 0) -> np.ndarray:
        from checkpoints import VOCAB

        return np.random.default_rng(seed).integers(0, VOCAB, size=(batch, length))

    return make


def to_numpy(x: mx.array) -> np.ndarray:
    return np.array(x.astype(mx.float32))


def first_logits(model, processor, prompt, prompt_cache=None, **kwargs):
    """The logits the first generated token is sampled from, and the last response."""
    from mlx_gemma4 import stream_generate

    seen = []

    def record(_history, logits):
        seen.append(to_numpy(logits))
        return logits

    *_, last = stream_generate(
        model,
        processor,
        prompt,
        max_tokens=1,
        prompt_cache=prompt_cache,
        logits_processors=[record],
        **kwargs,
    )
    return seen[0], last


# --------------------------------------------------------------------------- the gemma4 command


def gemma4_command() -> list[str]:
    """The console script when it is on PATH, else the same app through `python -m`."""
    executable = shutil.which("gemma4")
    return [executable] if executable else [sys.executable, "-m", "mlx_gemma4.cli"]


def run_gemma4(
    *args: str, stdin: str | None = None, env: dict | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """`gemma4 ARGS` in a child process, as a user runs it (for terminals, signals, exit codes
    of the real entry point)."""
    return subprocess.run(
        [*gemma4_command(), *map(str, args)],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def gemma4():
    """`gemma4(*args, stdin=None, env=None)` runs the app in this process (faster than a child:
    no new interpreter, MLX already imported) and returns a `CliResult`."""
    from typer.testing import CliRunner

    from mlx_gemma4.cli.app import app

    def run(*args: str, stdin: str | None = None, env: dict | None = None) -> CliResult:
        result = CliRunner().invoke(app, list(map(str, args)), input=stdin, env=env)
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception  # a bug, not bad input: show its traceback
        return CliResult(result.exit_code, result.stdout, result.stderr)

    return run


def run_chat(
    folder, stdin: str, *args: str, env: dict | None = None
) -> subprocess.CompletedProcess:
    """`gemma4 chat` on `folder` over a pipe, greedy, at most 6 tokens an answer."""
    return run_gemma4(
        "chat", "--model", folder, "--max-tokens", "6", "--temp", "0", *args, stdin=stdin, env=env
    )


# --------------------------------------------------------------------------- shared helpers


def reference_greedy(
    reference, ids: list[int], n: int, stop_ids: set[int], **media: np.ndarray
) -> list[int]:
    """transformers' greedy continuation of `ids`; `media`: its model inputs (pixel values, ...)."""
    import torch

    tensors = {name: torch.tensor(np.asarray(value)) for name, value in media.items()}
    with torch.no_grad():
        out = reference.generate(
            torch.tensor([ids]),
            **tensors,
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=sorted(stop_ids),
        )
    return out[0, len(ids) :].tolist()


def force_tokens(sequence: list[int]):
    """A logits processor that makes the model emit `sequence`, then the end of turn."""
    position = {"i": 0}

    def processor(_history, logits):
        i = position["i"]
        position["i"] += 1
        token = sequence[i] if i < len(sequence) else 106
        return mx.where(mx.arange(logits.shape[-1]) == token, 0.0, -mx.inf)[None]

    return processor


def random_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    # smooth it a little so bicubic resampling is exercised on image-like content
    pixels = ((pixels.astype(np.int32) + np.roll(pixels, 1, axis=0)) // 2).astype(np.uint8)
    return Image.fromarray(pixels).convert(mode)


def tones(seconds: float) -> np.ndarray:
    """Two sine tones at 16 kHz: audible, deterministic content for the audio path."""
    from mlx_gemma4.processing.audio import SAMPLE_RATE

    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return (0.1 * (np.sin(2 * np.pi * 440 * t) + np.sin(2 * np.pi * 1250 * t))).astype(np.float32)


def media_messages(modality: str) -> list[dict]:
    """One user turn with an image, a three-frame video or a 1.5 s clip, and a question."""
    from mlx_gemma4.processing.video import Video

    if modality == "image":
        part = {"type": "image", "image": random_image(96, 64, seed=1)}
    elif modality == "video":
        frames = [random_image(96, 48, seed=i) for i in range(3)]
        part = {"type": "video", "video": Video(frames, [0.0, 0.5, 1.0])}
    else:
        part = {"type": "audio", "audio": tones(1.5)}
    return [{"role": "user", "content": [part, {"type": "text", "text": "what is this?"}]}]


def run_python(code: str, env: dict) -> subprocess.CompletedProcess:
    """`python -c CODE` in a child process with `env` added to the environment."""
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=120,
    )


def video_chat(frames: int = 3) -> list[dict]:
    """A chat message with a decoded video of `frames` random frames."""
    from mlx_gemma4.processing.video import Video

    clip = Video([random_image(96, 48, seed=i) for i in range(frames)], [0.0, 0.5, 1.0][:frames])
    content = [{"type": "video", "video": clip}, {"type": "text", "text": "what happens"}]
    return [{"role": "user", "content": content}]


def solo(model, processor, prompt, **kwargs) -> list[int]:
    """The tokens of one prompt's own `stream_generate` run: what a batch must reproduce."""
    from mlx_gemma4 import stream_generate

    return [r.token for r in stream_generate(model, processor, prompt, **kwargs)]


def id_prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    """Token-id prompts of the given lengths (BOS first), reproducible by seed."""
    rng = np.random.default_rng(seed)
    return [[2, *rng.integers(5, 90, n - 1).tolist()] for n in lengths]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (for servers under test)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_serve(folder, *flags, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=180):
    """`gemma4 serve --model FOLDER FLAGS` as a child process on a free loopback port, returned
    with its URL once GET /health answers 200 (the model is loaded)."""
    import time
    import urllib.request

    port = free_port()
    command = [*gemma4_command(), "serve", "--model", str(folder), "--port", str(port), *flags]
    process = subprocess.Popen(command, stdout=stdout, stderr=stderr, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            said = process.communicate()[1] if stderr == subprocess.PIPE else ""
            raise AssertionError(f"gemma4 serve did not start: {said}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return process, url
        except OSError:
            time.sleep(0.2)
