"""The HTTP side of the server: OpenAI-style error objects for every failure (never a
traceback), the API key check, and one log line per request."""

from __future__ import annotations

import logging
import re
import secrets
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import Gemma4Error, PromptTooLongError

log = logging.getLogger("mlx_gemma4.server")


class APIError(Exception):
    """An error answered as OpenAI answers one: `{"error": {message, type, param, code}}`."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type,
            param,
            code,
        )

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def from_library_error(error: Gemma4Error) -> APIError:
    """A bad-input error of the package: its one line, as a 400."""
    code = "context_length_exceeded" if isinstance(error, PromptTooLongError) else None
    return APIError(400, str(error), code=code)


_UNION_BRANCH = re.compile(r"^(str|int|float|bool|none)$|\[")


def _field(location: tuple) -> str:
    """`("body", "messages", 0, "content")` -> `messages[0].content`."""
    text = ""
    for part in location:
        if part == "body":
            continue
        if isinstance(part, int):
            text += f"[{part}]"
        elif not text:
            text = str(part)
        elif _UNION_BRANCH.search(str(part)):
            continue  # pydantic's names for union branches say nothing to a client
        else:
            text += f".{part}"
    return text or "body"


def validation_error(error: RequestValidationError) -> APIError:
    """The first problem of a request body that did not validate, naming its field."""
    problems = error.errors()
    if not problems:
        return APIError(400, "the request body is not valid")
    if problems[0].get("type") == "json_invalid":
        return APIError(400, "the request body is not valid JSON", code="invalid_json")
    # the deepest problem: for a union (text or parts) the branch the client meant
    first = max(problems, key=lambda problem: len(problem.get("loc", ())))
    if first.get("type") == "json_invalid":
        return APIError(400, "the request body is not valid JSON", code="invalid_json")
    field = _field(tuple(first.get("loc", ())))
    message = first.get("msg", "invalid value").removeprefix("Value error, ")
    if field == "body" and ": " in message:  # a check of the whole body names its field
        field, message = message.split(": ", 1)
    more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
    return APIError(400, f"{field}: {message}{more}", param=field)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_request: Request, error: APIError) -> JSONResponse:
        return error.response()

    @app.exception_handler(Gemma4Error)
    async def _library_error(_request: Request, error: Gemma4Error) -> JSONResponse:
        return from_library_error(error).response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, error: RequestValidationError) -> JSONResponse:
        return validation_error(error).response()

    @app.exception_handler(HTTPException)
    async def _http(_request: Request, error: HTTPException) -> JSONResponse:
        kind = "invalid_request_error" if error.status_code < 500 else "server_error"
        code = "not_found" if error.status_code == 404 else None
        return APIError(error.status_code, str(error.detail), kind, code=code).response()

    @app.exception_handler(Exception)
    async def _bug(_request: Request, error: Exception) -> JSONResponse:
        log.exception("unexpected error while serving a request")
        return APIError(
            500, "internal server error (see the server's log)", "server_error"
        ).response()


def api_key_check(api_key: str | None):
    """A dependency that answers 401 unless the request carries `Authorization: Bearer KEY`."""

    async def check(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(
            given.strip().encode(), api_key.encode()
        ):
            raise APIError(
                401,
                "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                "authentication_error",
                code="invalid_api_key",
            )

    return check


class RequestLog:
    """ASGI middleware: one line per request when its response ends (streams included):
    method, path, status, bytes sent and seconds."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, state = time.perf_counter(), {"status": 0, "bytes": 0, "logged": False}

        def line(note: str = "") -> None:
            if not state["logged"]:
                state["logged"] = True
                client = scope.get("client") or ("-", 0)
                log.info(
                    "%s %s %s %d %dB %.2fs%s",
                    client[0],
                    scope["method"],
                    scope["path"],
                    state["status"],
                    state["bytes"],
                    time.perf_counter() - start,
                    note,
                )

        async def logged_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
            elif message["type"] == "http.response.body":
                state["bytes"] += len(message.get("body", b""))
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                line()

        try:
            await self.app(scope, receive, logged_send)
        finally:
            line(" (client gone)" if state["status"] else " (no response)")


class _BodyTooLarge(HTTPException):
    """Raised while the body arrives: FastAPI passes HTTP exceptions on unchanged."""


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` (by its Content-Length, or counted as
    it arrives) is answered 413 with an OpenAI error object, before the app reads it all."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self) -> APIError:
        return APIError(
            413,
            f"the request body is larger than the server's limit of {self.max_bytes:,} bytes",
            code="request_too_large",
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers", [])).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            await self._too_large().response()(scope, receive, send)
            return
        state = {"received": 0, "started": False}

        async def counted_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > self.max_bytes:
                    raise _BodyTooLarge(413, self._too_large().message)
            return message

        async def tracked_send(message: Message) -> None:
            state["started"] = state["started"] or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except _BodyTooLarge:
            if not state["started"]:
                await self._too_large().response()(scope, receive, send)
