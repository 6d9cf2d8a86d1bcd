"""Running the app under uvicorn until Ctrl-C or SIGTERM, which end unfinished streams with an
error event (the engine stops first) before the connections close."""

from __future__ import annotations

import logging
import signal

import uvicorn
from fastapi import FastAPI

log = logging.getLogger("mlx_gemma4.server")


class _Server(uvicorn.Server):
    """uvicorn's server, stopping the engine as soon as a stop signal arrives: otherwise the
    graceful shutdown would wait for every stream to finish generating."""

    def __init__(self, config: uvicorn.Config, app: FastAPI):
        super().__init__(config)
        self._driver = app.state.driver
        self._driver.on_failure = self._engine_gave_up

    def _engine_gave_up(self) -> None:
        """The engine cannot go on (a split model lost a rank): shut the server down."""
        self.should_exit = True

    def handle_exit(self, sig, frame) -> None:
        if not self.should_exit:
            log.info("stopping: unfinished requests end with an error")
            self._driver.stop_soon()
        super().handle_exit(sig, frame)


def _ignore(_signal, _frame) -> None:
    """uvicorn raises the stop signal again once it has shut down; by then nothing is left."""


def serve(
    app: FastAPI,
    host: str = "127.0.0.1",
    port: int = 8080,
    log_level: str = "info",
    graceful_seconds: float = 10.0,
) -> None:
    """Serve `app` (from `create_app`) on host:port until a stop signal; returns afterwards.
    When the engine gave up instead (a split model lost a rank), its error is raised."""
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(log_level.upper())
        log.propagate = False
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,  # RequestLog writes one line per request, streams included
        timeout_graceful_shutdown=graceful_seconds,
    )
    previous = {sig: signal.signal(sig, _ignore) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        _Server(config, app).run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if app.state.driver.failure is not None:
        raise app.state.driver.failure
