"""The engine driver: one thread owns the `BatchGenerator` and steps it while requests exist.

Request handlers (on the event loop) hand it jobs; it submits each when a concurrency slot is
free (so a request's own errors, such as an over-long prompt, come back before its response
starts), and passes every step's tokens to the job's asyncio queue from its thread
(`loop.call_soon_threadsafe`). A job ends with `None` on its queue, or an exception. All model
work happens on this one thread.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
from jinja2 import TemplateError
from mlx.utils import tree_flatten

from ..engine import BatchGenerator
from ..errors import Gemma4Error, ServerRequestError

log = logging.getLogger("mlx_gemma4.server")


def materialize(model) -> None:
    """Evaluate every array the model holds, private ones (rope frequencies, constants) too.
    MLX ties an unevaluated array to the thread that built it: the engine thread cannot
    evaluate what the loading thread left lazy."""
    arrays = [
        value
        for module in model.modules()
        for _, value in tree_flatten(dict(module.items()))
        if isinstance(value, mx.array)
    ]
    mx.eval(arrays)


class ServerStopping(Exception):
    """The server is shutting down: the job ends unfinished."""


class EngineFailure(Exception):
    """The engine raised an unexpected error while the job ran (logged on the server)."""


@dataclass(eq=False)
class Job:
    """One request's generation: what to submit, and where its tokens go."""

    prompt: Any
    options: dict[str, Any]
    loop: asyncio.AbstractEventLoop
    tokens: asyncio.Queue = field(default_factory=asyncio.Queue)
    accepted: Future = field(default_factory=Future)  # the engine's request id, or the error
    request_id: int | None = None


class EngineDriver:
    """Runs `generator` on its own thread, at most `max_concurrency` requests at a time (the
    rest wait here, first come first served)."""

    # seconds an idle engine waits for a command before iterating anyway (None: until one comes)
    idle_wait: float | None = None

    def __init__(
        self,
        model,
        make_generator: Callable[[], BatchGenerator],
        max_concurrency: int | None = None,
    ):
        materialize(model)  # here, on the thread that loaded it
        self._make_generator = make_generator
        self.generator: BatchGenerator | None = None  # made on the engine thread
        self.max_concurrency = max_concurrency
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._waiting: deque[Job] = deque()
        self._active: dict[int, Job] = {}
        self._stopping = False  # the engine thread's view
        self._closed = False  # no more submissions (set by any thread, under the lock)
        # reentrant: `stop_soon` runs in a signal handler, maybe while this thread is in `submit`
        self._lock = threading.RLock()
        self.cancelled = 0  # jobs dropped before their end (their clients left)
        # why submissions are refused once closed (a lost rank says so instead of "shutting down")
        self._closed_reason = "the server is shutting down"
        self.failure: Exception | None = None  # why the driver gave up, if it did (`_give_up`)
        self.on_failure: Callable[[], None] = lambda: None  # called from the engine thread
        self._running = threading.Event()  # the engine thread has made its generator
        self._thread = threading.Thread(target=self._run, name="gemma4-engine", daemon=True)

    # ---------------------------------------------------------------------- any thread
    def start(self) -> None:
        self._thread.start()

    def wait_until_running(self, poll: float = 0.2) -> None:
        """Block until the engine thread has made its generator (a split model's: once every
        rank has loaded), or has ended, or a stop came first."""
        while not self._running.wait(poll):
            if self._closed or not self._thread.is_alive():
                return

    def submit(self, job: Job) -> Future:
        """Queue `job`; the future resolves when the engine took it (or refused it)."""
        with self._lock:  # no job is left behind the stop command unanswered
            if self._closed:
                job.accepted.set_exception(ServerStopping(self._closed_reason))
            else:
                self._commands.put(("submit", job))
        return job.accepted

    def cancel(self, job: Job) -> None:
        """Drop the job, waiting or running, and free its cache."""
        self._commands.put(("cancel", job))

    def stop_soon(self) -> None:
        """Ask the thread to end every job with `ServerStopping` and finish (returns at once:
        safe in a signal handler)."""
        with self._lock:
            self._closed = True
            self._commands.put(("stop", None))

    def stop(self, timeout: float = 30.0) -> None:
        """`stop_soon`, then wait for the thread (at most `timeout` seconds: a step ends first)."""
        self.stop_soon()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    @property
    def stopping(self) -> bool:
        return self._closed

    def stats(self) -> dict[str, int]:
        """How many requests run in the engine, wait for a slot, were cancelled (approximate:
        read from another thread)."""
        return {
            "running": len(self._active),
            "waiting": len(self._waiting),
            "cancelled": self.cancelled,
        }

    # ---------------------------------------------------------------------- engine thread
    def _run(self) -> None:
        self.generator = self._make_generator()
        self._running.set()
        while True:
            try:
                if self._iterate():
                    return
            except Exception as error:
                if self._recover(error):
                    return

    def _recover(self, error: Exception) -> bool:
        """After an unexpected error the batch's state is unknown: end every job (their
        clients get a server error, the log the traceback), start a fresh generator. True when
        the driver cannot go on."""
        log.exception("the engine failed")
        self._end_all(EngineFailure(type(error).__name__))
        self.generator = self._make_generator()
        return False

    def _iterate(self) -> bool:
        """Take the commands, fill free slots, step once; True when the driver stopped."""
        idle = self.generator.done and not self._waiting
        self._take_commands(block=idle)
        if self._stopping:
            # first: a split model's followers hear of the stop, and when one is gone, that
            # (not the stop) is the reason every job ends with (`_recover`)
            self._stopped()
            self._end_all(ServerStopping("the server is shutting down"))
            self._refuse_the_rest()
            return True
        self._fill_slots()
        self._before_step()
        if not self.generator.done:
            self._step()
        return False

    def _give_up(self, error: Exception) -> None:
        """Stop for good: refuse new jobs and end every job with `error`'s reason, keep it as
        `failure` and call `on_failure`."""
        reason = str(error)
        with self._lock:
            self._closed, self._closed_reason = True, reason
        self._end_all(ServerStopping(reason))
        self._refuse_the_rest()
        self.failure = error
        self.on_failure()

    def _before_step(self) -> None:
        """Called once an iteration, after the commands are applied and before the step (even
        when nothing steps)."""

    def _stopped(self) -> None:
        """Called once, when the driver stops, before its jobs end."""

    def _take_commands(self, block: bool) -> None:
        try:
            command = self._commands.get(block=block, timeout=self.idle_wait if block else None)
        except queue.Empty:
            return
        while True:
            self._handle(*command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _handle(self, kind: str, job: Job | None) -> None:
        if kind == "submit":
            if self._stopping:
                job.accepted.set_exception(ServerStopping("the server is shutting down"))
            else:
                self._waiting.append(job)
        elif kind == "cancel":
            if job in self._waiting:
                self._waiting.remove(job)
                self.cancelled += 1
            elif job.request_id is not None and self._active.pop(job.request_id, None):
                self.generator.cancel(job.request_id)
                self.cancelled += 1
        elif kind == "stop":
            self._stopping = True

    def _refuse_the_rest(self) -> None:
        """Answer any job queued after the stop (a `submit` the stop signal interrupted)."""
        with self._lock:
            while True:
                try:
                    kind, job = self._commands.get_nowait()
                except queue.Empty:
                    return
                if kind == "submit":
                    job.accepted.set_exception(ServerStopping(self._closed_reason))

    def _fill_slots(self) -> None:
        while self._waiting and (
            self.max_concurrency is None or len(self._active) < self.max_concurrency
        ):
            job = self._waiting.popleft()
            try:
                job.request_id = self.generator.submit(job.prompt, **job.options)
            except Gemma4Error as error:
                job.accepted.set_exception(error)
                continue
            except TemplateError as error:  # a checkpoint's template may refuse a conversation
                reason = (str(error).splitlines() or ["no reason given"])[0]
                job.accepted.set_exception(
                    ServerRequestError(f"messages: the chat template cannot render them: {reason}")
                )
                continue
            except Exception as error:  # a bug: logged here, never shown to the client
                log.exception("the engine could not take a request")
                job.accepted.set_exception(EngineFailure(type(error).__name__))
                continue
            self._active[job.request_id] = job
            job.accepted.set_result(job.request_id)

    def _step(self) -> None:
        deliveries: list[tuple[Job, Any]] = []
        for response in self.generator.step():
            job = self._active.get(response.request_id)
            if job is None:
                continue
            deliveries.append((job, response))
            if response.finish_reason is not None:
                del self._active[response.request_id]
                deliveries.append((job, None))
        self._send(deliveries)

    def _end_all(self, error: Exception) -> None:
        """End every job with `error` (their rows stay: the generator is stopped or replaced)."""
        deliveries = []
        for job in [*self._waiting, *self._active.values()]:
            if not job.accepted.done():
                job.accepted.set_exception(error)
            else:
                deliveries.append((job, error))
        self._send(deliveries)
        self._waiting.clear()
        self._active.clear()

    @staticmethod
    def _send(deliveries: list[tuple[Job, Any]]) -> None:
        """Hand each item to its job's queue: one wake-up of each event loop per step, not one
        per token."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Job, Any]]] = {}
        for job, item in deliveries:
            by_loop.setdefault(job.loop, []).append((job, item))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the loop closed: nobody is listening
                pass


def _put_all(items: list[tuple[Job, Any]]) -> None:
    for job, item in items:
        job.tokens.put_nowait(item)
