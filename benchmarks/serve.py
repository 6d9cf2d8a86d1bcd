"""Serving throughput: `gemma4 serve` beside `mlx_lm.server` on one E2B-shaped text checkpoint.

    python benchmarks/serve.py [--layers 5] [--concurrency 1 8 32] [--requests 4 16 64]
        [--prompt-words 20] [--max-tokens 16] [--rounds 1] [--tiny] [--bundled-blas]

Both servers run as real subprocesses on 127.0.0.1, one at a time (two would share this
machine's cores). Against each, `concurrency` clients send non-streamed greedy chat requests
back to back until `requests` have been answered (a bounded count per level); every request
has its own prompt (no prefix is shared). Reported per level: requests/s and generated tokens
per second over the whole level's wall time, and the p50 / p99 request latency. Both servers
render the same chat template (the package's built-in one, written into the checkpoint) and
stop only at `max_tokens` or a stop token the random model rarely samples. `--tiny` runs the
tests' tiny checkpoint instead, to time what each server spends around its model.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from common import CACHE, base_parser, e2b_shaped_checkpoint, parse, print_table
from structured import gemma_sized_tokenizer

RETRIES = 5
WORDS = (
    "river stone light garden paper window music winter bridge market orange silver cloud "
    "engine forest letter planet summer yellow doctor island mirror pocket rabbit candle "
    "ladder violin harbor meadow basket thunder lantern pepper castle spider blanket"
).split()


def chat_checkpoint(layers: int) -> Path:
    """The E2B-shaped weights, the Gemma-sized tokenizer and our built-in chat template in one
    folder, so both servers render the same prompt tokens."""
    from mlx_gemma4.processing.chat_template import BUILTIN_TEMPLATE

    weights = e2b_shaped_checkpoint(layers)
    gemma_sized_tokenizer()
    tokenizer = CACHE / "gemma-sized-tokenizer"
    folder = CACHE / f"e2b-shaped-{layers}l-chat"
    folder.mkdir(exist_ok=True)
    for source in [*weights.iterdir(), *tokenizer.iterdir()]:
        link = folder / source.name
        if not link.exists():
            link.symlink_to(source)
    (folder / "chat_template.jinja").write_text(BUILTIN_TEMPLATE)
    return folder


def tiny_chat_checkpoint() -> Path:
    """The tests' tiny text checkpoint (64 wide, 6 layers, 512-piece vocabulary) with their
    tokenizer and our chat template: its model time is next to nothing, so what a server
    spends around the model (HTTP, scheduling, sampling, detokenizing) is what is timed."""
    from mlx_gemma4.processing.chat_template import BUILTIN_TEMPLATE

    folder = CACHE / "tiny-chat"
    if not (folder / "config.json").exists():
        sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
        from checkpoints import build_text, save_tokenizer

        build_text("ple_kv_shared", folder)
        save_tokenizer(folder)
    (folder / "chat_template.jinja").write_text(BUILTIN_TEMPLATE)
    return folder


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def server_command(name: str, folder: Path, port: int) -> list[str]:
    if name == "mlx-gemma4":
        serve = ["-m", "mlx_gemma4.cli", "serve", "--model", str(folder)]
        return [sys.executable, *serve, "--host", "127.0.0.1", "--port", str(port)]
    return [
        sys.executable,
        *["-m", "mlx_lm.server", "--model", str(folder), "--host", "127.0.0.1"],
        *["--port", str(port), "--log-level", "WARNING"],
    ]


class Server:
    """One server subprocess, up until `stop()`; its output goes to a log file."""

    def __init__(self, name: str, folder: Path, log: Path):
        self.name, self.port = name, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log.open("wb")
        self.process = subprocess.Popen(
            server_command(name, folder, self.port), stdout=self.log, stderr=subprocess.STDOUT
        )

    def wait_ready(self, timeout: float = 900) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"{self.name} exited ({self.process.returncode}): {self.log.name}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as response:
                    if response.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                time.sleep(1)
        raise SystemExit(f"{self.name} was not ready within {timeout:.0f} s: {self.log.name}")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


def prompt(index: int, words: int) -> str:
    """A distinct prompt per request: the index first, so no two share more than a few tokens."""
    start = (index * 7) % len(WORDS)
    chosen = [WORDS[(start + i * (index % 5 + 1)) % len(WORDS)] for i in range(words)]
    return f"Request {index}: tell a story about " + " ".join(chosen)


@dataclass
class Outcome:
    seconds: float
    prompt_tokens: int
    completion_tokens: int
    retries: int  # connections the server reset or refused before it took the request


def chat(url: str, text: str, max_tokens: int) -> Outcome:
    body = {
        "model": "default_model",  # mlx_lm.server's name for its --model
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        # thinking off in both (mlx-lm's tokenizer wrapper turns it on when not told)
        "chat_template_kwargs": {"enable_thinking": False},
    }
    request = urllib.request.Request(
        f"{url}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    start = time.perf_counter()
    for retries in range(RETRIES + 1):
        try:
            with urllib.request.urlopen(request, timeout=900) as response:
                usage = json.loads(response.read())["usage"]
            break
        except (ConnectionError, urllib.error.URLError) as e:
            if not isinstance(getattr(e, "reason", e), ConnectionError):  # HTTP errors too
                raise
            # mlx_lm.server's listen backlog is 5 (ThreadingHTTPServer's default): a burst of
            # connections can overflow it. Clients retry, as OpenAI's does; the wait counts.
            if retries == RETRIES:
                raise
            time.sleep(0.5 * (retries + 1))
    seconds = time.perf_counter() - start
    return Outcome(seconds, usage["prompt_tokens"], usage["completion_tokens"], retries)


@dataclass
class Level:
    requests_per_second: float
    tokens_per_second: float
    p50: float
    p99: float
    prompt_tokens: float
    completion_tokens: float
    retries: int


def run_level(url: str, clients: int, requests: int, first: int, args) -> Level:
    """`requests` requests from `clients` concurrent clients; prompt indices from `first`."""
    texts = [prompt(first + i, args.prompt_words) for i in range(requests)]
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        outcomes = list(pool.map(lambda text: chat(url, text, args.max_tokens), texts))
    wall = time.perf_counter() - start
    latencies = sorted(o.seconds for o in outcomes)
    p99_index = min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))
    return Level(
        requests / wall,
        sum(o.completion_tokens for o in outcomes) / wall,
        statistics.median(latencies),
        latencies[p99_index],
        statistics.mean(o.prompt_tokens for o in outcomes),
        statistics.mean(o.completion_tokens for o in outcomes),
        sum(o.retries for o in outcomes),
    )


def measure(name: str, folder: Path, args) -> dict[int, Level]:
    server = Server(name, folder, CACHE / f"serve-bench-{name}.log")
    try:
        server.wait_ready()
        chat(server.url, prompt(10_000, args.prompt_words), args.max_tokens)  # warm-up
        levels = {}
        for clients, requests in zip(args.concurrency, args.requests, strict=True):
            # the same prompts for both servers, different ones at each level
            try:
                levels[clients] = run_level(server.url, clients, requests, 1000 * clients, args)
            except OSError:
                if server.process.poll() is None:
                    raise
                code = server.process.returncode
                raise SystemExit(
                    f"{name} exited ({code}{': killed, out of memory?' if code == -9 else ''}) "
                    f"during the {clients}-client level; its log: {server.log.name}"
                ) from None
            level = levels[clients]
            print(
                f"{name:>10} x{clients:<3} {level.requests_per_second:6.2f} req/s "
                f"{level.tokens_per_second:7.1f} tok/s  p50 {level.p50:6.2f} s  "
                f"p99 {level.p99:6.2f} s  (prompt {level.prompt_tokens:.0f}, "
                f"generated {level.completion_tokens:.1f} tokens a request, "
                f"{level.retries} connections retried)",
                flush=True,
            )
        return levels
    finally:
        server.stop()


def main() -> None:
    parser = base_parser(rounds=1)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--prompt-words", type=int, default=20, help="words in each prompt")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens generated a request")
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="the tests' tiny checkpoint instead: the servers' overhead, not the model's time",
    )
    args, blas = parse(parser)
    if len(args.requests) != len(args.concurrency):
        raise SystemExit("--requests needs one count per --concurrency level")
    if any(r < c for r, c in zip(args.requests, args.concurrency, strict=True)):
        raise SystemExit("each --requests count must be at least its --concurrency")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = tiny_chat_checkpoint() if args.tiny else chat_checkpoint(args.layers)
    shape = "tiny (tests')" if args.tiny else f"{args.layers}-layer E2B-shaped"

    best: dict[str, dict[int, Level]] = {}
    for _ in range(args.rounds):
        for name in ["mlx-gemma4", "mlx-lm"]:
            levels = measure(name, folder, args)
            for clients, level in levels.items():
                kept = best.setdefault(name, {}).get(clients)
                if kept is None or level.tokens_per_second > kept.tokens_per_second:
                    best[name][clients] = level

    rows = []
    for clients, requests in zip(args.concurrency, args.requests, strict=True):
        ours, theirs = best["mlx-gemma4"][clients], best["mlx-lm"][clients]
        rows.append(
            [
                clients,
                requests,
                f"{ours.requests_per_second:.2f} / {theirs.requests_per_second:.2f}",
                f"{ours.tokens_per_second:.1f} / {theirs.tokens_per_second:.1f}",
                f"{ours.tokens_per_second / theirs.tokens_per_second:.2f}x",
                f"{ours.p50:.1f} / {theirs.p50:.1f}",
                f"{ours.p99:.1f} / {theirs.p99:.1f}",
                f"{ours.retries} / {theirs.retries}",
            ]
        )
    print_table(
        f"gemma4 serve / mlx_lm.server, {shape} checkpoint (float32), "
        f"prompts of ~{best['mlx-gemma4'][args.concurrency[0]].prompt_tokens:.0f} tokens, "
        f"up to {args.max_tokens} generated, greedy, non-streamed ({blas})",
        [
            "clients",
            "requests",
            "req/s",
            "generated tok/s",
            "tok/s ratio",
            "p50 latency s",
            "p99 latency s",
            "connections retried",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
