"""`--distributed tensor|pipeline`: one command run by every rank `mlx.launch` started.

Rank 0 talks to the user; the other ranks follow silently: they get rank 0's prompt and input
lines, draw the same random numbers, and compute their share of every step. A rank that stops
answering without going away ends every rank after --distributed-timeout seconds.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Iterable
from typing import Annotated, Any

import typer

from mlx_gemma4.collectives import DEFAULT_TIMEOUT  # noqa: F401  (the option's default)

Distributed = Annotated[
    str | None,
    typer.Option(
        "--distributed",
        metavar="tensor|pipeline",
        help="Split the model across the ranks mlx.launch started: tensor (every layer cut "
        "across ranks) or pipeline (a span of layers per rank).",
    ),
]
DistributedTimeout = Annotated[
    float,
    typer.Option(
        "--distributed-timeout",
        metavar="SECONDS",
        min=0,
        help="With --distributed: end every rank when the others make no progress for this "
        "long while generating (a rank stopped or stuck); 0 waits forever.",
    ),
]


_silenced: list[tuple[Any, Any]] = []


def start(mode: str | None) -> Any:
    """The group for `mode` (None: not distributed); followers' output silenced."""
    if mode is None:
        return None
    from mlx_gemma4.collectives import init
    from mlx_gemma4.errors import DistributedError
    from mlx_gemma4.models.sharding import MODES

    if mode not in MODES:
        raise DistributedError(f"--distributed {mode}: use one of {', '.join(MODES)}")
    group = init()
    if group.rank():
        devnull = open(os.devnull, "w")  # noqa: SIM115  (for the life of the process)
        # the streams replaced stay referenced: dropping the last reference to a text
        # wrapper closes the buffer beneath it, which its owner (a test runner, a program
        # running the command in-process) may still read
        _silenced.append((sys.stdout, sys.stderr))
        sys.stdout = sys.stderr = devnull
    _same_random_numbers(group)
    return group


def _same_random_numbers(group: Any) -> None:
    """Seed every rank's generator with rank 0's seed, so sampling picks the same tokens."""
    import mlx.core as mx

    from mlx_gemma4.collectives import broadcast_int

    seed = int.from_bytes(os.urandom(4), "little") >> 1 if group.rank() == 0 else 0
    mx.random.seed(broadcast_int(seed, group))


def shared_text(text: str | None, group: Any) -> str | None:
    """Rank 0's `text` on every rank (unchanged when not distributed)."""
    if group is None:
        return text
    from mlx_gemma4.collectives import broadcast_text

    return broadcast_text(text, group)


def shared_reader(
    read_line: Callable[[str], str], group: Any, timeout: float | None = None
) -> Callable[[str], str]:
    """Rank 0 reads lines with `read_line` and sends each (or the end of input) to the
    others, whose reader returns the same lines. Sending is watched (`timeout` seconds);
    waiting for the user, on rank 0 or behind it, is not."""
    if group is None:
        return read_line
    from mlx_gemma4.collectives import Watchdog, broadcast_int, broadcast_text

    def read(prompt: str) -> str:
        line, ended = None, 0
        if group.rank() == 0:
            try:
                line = read_line(prompt)
            except EOFError:
                ended = 1
        with Watchdog(timeout if group.rank() == 0 else None):
            if broadcast_int(ended, group):
                raise EOFError
            return broadcast_text(line, group)

    return read


def watched(responses: Iterable, group: Any, timeout: float | None) -> Iterable:
    """A generation's responses, watched for a rank that stops answering (`timeout`
    seconds without progress ends this rank); unchanged when not distributed."""
    if group is None:
        return responses
    from mlx_gemma4.collectives import watched as watch

    return watch(responses, timeout)


def watching(stream_generate: Callable[..., Iterable], group: Any, timeout: float | None):
    """`stream_generate` whose responses are `watched`."""

    @functools.wraps(stream_generate)
    def run(*args, **kwargs):
        return watched(stream_generate(*args, **kwargs), group, timeout)

    return run


def reports_lost_ranks(command: Callable) -> Callable:
    """A command during which a peer that goes away ends in one clear error."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        from mlx_gemma4.collectives import lost_ranks_reported

        with lost_ranks_reported():
            return command(*args, **kwargs)

    return run


def prompt_text(prompt: str, group: Any) -> str:
    """The prompt: `-` reads stdin (on rank 0, which sends it to the others)."""
    text = prompt
    if prompt == "-" and (group is None or group.rank() == 0):
        text = sys.stdin.read()
    return shared_text(text, group)


def load_options(group: Any, mode: str | None) -> dict[str, Any]:
    """`load` keywords: each rank's share of the model when distributed."""
    return {} if group is None else {"group": group, "mode": mode}
