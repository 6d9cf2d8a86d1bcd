"""The FastAPI app: OpenAI's endpoints over one engine driver, and the chat page."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, PlainTextResponse
from fastapi.sse import EventSourceResponse
from fastapi.staticfiles import StaticFiles

from ..drafters import check_draft_model
from ..options import SamplingOptions
from .completions import (
    Reply,
    accepted,
    chat_options,
    collect,
    sampling_options,
    stream,
)
from .distributed import LeaderDriver
from .driver import EngineDriver, Job, materialize
from .http import APIError, BodyLimit, RequestLog, api_key_check, install_error_handlers
from .messages import chat_messages
from .schemas import ChatCompletionRequest, CompletionRequest
from .settings import ServerSettings, engine_generator
from .transcriptions import TranscriptionFormat, transcribe_upload

STATIC = Path(__file__).parent / "static"
NO_CACHE = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # proxies pass events on


def create_app(
    model,
    processor,
    settings: ServerSettings | None = None,
    draft_model=None,
    group: Any = None,
) -> FastAPI:
    """The OpenAI-compatible app for a loaded model. Its engine thread starts with the app
    (the lifespan) and stops with it, ending unfinished streams with an error event.

    `draft_model` (checked against `model`) drafts for every request: speculative decoding,
    reported in each answer's usage as accepted and rejected prediction tokens.
    `group`: the distributed group the model is split across (see `server.distributed`); this
    process is its rank 0, and every other rank runs `follow` meanwhile."""
    settings = settings or ServerSettings()
    if group is not None and draft_model is not None:
        raise ValueError("a split model cannot draft yet: no draft_model with a group")
    if draft_model is not None and not hasattr(draft_model, "propose"):  # a model
        check_draft_model(model, draft_model)  # before the engine thread starts
        materialize(draft_model)
    if group is None:
        driver = EngineDriver(
            model,
            lambda: engine_generator(model, processor, settings, draft_model),
            settings.max_concurrency,
        )
    else:
        driver = LeaderDriver(model, processor, settings, group)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        driver.start()
        # uvicorn listens once this returns: a client that can connect (to /health too) is
        # served by a running engine, and a split model's followers have all loaded
        await run_in_threadpool(driver.wait_until_running)
        try:
            yield
        finally:
            await run_in_threadpool(driver.stop)

    app = FastAPI(
        title="mlx-gemma4",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.driver = driver
    app.state.settings = settings
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestLog)
    install_error_handlers(app)
    authorized = [Depends(api_key_check(settings.api_key))]

    async def respond(job: Job, kind: str, body, request: Request):
        """Submit the job; its answer as one body, or streamed as server-sent events."""
        await accepted(driver, job, request)
        reply = Reply(kind, settings.model_name)
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return EventSourceResponse(stream(driver, job, reply, usage), headers=NO_CACHE)
        return reply.whole(await collect(driver, job, request))

    @app.post("/v1/chat/completions", dependencies=authorized)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        messages = await run_in_threadpool(chat_messages, body.messages, settings.media)
        options = chat_options(body, body.token_limit() or settings.default_max_tokens)
        job = Job(messages, options, asyncio.get_running_loop())
        return await respond(job, "chat.completion", body, request)

    @app.post("/v1/completions", dependencies=authorized)
    async def completions(body: CompletionRequest, request: Request):
        sampling = sampling_options(body, body.token_limit() or settings.default_max_tokens)
        job = Job(body.prompt, {"sampling": sampling}, asyncio.get_running_loop())
        return await respond(job, "text_completion", body, request)

    async def audio_endpoint(
        request: Request,
        file: UploadFile,
        language: str | None,
        response_format: TranscriptionFormat,
        temperature: float,
        translate_to: str | None = None,
    ):
        return await transcribe_upload(
            driver,
            request,
            file,
            language=language,
            translate_to=translate_to,
            response_format=response_format,
            sampling=SamplingOptions(
                max_tokens=settings.transcription_max_tokens, temperature=temperature
            ),
            policy=settings.media,
        )

    @app.post("/v1/audio/transcriptions", dependencies=authorized)
    async def transcriptions(
        request: Request,
        file: Annotated[UploadFile, File()],
        model: Annotated[str | None, Form()] = None,
        language: Annotated[str | None, Form()] = None,
        response_format: Annotated[TranscriptionFormat, Form()] = TranscriptionFormat.json,
        temperature: Annotated[float, Form(ge=0.0, le=2.0)] = 0.0,
    ):
        return await audio_endpoint(request, file, language, response_format, temperature)

    @app.post("/v1/audio/translations", dependencies=authorized)
    async def translations(
        request: Request,
        file: Annotated[UploadFile, File()],
        model: Annotated[str | None, Form()] = None,
        response_format: Annotated[TranscriptionFormat, Form()] = TranscriptionFormat.json,
        temperature: Annotated[float, Form(ge=0.0, le=2.0)] = 0.0,
    ):
        """Speech in any language -> English text, as OpenAI's endpoint."""
        return await audio_endpoint(
            request, file, None, response_format, temperature, translate_to="English"
        )

    served_model = {
        "id": settings.model_name,
        "object": "model",
        "created": 0,
        "owned_by": "mlx-gemma4",
    }

    @app.get("/v1/models", dependencies=authorized)
    async def models():
        return {"object": "list", "data": [served_model]}

    @app.get("/v1/models/{model_id:path}", dependencies=authorized)
    async def model_info(model_id: str):
        if model_id != settings.model_name:
            raise APIError(
                404,
                f"model {model_id!r}: this server serves {settings.model_name!r} only",
                param="model",
                code="model_not_found",
            )
        return served_model

    @app.get("/health")
    async def health():
        if driver.stopping:
            raise APIError(503, "the server is shutting down", "server_error")
        return {"status": "ok", "model": settings.model_name, **driver.stats()}

    @app.get("/", include_in_schema=False)
    async def page():
        index = STATIC / "index.html"
        if not index.is_file():
            return PlainTextResponse("mlx-gemma4 server: the chat page is not installed")
        return FileResponse(index)

    if STATIC.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
