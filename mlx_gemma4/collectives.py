"""A group's collectives as this package uses them: in one order on every rank, broadcasts
from rank 0 (prompts, input lines, seeds), the group's start, a lost peer's error and a
watchdog for a peer that stops answering without going away."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import mlx.core as mx

from .errors import DistributedError

Group = Any  # mx.distributed.Group (not subscriptable as a type)
T = TypeVar("T")

# seconds a rank waits for the others in a step before it gives up (`Watchdog`)
DEFAULT_TIMEOUT = 120.0


class Collectives:
    """A group's collectives, issued in program order on every rank.

    MLX evaluates lazily, in an order set by the shape of the graph. A pipeline's ranks build
    different graphs, so two independent collectives (the token and per-layer table lookups)
    could run in opposite orders on two ranks and pair up wrongly. Each collective here
    depends on the one before it, which fixes the order everywhere.
    """

    def __init__(self, group: Group):
        self.group = group
        self.rank, self.size = group.rank(), group.size()
        self._last: mx.array | None = None

    def _in_turn(self, x: mx.array) -> mx.array:
        return x if self._last is None else mx.depends(x, self._last)

    def _done(self, out: mx.array) -> mx.array:
        # a one-element array computed from `out` marks it, without keeping its buffer alive
        self._last = out.reshape(-1)[:1].sum()
        Watchdog.progress()  # a new collective: the ones before it have been waited for
        return out

    def all_sum(self, x: mx.array) -> mx.array:
        return self._done(mx.distributed.all_sum(self._in_turn(x), group=self.group))

    def broadcast(self, x: mx.array, source: int) -> mx.array:
        """`x` of rank `source` on every rank (the others add zeros). The zeros depend on `x`,
        so every collective behind `x` still runs on every rank."""
        return self.all_sum(x if self.rank == source else mx.depends(mx.zeros_like(x), x))

    def gather_last_axis(self, x: mx.array) -> mx.array:
        """Every rank's `x` [..., n] concatenated along the last axis, in rank order.

        Used for the logits, the last collective of a forward pass: nothing is chained to it,
        so logits no one reads (a prefill chunk's) are never computed, and a step that reads
        them depends on them through its token anyway."""
        parts = mx.distributed.all_gather(self._in_turn(x)[None], group=self.group)
        return mx.moveaxis(parts, 0, -2).reshape(*x.shape[:-1], -1)


def broadcast(x: mx.array, source: int, group: Group) -> mx.array:
    """`x` of rank `source` on every rank, evaluated now."""
    out = Collectives(group).broadcast(x, source)
    mx.eval(out)
    return out


def barrier(group: Group) -> None:
    mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group, stream=mx.cpu))


def broadcast_int(value: int, group: Group) -> int:
    return int(broadcast(mx.array(value, dtype=mx.int32), 0, group).item())


def broadcast_bytes(data: bytes | None, group: Group) -> bytes:
    """Rank 0's `data` on every rank (others pass anything, e.g. None): its length, then the
    bytes themselves when there are any."""
    data = (data or b"") if group.rank() == 0 else b""
    length = broadcast_int(len(data), group)
    if not length:
        return b""
    if group.rank() == 0:
        payload = mx.array(memoryview(data))  # uint8
    else:
        payload = mx.zeros(length, dtype=mx.uint8)
    return bytes(memoryview(broadcast(payload, 0, group)))


def broadcast_text(text: str | None, group: Group) -> str:
    """Rank 0's `text` on every rank (others pass anything, e.g. None)."""
    return broadcast_bytes((text or "").encode(), group).decode()


def init(backend: str = "any") -> Group:
    """The group `mlx.launch` set up (a group of one when not launched), one clear error when
    it cannot start."""
    try:
        return mx.distributed.init(backend=backend)
    except RuntimeError as e:
        hostfile = os.environ.get("MLX_HOSTFILE")
        where = f"hostfile {hostfile} (MLX_HOSTFILE)" if hostfile else "the distributed group"
        raise DistributedError(
            f"{where}: the group could not start ({e}); check the file, or let mlx.launch "
            "write it (mlx.launch --hostfile hosts.json -- gemma4 ...)"
        ) from e


@contextlib.contextmanager
def lost_ranks_reported() -> Iterator[None]:
    """Turn the backend's error for a peer that went away into one `DistributedError`."""
    try:
        yield
    except RuntimeError as e:
        if "[ring]" in str(e) or "[jaccl]" in str(e) or "[mpi]" in str(e):
            raise DistributedError(
                f"another rank stopped or became unreachable ({e}); see its output above"
            ) from e
        raise


class Watchdog:
    """While entered, ends this process when the group stops making progress: one line on
    stderr ("error: ...") and exit status 1 once `seconds` pass without a `beat()`.

    A peer that dies closes its connections, and the next collective fails
    (`lost_ranks_reported`); a peer that is stopped (SIGSTOP) or stuck keeps them open, and a
    collective waits for it forever, inside MLX, where no exception can reach it: a thread
    of its own does the timing. Enter it around work the peers should answer promptly (a
    generation step, sending an input line), never around a wait for a user or a client:
    every `Collectives` operation built and every `watched` item counts as a beat. With
    `seconds` None or 0 it does nothing. On `mlx.launch`, the exit makes the launcher
    terminate the other ranks (a stopped one when it is continued).
    """

    _entered: list[Watchdog] = []  # innermost last

    def __init__(
        self, seconds: float | None = DEFAULT_TIMEOUT, option: str = "--distributed-timeout"
    ):
        self.seconds = seconds or 0.0
        self.option = option
        self._deadline = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self) -> None:
        self._deadline = time.monotonic() + self.seconds

    @classmethod
    def progress(cls) -> None:
        """A beat for every watchdog entered (none: nothing)."""
        for dog in cls._entered:
            dog.beat()

    def __enter__(self) -> Watchdog:
        if self.seconds > 0:
            self.beat()
            self._stop.clear()
            self._thread = threading.Thread(target=self._watch, daemon=True, name="watchdog")
            self._thread.start()
            Watchdog._entered.append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._thread is not None:
            Watchdog._entered.remove(self)
            self._stop.set()
            self._thread.join()
            self._thread = None

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.seconds / 4)):
            if time.monotonic() > self._deadline:
                self._give_up()

    def _give_up(self) -> None:
        sys.stderr.write(
            f"error: no progress from the other ranks for {self.seconds:g} s ({self.option}): "
            "a rank is stopped or stuck without closing its connection; ending this rank\n"
        )
        sys.stderr.flush()
        os._exit(1)  # the main thread waits inside a collective: nothing else can end it


def watched(items: Iterable[T], seconds: float | None = DEFAULT_TIMEOUT) -> Iterator[T]:
    """`items` (a generation's responses), each one a beat of a `Watchdog(seconds)` that
    watches the whole iteration."""
    with Watchdog(seconds) as dog:
        for item in items:
            dog.beat()
            yield item
