"""`POST /v1/audio/transcriptions` and `/translations`: an uploaded recording of any length,
split into chunks that the engine transcribes (or translates) together
(`transcription.chunk_requests`), the seams joined."""

from __future__ import annotations

import asyncio
from enum import Enum
from pathlib import PurePosixPath

from fastapi import Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import PlainTextResponse

from ..memory import format_bytes
from ..options import SamplingOptions
from ..processing.audio import SAMPLE_RATE
from ..transcription import Format, as_json, assemble_transcript, chunk_requests, render
from .completions import accepted, collect
from .driver import EngineDriver, Job
from .http import APIError
from .messages import MediaPolicy, decode_audio


class TranscriptionFormat(str, Enum):
    json = "json"
    text = "text"
    srt = "srt"
    vtt = "vtt"
    verbose_json = "verbose_json"


async def transcribe_upload(
    driver: EngineDriver,
    request: Request,
    file: UploadFile,
    *,
    language: str | None,
    translate_to: str | None = None,
    response_format: TranscriptionFormat,
    sampling: SamplingOptions,
    policy: MediaPolicy,
):
    data = await file.read()
    if not data:
        raise APIError(400, "file: the upload is empty", param="file")
    if len(data) > policy.max_media_bytes:
        raise APIError(
            400,
            f"file: larger than the server's limit of {format_bytes(policy.max_media_bytes)}",
            param="file",
        )
    name = file.filename or "audio"
    suffix = PurePosixPath(name).suffix.lower() or ".wav"
    wave = await run_in_threadpool(decode_audio, data, suffix, "file")
    chunks, requests = await run_in_threadpool(chunk_requests, wave, language, translate_to)
    loop = asyncio.get_running_loop()
    options = {"sampling": sampling}
    jobs = [None if m is None else Job(m, options, loop) for m in requests]
    try:
        for job in jobs:
            if job is not None:
                await accepted(driver, job, request)
        outcomes = await asyncio.gather(
            *(collect(driver, job, request) for job in jobs if job is not None)
        )
    except BaseException:
        for job in jobs:
            if job is not None:
                driver.cancel(job)
        raise
    answers = iter(outcomes)
    texts = ["" if job is None else next(answers).text.strip() for job in jobs]
    transcript = assemble_transcript(
        name, len(wave) / SAMPLE_RATE, chunks, texts, language, translate_to
    )
    if response_format is TranscriptionFormat.json:
        return {"text": transcript.text}
    if response_format is TranscriptionFormat.verbose_json:
        return as_json(transcript)
    format = (
        Format.txt if response_format is TranscriptionFormat.text else Format(response_format.value)
    )
    return PlainTextResponse(render(transcript, format))
