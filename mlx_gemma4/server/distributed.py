"""Serving a model split across a distributed group: rank 0 runs the HTTP server and the
engine driver, every other rank follows.

Every forward pass is collective, so every rank must make the same `BatchGenerator` calls in
the same order with the same inputs. Before each engine iteration rank 0 broadcasts the calls
it made since the last one (the requests it submitted, with their prompts and options, and
the ones it cancelled) and a fresh random seed; the followers make the same calls, seed alike,
and everyone steps. A stop message ends the followers.

The messages are pickled: the ranks are one program that `mlx.launch` started together, and
the followers only ever read what rank 0 sent. A rank blocked in a broadcast polls its socket
and keeps a core busy, so an idle rank 0 sends an empty message every `IDLE_TICK` seconds and
the followers sleep nearly as long after each.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from ..collectives import Group, Watchdog, broadcast_bytes, lost_ranks_reported
from ..engine import BatchGenerator
from ..engine.prefix_pool import PrefixCachePool
from ..errors import DistributedError
from ..prompt_cache import PromptCache
from .driver import EngineDriver
from .settings import ServerSettings, engine_generator

log = logging.getLogger("mlx_gemma4.server")

IDLE_TICK = 0.05  # seconds between an idle rank 0's messages
FOLLOWER_NAP = 0.9 * IDLE_TICK  # a follower's sleep after an idle message: it arrives first
STOP_GRACE = 10.0  # seconds a stopping engine may take before it counts as stuck in a collective
STUCK = (
    "another rank stopped or became unreachable (the engine still waited in a collective "
    f"{STOP_GRACE:g} s after the stop signal)"
)


@dataclass
class Changes:
    """What rank 0's engine did since the last message: calls in order, ("submit", id, prompt,
    options) or ("cancel", id), and the seed every rank draws from next."""

    calls: list[tuple] = field(default_factory=list)
    seed: int = 0
    stop: bool = False


class GroupLink:
    """Rank 0's messages to the other ranks: a length, then the pickled bytes (nothing more
    when there is nothing to say)."""

    def __init__(self, group: Group):
        self.group = group

    def send(self, message: Changes | None) -> None:
        data = b"" if message is None else pickle.dumps(message, pickle.HIGHEST_PROTOCOL)
        broadcast_bytes(data, self.group)

    def receive(self) -> Changes | None:
        data = broadcast_bytes(None, self.group)
        return pickle.loads(data) if data else None


class GroupPrefixPool(PrefixCachePool):
    """A prefix pool that counts each cache by the memory model's bytes for its tokens, which
    are the same on every rank. Each rank holds its own share of a cache (a pipeline rank only
    its layers'), so counting what they hold would evict different entries on different ranks,
    and their prefills, and with them their collectives, would differ."""

    def __init__(self, model, max_bytes: int, measure: Callable[[int], int]):
        super().__init__(model, max_bytes)
        self.measure = measure

    def entry_bytes(self, prompt_cache: PromptCache) -> int:
        return self.measure(len(prompt_cache.tokens))


def group_generator(model, processor, settings: ServerSettings) -> BatchGenerator:
    """The engine's generator as every rank of a group makes it (`engine_generator`, with
    decisions that do not depend on the rank)."""
    generator = engine_generator(model, processor, settings)
    if generator.pool is not None:
        generator.pool = GroupPrefixPool(model, generator.pool.max_bytes, generator.row_kv_bytes)
    return generator


class LeaderGenerator:
    """Rank 0's generator: the calls that change it are recorded for the followers."""

    def __init__(self, generator: BatchGenerator):
        self.generator = generator
        self.calls: list[tuple] = []

    def submit(self, prompt: Any, **options: Any) -> int:
        request_id = self.generator.submit(prompt, **options)
        self.calls.append(("submit", request_id, prompt, options))
        return request_id

    def cancel(self, request_id: int) -> bool:
        self.calls.append(("cancel", request_id))
        return self.generator.cancel(request_id)

    def step(self) -> list:
        return self.generator.step()

    @property
    def done(self) -> bool:
        return self.generator.done

    def take_calls(self) -> list[tuple]:
        calls, self.calls = self.calls, []
        return calls


class LeaderDriver(EngineDriver):
    """Rank 0's engine driver: before each iteration's step it tells the followers what changed.

    A lost rank, or any engine error (the ranks' states may then differ), ends every job with
    the reason and stops the driver; `failure` holds it and `on_failure` is called, so the
    server can exit."""

    idle_wait = IDLE_TICK

    def __init__(self, model, processor, settings: ServerSettings, group: Group):
        super().__init__(
            model,
            lambda: LeaderGenerator(group_generator(model, processor, settings)),
            settings.max_concurrency,
        )
        self.link = GroupLink(group)
        self.timeout = settings.distributed_timeout

    def _run(self) -> None:
        try:
            with lost_ranks_reported():
                self.link.send(None)  # waits for every follower to have loaded: not timed
        except DistributedError as error:  # one died while loading
            self._recover(error)
            return
        # every message after it (one each 50 ms even when idle) is a beat: a follower that
        # stops without closing its connection stalls them, and the watchdog ends rank 0
        with Watchdog(self.timeout):
            super()._run()

    def _iterate(self) -> bool:
        with lost_ranks_reported():
            return super()._iterate()

    def _before_step(self) -> None:
        calls = self.generator.take_calls()
        if not calls:
            self.link.send(None)
            return
        seed = new_seed()
        self.link.send(Changes(calls, seed))
        mx.random.seed(seed)

    def _stopped(self) -> None:
        self.link.send(Changes(stop=True))

    def stop_soon(self) -> None:
        # `mlx.launch` sends the stop signal itself when another rank died: the engine may then
        # wait in a collective that never returns, so the stop must not wait for it
        super().stop_soon()
        timer = threading.Timer(STOP_GRACE, self._give_up_if_stuck)
        timer.daemon = True
        timer.start()

    def _give_up_if_stuck(self) -> None:
        if self._thread.is_alive() and self.failure is None:
            self._give_up(DistributedError(STUCK))  # its thread waits: its jobs end from here

    def stop(self, timeout: float = 30.0) -> None:
        if self.failure is None:
            super().stop(timeout)

    def _recover(self, error: Exception) -> bool:
        if isinstance(error, DistributedError):
            reason = str(error)
        else:
            log.exception("the engine failed")
            reason = (
                f"the engine failed ({type(error).__name__}, see rank 0's log); the ranks of a "
                "split model cannot go on apart, so the server stops"
            )
        log.error("%s", reason)
        self._give_up(DistributedError(reason))
        return True


def new_seed() -> int:
    return int.from_bytes(os.urandom(4), "little") >> 1


def follow(model, processor, settings: ServerSettings, group: Group) -> None:
    """A follower rank's part of a split server: make the engine calls rank 0 makes, in its
    order, until it says stop. Ctrl-C, which a terminal sends every rank, is left to rank 0."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    link = GroupLink(group)
    generator = group_generator(model, processor, settings)
    ours: dict[int, int] = {}  # rank 0's request id -> this rank's
    theirs: dict[int, int] = {}
    changes = link.receive()  # rank 0's first: it has loaded and serves (loading is not timed)
    with Watchdog(settings.distributed_timeout):  # each later message is a beat
        while changes is None or not changes.stop:
            if changes is not None:
                for call in changes.calls:
                    apply_call(generator, call, ours, theirs, group.rank())
                mx.random.seed(changes.seed)
            if not generator.done:
                for response in generator.step():
                    if response.finish_reason is not None:
                        ours.pop(theirs.pop(response.request_id, None), None)
            elif changes is None:
                time.sleep(FOLLOWER_NAP)
            changes = link.receive()


def apply_call(
    generator: BatchGenerator, call: tuple, ours: dict[int, int], theirs: dict[int, int], rank: int
) -> None:
    """Make one of rank 0's calls here. A request rank 0 took must be taken here too: if it is
    not, the ranks have parted, and this rank stops (rank 0 then reports it lost)."""
    if call[0] == "submit":
        _, their_id, prompt, options = call
        try:
            our_id = generator.submit(prompt, **options)
        except Exception as error:
            raise DistributedError(
                f"rank {rank} could not take a request rank 0 took ({error}); stopping"
            ) from error
        ours[their_id], theirs[our_id] = our_id, their_id
    elif call[0] == "cancel":
        our_id = ours.pop(call[1], None)
        if our_id is not None:
            theirs.pop(our_id, None)
            generator.cancel(our_id)
